"""Loading of the compiled extension `svdfuse._C`, and the Python halves of the ops it defines.

`svdfuse._C` defines `torch.ops.svdfuse.*` and their CPU/CUDA kernels in C++. This module adds what
tracing and training need on top: a fake (meta) impl for each op, so that FakeTensor, torch.compile
and torch.export see output shapes without running a kernel, and its autograd formula.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import Tensor

from svdfuse.reference import compute_dtype, task_ids, task_sigma

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


def _lowrank_matmul_setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, U, S, V, base, _, task = inputs
    ctx.save_for_backward(x, U, S, V, base, task)


def _lowrank_matmul_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    # In the forward's accumulation dtype, like the kernels, and cast once per gradient. With a
    # per-row σ, S's gradient sums each row's contribution into the row of S that its task id picked;
    # task itself is an index and gets none.
    x, U, S, V, base, task = ctx.saved_tensors
    need_x, need_U, need_S, need_V, need_base, need_bias = ctx.needs_input_grad[:6]
    acc = compute_dtype(x.dtype)
    # rows counted, not reshape(-1, ...): -1 is ambiguous for 0 elements (n = 0 or m = 0).
    rows = x.shape[:-1].numel()
    x2 = x.reshape(rows, V.shape[0]).to(acc)
    g2 = grad.reshape(rows, U.shape[0]).to(acc)
    U_, V_ = U.to(acc), V.to(acc)
    sigma = task_sigma(S.to(acc), task)  # (rows, K), or (1, K) for one σ
    gU = g2 @ U_  # gradient with respect to (x V) ⊙ σ
    t = x2 @ V_ if need_U or need_S else None
    grad_x = grad_U = grad_S = grad_V = grad_base = grad_bias = None
    if need_x:
        gx = (gU * sigma) @ V_.T
        if base is not None:
            gx = gx + g2 @ base.to(acc)
        grad_x = gx.to(x.dtype).reshape(x.shape)
    if need_U:
        grad_U = (g2.T @ (t * sigma)).to(U.dtype)
    if need_S:
        if task is None:
            grad_S = (gU * t).sum(0).to(S.dtype)
        else:
            # A row with a bad id adds NaN to the row its clamped id names, as its output row is NaN.
            ids, valid = task_ids(task, S.shape[0])
            per_row = (gU * t).masked_fill(~valid[:, None], float("nan"))
            grad_S = torch.zeros_like(S, dtype=acc).index_add_(0, ids, per_row).to(S.dtype)
    if need_V:
        grad_V = (x2.T @ (gU * sigma)).to(V.dtype)
    if need_base:
        grad_base = (g2.T @ x2).to(base.dtype)
    if need_bias:
        grad_bias = g2.sum(0).to(x.dtype)
    return grad_x, grad_U, grad_S, grad_V, grad_base, grad_bias, None


_LOWRANK_MATMUL_KERNELS: dict[str, Callable] = _lowrank_matmul_kernels() if _LOAD_ERROR is None else {}

if _LOAD_ERROR is None:
    # The registrations belong to this library object: re-executing the module (importlib.reload)
    # replaces them when the old object is released, instead of failing on a duplicate.
    _LIB = torch.library.Library("svdfuse", "FRAGMENT")
    torch.library.register_fake("svdfuse::lowrank_matmul", _lowrank_matmul_fake, lib=_LIB)
    torch.library.register_autograd(
        "svdfuse::lowrank_matmul",
        _lowrank_matmul_backward,
        setup_context=_lowrank_matmul_setup_context,
        lib=_LIB,
    )
