"""`torch.ops.svdfuse.*`: the schemas, their Python kernels and checks, and the compiled extension.

Each op is defined here, once, whether or not the compiled extension `svdfuse._C` loads:

- the schema, with `torch.library`;
- the default kernel (CompositeExplicitAutograd): the pure-torch reference of `svdfuse.reference`
  behind the op's checks. It serves every device the extension has no kernel for, and every device
  when the extension is missing (`SVDFUSE_NO_EXT=1` installs), which `warn_if_missing` reports once;
- the fake impl, the same checks and an empty output, for FakeTensor, torch.compile and export;
- the autograd: the extension registers its C++ formula at the Autograd key; without it, the same
  formula in Python (`reference.lowrank_matmul_backward`) through `torch.library.register_autograd`.

The extension registers the compiled CPU and CUDA kernels (csrc/), which run the C++ twin of
`check_lowrank_matmul` (csrc/lowrank_matmul.h) with the same messages. So every kernel checks its
inputs once, and `svdfuse.ops.lowrank_matmul` calls the op without checking.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from svdfuse import reference

# Loaded at import, quietly (it is cheap and initializes no CUDA), so that the op's kernels are
# complete for torch.compile from the start; a missing extension is reported at the first call.
try:
    import svdfuse._C  # noqa: F401  (loading it registers the compiled kernels of torch.ops.svdfuse.*)

    LOAD_ERROR: ImportError | None = None
except ImportError as err:
    LOAD_ERROR = err

__all__ = ["LOAD_ERROR", "warn_if_missing", "check_lowrank_matmul", "first_bad_task"]

LOWRANK_MATMUL_SCHEMA = (
    "lowrank_matmul(Tensor x, Tensor U, Tensor S, Tensor V, Tensor? base, Tensor? bias, Tensor? task=None) -> Tensor"
)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # what the kernels are written for


@functools.cache
def warn_if_missing() -> None:
    """Warn, once per process, that the extension did not load and the reference serves every call."""
    # stacklevel 3: the code that called the svdfuse.ops function (functools.cache adds no frame).
    warnings.warn(
        f"svdfuse: the compiled extension svdfuse._C is not available ({LOAD_ERROR}); using the pure-torch "
        "reference ops. Reinstall with `pip install --no-build-isolation -e .` to build it.",
        stacklevel=3,
    )


# The checks of csrc/lowrank_matmul.h, message for message: sizes print as lists ([3, 7]), dtypes
# and devices as Python prints them.


def _check_shape(t: Tensor, name: str, dims: str, expected: list[int]) -> None:
    if list(t.shape) != expected:
        raise ValueError(f"lowrank_matmul: {name} must have shape {dims} = {expected}, found {list(t.shape)}")


def _check_like_x(t: Tensor, name: str, x: Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"lowrank_matmul: {name} must have x's dtype {x.dtype}, found {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"lowrank_matmul: {name} must be on x's device {x.device}, found {t.device}")


def _check_task(S: Tensor, task: Tensor | None, x: Tensor) -> None:
    lead = list(x.shape[:-1])
    if S.dim() == 1:
        if task is not None:
            raise ValueError(
                "lowrank_matmul: task must be None when S has shape (K,) (one S for every row), found a task of "
                f"shape {list(task.shape)}"
            )
        return
    if S.shape[0] < 1:
        raise ValueError(f"lowrank_matmul: S must have at least one task row, found shape {list(S.shape)}")
    if task is None:
        raise ValueError(
            f"lowrank_matmul: task is required when S has shape (num_tasks, K) = {list(S.shape)}: an int64 tensor "
            f"of shape x.shape[:-1] = {lead}"
        )
    if task.dtype != torch.int64:
        raise TypeError(f"lowrank_matmul: task must have dtype torch.int64, found {task.dtype}")
    _check_shape(task, "task", "x.shape[:-1]", lead)
    if task.device != x.device:
        raise ValueError(f"lowrank_matmul: task must be on x's device {x.device}, found {task.device}")


def check_lowrank_matmul(
    x: Tensor, U: Tensor, S: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor | None
) -> None:
    """The op's checks of shapes, dtypes and devices (not of task ids' range: that reads them).

    x: (..., n), U: (m, K), S: (K,) or (num_tasks, K), V: (n, K), base: (m, n), bias: (m,), task:
    x.shape[:-1]; m and K come from U, n from V. Raises ValueError (shapes, devices) or TypeError
    (dtypes) naming the tensor, what was expected and what was found.
    """
    if U.dim() != 2:
        raise ValueError(f"lowrank_matmul: U must have shape (m, K), found {list(U.shape)}")
    if V.dim() != 2:
        raise ValueError(f"lowrank_matmul: V must have shape (n, K), found {list(V.shape)}")
    (m, K), n = U.shape, V.shape[0]
    if S.dim() not in (1, 2):
        raise ValueError(f"lowrank_matmul: S must have shape (K,) or (num_tasks, K), found {list(S.shape)}")
    if S.dim() == 2:
        _check_shape(S, "S", "(num_tasks, K)", [S.shape[0], K])
    else:
        _check_shape(S, "S", "(K,)", [K])
    _check_shape(V, "V", "(n, K)", [n, K])
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"lowrank_matmul: x must have shape (..., n) with n = V.size(0) = {n}, found {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"lowrank_matmul: x must be torch.float32, torch.float64, torch.float16 or torch.bfloat16, found {x.dtype}"
        )
    for name, t in (("U", U), ("S", S), ("V", V)):
        _check_like_x(t, name, x)
    if base is not None:
        _check_shape(base, "base", "(m, n)", [m, n])
        _check_like_x(base, "base", x)
    if bias is not None:
        _check_shape(bias, "bias", "(m,)", [m])
        _check_like_x(bias, "bias", x)
    _check_task(S, task, x)


def first_bad_task(task: Tensor, num_tasks: int) -> tuple[int, tuple[int, ...]] | None:
    """The first id of `task` outside [0, num_tasks) and its index, or None; reads the ids (a
    device-to-host sync on a GPU)."""
    bad = ((task < 0) | (task >= num_tasks)).nonzero()
    if not len(bad):
        return None
    where = tuple(bad[0].tolist())
    return int(task[where]), where


def _lowrank_matmul_default(
    x: Tensor, U: Tensor, S: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor | None = None
) -> Tensor:
    check_lowrank_matmul(x, U, S, V, base, bias, task)
    # Ids are range-checked where reading them is free, as the CPU kernel does; elsewhere the
    # reference gives a bad id's row NaN, as the CUDA kernels do.
    if task is not None and task.device.type == "cpu":
        bad = first_bad_task(task, S.shape[0])
        if bad is not None:
            raise ValueError(
                f"lowrank_matmul: task ids must be in [0, num_tasks) = [0, {S.shape[0]}) (the rows of S), found "
                f"{bad[0]} at {list(bad[1])}"
            )
    return reference.lowrank_matmul(x, U, S, V, base, bias, task)


def _lowrank_matmul_fake(
    x: Tensor, U: Tensor, S: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor | None = None
) -> Tensor:
    check_lowrank_matmul(x, U, S, V, base, bias, task)
    return x.new_empty((*x.shape[:-1], U.shape[0]))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, U, S, V, base, bias, task = inputs
    ctx.save_for_backward(x, U, S, V, base, task)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, U, S, V, base, task = ctx.saved_tensors
    return (*reference.lowrank_matmul_backward(grad, x, U, S, V, base, task, ctx.needs_input_grad[:6]), None)


# The registrations belong to this library object: re-executing the module (importlib.reload)
# releases the old object, and its registrations with it, before the new one defines the op again.
_LIB = torch.library.Library("svdfuse", "FRAGMENT")
_LIB.define(LOWRANK_MATMUL_SCHEMA)
_LIB.impl("lowrank_matmul", _lowrank_matmul_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::lowrank_matmul", _lowrank_matmul_fake, lib=_LIB)
if LOAD_ERROR is not None:
    torch.library.register_autograd("svdfuse::lowrank_matmul", _backward, setup_context=_setup_context, lib=_LIB)


# -- core_matmul: the full-core serving of a bundle (svdfuse.bundle) ---------------------------

CORE_MATMUL_SCHEMA = "core_matmul(Tensor x, Tensor U, Tensor C, Tensor V, Tensor? base, Tensor? bias, Tensor task) -> Tensor"


def check_core_matmul(x: Tensor, U: Tensor, C: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor) -> None:
    """The checks of `core_matmul` (not of task ids' range): x (..., n), U (m, K), C (num_tasks, K, K),
    V (n, K), base (m, n), bias (m,), task int64 x.shape[:-1]; ValueError (shapes, devices) or
    TypeError (dtypes) naming the tensor, what was expected and what was found."""
    if U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"core_matmul: U must have shape (m, K) and V (n, K), found {list(U.shape)} and {list(V.shape)}")
    (m, K), n = U.shape, V.shape[0]
    if V.shape[1] != K:
        raise ValueError(f"core_matmul: V must have shape (n, K) = [{n}, {K}], found {list(V.shape)}")
    if C.dim() != 3 or C.shape[1:] != (K, K) or C.shape[0] < 1:
        raise ValueError(f"core_matmul: C must have shape (num_tasks, K, K) with K = {K}, found {list(C.shape)}")
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"core_matmul: x must have shape (..., n) with n = V.size(0) = {n}, found {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"core_matmul: x must be torch.float32, torch.float64, torch.float16 or torch.bfloat16, found {x.dtype}")
    for name, t, shape in (("U", U, None), ("C", C, None), ("V", V, None), ("base", base, [m, n]), ("bias", bias, [m])):
        if t is None:
            continue
        if shape is not None and list(t.shape) != shape:
            raise ValueError(f"core_matmul: {name} must have shape {shape}, found {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"core_matmul: {name} must have x's dtype {x.dtype}, found {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"core_matmul: {name} must be on x's device {x.device}, found {t.device}")
    if task.dtype != torch.int64:
        raise TypeError(f"core_matmul: task must have dtype torch.int64, found {task.dtype}")
    if list(task.shape) != list(x.shape[:-1]) or task.device != x.device:
        raise ValueError(f"core_matmul: task must have shape x.shape[:-1] = {list(x.shape[:-1])} on {x.device}, found {list(task.shape)} on {task.device}")


def _check_core_ids(task: Tensor, num_tasks: int) -> None:
    bad = first_bad_task(task, num_tasks)
    if bad is not None:
        raise ValueError(f"core_matmul: task ids must be in [0, num_tasks) = [0, {num_tasks}) (the cores of C), found {bad[0]} at {list(bad[1])}")


def _core_matmul_default(x: Tensor, U: Tensor, C: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor) -> Tensor:
    check_core_matmul(x, U, C, V, base, bias, task)
    if task.device.type == "cpu":
        _check_core_ids(task, C.shape[0])
    return reference.core_matmul(x, U, C, V, base, bias, task)


def _core_matmul_cpu(x: Tensor, U: Tensor, C: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor) -> Tensor:
    from svdfuse import cpu

    check_core_matmul(x, U, C, V, base, bias, task)
    _check_core_ids(task, C.shape[0])
    return cpu.core_matmul(x, U, C, V, base, bias, task)


def _core_matmul_fake(x: Tensor, U: Tensor, C: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor) -> Tensor:
    check_core_matmul(x, U, C, V, base, bias, task)
    return x.new_empty((*x.shape[:-1], U.shape[0]))


_LIB.define(CORE_MATMUL_SCHEMA)
_LIB.impl("core_matmul", _core_matmul_default, "CompositeExplicitAutograd")
_LIB.impl("core_matmul", _core_matmul_cpu, "CPU")
torch.library.register_fake("svdfuse::core_matmul", _core_matmul_fake, lib=_LIB)
