"""Merge methods as plain typed functions, registered by name with the paper they implement.

A method sees one group of G same-shape matrices at a time, `W0: (G, m, n)` and the sources'
`W: (G, T, m, n)`, and returns the merged task matrices either as SVD factors (`Factors`) or dense
(`Tensor (G, m, n)`). Tensors that are not merged as matrices go through the method's elementwise
rule (`tensors`), which by default is the mean of the task vectors. The merge driver
(`svdfuse.merge`) does the reading, the checks and the bookkeeping; methods only compute.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["Factors", "Method", "METHODS", "get_method", "register", "mean_delta"]


class Factors(NamedTuple):
    """Merged task matrices `U diag(S) Vᵀ` of a group, an SVD (orthonormal U, V; S descending).

    U: (G, m, r), S: (G, r), V: (G, n, r); counts: (G, T) components taken from each source, if
    the method selects components.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    counts: Tensor | None = None


def mean_delta(W0: Tensor, W: Tensor) -> Tensor:
    """Mean task vector: W0 (G, *s), W (G, T, *s) -> (G, *s)."""
    return W.mean(1) - W0


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    Attributes:
        name: what users pass as `method=`.
        reference_url: the paper it implements.
        matrices: `(W0, W, *, k, svd, keys, **params) -> Factors | Tensor` for a group of
            matrices; it declares only the context arguments it uses (`svd` is an
            `ops.SVDOptions`, whose seed also seeds random methods).
        tensors: `(W0, W, *, svd, keys, **params) -> Tensor` merged task vector of other tensors.
        needs_k: whether `k` is required (it is the method's own rank, as in AXIS).
        upcast: whether the driver hands it fp32 (fp64) tensors; False for methods whose ops
            read the storage dtype themselves.
    """

    name: str
    reference_url: str
    matrices: Callable[..., Factors | Tensor]
    tensors: Callable[..., Tensor]
    needs_k: bool
    upcast: bool

    def params(self) -> dict[str, Any]:
        """The method's own parameters and their defaults."""
        common = {"k", "svd", "keys"}
        out = {}
        for fn in (self.matrices, self.tensors):
            for name, p in inspect.signature(fn).parameters.items():
                if p.kind is p.KEYWORD_ONLY and name not in common:
                    out[name] = p.default
        return out

    def check_params(self, given: dict[str, Any]) -> None:
        unknown = sorted(set(given) - set(self.params()))
        if unknown:
            accepted = ", ".join(f"{k}={v!r}" for k, v in self.params().items()) or "none"
            raise TypeError(f"method {self.name!r} has no parameter {unknown[0]!r}; its parameters: {accepted}")

    def bind(self, fn: Callable, params: dict[str, Any]) -> dict[str, Any]:
        """The subset of `params` that `fn` takes."""
        names = inspect.signature(fn).parameters
        return {k: v for k, v in params.items() if k in names}


METHODS: dict[str, Method] = {}


def register(
    name: str,
    *,
    reference_url: str,
    tensors: Callable[..., Tensor] | None = None,
    needs_k: bool = False,
    upcast: bool = True,
) -> Callable[[Callable], Callable]:
    """Register `fn` as the matrix rule of method `name`; `tensors` (default: the mean task
    vector) merges everything else. A dense elementwise method passes the same function twice."""

    def decorate(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        METHODS[name] = Method(name, reference_url, fn, tensors or mean_delta, needs_k, upcast)
        return fn

    return decorate


def get_method(name: str) -> Method:
    """The registered method `name`; the error lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Registration happens on import; these modules import the names above.
from svdfuse.methods import axis, elementwise, spectral  # noqa: E402, F401
