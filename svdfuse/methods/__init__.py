"""Merge methods as plain typed functions, registered by name with the paper they implement.

`registry` defines what a method is (`Kind`, `Method`, `register`); `axis`, `elementwise` and
`spectral` register the methods; `trim` computes TIES's exact per-tensor magnitude thresholds.
"""

from svdfuse.methods import axis, elementwise, spectral  # noqa: F401  (importing registers them)
from svdfuse.methods.registry import METHODS, Block, Components, Factors, Kind, Method, check_finite_param, check_weights, get_method, register

__all__ = ["Kind", "Factors", "Components", "Block", "Method", "METHODS", "get_method", "register", "check_finite_param", "check_weights"]
