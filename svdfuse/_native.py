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

__all__ = ["LOAD_ERROR", "warn_if_missing", "check_lowrank_matmul", "first_bad_task", "check_merge_block", "check_ties_block", "check_trim_bracket", "check_trim_sample", "check_trim_select", "check_gram"]

LOWRANK_MATMUL_SCHEMA = (
    "lowrank_matmul(Tensor x, Tensor U, Tensor S, Tensor V, Tensor? base, Tensor? bias, Tensor? task=None) -> Tensor"
)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # what the kernels are written for
TRIM_BRACKET_SCHEMA = "trim_bracket(Tensor[] sources, Tensor base, Tensor lo, Tensor hi, bool same_is_zero) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
TRIM_SAMPLE_SCHEMA = "trim_sample(Tensor[] sources, Tensor base, int first, int stride, bool same_is_zero) -> Tensor"
TRIM_SELECT_SCHEMA = "trim_select(Tensor values, Tensor counts, Tensor rank) -> (Tensor, Tensor, Tensor, Tensor)"
TIES_BLOCK_SCHEMA = (
    "ties_block(Tensor[] sources, Tensor base, Tensor? weights, Tensor threshold, Tensor cutoff, int start, bool keep_none, "
    "float scale, bool mean, bool positive, bool same_is_zero, bool add_base, ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor)"
)
MERGE_BLOCK_SCHEMA = (
    "merge_block(Tensor[] sources, Tensor base, Tensor weights, float scale, float divisor, Tensor? seeds, int start, "
    "int drop, bool same_is_zero, bool add_base, ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor)"
)


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


def check_merge_block(
    sources: list[Tensor], base: Tensor, weights: Tensor, seeds: Tensor | None, start: int, drop: int, dtype: torch.dtype,
    op: str = "merge_block",
) -> None:
    """The checks of `merge_block` (svdfuse.ops.merge_block documents the arguments): ValueError for
    shapes, devices and ranges, TypeError for dtypes, naming the tensor, expected and found."""
    if base.dim() != 1:
        raise ValueError(f"{op}: base must have shape (N,), found {list(base.shape)}")
    T, N = len(sources), base.shape[0]
    if base.dtype not in _DTYPES:
        raise TypeError(f"{op}: base must be float32, float64, float16 or bfloat16, found {base.dtype}")
    for i, x in enumerate(sources):
        if list(x.shape) != [N] or not x.is_contiguous():
            raise ValueError(f"{op}: source {i} must be contiguous of shape (N,) = {[N]} (the base's), found {list(x.shape)}")
        if x.dtype != base.dtype:
            raise TypeError(f"{op}: source {i} must have the base's dtype {base.dtype}, found {x.dtype}")
        if x.device != base.device:
            raise ValueError(f"{op}: source {i} must be on the base's device {base.device}, found {x.device}")
    acc = reference.compute_dtype(base.dtype)
    if list(weights.shape) != [T] or weights.dtype != acc:
        raise TypeError(f"{op}: weights must be {acc} of shape (T,) = {[T]}, found {weights.dtype} {list(weights.shape)}")
    if weights.device != base.device:
        raise ValueError(f"{op}: weights must be on the base's device {base.device}, found {weights.device}")
    if dtype not in _DTYPES or (dtype == torch.float64) != (acc == torch.float64):
        raise TypeError(f"{op}: dtype must be a float dtype of the sources' precision class, found {dtype} for {base.dtype}")
    if start < 0 or not 0 <= drop <= 1 << 24:
        raise ValueError(f"{op}: start must be >= 0 and drop in [0, 2^24], found {start} and {drop}")
    if seeds is not None:
        chunks = -(-(start + N) // reference.DARE_CHUNK) - start // reference.DARE_CHUNK
        if seeds.dtype != torch.int64 or list(seeds.shape) != [T, chunks] or seeds.device.type != "cpu":
            raise ValueError(
                f"{op}: seeds must be int64 (T, chunks) = {[T, chunks]} on the CPU, found {seeds.dtype} "
                f"{list(seeds.shape)} on {seeds.device}"
            )


def _merge_block_default(
    sources: list[Tensor], base: Tensor, weights: Tensor, scale: float, divisor: float, seeds: Tensor | None, start: int,
    drop: int, same_is_zero: bool, add_base: bool, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_merge_block(sources, base, weights, seeds, start, drop, dtype)
    return reference.merge_block(sources, base, weights, scale, divisor, seeds, start, drop, same_is_zero, add_base, dtype)


def _merge_block_fake(
    sources: list[Tensor], base: Tensor, weights: Tensor, scale: float, divisor: float, seeds: Tensor | None, start: int,
    drop: int, same_is_zero: bool, add_base: bool, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_merge_block(sources, base, weights, seeds, start, drop, dtype)
    T, N = len(sources), base.shape[0]
    flags = base.new_empty((T,), dtype=torch.bool), base.new_empty((T + 1,), dtype=torch.bool)
    return base.new_empty((N,), dtype=dtype), *flags, base.new_empty((), dtype=torch.int64)


def check_ties_block(
    sources: list[Tensor], base: Tensor, weights: Tensor | None, threshold: Tensor, cutoff: Tensor, start: int, dtype: torch.dtype
) -> None:
    """The checks of `ties_block` (svdfuse.ops.ties_block documents the arguments), as `check_merge_block`'s."""
    T = len(sources)
    check_merge_block(sources, base, torch.ones(T, dtype=reference.compute_dtype(base.dtype), device=base.device) if weights is None else weights,
                      None, start, 0, dtype, "ties_block")  # fmt: skip
    acc = reference.compute_dtype(base.dtype)
    if list(threshold.shape) != [T] or threshold.dtype != acc:
        raise TypeError(f"ties_block: threshold must be {acc} of shape (T,) = {[T]}, found {threshold.dtype} {list(threshold.shape)}")
    if list(cutoff.shape) != [T] or cutoff.dtype != torch.int64:
        raise TypeError(f"ties_block: cutoff must be torch.int64 of shape (T,) = {[T]}, found {cutoff.dtype} {list(cutoff.shape)}")
    for name, t in (("threshold", threshold), ("cutoff", cutoff)):
        if t.device != base.device:
            raise ValueError(f"ties_block: {name} must be on the base's device {base.device}, found {t.device}")


def _ties_block_default(
    sources: list[Tensor], base: Tensor, weights: Tensor | None, threshold: Tensor, cutoff: Tensor, start: int,
    keep_none: bool, scale: float, mean: bool, positive: bool, same_is_zero: bool, add_base: bool, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_ties_block(sources, base, weights, threshold, cutoff, start, dtype)
    return reference.ties_block(sources, base, weights, threshold, cutoff, start, keep_none, scale, mean, positive, same_is_zero, add_base, dtype)


def _ties_block_fake(
    sources: list[Tensor], base: Tensor, weights: Tensor | None, threshold: Tensor, cutoff: Tensor, start: int,
    keep_none: bool, scale: float, mean: bool, positive: bool, same_is_zero: bool, add_base: bool, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_ties_block(sources, base, weights, threshold, cutoff, start, dtype)
    T, N = len(sources), base.shape[0]
    flags = base.new_empty((T,), dtype=torch.bool), base.new_empty((T + 1,), dtype=torch.bool)
    return base.new_empty((N,), dtype=dtype), *flags, base.new_empty((), dtype=torch.int64)


def check_trim_bracket(sources: list[Tensor], base: Tensor, lo: Tensor, hi: Tensor) -> None:
    """The checks of `trim_bracket` (svdfuse.ops.trim_bracket documents the arguments)."""
    check_merge_block(sources, base, torch.ones(len(sources), dtype=torch.float32, device=base.device), None, 0, 0,
                      torch.float32, "trim_bracket")  # fmt: skip
    T = len(sources)
    for name, t in (("lo", lo), ("hi", hi)):
        if list(t.shape) != [T] or t.dtype != torch.float32 or t.device != base.device:
            raise TypeError(f"trim_bracket: {name} must be torch.float32 of shape (T,) = {[T]} on {base.device}, found {t.dtype} {list(t.shape)} on {t.device}")


def _trim_bracket_default(sources: list[Tensor], base: Tensor, lo: Tensor, hi: Tensor, same_is_zero: bool) -> tuple[Tensor, ...]:
    check_trim_bracket(sources, base, lo, hi)
    return reference.trim_bracket(sources, base, lo, hi, same_is_zero)


def _trim_bracket_fake(sources: list[Tensor], base: Tensor, lo: Tensor, hi: Tensor, same_is_zero: bool) -> tuple[Tensor, ...]:
    check_trim_bracket(sources, base, lo, hi)
    held = torch.library.get_ctx().new_dynamic_size()
    counts = lo.new_empty(lo.shape, dtype=torch.int64), lo.new_empty(lo.shape, dtype=torch.int64)
    units = -(-base.shape[0] // reference.DARE_CHUNK)
    bounds = lo.new_empty((len(sources), units, 2), dtype=torch.int64)
    return *counts, lo.new_empty((held,)), lo.new_empty((held,), dtype=torch.int64), bounds


def check_trim_sample(sources: list[Tensor], base: Tensor, first: int, stride: int) -> None:
    """The checks of `trim_sample` (svdfuse.ops.trim_sample documents the arguments)."""
    check_merge_block(sources, base, torch.ones(len(sources), dtype=torch.float32, device=base.device), None, 0, 0,
                      torch.float32, "trim_sample")  # fmt: skip
    if first < 0 or stride < 1:
        raise ValueError(f"trim_sample: first must be >= 0 and stride >= 1, found {first} and {stride}")


def _trim_sample_default(sources: list[Tensor], base: Tensor, first: int, stride: int, same_is_zero: bool) -> Tensor:
    check_trim_sample(sources, base, first, stride)
    return reference.trim_sample(sources, base, first, stride, same_is_zero)


def _trim_sample_fake(sources: list[Tensor], base: Tensor, first: int, stride: int, same_is_zero: bool) -> Tensor:
    check_trim_sample(sources, base, first, stride)
    return base.new_empty((len(sources), len(range(first, base.shape[0], stride))), dtype=torch.float32)


def check_trim_select(values: Tensor, counts: Tensor, rank: Tensor) -> None:
    """The checks of `trim_select` (svdfuse.ops.trim_select documents the arguments)."""
    if values.dim() != 1 or values.dtype != torch.float32:
        raise TypeError(f"trim_select: values must be torch.float32 of shape (M,), found {values.dtype} {list(values.shape)}")
    for name, t in (("counts", counts), ("rank", rank)):
        if t.dim() != 1 or t.dtype != torch.int64 or t.shape != counts.shape or t.device != values.device:
            raise TypeError(f"trim_select: {name} must be torch.int64 of shape (T,) = {list(counts.shape)} on {values.device}, found {t.dtype} {list(t.shape)}")


def _trim_select_default(values: Tensor, counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_trim_select(values, counts, rank)
    return reference.trim_select(values, counts, rank)


def _trim_select_fake(values: Tensor, counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_trim_select(values, counts, rank)
    return values.new_empty(counts.shape), *(counts.new_empty(counts.shape) for _ in range(3))


# The registrations belong to this library object: re-executing the module (importlib.reload)
# releases the old object, and its registrations with it, before the new one defines the op again.
_LIB = torch.library.Library("svdfuse", "FRAGMENT")
_LIB.define(LOWRANK_MATMUL_SCHEMA)
_LIB.impl("lowrank_matmul", _lowrank_matmul_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::lowrank_matmul", _lowrank_matmul_fake, lib=_LIB)
_LIB.define(MERGE_BLOCK_SCHEMA)
_LIB.define(TIES_BLOCK_SCHEMA)
_LIB.define(TRIM_BRACKET_SCHEMA)
_LIB.impl("trim_bracket", _trim_bracket_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::trim_bracket", _trim_bracket_fake, lib=_LIB)
_LIB.define(TRIM_SAMPLE_SCHEMA)
_LIB.impl("trim_sample", _trim_sample_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::trim_sample", _trim_sample_fake, lib=_LIB)
_LIB.define(TRIM_SELECT_SCHEMA)
_LIB.impl("trim_select", _trim_select_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::trim_select", _trim_select_fake, lib=_LIB)
_LIB.impl("ties_block", _ties_block_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::ties_block", _ties_block_fake, lib=_LIB)
_LIB.impl("merge_block", _merge_block_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::merge_block", _merge_block_fake, lib=_LIB)
if LOAD_ERROR is not None:
    torch.library.register_autograd("svdfuse::lowrank_matmul", _backward, setup_context=_setup_context, lib=_LIB)


# -- gram: the float64 Gram matrices of thin factors (svdfuse.factored) ----------------------

GRAM_SCHEMA = "gram(Tensor x, bool left) -> Tensor"


def check_gram(x: Tensor) -> None:
    """The checks of `gram`: x (..., a, b), a floating dtype the kernels are written for."""
    if x.dim() < 2:
        raise ValueError(f"gram: x must have shape (..., a, b), found {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"gram: x must be torch.float32, torch.float64, torch.float16 or torch.bfloat16, found {x.dtype}")


def _gram_default(x: Tensor, left: bool) -> Tensor:
    check_gram(x)
    return reference.gram(x, left)


def _gram_fake(x: Tensor, left: bool) -> Tensor:
    check_gram(x)
    r = x.shape[-1] if left else x.shape[-2]
    return x.new_empty((*x.shape[:-2], r, r), dtype=torch.float64)


_LIB.define(GRAM_SCHEMA)
_LIB.impl("gram", _gram_default, "CompositeExplicitAutograd")
torch.library.register_fake("svdfuse::gram", _gram_fake, lib=_LIB)


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
