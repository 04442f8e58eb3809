"""Triton kernels behind `svdfuse.ops`, imported only when an op runs them (never at `import svdfuse`).

Each module holds one kernel family with its launcher; its oracle is the function of the same name
in `svdfuse.reference` (the Jacobi `small_svd`'s is `torch.linalg.svd`).
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def available() -> bool:
    """Whether Triton is installed, checked without importing it."""
    return importlib.util.find_spec("triton") is not None
