"""Loading of the compiled extension `svdfuse._C` and the ops it registers with `torch.library`."""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch


@functools.cache
def _loaded() -> bool:
    try:
        import svdfuse._C  # noqa: F401  (registers torch.ops.svdfuse.*)
    except ImportError as err:
        warnings.warn(
            f"svdfuse: the compiled extension svdfuse._C is not available ({err}); using the pure-torch "
            "reference ops. Reinstall with `pip install --no-build-isolation -e .` to build it.",
            stacklevel=3,
        )
        return False
    return True


def lowrank_matmul_op(device: torch.device) -> Callable | None:
    """`torch.ops.svdfuse.lowrank_matmul` if the extension has a kernel for `device`, else None."""
    if not _loaded():
        return None
    op = torch.ops.svdfuse.lowrank_matmul.default
    key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
    return op if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key) else None
