"""`merge_block` and `ties_block` on CUDA: an element-wise merge of a block and its checks, one
Triton launch each.

Each program takes BLOCK entries of the block, streams the T sources through them, adds the
(weighted, for TIES trimmed) task vectors in source order in fp32, divides, scales, adds the base
back and stores in the output dtype. TIES reads its sources twice in the program: once to elect
each entry's sign, once to combine the values that agree (the second read comes from the cache the
first filled). Flags reach the block's by atomics: per source "differs from the base" and "has a
nonzero", and the first non-finite output. `reference.merge_block` and `reference.ties_block` are
the oracles; DARE's masks (CPU generators) stay with the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _store(out, offs, inside, v, x0, bad, N, ADD_BASE: tl.constexpr):
    """The merged task vector v (plus the base x0) stored in the output's dtype; the first
    non-finite stored value's offset reported to `bad`."""
    if ADD_BASE:
        v += x0
    value = v.to(out.dtype.element_ty)
    tl.store(out + offs, value, mask=inside)
    check = value.to(tl.float32)
    tl.atomic_min(bad, tl.min(tl.where(inside & ((check - check) != 0.0), offs, N), 0))  # NaN or ±inf


@triton.jit
def _merge_block_kernel(X, stride, X0, weights, out, flags, bad, T, N, scale, divisor, SAME_IS_ZERO: tl.constexpr,
                        ADD_BASE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # flags: int32 (2T + 1,): [0, T) differs, [T, 2T) source nonzero, 2T base nonzero; bad: int64 (1,), N if none.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x0 = tl.load(X0 + offs, mask=inside, other=0.0).to(tl.float32)
    tl.atomic_max(flags + 2 * T, tl.max(((x0 != 0.0) & inside).to(tl.int32), 0))
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # +0: torch's sum starts from it
    for i in range(T):
        x = tl.load(X + i * stride + offs, mask=inside, other=0.0).to(tl.float32)
        tl.atomic_max(flags + i, tl.max(((x != x0) & inside).to(tl.int32), 0))  # NaN differs
        tl.atomic_max(flags + T + i, tl.max(((x != 0.0) & inside).to(tl.int32), 0))
        d = x - x0
        if SAME_IS_ZERO:
            d = tl.where(x == x0, 0.0, d)  # an infinite entry equal to the base's is no change
        acc += d * tl.load(weights + i)
    v = tl.math.div_rn(acc, divisor) * scale
    _store(out, offs, inside, v, x0, bad, N, ADD_BASE)


@triton.jit
def _trimmed(X, stride, i, offs, inside, x0, threshold, cutoff, weights, start, HAS_WEIGHTS: tl.constexpr,
             KEEP_NONE: tl.constexpr, SAME_IS_ZERO: tl.constexpr):  # fmt: skip
    """Source i's entries at `offs`, and its trimmed (weighted) task vector there, in fp32."""
    x = tl.load(X + i * stride + offs, mask=inside, other=0.0).to(tl.float32)
    d = x - x0
    if SAME_IS_ZERO:
        d = tl.where(x == x0, 0.0, d)
    m = tl.abs(d)
    thr = tl.load(threshold + i)
    keep = (m > thr) | ((m == thr) & (start + offs < tl.load(cutoff + i)))
    if KEEP_NONE:
        keep = keep & False
    t = d * keep.to(tl.float32)  # a multiply: a NaN survives to be reported
    if HAS_WEIGHTS:
        t = t * tl.load(weights + i)
    return x, t


@triton.jit
def _ties_block_kernel(X, stride, X0, weights, threshold, cutoff, out, flags, bad, T, N, start, scale,
                       HAS_WEIGHTS: tl.constexpr, KEEP_NONE: tl.constexpr, MEAN: tl.constexpr, POSITIVE: tl.constexpr,
                       SAME_IS_ZERO: tl.constexpr, ADD_BASE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # flags and bad as _merge_block_kernel's; start: the block's first entry's flat index in the trim's scope.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x0 = tl.load(X0 + offs, mask=inside, other=0.0).to(tl.float32)
    tl.atomic_max(flags + 2 * T, tl.max(((x0 != 0.0) & inside).to(tl.int32), 0))
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(T):
        x, t = _trimmed(X, stride, i, offs, inside, x0, threshold, cutoff, weights, start, HAS_WEIGHTS, KEEP_NONE, SAME_IS_ZERO)
        tl.atomic_max(flags + i, tl.max(((x != x0) & inside).to(tl.int32), 0))
        tl.atomic_max(flags + T + i, tl.max(((x != 0.0) & inside).to(tl.int32), 0))
        total += t
    # the elected sign; a NaN sum elects 0, as an exact 0 does; "positive" turns both into +1
    elected = (total > 0.0).to(tl.float32) - (total < 0.0).to(tl.float32)
    if POSITIVE:
        elected = tl.where(elected == 0.0, 1.0, elected)
    agreeing = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(T):
        x, t = _trimmed(X, stride, i, offs, inside, x0, threshold, cutoff, weights, start, HAS_WEIGHTS, KEEP_NONE, SAME_IS_ZERO)
        agree = (t * elected) > 0.0
        agreeing += t * agree.to(tl.float32)
        if HAS_WEIGHTS:
            count += tl.where(agree, tl.load(weights + i), 0.0)
        else:
            count += agree.to(tl.float32)
    v = agreeing
    if MEAN:
        v = tl.math.div_rn(v, tl.where(count == 0.0, 1.0, count))
    v = v * scale
    _store(out, offs, inside, v, x0, bad, N, ADD_BASE)


def _rows(sources: list[Tensor]) -> tuple[Tensor, int]:
    """The sources as (first source, element stride between sources): the buffer they are rows of,
    or a stacked copy where they are not evenly spaced in one."""
    if len(sources) > 1:
        stride = (sources[1].data_ptr() - sources[0].data_ptr()) // sources[0].element_size()
        spaced = stride > 0 and all(s.data_ptr() == sources[0].data_ptr() + i * stride * s.element_size() for i, s in enumerate(sources))
        if not spaced:
            stacked = torch.stack(sources)
            return stacked, stacked.stride(0)
        return sources[0], stride
    return (sources[0], 0) if sources else (torch.empty(0), 0)


def _launch(kernel, sources: list[Tensor], base: Tensor, dtype: torch.dtype, inputs: tuple, scalars: tuple, **constexprs) -> tuple[Tensor, Tensor, Tensor, int]:
    """One launch of an element-wise `kernel(X, stride, X0, *inputs, out, flags, bad, T, N, *scalars,
    **constexprs, BLOCK)` over a block; returns value (N,) `dtype`, differs (T,), zero (T + 1,) and
    the first non-finite index or -1."""
    T, N = len(sources), base.shape[0]
    X, stride = _rows(sources)
    out = torch.empty(N, dtype=dtype, device=base.device)
    flags = torch.zeros(2 * T + 1, dtype=torch.int32, device=base.device)
    bad = torch.full((1,), N, dtype=torch.int64, device=base.device)
    if N:
        kernel[(triton.cdiv(N, _BLOCK),)](X if T else base, stride, base, *inputs, out, flags, bad, T, N, *scalars, **constexprs, BLOCK=_BLOCK)
    first = int(bad)
    return out, flags[:T].bool(), ~flags[T:].bool(), -1 if first == N else first


def merge_block(
    sources: list[Tensor], base: Tensor, weights: Tensor, scale: float, divisor: float, same_is_zero: bool, add_base: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, int]:  # fmt: skip
    """`svdfuse.ops.merge_block` without DARE's masks, inputs checked: T sources (N,) and the base
    (N,) fp32/bf16/fp16, weights (T,) fp32. Returns value (N,) `dtype`, differs (T,), zero (T + 1,)
    and the first non-finite index or -1."""
    return _launch(_merge_block_kernel, sources, base, dtype, (weights,), (float(scale), float(divisor)),
                   SAME_IS_ZERO=same_is_zero, ADD_BASE=add_base)  # fmt: skip


def ties_block(
    sources: list[Tensor], base: Tensor, weights: Tensor | None, threshold: Tensor, cutoff: Tensor, start: int,
    keep_none: bool, scale: float, mean: bool, positive: bool, same_is_zero: bool, add_base: bool, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, int]:  # fmt: skip
    """`svdfuse.ops.ties_block`, inputs checked: T sources (N,) and the base (N,) fp32/bf16/fp16,
    weights (T,) fp32 or None, threshold (T,) fp32, cutoff (T,) int64. Returns as `merge_block`."""
    weights_or_any = threshold if weights is None else weights  # a pointer the kernel never reads without weights
    return _launch(_ties_block_kernel, sources, base, dtype, (weights_or_any, threshold, cutoff), (start, float(scale)),
                   HAS_WEIGHTS=weights is not None, KEEP_NONE=keep_none, MEAN=mean, POSITIVE=positive,
                   SAME_IS_ZERO=same_is_zero, ADD_BASE=add_base)  # fmt: skip
