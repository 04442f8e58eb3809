"""Exact top-magnitude trimming of task vectors over whole tensors or whole models, read in row blocks.

TIES keeps, per source, the entries of largest |τ| of a *scope*: each tensor (`TrimScope.TENSOR`,
mergekit's rule) or the whole model's task vector flattened (`TrimScope.MODEL`, the TIES paper's
and FusionBench's). How many it keeps is the `TrimKeep` rule: exactly floor(density · numel),
ties at the threshold going to the entries first in row-major (model) order (`COUNT`: the
paper's "top k%", mergekit), or every entry at least the (floor(density · numel) + 1)-th largest
|τ| (`INCLUSIVE`: the TIES authors' code and FusionBench, `kthvalue(numel − floor(density · numel))`
then `>=`). A scope may be larger than the memory budget, so the threshold is found over its row
blocks, exactly, in one pass and a sample, so that with the merge's own pass each source block
is read twice:

1. a sample of |τ| brackets the threshold: [lo, hi] holds it with overwhelming probability (a
   margin of several standard deviations of the sampled fraction around the sample quantile). It
   is strided over a tensor held in memory (`svdfuse.ops.trim_sample`, every source in one op),
   or taken from rows read apart (a fraction of a pass) for one larger than a block: those rows
   are clusters, whose spread widens the margin;
2. one pass (`svdfuse.ops.trim_bracket`, the task vectors formed as it reads) counts the entries
   above hi and gathers the few inside [lo, hi]; the threshold is the right order statistic of
   those (`svdfuse.ops.trim_select`, every source at once: a radix select on the bits of |τ|).

If the bracket misses (a sample that is not representative, or so many equal values that the
bracket holds more than a block), a radix select over the bits of |τ| (non-negative floats order as
their bit patterns) finds it instead, one histogram pass per 16 bits. When more entries equal the
threshold than places remain, one more pass finds where the kept ones end.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from svdfuse import ops, reference

__all__ = ["Trim", "TrimScope", "TrimKeep", "TrimOptions", "trim_options", "kept_entries", "exact_trim", "strided_sample", "blocks_locate", "TRIM_SHARE"]

# Share of a merge's memory budget that the values bracketing the thresholds may take (the
# plan gives the pieces of a trimmed method the rest).
TRIM_SHARE = 0.25

_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}  # sign bit excluded
_WINDOW = 16
_SAMPLE = 1 << 14  # smallest sample per source: its bracket holds ~4% of a tensor at density 0.2
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


Blocks = Callable[[], Iterator[tuple[int, "Tensor | Sequence[Tensor]", "Tensor | None"]]]
Sample = Callable[[int], Tensor]
Locate = Callable[[int, int, int], Tensor]  # (source, start, stop) -> |τ| of the source at flat [start, stop), fp32
_UNIT = reference.DARE_CHUNK  # what ops.trim_bracket counts entries equal to a bound in


def _flat(sources: Tensor | Sequence[Tensor], base: Tensor | None) -> tuple[list[Tensor], Tensor]:
    """A block as T flat sources and a flat base (zeros where the sources are task vectors already)."""
    flat = [x.reshape(-1) for x in sources]
    return flat, (torch.zeros_like(flat[0]) if base is None else base.reshape(-1))


def _tau(x: Tensor, base: Tensor, dtype: torch.dtype, same_is_zero: bool) -> Tensor:
    """One source's task vector `x − base` in `dtype` (an entry equal to the base's 0 with `same_is_zero`)."""
    tau = x.to(dtype) - base.to(dtype)
    return tau.masked_fill_(x == base, 0.0) if same_is_zero else tau


def strided_sample(blocks: Blocks, numel: int, sources: int, same_is_zero: bool = False) -> Sample:
    """A `Sample` of |τ| at every `stride`-th flat index of the scope (an odd stride, so rows and
    columns are both visited): (T, ≤ size, 1), each entry its own cluster. Reads every block."""

    def sample(size: int) -> Tensor:
        stride = max(1, numel // size) | 1
        parts = []
        for start, x, base in blocks():
            x, base = _flat(x, base)
            # every source in one op: a parallel region per block, never one per source
            parts.append(ops.trim_sample(x, base, (-start) % stride, stride, same_is_zero=same_is_zero).cpu())
        return (torch.cat(parts, 1) if len(parts) > 1 else parts[0])[:, :, None]

    return sample


def blocks_locate(blocks: Blocks, same_is_zero: bool = False) -> Locate:
    """A `Locate` that finds the range in the blocks (a pass up to it: for scopes held in memory)."""

    def locate(i: int, start: int, stop: int) -> Tensor:
        for first, x, base in blocks():
            x, base = _flat(x, base)
            if first <= start and stop <= first + base.numel():
                a, b = start - first, stop - first
                return ops.trim_sample([x[i][a:b]], base[a:b], 0, 1, same_is_zero=same_is_zero)[0].cpu()
        raise ValueError(f"flat range [{start}, {stop}) lies in no block of the scope")

    return locate


def _margins(sample: Tensor, p: float) -> Tensor:
    """Half-widths, in ranks of the sample, of a bracket that holds the p-quantile: `_MARGIN`
    standard deviations of the sampled fraction above it, plus 8. sample: (T, clusters, m), the
    entries of a cluster (a row read) possibly alike, so the deviation is the larger of the
    binomial one and the spread of the clusters' own fractions -> (T,) float64."""
    T, clusters, m = sample.shape
    size = clusters * m
    sd = torch.full((T,), math.sqrt(p * (1 - p) / size), dtype=torch.float64)
    if m > 1 and clusters > 1:
        flat = sample.reshape(T, -1)
        at = min(size, max(1, round(p * size)))
        # the sample's own p-quantile: its at-th largest (trim_select orders NaN as kthvalue does)
        t0 = ops.trim_select(flat.reshape(-1).float(), torch.full((T,), size), torch.full((T,), at))[0]
        fractions = (sample > t0[:, None, None]).double().mean(2)  # (T, clusters)
        sd = torch.maximum(sd, fractions.std(1) / math.sqrt(clusters))
    return _MARGIN * size * sd + 8


def _sample_size(numel: int, sources: int, p: float, limit: int) -> int:
    """Entries to sample per source: enough that the bracket is expected to hold a sixth of `limit`
    (a wider scope needs a narrower bracket), at least `_SAMPLE`; the sample itself a quarter of it.
    Between those, the size that makes least work of the order statistics: the sample's S entries
    plus the bracket's ~2·_MARGIN·sqrt(p(1-p)/S)·numel, least at S = (_MARGIN·sqrt(p(1-p))·numel)^(2/3)."""
    needed = (12 * _MARGIN * sources * numel * math.sqrt(p * (1 - p)) / max(limit, 1)) ** 2
    cheapest = (_MARGIN * math.sqrt(p * (1 - p)) * numel) ** (2 / 3)
    return int(max(1, min(numel, limit // (4 * sources), max(_SAMPLE, needed, cheapest))))


def _bounds(drawn: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(lo, hi) per source: a bracket of the p-quantile of |τ| from a sample (T, clusters, m)."""
    sources, size = drawn.shape[0], drawn.shape[1] * drawn.shape[2]
    margin = _margins(drawn, p)
    flat = drawn.reshape(-1).float().contiguous()
    whole = torch.full((sources,), size, dtype=torch.int64)
    # ranks from the top: the bracket's upper end is the (hi_at + 1)-th largest of the sample
    hi_at, lo_at = (p * size - margin).floor().long(), (p * size + margin).ceil().long()
    hi = ops.trim_select(flat, whole, (hi_at + 1).clamp(min=1))[0]
    lo = ops.trim_select(flat, whole, (lo_at + 1).clamp(max=size))[0]
    return torch.where(lo_at < size, lo, -1.0), torch.where(hi_at >= 0, hi, math.inf)


def _bracketed(
    blocks: Blocks, sample: Sample, locate: Locate | None, numel: int, sources: int, keep: int, limit: int, same_is_zero: bool
) -> tuple[Tensor, Tensor] | None:
    """(threshold, flat index just past the last entry equal to it that survives) per source from
    a sample's bracket [lo, hi], or None where the bracket missed. One pass over the scope gathers
    the entries strictly inside and counts those equal to a bound per unit: a threshold inside has
    every entry equal to it gathered; one at a bound has its cutoff in the unit where the count of
    that bound's entries reaches what survives, which `locate` reads again (a unit, not a pass;
    without `locate`, where every tie survives, no cutoff is found)."""
    p = keep / numel
    size = _sample_size(numel, sources, p, limit)
    if size >= numel and 3 * sources * numel <= limit:  # a sample as large as the scope: take it all
        lo, hi = torch.full((sources,), -1.0), torch.full((sources,), math.inf)
    else:
        lo, hi = _bounds(sample(size), p)
    above = torch.zeros(sources, dtype=torch.int64)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []  # per block: values inside, their flat indices, counts per source
    units: list[tuple[int, int, Tensor]] = []  # per block: its start, its length, entries equal to lo and hi per unit (T, units, 2)
    held = 0
    for start, x, base in blocks():
        x, base = _flat(x, base)
        # every source in one op: a parallel region per block, never one per source
        up, counts, values, index, bounds = ops.trim_bracket(x, base, lo.to(base.device), hi.to(base.device), same_is_zero=same_is_zero)
        above += up.cpu()
        held += 3 * values.numel() + 2 * bounds.numel()  # a value and its int64 index; int64 counts per unit
        if held > limit:
            return None  # too many values inside: leave it to the radix select
        index = index.cpu()
        parts.append((values.cpu(), index + start if start else index, counts.cpu()))
        units.append((start, base.numel(), bounds.cpu()))
    values, index, counts = parts[0] if parts else (torch.empty(0), torch.empty(0, dtype=torch.int64), torch.zeros(sources, dtype=torch.int64))
    if len(parts) > 1:  # source by source, each in flat order: blocks come in order
        counts = sum(c for _, _, c in parts)
        # numpy's concatenate copies on this thread: torch.cat of the T · blocks pieces took 0.3 s a
        # call on a busy machine (48 sources), numpy's well under a tenth of that
        ends = [c.cumsum(0)[:-1].numpy() for _, _, c in parts]
        split = [(np.split(v.numpy(), e), np.split(i.numpy(), e)) for (v, i, _), e in zip(parts, ends)]
        values = torch.from_numpy(np.concatenate([v[s] for s in range(sources) for v, _ in split]))
        index = torch.from_numpy(np.concatenate([i[s] for s in range(sources) for _, i in split]))
    at_lo, at_hi = (sum(b[:, :, j].sum(1) for _, _, b in units) for j in (0, 1))
    rank = keep - above  # the threshold is the rank-th largest of what is not above hi
    if not bool(((rank >= 1) & (rank <= at_hi + counts + at_lo)).all()):
        return None
    inside = (rank > at_hi) & (rank <= at_hi + counts)
    t, _, _, position = ops.trim_select(values, counts, torch.where(inside, rank - at_hi, 1))
    first = torch.cumsum(counts, 0) - counts
    at = index[(first + position).clamp(0, index.numel() - 1)] if index.numel() else torch.zeros_like(position)
    cutoff = torch.where(position >= 0, at + 1, numel)
    threshold = torch.where(rank <= at_hi, hi, torch.where(inside, t, lo)).double()
    for i in range(sources if locate is not None else 0):
        if bool(inside[i]):
            continue
        bound, need = (1, int(rank[i])) if rank[i] <= at_hi[i] else (0, int(rank[i] - at_hi[i] - counts[i]))
        if need < int((at_hi if bound else at_lo)[i]):  # some entries equal to the bound are cut: where?
            cutoff[i] = _cutoff_at_bound(units, locate, i, bound, need, float(threshold[i]))
        else:
            cutoff[i] = numel
    return threshold, cutoff


def _cutoff_at_bound(units: list[tuple[int, int, Tensor]], locate: Locate, i: int, bound: int, need: int, value: float) -> int:
    """The flat index just past source i's `need`-th entry (1-based, in flat order) equal to `value`,
    a bracket's bound whose entries the bracket pass counted per unit: one unit read again."""
    before = 0
    for start, length, counts in units:
        per_unit = counts[i, :, bound]
        total = int(per_unit.sum())
        if before + total < need:
            before += total
            continue
        u = int((torch.cumsum(per_unit, 0) + before >= need).nonzero()[0, 0])
        before += int(per_unit[:u].sum())
        lo = start + u * _UNIT
        tau = locate(i, lo, min(lo + _UNIT, start + length))
        # numpy's search runs on this thread: a torch op this size would wake the thread pool, which
        # costs milliseconds on a busy machine, and a trim may search once per source and tensor
        return lo + int(np.flatnonzero(tau.numpy() == np.float32(value))[need - before - 1]) + 1
    raise AssertionError("the bracket's counts hold fewer entries equal to a bound than they said")


def _radix(blocks: Blocks, sources: int, keep: int, dtype: torch.dtype, same_is_zero: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(threshold bits' value, entries above it, entries equal to it) by a radix select on |τ|'s bits."""
    int_dtype, nbits = _BITS[dtype]
    prefix = torch.zeros(sources, dtype=torch.int64)  # the top bits of the threshold found so far
    greater = torch.zeros(sources, dtype=torch.int64)  # entries known to lie above the threshold
    shift, equal = nbits, torch.zeros(sources, dtype=torch.int64)
    while shift > 0:
        width = min(_WINDOW, shift)
        shift -= width
        hist = torch.zeros((sources, 1 << width), dtype=torch.int64)
        for _, x, base in blocks():
            x, base = _flat(x, base)
            for i in range(sources):
                bits = _tau(x[i], base, dtype, same_is_zero).abs_().view(int_dtype)
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
    blocks: Blocks, numel: int, sources: int, density: float, dtype: torch.dtype, limit: int = 1 << 22,
    keep_rule: TrimKeep = TrimKeep.COUNT, *, sample: Sample | None = None, locate: Locate | None = None,
    same_is_zero: bool = False,
) -> Trim:  # fmt: skip
    """The `Trim` keeping the `keep_rule`'s entries (`kept_entries`) of each source's task vector.

    Args:
        blocks: called once per pass; yields (flat index of the block's first entry, the block of
            every source (T, R, *s) or T tensors, the base's block or None) over the whole scope
            in order: one tensor's rows, or every tensor of a model one after the other (blocks of
            different tensors may differ in shape). The task vectors are the sources minus the
            base (the sources themselves where the base is None), formed as they are read.
        numel: entries of the scope; sources: T; dtype: τ's dtype (fp32 or fp64).
        limit: most bracketed values held at once before falling back to the radix select.
        keep_rule: `COUNT` breaks ties at the threshold by flat index; `INCLUSIVE` keeps them all.
        sample: draws the bracket's sample, `size` -> |τ| (T, clusters, m) fp32 (rows read
            apart, say, so that it costs a fraction of a pass); default `strided_sample`, a pass.
        locate: reads one source's |τ| over a flat range of the scope again (a unit of
            `reference.DARE_CHUNK` entries, where a cutoff falls among entries equal to a bound);
            default `blocks_locate`, a pass up to it.
        same_is_zero: an entry equal to the base's is no change even where both are infinite.
    """
    keep = kept_entries(numel, density, keep_rule)
    if keep == 0:
        return Trim(torch.zeros(sources, dtype=dtype), torch.zeros(sources, dtype=torch.int64), keep_none=True)
    if keep >= numel:
        return Trim(torch.zeros(sources, dtype=dtype), torch.full((sources,), numel, dtype=torch.int64))
    found = None
    if dtype == torch.float32:
        sample = sample or strided_sample(blocks, numel, sources, same_is_zero)
        if keep_rule is TrimKeep.COUNT:  # the inclusive rule keeps every tie: no cutoff to find
            locate = locate or blocks_locate(blocks, same_is_zero)
        else:
            locate = None
        found = _bracketed(blocks, sample, locate, numel, sources, keep, limit, same_is_zero)
    if found is not None:
        threshold, cutoff = found
        if keep_rule is TrimKeep.INCLUSIVE:
            cutoff = torch.full((sources,), numel, dtype=torch.int64)
        return Trim(threshold.to(dtype), cutoff)
    threshold, greater, equal = _radix(blocks, sources, keep, dtype, same_is_zero)
    threshold = threshold.to(dtype)
    need = keep - greater  # how many entries equal to the threshold survive
    cutoff = torch.full((sources,), numel, dtype=torch.int64)
    partial = (need < equal) & (keep_rule is TrimKeep.COUNT)
    if bool(partial.any()):
        seen = torch.zeros(sources, dtype=torch.int64)
        for start, x, base in blocks():
            x, base = _flat(x, base)
            for i in partial.nonzero()[:, 0].tolist():
                where = (_tau(x[i], base, dtype, same_is_zero).abs_() == threshold[i].item()).nonzero()[:, 0].cpu()
                take = int(need[i] - seen[i])
                if 0 < take <= len(where):
                    cutoff[i] = start + int(where[take - 1]) + 1
                seen[i] += len(where)
    return Trim(threshold, cutoff)
