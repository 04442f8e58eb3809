"""Exact top-magnitude trimming of task vectors over whole tensors, read in row blocks.

TIES keeps, per source and tensor, the floor(density · numel) entries of largest |τ|. A tensor
may be larger than the memory budget, so the threshold is found by a radix select over the bits
of |τ| (non-negative floats order as their bit patterns): one histogram pass per 16 bits of the
value, each over the blocks, each narrowing to the entries that share the bits found so far. Ties
at the threshold go to the entries that come first in row-major order; when there are more equal
entries than places, one more pass finds where the kept ones end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Trim", "exact_trim"]

_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}  # sign bit excluded
_WINDOW = 16


@dataclass(frozen=True)
class Trim:
    """Which entries of each source's task vector survive trimming.

    An entry of source i survives iff |τ| > threshold[i], or |τ| == threshold[i] and its flat
    index in the tensor is < cutoff[i]. threshold: (T,) in τ's dtype; cutoff: (T,) int64.
    `keep_none` marks density 0 (nothing survives).
    """

    threshold: Tensor
    cutoff: Tensor
    keep_none: bool = False

    def mask(self, tau: Tensor, start: int) -> Tensor:
        """Survivors of a block: tau (T, R, *s) whose first entry has flat index `start` -> bool (T, R, *s)."""
        if self.keep_none:
            return torch.zeros_like(tau, dtype=torch.bool)
        a = tau.abs()
        shape = (-1,) + (1,) * (tau.dim() - 1)
        thr = self.threshold.to(tau.device).reshape(shape)
        keep = a > thr
        cut = self.cutoff.to(tau.device)
        if bool((cut < start + tau[0].numel()).any()):  # some source keeps only part of its ties here
            index = torch.arange(start, start + tau[0].numel(), device=tau.device).reshape(tau.shape[1:])
            keep |= (a == thr) & (index < cut.reshape(shape))
        else:
            keep |= a == thr
        return keep


def _bits(tau: Tensor) -> Tensor:
    """|τ| as integers of the same order: fp32 -> int32, fp64 -> int64 (one source at a time, so
    the temporaries stay a fraction of the block)."""
    int_dtype, _ = _BITS[tau.dtype]
    return tau.abs().contiguous().view(int_dtype).flatten()


def exact_trim(blocks: Callable[[], Iterator[tuple[int, Tensor]]], numel: int, sources: int, density: float, dtype: torch.dtype) -> Trim:
    """The `Trim` keeping floor(density · numel) entries of each source's task vector.

    Args:
        blocks: called once per pass; yields (flat index of the block's first entry, τ block
            (T, R, *s)) over the whole tensor in row order.
        numel: entries of the tensor; sources: T; dtype: τ's dtype (fp32 or fp64).
    """
    keep = math.floor(density * numel)
    if keep == 0:
        return Trim(torch.zeros(sources, dtype=dtype), torch.zeros(sources, dtype=torch.int64), keep_none=True)
    if keep >= numel:
        return Trim(torch.zeros(sources, dtype=dtype), torch.full((sources,), numel, dtype=torch.int64))
    int_dtype, nbits = _BITS[dtype]
    prefix = torch.zeros(sources, dtype=torch.int64)  # the top bits of the threshold found so far
    greater = torch.zeros(sources, dtype=torch.int64)  # entries known to lie above the threshold
    shift, equal = nbits, None
    while shift > 0:
        width = min(_WINDOW, shift)
        shift -= width
        hist = torch.zeros((sources, 1 << width), dtype=torch.int64)
        for _, tau in blocks():
            for i in range(sources):
                bits = _bits(tau[i])
                if shift + width < nbits:  # narrowed to the entries that share the bits found so far
                    bits = bits[(bits >> (shift + width)) == int(prefix[i])]
                hist[i] += torch.bincount((bits >> shift) & ((1 << width) - 1), minlength=1 << width).cpu()
        at_least = hist.flip(-1).cumsum(-1).flip(-1)  # entries with digit >= d
        need = keep - greater
        d = (at_least >= need[:, None]).sum(-1) - 1  # the threshold's digit: largest d with enough at or above it
        above = torch.where(d + 1 < at_least.shape[1], at_least.gather(1, (d + 1).clamp(max=at_least.shape[1] - 1)[:, None])[:, 0], 0)
        greater += above
        equal = at_least.gather(1, d[:, None])[:, 0] - above
        prefix = (prefix << width) | d
    threshold = prefix.to(int_dtype).view(dtype)
    need = keep - greater  # how many entries equal to the threshold survive
    cutoff = torch.full((sources,), numel, dtype=torch.int64)
    partial = need < equal
    if bool(partial.any()):
        seen = torch.zeros(sources, dtype=torch.int64)
        for start, tau in blocks():
            for i in partial.nonzero()[:, 0].tolist():
                where = (tau[i].abs().flatten() == threshold[i].item()).nonzero()[:, 0].cpu()
                take = int(need[i] - seen[i])
                if 0 < take <= len(where):
                    cutoff[i] = start + int(where[take - 1]) + 1
                seen[i] += len(where)
    return Trim(threshold, cutoff)
