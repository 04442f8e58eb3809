"""Exact top-magnitude trimming of task vectors over whole tensors, read in row blocks.

TIES keeps, per source and tensor, the floor(density · numel) entries of largest |τ|; ties at the
threshold go to the entries first in row-major order. A tensor may be larger than the memory
budget, so the threshold is found over its row blocks, exactly, in two passes:

1. a strided sample of |τ| brackets the threshold: [lo, hi] holds it with overwhelming
   probability (a margin of several binomial standard deviations around the sample quantile);
2. one pass counts the entries above hi and gathers the few inside [lo, hi]; the threshold is the
   right order statistic of those.

If the bracket misses (a sample that is not representative, or so many equal values that the
bracket holds more than a block), a radix select over the bits of |τ| (non-negative floats order as
their bit patterns) finds it instead, one histogram pass per 16 bits. When more entries equal the
threshold than places remain, one more pass finds where the kept ones end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Trim", "exact_trim", "TRIM_SHARE"]

# Share of a merge's memory budget that the values bracketing the thresholds may take (the
# plan gives the pieces of a trimmed method the rest).
TRIM_SHARE = 0.25

Blocks = Callable[[], Iterator[tuple[int, Tensor]]]
_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}  # sign bit excluded
_WINDOW = 16
_SAMPLE = 1 << 14  # largest sample per source: its bracket holds ~4% of a tensor at density 0.2
_MARGIN = 6.0  # binomial standard deviations on each side of the sample quantile


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
        """Survivors of a block: tau (T, *b) whose first entry has flat index `start` -> bool (T, *b)."""
        if self.keep_none:
            return torch.zeros_like(tau, dtype=torch.bool)
        shape = (-1,) + (1,) * (tau.dim() - 1)
        thr = self.threshold.to(tau.device).reshape(shape)
        a = tau.abs()
        cut = self.cutoff.to(tau.device)
        if not bool((cut < start + tau[0].numel()).any()):  # every tie at the threshold survives here
            return a >= thr
        index = torch.arange(start, start + tau[0].numel(), device=tau.device).reshape(tau.shape[1:])
        return (a > thr) | ((a == thr) & (index < cut.reshape(shape)))


def _sample(blocks: Blocks, numel: int, sources: int, size: int) -> Tensor:
    """|τ| at every `stride`-th flat index (an odd stride, so rows and columns are both visited): (T, ≤ size)."""
    stride = max(1, numel // size) | 1
    parts = []
    for start, tau in blocks():
        first = (-start) % stride
        parts.append(torch.stack([tau[i].reshape(-1)[first::stride].abs().float().cpu() for i in range(sources)]))
    return torch.cat(parts, 1)


def _bracketed(blocks: Blocks, numel: int, sources: int, keep: int, limit: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(threshold, entries above it, entries equal to it) per source from a sample's bracket, or
    None where the bracket missed."""
    # The sample and its order statistics take at most a quarter of what the bracket may hold.
    sample = _sample(blocks, numel, sources, min(_SAMPLE, max(1024, limit // (8 * sources))))
    size = sample.shape[1]
    p = keep / numel
    margin = _MARGIN * math.sqrt(size * p * (1 - p)) + 8
    hi_at, lo_at = math.floor(p * size - margin), math.ceil(p * size + margin)  # ranks from the top
    # the (r+1)-th largest is the (size - r)-th smallest
    hi = sample.kthvalue(size - hi_at, dim=1).values if hi_at >= 0 else torch.full((sources,), math.inf)
    lo = sample.kthvalue(size - lo_at, dim=1).values if lo_at < size else torch.full((sources,), -1.0)
    above = torch.zeros(sources, dtype=torch.int64)
    inside: list[list[Tensor]] = [[] for _ in range(sources)]
    held = 0
    scratch = None  # |τ| of one source's block, reused: a fresh one per source costs its page faults
    for _, tau in blocks():
        for i in range(sources):
            need = tau[i].numel()
            if scratch is None or scratch.numel() < need:
                scratch = torch.empty(need, dtype=tau.dtype, device=tau.device)
            a = torch.abs(tau[i].reshape(-1), out=scratch[:need])
            h, low = hi[i].item(), lo[i].item()
            above[i] += int((a > h).sum())
            chosen = a[(a >= low) & (a <= h)]
            held += chosen.numel()
            if held > limit:
                return None  # too many values inside: leave it to the radix select
            inside[i].append(chosen.cpu())
    threshold = torch.empty(sources, dtype=torch.float64)
    greater, equal = above.clone(), torch.zeros(sources, dtype=torch.int64)
    for i in range(sources):
        values = torch.cat(inside[i]) if inside[i] else torch.empty(0)
        rank = keep - int(above[i])  # the threshold is the rank-th largest inside the bracket
        if not 1 <= rank <= values.numel():
            return None
        t = values.kthvalue(values.numel() - rank + 1).values
        threshold[i] = t.double()
        greater[i] += int((values > t).sum())
        equal[i] = int((values == t).sum())
    return threshold, greater, equal


def _radix(blocks: Blocks, sources: int, keep: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(threshold bits' value, entries above it, entries equal to it) by a radix select on |τ|'s bits."""
    int_dtype, nbits = _BITS[dtype]
    prefix = torch.zeros(sources, dtype=torch.int64)  # the top bits of the threshold found so far
    greater = torch.zeros(sources, dtype=torch.int64)  # entries known to lie above the threshold
    shift, equal = nbits, torch.zeros(sources, dtype=torch.int64)
    while shift > 0:
        width = min(_WINDOW, shift)
        shift -= width
        hist = torch.zeros((sources, 1 << width), dtype=torch.int64)
        for _, tau in blocks():
            for i in range(sources):
                bits = tau[i].abs().contiguous().view(int_dtype).flatten()
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
    return prefix.to(int_dtype).view(dtype).double(), greater, equal


def exact_trim(blocks: Blocks, numel: int, sources: int, density: float, dtype: torch.dtype, limit: int = 1 << 22) -> Trim:
    """The `Trim` keeping floor(density · numel) entries of each source's task vector.

    Args:
        blocks: called once per pass; yields (flat index of the block's first entry, τ block
            (T, R, *s)) over the whole tensor in row order.
        numel: entries of the tensor; sources: T; dtype: τ's dtype (fp32 or fp64).
        limit: most bracketed values held at once before falling back to the radix select.
    """
    keep = math.floor(density * numel)
    if keep == 0:
        return Trim(torch.zeros(sources, dtype=dtype), torch.zeros(sources, dtype=torch.int64), keep_none=True)
    if keep >= numel:
        return Trim(torch.zeros(sources, dtype=dtype), torch.full((sources,), numel, dtype=torch.int64))
    found = _bracketed(blocks, numel, sources, keep, limit) if dtype == torch.float32 else None
    threshold, greater, equal = found if found is not None else _radix(blocks, sources, keep, dtype)
    threshold = threshold.to(dtype)
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
