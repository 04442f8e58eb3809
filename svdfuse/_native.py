"""Loading of the compiled extension `svdfuse._C`, and the Python halves of the ops it defines.

`svdfuse._C` defines `torch.ops.svdfuse.*`, their CPU/CUDA kernels and their autograd in C++. This
module adds what tracing needs on top: a fake (meta) impl for each op, so that FakeTensor,
torch.compile and torch.export see output shapes without running a kernel.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import Tensor

# Loaded at import, quietly (it is cheap and initializes no CUDA), so that the ops are complete for
# torch.compile from the start; a missing extension is reported at the first call instead.
try:
    import svdfuse._C  # noqa: F401  (loading it defines torch.ops.svdfuse.*)

    _LOAD_ERROR: ImportError | None = None
except ImportError as err:
    _LOAD_ERROR = err


@functools.cache
def _available() -> bool:
    # Cached, so that a missing extension warns once per process; stacklevel 4 is the code that
    # called the svdfuse.ops function.
    if _LOAD_ERROR is not None:
        warnings.warn(
            f"svdfuse: the compiled extension svdfuse._C is not available ({_LOAD_ERROR}); using the pure-torch "
            "reference ops. Reinstall with `pip install --no-build-isolation -e .` to build it.",
            stacklevel=4,
        )
    return _LOAD_ERROR is None


def lowrank_matmul_op(device: torch.device) -> Callable | None:
    """`torch.ops.svdfuse.lowrank_matmul` if the extension has a kernel for `device`, else None."""
    # _LOAD_ERROR first: torch.compile traces this function, and a cached one (_available) only with a warning.
    if _LOAD_ERROR is None:
        return _LOWRANK_MATMUL_KERNELS.get(device.type)
    _available()  # warns, once per process
    return None


def _lowrank_matmul_kernels() -> dict[str, Callable]:
    # Looked up once, at import (every SVDLinear forward asks), into a plain dict that torch.compile
    # can read while tracing; the dispatcher's own lookup is opaque to it and would break the graph.
    op = torch.ops.svdfuse.lowrank_matmul.default
    keys = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return {device: op for device, key in keys.items() if has_kernel(op.name(), key)}


def _lowrank_matmul_fake(
    x: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    base: Tensor | None,
    bias: Tensor | None,
    task: Tensor | None = None,
) -> Tensor:
    return x.new_empty((*x.shape[:-1], U.shape[0]))


_LOWRANK_MATMUL_KERNELS: dict[str, Callable] = _lowrank_matmul_kernels() if _LOAD_ERROR is None else {}

if _LOAD_ERROR is None:
    # The registration belongs to this library object: re-executing the module (importlib.reload)
    # replaces it when the old object is released, instead of failing on a duplicate.
    _LIB = torch.library.Library("svdfuse", "FRAGMENT")
    torch.library.register_fake("svdfuse::lowrank_matmul", _lowrank_matmul_fake, lib=_LIB)
