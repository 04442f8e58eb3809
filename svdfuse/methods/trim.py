"""Exact top-magnitude trimming of task vectors over whole tensors or whole models, read in row blocks.

TIES keeps, per source, the entries of largest |τ| of a *scope*: each tensor (`TrimScope.TENSOR`,
mergekit's rule) or the whole model's task vector flattened (`TrimScope.MODEL`, the TIES paper's
and FusionBench's). How many it keeps is the `TrimKeep` rule: exactly floor(density · numel),
ties at the threshold going to the entries first in row-major (model) order (`COUNT`: the
paper's "top k%", mergekit), or every entry at least the (floor(density · numel) + 1)-th largest
|τ| (`INCLUSIVE`: the TIES authors' code and FusionBench, `kthvalue(numel − floor(density · numel))`
then `>=`). A scope may be larger than the memory budget, so the threshold is found over its row
blocks, exactly, in two passes:

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

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from svdfuse import ops

__all__ = ["Trim", "TrimScope", "TrimKeep", "TrimOptions", "trim_options", "kept_entries", "exact_trim", "TRIM_SHARE"]

# Share of a merge's memory budget that the values bracketing the thresholds may take (the
# plan gives the pieces of a trimmed method the rest).
TRIM_SHARE = 0.25

Blocks = Callable[[], Iterator[tuple[int, Tensor]]]
_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}  # sign bit excluded
_WINDOW = 16
_SAMPLE = 1 << 14  # largest sample per source: its bracket holds ~4% of a tensor at density 0.2
_MARGIN = 6.0  # binomial standard deviations on each side of the sample quantile


class TrimScope(str, enum.Enum):
    """What one source's threshold is taken over."""

    TENSOR = "tensor"  # each tensor on its own (mergekit)
    MODEL = "model"  # the whole model's task vector, every floating tensor (TIES paper, FusionBench)


class TrimKeep(str, enum.Enum):
    """How many entries of a scope of n entries survive, at density d."""

    COUNT = "count"  # exactly floor(d · n); ties at the threshold to the first in row-major order (mergekit)
    INCLUSIVE = "inclusive"  # every |τ| >= the (floor(d · n) + 1)-th largest (the TIES authors' code, FusionBench)


@dataclass(frozen=True)
class TrimOptions:
    """A trimming method's settings: `density` in [0, 1], its `scope` and `keep` rule."""

    density: float
    scope: TrimScope
    keep: TrimKeep


def _choice(enum_type: type[enum.Enum], method: str, name: str, value: object) -> enum.Enum:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(e.value) for e in enum_type)
        raise ValueError(f"{method}: {name} must be one of {choices}, found {value!r}") from None


def trim_options(method: str, density: float, scope: str, keep: str) -> TrimOptions:
    """Checked `TrimOptions`; the errors name the method and the parameter."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"{method}: density must be in [0, 1], found {density}")
    return TrimOptions(density, _choice(TrimScope, method, "trim_scope", scope), _choice(TrimKeep, method, "trim_keep", keep))


def kept_entries(numel: int, density: float, keep: TrimKeep) -> int:
    """Entries the threshold is the last of: floor(density · numel), plus one for `INCLUSIVE`, at most numel."""
    count = math.floor(density * numel)
    return min(numel, count + 1) if keep is TrimKeep.INCLUSIVE else count


@dataclass(frozen=True)
class Trim:
    """Which entries of each source's task vector survive trimming.

    An entry of source i survives iff |τ| > threshold[i], or |τ| == threshold[i] and its flat
    index in the scope is < cutoff[i]. threshold: (T,) in τ's dtype; cutoff: (T,) int64.
    `keep_none` marks that nothing survives; `offset` is the flat index in the scope of the
    tensor's first entry (nonzero for one tensor of a whole-model trim).
    """

    threshold: Tensor
    cutoff: Tensor
    keep_none: bool = False
    offset: int = 0

    def mask(self, tau: Tensor, start: int) -> Tensor:
        """Survivors of a block: tau (T, *b) whose first entry has flat index `start` in its tensor -> bool (T, *b)."""
        if self.keep_none:
            return torch.zeros_like(tau, dtype=torch.bool)
        start += self.offset
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
        parts.append(tau.reshape(sources, -1)[:, first::stride].abs().float().cpu())
    return torch.cat(parts, 1)


def _bracketed(blocks: Blocks, numel: int, sources: int, keep: int, limit: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(threshold, entries above it, entries equal to it, flat index just past the `keep - above`-th
    entry equal to it) per source from a sample's bracket, or None where the bracket missed. Every
    entry equal to a threshold lies in its bracket, so the cutoff needs no pass of its own."""
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
    inside: list[tuple[Tensor, Tensor, list[int]]] = []  # per block: values inside and their flat indices, source by source, and counts
    held = 0
    for start, tau in blocks():
        # every source in one op: a parallel region per block, never one per source
        flat = tau.reshape(sources, -1)
        up, counts, values, index = ops.trim_bracket(flat, lo.to(flat.device), hi.to(flat.device))
        above += up.cpu()
        held += 3 * values.numel()  # a value and its int64 index
        if held > limit:
            return None  # too many values inside: leave it to the radix select
        inside.append((values.cpu(), index.cpu() + start, counts.tolist()))  # source 0's first
    parts = [(values.split(counts), index.split(counts)) for values, index, counts in inside]
    threshold = torch.empty(sources, dtype=torch.float64)
    greater, equal = above.clone(), torch.zeros(sources, dtype=torch.int64)
    cutoff = torch.full((sources,), numel, dtype=torch.int64)
    for i in range(sources):
        values = torch.cat([p[0][i] for p in parts]) if parts else torch.empty(0)
        rank = keep - int(above[i])  # the threshold is the rank-th largest inside the bracket
        if not 1 <= rank <= values.numel():
            return None
        t = values.kthvalue(values.numel() - rank + 1).values
        threshold[i] = t.double()
        greater[i] += int((values > t).sum())
        at = (values == t).nonzero()[:, 0]
        equal[i] = len(at)
        need = keep - int(greater[i])
        if need < len(at):  # need >= 1 (rank >= 1); blocks come in order, each block's values in flat order
            cutoff[i] = int(torch.cat([p[1][i] for p in parts])[at[need - 1]]) + 1
    return threshold, greater, equal, cutoff


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


def exact_trim(
    blocks: Blocks, numel: int, sources: int, density: float, dtype: torch.dtype, limit: int = 1 << 22, keep_rule: TrimKeep = TrimKeep.COUNT
) -> Trim:
    """The `Trim` keeping the `keep_rule`'s entries (`kept_entries`) of each source's task vector.

    Args:
        blocks: called once per pass; yields (flat index of the block's first entry, τ block
            (T, R, *s)) over the whole scope in order: one tensor's rows, or every tensor of a
            model one after the other (blocks of different tensors may differ in shape).
        numel: entries of the scope; sources: T; dtype: τ's dtype (fp32 or fp64).
        limit: most bracketed values held at once before falling back to the radix select.
        keep_rule: `COUNT` breaks ties at the threshold by flat index; `INCLUSIVE` keeps them all.
    """
    keep = kept_entries(numel, density, keep_rule)
    if keep == 0:
        return Trim(torch.zeros(sources, dtype=dtype), torch.zeros(sources, dtype=torch.int64), keep_none=True)
    if keep >= numel:
        return Trim(torch.zeros(sources, dtype=dtype), torch.full((sources,), numel, dtype=torch.int64))
    found = _bracketed(blocks, numel, sources, keep, limit) if dtype == torch.float32 else None
    if found is not None:
        threshold, _, _, cutoff = found
        if keep_rule is TrimKeep.INCLUSIVE:
            cutoff = torch.full((sources,), numel, dtype=torch.int64)
        return Trim(threshold.to(dtype), cutoff)
    threshold, greater, equal = _radix(blocks, sources, keep, dtype)
    threshold = threshold.to(dtype)
    need = keep - greater  # how many entries equal to the threshold survive
    cutoff = torch.full((sources,), numel, dtype=torch.int64)
    partial = (need < equal) & (keep_rule is TrimKeep.COUNT)
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
