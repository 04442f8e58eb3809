"""Compute: one task of the plan at a time, piece by piece, through `svdfuse.ops` and the method.

`Compute.run(task)` yields what the sinks take, in plain terms: `Merged(spec, start, value)`, a
row block of a dense merged tensor (value: rows [start, start + R)) or a whole matrix as
`LowRank` factors, with the `LayerReport` of every matrix. It reads through the `Reader` and
knows nothing of where its output goes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from svdfuse import factored, ops
from svdfuse.adapters import LoraSource, refuse_non_finite, stack_factors
from svdfuse.methods import Block, Components, Factors, Kind, Method
from svdfuse.methods.elementwise import MEAN, Linear, Ties, fused
from svdfuse.methods.trim import TRIM_SHARE, Blocks, Locate, Sample, Trim, TrimScope, exact_trim
from svdfuse.ops import SVDOptions
from svdfuse.plan import ModelTrim, Role, Task, TensorSpec
from svdfuse.reference import compute_dtype
from svdfuse.report import LayerReport
from svdfuse.sinks import LowRank
from svdfuse.sources import ComponentCache, MappingSource, Reader, Source, SourceError, advise

# Rows a trim's sample reads of a tensor larger than a block (at most an eighth of its rows): enough
# clusters that the spread of their fractions bounds the sample's error.
_SAMPLE_ROWS = 512
_PREFETCH_BYTES = 8 << 20  # of each source, asked of the disk at once ahead of a tensor's row blocks


@dataclass(frozen=True)
class Merged:
    """One output of the merge: rows [start, ...) of `spec`'s dense value, or its `LowRank` factors."""

    spec: TensorSpec
    start: int
    value: Tensor | LowRank
    layer: LayerReport | None = None
    residual: bool = False  # LowRank only: its frozen part is the base's weight plus a dense rest


@dataclass
class Progress:
    """What compute tells the caller as it goes: bytes read, and which sources differ from the base."""

    differs: list[bool]
    advance: Callable[[int], None] = lambda nbytes: None


class _Reused:
    """Buffers by name, reused while large enough: fresh memory costs a page fault per 4 KB at its
    first touch (2-core machine, 2026-12-07: 0.10 s per 300 MB, against 0.015 s to fill it again),
    as much as reading a chunk of adapters' factors from the page cache."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        size = math.prod(shape)
        device = torch.device("cpu") if device is None else device
        held = self._held.get((name, dtype, device))
        if held is None or held.numel() < size:
            self._held.pop((name, dtype, device), None)  # the old one freed before the larger one is taken
            held = self._held[(name, dtype, device)] = torch.empty(size, dtype=dtype, device=device)
        return held[:size].view(shape)

    def clear(self) -> None:
        """Free every buffer (before work that sizes its own pieces to the budget)."""
        self._held.clear()


def _extremes(M: Tensor) -> tuple[list, list]:
    """Which matrices of M (..., m, n) are finite and which are all zeros, as nested lists (...):
    two reductions over M in all (`amin`, `amax` carry NaN and ±inf, and need no temporary), where
    a check per matrix costs a parallel region each, ~16 ms of thread wake-up on a busy machine.
    Not `aminmax(dim=-1)`: on the CPU it reads 3.7 GB/s where `amax(-1)` reads 43 (fp32, 2-core machine,
    2026-12-07; `aminmax` of a whole tensor, as `linalg.all_finite` takes it, is fast)."""
    flat = M.flatten(-2)
    low, high = flat.amin(-1), flat.amax(-1)
    finite = torch.isfinite(low) & torch.isfinite(high)
    return finite.tolist(), ((low == 0) & (high == 0)).tolist()


def _factors_finite(U: Tensor, S: Tensor, V: Tensor) -> list[bool]:
    """Whether the factors U (G, m, r), S (G, r), V (G, n, r) of each of G matrices are finite."""
    return (torch.isfinite(S).all(-1) & torch.isfinite(U).flatten(1).all(-1) & torch.isfinite(V).flatten(1).all(-1)).tolist()


def _adaptable(merged: Factors | Tensor, k: int | None, svd: SVDOptions) -> tuple[Factors | None, Tensor | None]:
    """Split a group's merged task matrices into top-k SVD factors (what Stage 2 adapts) and a
    dense residual (kept frozen), exactly: factors + residual = merged.

    k None keeps a method's own factors whole and leaves a dense result dense.
    """
    if isinstance(merged, Factors):
        if k is None or merged.S.shape[-1] <= k:
            return merged, None
        U, S, V, counts = merged
        rest = (U[..., k:] * S[..., k:].unsqueeze(-2)) @ V[..., k:].mT
        return Factors(U[..., :k], S[..., :k], V[..., :k], counts), rest
    if k is None:
        return None, merged
    U, S, V = svd.truncated_svd(merged, k)
    return Factors(U, S, V), merged - (U * S.unsqueeze(-2)) @ V.mT


class Compute:
    """Merges the tasks of a plan with `method`, reading through `reader`, on `device`.

    `want_factors`: whether matrices of methods whose merge is dense must also be split into
    top-k factors (for Stage 2); a file sink needs only the dense values. `want_base`: whether a
    low-rank output carries the base's weight (`LowRank.frozen`); a LoRA output needs the update
    alone, and a group whose sources all give factors is then merged without reading the base.
    """

    def __init__(
        self,
        method: Method,
        reader: Reader,
        *,
        svd: SVDOptions,
        device: torch.device,
        params: dict[str, Any],
        want_factors: bool,
        progress: Progress,
        budget: int,
        allow_non_finite: bool = False,
        model_trim: ModelTrim | None = None,
        want_base: bool = True,
    ) -> None:
        self.method, self.reader, self.svd, self.device = method, reader, svd, device
        self.budget, self.allow_non_finite = budget, allow_non_finite
        self.params, self.want_factors, self.want_base, self.progress = params, want_factors, want_base, progress
        self.T = len(reader.sources)
        self.trim_options = method.trim(params)
        self.model_trim = model_trim
        self._model_trim: Trim | None = None  # found by the first pass, at the first task that needs it
        self._row_buffers = _Reused()  # the row blocks of element-wise tensors, one buffer for all of them
        self._factor_buffers = _Reused()  # the adapters' stacked factors, one buffer for all groups read from adapters alone
        self._source_buffers = _Reused()  # a group's source matrices, one buffer for all groups read dense

    def run(self, task: Task, after: Task | None = None) -> Iterator[Merged]:
        """The outputs of `task`; the first piece of `after` (the next task) is read ahead from disk
        by the kernel while this one computes."""
        for spec in after.specs if after is not None else ():
            in_blocks = spec.role is not Role.MATRIX or self.method.kind is Kind.ELEMENTWISE  # else whole matrices
            self.reader.prefetch(spec.key, 0, min(spec.rows, after.block) if in_blocks else spec.rows)
        spec = task.specs[0]
        if spec.role is Role.COPIED:
            yield from self._copied(spec)
        elif spec.role is Role.ELEMENTWISE or self.method.kind is Kind.ELEMENTWISE:
            self._free_group_buffers()
            yield from self._elementwise(spec, task.block)
        else:
            self._row_buffers.clear()  # a matrix group's pieces take the budget: no row blocks held beside them
            if self.method.kind is not Kind.FACTORS:  # nor a factored merge's (`source_factors` keeps them for the next group)
                self._free_group_buffers()
            yield from self._factors(task) if self.method.kind is Kind.FACTORS else self._matrices(task)

    def _free_group_buffers(self) -> None:
        """Free what `source_factors` keeps from one group to the next (its pieces take the budget)."""
        self._factor_buffers.clear()
        self._source_buffers.clear()

    # -- elementwise: row blocks of one tensor over all sources ---------------------------------

    def _copied(self, spec: TensorSpec) -> Iterator[Merged]:
        base = self.reader.base_rows(spec.key, 0, spec.rows, torch.empty(spec.shape, dtype=spec.dtype))
        for i, source in enumerate(self.reader.sources):
            if spec.key not in source:
                continue  # integer buffers a source does not store are the base's
            if not torch.equal(self.reader.source_rows(i, spec.key, 0, spec.rows, torch.empty(spec.shape, dtype=spec.dtype)), base):
                raise SourceError(
                    f"{source.label}: integer tensor {spec.key!r} {spec.shape} {spec.dtype} differs from the base's; "
                    "svdfuse merges floating tensors only and keeps integer buffers, which must agree"
                )
        self.progress.advance((self.T + 1) * spec.nbytes)
        yield Merged(spec, 0, base)

    def _row_blocks(self, spec: TensorSpec, block: int) -> Iterator[tuple[int, int]]:
        """(start row, stop row) of `spec`'s row blocks, the disk asked for the next block before
        each is read: in windows of `_PREFETCH_BYTES` a source, one advice per file a window (an
        advice per file per block costs more than a 1 MiB block's read from the page cache)."""
        window = max(block, _PREFETCH_BYTES // max(1, spec.row_numel * spec.dtype.itemsize))
        asked = min(block, spec.rows)  # the first block: asked for before the task began (`run`)
        for start in range(0, spec.rows, block):
            stop = min(start + block, spec.rows)
            if asked < min(stop + block, spec.rows):
                self.reader.prefetch(spec.key, asked, min(asked + window, spec.rows))
                asked = min(asked + window, spec.rows)
            yield start, stop

    def _reads(self, spec: TensorSpec, block: int, W0: Tensor, W: Tensor) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """(start row, stop row, base rows, source rows) of `spec`, read into the buffers, the next
        block asked of the disk while this one is computed."""
        for start, stop in self._row_blocks(spec, block):
            w0, w = W0[: stop - start], W[:, : stop - start]
            self.reader.read_rows(spec.key, start, stop, [(0, w0), *((i + 1, w[i]) for i in range(self.T))])
            yield start, stop, w0, w

    def _views(self, spec: TensorSpec, block: int, W0: Tensor, W: Tensor) -> Iterator[tuple[int, int, Tensor, list[Tensor]]]:
        """(start row, stop row, base entries, every source's entries) of `spec`'s row blocks, flat:
        views of a tensor held in memory in the buffers' dtype (nothing to convert, so no copy:
        a copy per source is a parallel op, which a busy machine makes slow), the rest read into
        the buffers. For reading only: a view is the caller's tensor."""
        c = spec.row_numel
        held = [self._held(source, spec) for source in (self.reader.base, *self.reader.sources)]
        for start, stop in self._row_blocks(spec, block):
            rows = []
            for i, t in enumerate(held):
                buffer = W0[: stop - start] if i == 0 else W[i - 1, : stop - start]
                rows.append(buffer if t is None else t[start * c : stop * c])
            self.reader.read_rows(spec.key, start, stop, [(i, rows[i]) for i, t in enumerate(held) if t is None])
            rows = [out.reshape(-1) for out in rows]
            yield start, stop, rows[0], rows[1:]

    def _held(self, source: Source, spec: TensorSpec) -> Tensor | None:
        """`spec`'s entries of an in-memory source, flat, where the reader would copy them unchanged."""
        if not isinstance(source, MappingSource) or spec.key not in source:
            return None
        t = source.get(spec.key)
        same = t.dtype == spec.out_dtype and self.reader.dtype in (None, t.dtype)
        return t.reshape(-1) if same and t.device == self.device and t.is_contiguous() else None

    def _blocks(self, spec: TensorSpec, block: int, W0: Tensor, W: Tensor, check: bool) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """`_reads`; with `check`, noting which sources differ from the base and refusing all-zero ones."""
        zero = torch.ones(self.T + 1, dtype=torch.bool)  # all zeros so far, the base's last
        for start, stop, w0, w in self._reads(spec, block, W0, W):
            if check:  # the fused pass's flags, its mean unused: one read instead of 2T ops
                flags = MEAN.merge_block(w.reshape(self.T, -1), w0.reshape(-1), Block(spec.key, 0, 0), add_base=False)
                self._note(flags.differs, flags.zero, zero)
            yield start, stop, w0, w
        if check:
            self._refuse_zero(spec, zero)

    def _note(self, differs: Tensor, zero_here: Tensor, zero: Tensor) -> None:
        """Record a block's flags: `differs` (T,), `zero_here` (T + 1,) into the tensor's `zero`."""
        self.progress.differs[:] = [a or bool(b) for a, b in zip(self.progress.differs, differs.tolist())]
        zero &= zero_here.cpu()

    def _refuse_zero(self, spec: TensorSpec, zero: Tensor | list[int]) -> None:
        """A source whose tensor is all zeros where the base's is not is a checkpoint that was never
        written or was corrupted, not a fine-tune: merging it would subtract the base.

        zero: the ids of all-zero sources, or flags (T + 1,), the base's last."""
        if isinstance(zero, Tensor):
            zero = [] if bool(zero[-1]) else zero[:-1].nonzero()[:, 0].tolist()
        if zero:
            source = self.reader.sources[zero[0]]
            raise SourceError(
                f"{source.label}: tensor {spec.key!r} {spec.shape} is all zeros where the base's is not"
                + (f" (and in {len(zero) - 1} other sources)" if len(zero) > 1 else "")
                + "; a fine-tuned model holds the base's weights plus a change: is this checkpoint complete?"
            )

    def _trim_blocks(self, spec: TensorSpec, block: int, offset: int = 0) -> Iterator[tuple[int, list[Tensor], Tensor]]:
        """(flat index of the block's first entry + offset, every source's entries, the base's) of
        `spec`'s row blocks, a trim pass: the task vectors are formed by the op that reads them."""
        rows, c = min(block, spec.rows), spec.row_numel
        W0 = self._row_buffers("base", (rows, c), spec.out_dtype, self.device)
        W = self._row_buffers("sources", (self.T, rows, c), spec.out_dtype, self.device)
        for start, _, w0, w in self._views(spec, block, W0, W):
            yield offset + start * c, w, w0

    def _row_sample(self, spec: TensorSpec, size: int) -> Tensor:
        """|τ| of `size` entries per source from rows read apart: (T, rows, m) fp32, a fraction of
        a pass over `spec` (rows are read whole: m entries are taken from each, spread over it)."""
        c = spec.row_numel
        rows = min(max(1, spec.rows // 8), max(-(-size // c), _SAMPLE_ROWS))
        m = max(1, min(c, size // rows))
        picked = torch.linspace(0, spec.rows - 1, rows).round().long().unique().tolist()
        columns = torch.linspace(0, c - 1, m).round().long().unique()
        # index_select, not [:, columns]: CPU advanced indexing of a row this size wakes the thread
        # pool (milliseconds per row on a busy machine, one row at a time)
        return torch.stack([self._abs_task_vectors(spec, range(self.T), row, row + 1).index_select(1, columns) for row in picked], 1)

    def _whole_model_trim(self, spec: TensorSpec) -> Trim:
        """Tensor `spec`'s view of the whole-model trim; the first call finds it, in passes over
        every floating tensor of the model in its row blocks (every process finds the same)."""
        scope = self.model_trim
        if self._model_trim is None:
            def taus() -> Iterator[tuple[int, Tensor]]:
                for task in scope.tasks:
                    each = task.specs[0]
                    yield from self._trim_blocks(each, task.block, scope.offsets[each.key])

            def locate(i: int, start: int, stop: int) -> Tensor:  # a unit lies in one tensor's block
                for task in scope.tasks:
                    each, first = task.specs[0], scope.offsets[task.specs[0].key]
                    if first <= start < first + each.rows * each.row_numel:
                        return self._flat_range(each, i, start - first, stop - first)
                raise AssertionError(f"flat index {start} lies in no tensor of the model's trim")

            limit = int(TRIM_SHARE * self.budget) // scope.dtype.itemsize
            options = self.trim_options
            self._model_trim = exact_trim(
                taus, scope.numel, self.T, options.density, scope.dtype, limit=limit, keep_rule=options.keep,
                locate=locate, same_is_zero=self.allow_non_finite,
            )  # fmt: skip
        return dataclasses.replace(self._model_trim, offset=scope.offsets[spec.key])

    def _elementwise(self, spec: TensorSpec, block: int) -> Iterator[Merged]:
        if self.method.kind is Kind.ELEMENTWISE:
            terms = fused(self.method, self.T, self.params)
        else:
            terms = MEAN if self.method.others is None else None
        if terms is None:
            yield from self._others(spec, block)
        else:
            yield from self._fused(spec, block, terms)

    def _others(self, spec: TensorSpec, block: int) -> Iterator[Merged]:
        """A tensor not merged as a matrix by a matrix method with its own rule for them (`others`)."""
        acc = compute_dtype(spec.out_dtype)
        c = spec.row_numel
        W0 = torch.empty((min(block, spec.rows), c), dtype=acc, device=self.device)
        W = torch.empty((self.T, min(block, spec.rows), c), dtype=acc, device=self.device)
        for start, stop, w0, w in self._blocks(spec, block, W0, W, check=True):
            delta = self.method.call(self.method.others, self._task_vectors(w, w0), **self.params)
            self.progress.advance((self.T + 1) * (stop - start) * c * spec.dtype.itemsize)
            out = delta.add_(w0).to(spec.out_dtype)
            self._check_merged(spec, start, stop, out)
            yield Merged(spec, start, out.reshape((stop - start, *spec.shape[1:]) if spec.shape else ()))

    def _trim(self, spec: TensorSpec, block: int) -> Trim | None:
        """The trim of a tensor of a trimming method, found in passes over its blocks; None where
        the tensor is one block, which is trimmed from what its merge reads."""
        options = self.trim_options
        if options.scope is TrimScope.MODEL:
            return self._whole_model_trim(spec)
        if spec.rows <= block:
            return None
        # a sample of rows read apart, not a pass: the trim then reads the tensor once, the merge once more
        return self._tensor_trim(
            spec, lambda: self._trim_blocks(spec, block), lambda size: self._row_sample(spec, size),
            lambda i, start, stop: self._flat_range(spec, i, start, stop),
        )  # fmt: skip

    def _tensor_trim(self, spec: TensorSpec, blocks: Blocks, sample: Sample | None = None, locate: Locate | None = None) -> Trim:
        acc = compute_dtype(spec.out_dtype)
        limit = int(TRIM_SHARE * self.budget) // acc.itemsize  # values bracketing the thresholds
        options = self.trim_options
        return exact_trim(
            blocks, spec.rows * spec.row_numel, self.T, options.density, acc, limit=limit, keep_rule=options.keep,
            sample=sample, locate=locate, same_is_zero=self.allow_non_finite,
        )  # fmt: skip

    def _flat_range(self, spec: TensorSpec, i: int, start: int, stop: int) -> Tensor:
        """|τ| (fp32) of source i's `spec` at flat [start, stop), its rows read again: where a
        trim's cutoff falls among entries equal to a bound (a unit, not a pass)."""
        c = spec.row_numel
        first = start // c
        return self._abs_task_vectors(spec, [i], first, -(-stop // c))[0, start - first * c : stop - first * c]

    def _abs_task_vectors(self, spec: TensorSpec, ids: Sequence[int], first: int, last: int) -> Tensor:
        """|τ| (fp32, on the CPU) of sources `ids` at `spec`'s rows [first, last), read again apart from
        the row blocks: (len(ids), (last − first) · row_numel)."""
        n = (last - first) * spec.row_numel
        w0 = torch.empty(n, dtype=spec.out_dtype, device=self.device)
        w = torch.empty((len(ids), n), dtype=spec.out_dtype, device=self.device)
        self.reader.read_rows(spec.key, first, last, [(0, w0), *((i + 1, w[j]) for j, i in enumerate(ids))])
        return self._task_vectors(w.float(), w0.float()).abs_().cpu()

    def _fused(self, spec: TensorSpec, block: int, terms: Linear | Ties) -> Iterator[Merged]:
        """One fused op per row block (`merge_block`, `ties_block`): the sources are read in the
        output dtype (the merge's cast, if any, made by the reader) and never copied again."""
        trim = self._trim(spec, block) if isinstance(terms, Ties) else None
        c, rows = spec.row_numel, min(block, spec.rows)
        acc = compute_dtype(spec.out_dtype)
        W0 = self._row_buffers("base", (rows, c), spec.out_dtype, self.device)
        W = self._row_buffers("sources", (self.T, rows, c), spec.out_dtype, self.device)
        whole = whole0 = None
        if spec.role is Role.MATRIX and spec.k is not None and self.want_factors:
            # the whole delta, for its SVD, and the base beside it (a matrix kept in memory anyway)
            whole, whole0 = (torch.empty((spec.rows, c), dtype=acc, device=self.device) for _ in range(2))
        zero = torch.ones(self.T + 1, dtype=torch.bool)
        for start, stop, w0, w in self._views(spec, block, W0, W):
            context = {}
            if isinstance(terms, Ties):
                if trim is None:  # one block: trimmed from what was just read
                    trim = self._tensor_trim(spec, lambda: iter([(0, w, w0)]))  # noqa: B023
                context["trim"] = trim
            merged = terms.merge_block(
                w, w0, Block(spec.key, start * c, self.svd.seed), **context,
                same_is_zero=self.allow_non_finite, add_base=whole is None, dtype=acc if whole is not None else spec.out_dtype,
            )  # fmt: skip
            self._note(merged.differs, merged.zero, zero)
            self.progress.advance((self.T + 1) * (stop - start) * c * spec.dtype.itemsize)
            if whole is not None:
                whole[start:stop], whole0[start:stop] = merged.value.reshape(-1, c), w0.reshape(-1, c)
                continue
            if merged.first_bad >= 0 and not self.allow_non_finite:
                self._refuse_non_finite(spec, start, stop, merged.value)
            layer = LayerReport(spec.key, spec.shape, 0, None) if spec.role is Role.MATRIX and start == 0 else None
            yield Merged(spec, start, merged.value.reshape((stop - start, *spec.shape[1:]) if spec.shape else ()), layer)
        self._refuse_zero(spec, zero)
        if whole is not None:
            factors, rest = _adaptable(whole[None], spec.k, self.svd)
            yield self._low_rank(spec, whole0 if rest is None else whole0.add_(rest[0]), factors, 0, rest is not None)

    def _task_vectors(self, w: Tensor, w0: Tensor) -> Tensor:
        """`w - w0` in place (T, R, c); where non-finite values are allowed, an entry equal to the
        base's is no change even when it is infinite (-inf - -inf would be NaN)."""
        if not self.allow_non_finite:
            return w.sub_(w0)
        for w_i in w:  # one source's mask at a time: the buffers hold the budget, this stays small
            same = w_i == w0
            w_i.sub_(w0).masked_fill_(same, 0.0)
        return w

    def _check_merged(self, spec: TensorSpec, start: int, stop: int, out: Tensor) -> None:
        """Refuse a merged value that is not finite, naming the source that holds one or the rows
        that overflowed; unless the merge allows it (masks stored as -inf, say)."""
        if not (self.allow_non_finite or bool(torch.isfinite(out).all())):
            self._refuse_non_finite(spec, start, stop, out)

    def _refuse_non_finite(self, spec: TensorSpec, start: int, stop: int, out: Tensor) -> None:
        why = self.reader.non_finite(spec.key, start, stop, spec.shape)
        if why is not None:
            raise SourceError(why)
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(
            f"{spec.key!r} {spec.shape}: the merged value overflows {spec.out_dtype} in {bad} entries (rows {start}:{stop}) "
            f"though every input is finite; merge in a wider dtype (dtype=torch.float32) or lower the method's scaling"
        )

    # -- matrices: groups of same-shape matrices -----------------------------------------------

    def _refuse_non_finite_input(self, spec: TensorSpec) -> None:
        raise SourceError(self.reader.non_finite(spec.key, 0, spec.rows, spec.shape) or f"{spec.key!r}: not finite")

    def _sources(self, specs: tuple[TensorSpec, ...], W0: Tensor, ids: list[int], out: Tensor) -> Tensor:
        """Sources `ids` of the group into out (G, len(ids), m, n), checked finite, not all zeros
        where the base is not, and against the base."""
        for g, spec in enumerate(specs):
            self.reader.read_rows(spec.key, 0, spec.rows, [(i + 1, out[g, j]) for j, i in enumerate(ids)])
        finite, zero = _extremes(out)
        base_zero = _extremes(W0)[1]
        for g, j in itertools.product(range(len(specs)), range(len(ids))):
            if not finite[g][j]:
                self._refuse_non_finite_input(specs[g])
            if zero[g][j] and not base_zero[g]:
                self._refuse_zero(specs[g], [ids[j]])
        for j, i in enumerate(ids):  # once a source differs it is never compared again
            self.progress.differs[i] = self.progress.differs[i] or any(not torch.equal(out[g, j], W0[g]) for g in range(len(specs)))
        self.progress.advance(out[:, :, 0].numel() * specs[0].n * specs[0].dtype.itemsize)
        return out

    def _cached(self, i: int, specs: tuple[TensorSpec, ...], rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Source i's stored factors of the group: U (G, m, r), S (G, r), V (G, n, r)."""
        cache = self.reader.sources[i]
        stored = [cache.factors(spec.key, rank) for spec in specs]
        U, S, V = (torch.stack([f[p] for f in stored]).to(self.device) for p in range(3))
        self.progress.differs[i] = self.progress.differs[i] or bool((S != 0).any())
        self.progress.advance(sum(t.numel() * t.element_size() for f in stored for t in f))
        return U, S, V

    def _lora(
        self, ids: list[int], specs: tuple[TensorSpec, ...], width: int, dtype: torch.dtype, buffer=None, then: list[int] | None = None
    ) -> factored.FactoredSVD:
        """Adapters `ids`' exact top-`width` components of the group, from their own factors: U
        (G, c, m, w), S (G, c, w), V (G, c, n, w) in `dtype`, as a `factored.FactoredSVD` whose
        singular vectors are formed only where asked for; one batched pass of Gram matrices and
        r×r SVDs, never an m×n matrix. An adapter's rank is padded with zero components to the
        widest one. The factors are read straight into one buffer in their stored dtype and
        checked once for the chunk, and stay so (peft's scale enters the r×r cores): thousands of
        adapters cost a few large ops, not thousands of small ones each. `buffer`: where to read
        them (`stack_factors`), so that a group's chunks reuse one memory: the components of a
        chunk are then valid until the next chunk is read. `then`: the adapters of the next chunk,
        whose factors the disk is asked for once these are read (`_advise`)."""
        adapters, keys = [self.reader.sources[i] for i in ids], [spec.key for spec in specs]
        L, R, scale = (t.to(self.device) for t in stack_factors(adapters, keys, None, buffer=buffer, checked=False))
        if then:
            self._advise(then, keys)
        grams = ops.gram(L), ops.gram(R, left=False)
        # A Gram matrix is finite iff its factor is (stored bf16, fp16 and fp32 values square far
        # inside float64's range): the check costs r × r per factor, not another read of them all.
        finite = [[a and b for a, b in zip(*rows)] for rows in zip(_extremes(grams[0])[0], _extremes(grams[1])[0])]  # (G, c)
        if not all(map(all, finite)):
            refuse_non_finite(adapters, keys, L, R)
            g, j = next((g, j) for g, row in enumerate(finite) for j, ok in enumerate(row) if not ok)
            raise SourceError(f"{adapters[j].label}: the factors of {keys[g]!r} are too large: their float64 Gram matrices overflow")
        for j, i in enumerate(ids):
            self.progress.differs[i] = self.progress.differs[i] or bool((scale[:, j] != 0).any())
        self.progress.advance(sum(a.factor_bytes(spec.key) for a in adapters for spec in specs if spec.key in a.modules))
        return factored.exact_factored_svd(L, R, dtype, scale=scale, grams=grams, buffer=buffer).resized(width)

    def _advise(self, ids: list[int], keys: list[str]) -> None:
        """Ask the disk for adapters `ids`' factors of `keys` on a thread of its own, while this one
        computes (a thousand adapters by AXIS from a cold page cache, 2-core machine, 2026-12-07: 10.0 s
        against 12.1 s)."""
        found = [self.reader.sources[i].factor_spans(key) for i in ids for key in keys if key in self.reader.sources[i].modules]
        spans = [span for where in found if where is not None for span in where[1:]]  # B's and A's (file, offset, length)
        threading.Thread(target=advise, args=(spans,), name="svdfuse-advise", daemon=True).start()

    def _adapter_chunks(self, specs: tuple[TensorSpec, ...], chunk: int, dtype: torch.dtype) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
        """A group of adapters alone as a method's `factored` merge reads it: each call a pass over
        chunks of `chunk` consecutive adapters (the plan's), L (G, c, m, r) with peft's scale,
        R (G, c, r, n), ranks padded with zero columns to the widest, in `dtype`."""
        width = self._adapter_width(specs, max(specs[0].m, specs[0].n))

        def chunks() -> Iterator[tuple[Tensor, Tensor]]:
            for first in range(0, self.T, chunk):
                ids = list(range(first, min(first + chunk, self.T)))
                adapters = [self.reader.sources[i] for i in ids]
                L, R, scale = (t.to(self.device) for t in stack_factors(adapters, [spec.key for spec in specs], dtype))
                r = L.shape[-1]  # the chunk's widest: every chunk as wide as the group's widest
                L, R = torch.nn.functional.pad(L, (0, width - r)), torch.nn.functional.pad(R, (0, 0, 0, width - r))
                for j, i in enumerate(ids):
                    self.progress.differs[i] = self.progress.differs[i] or bool((scale[:, j] != 0).any())
                self.progress.advance(sum(a.factor_bytes(spec.key) for a in adapters for spec in specs if spec.key in a.modules))
                yield L.mul_(scale.to(L.dtype)[..., None, None]), R

        return chunks

    def _adapter_width(self, specs: tuple[TensorSpec, ...], rank: int) -> int | None:
        """Components per source of a group read from adapters alone (None: some source is read
        dense): `rank`, or the adapters' widest rank if smaller, so that no chunk carries rank −
        r zero columns per adapter."""
        sources = self.reader.sources
        if not all(isinstance(s, LoraSource) and all(s.touched(spec.key) != "dense" for spec in specs) for s in sources):
            return None
        widest = max([s.modules[spec.key].rank for s in sources for spec in specs if s.touched(spec.key)] or [1])
        return min(rank, widest)

    def source_factors(self, task: Task, W0: Tensor | None, rank: int) -> Iterator[Components | factored.FactoredSVD]:
        """The top-`rank` factors of every source's task matrices of a group, chunk by chunk of
        `task.block` sources: U (G, c, m, r), S (G, c, r), V (G, c, n, r); decomposed on the fly,
        read from component caches, or factored exactly from LoRA adapters (a group of adapters
        alone in chunks sized by their factors, at most their widest rank wide). W0: the group's
        base (G, m, n) in its output dtype, or None where every source gives factors."""
        specs, chunk = task.specs, task.block
        G, m, n = len(specs), specs[0].m, specs[0].n
        acc = compute_dtype(specs[0].out_dtype)
        width = self._adapter_width(specs, rank)
        if width is not None:  # the factors in float64 beside their stored copy, and the vectors formed from them, fill a share of the budget
            self._source_buffers.clear()
            chunk = max(1, self.budget // (8 * G * (m + n) * max(width, 16) * acc.itemsize))
            parts = [list(range(first, min(first + chunk, self.T))) for first in range(0, self.T, chunk)]
            for ids, then in zip(parts, [*parts[1:], None]):
                yield self._lora(ids, specs, width, acc, self._factor_buffers, then)
            return
        self._factor_buffers.clear()  # this group's pieces take the budget
        buffer = None  # reused from group to group: fresh memory costs a page fault per 4 KB (`_Reused`)
        for first in range(0, self.T, chunk):
            ids = list(range(first, min(first + chunk, self.T)))
            factored = [i for i in ids if self._factored(i, specs)]
            raw = [i for i in ids if i not in factored]
            parts: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
            if raw:
                if buffer is None:
                    buffer = self._source_buffers("W", (G, min(chunk, self.T), m, n), W0.dtype, self.device)
                W = self._sources(specs, W0, raw, buffer[:, : len(raw)])
                if W.dtype == compute_dtype(W.dtype):  # the task matrices in place: no working copy of them
                    U, S, V = self.svd.truncated_svd(W.sub_(W0.unsqueeze(1)), rank)
                else:
                    U, S, V = self.svd.truncated_svd(W, rank, base=W0.unsqueeze(1))
                if not factored:
                    yield Components(U, S, V)
                    continue
                parts.update({i: (U[:, j], S[:, j], V[:, j]) for j, i in enumerate(raw)})
            for i in factored:
                if isinstance(self.reader.sources[i], ComponentCache):
                    parts[i] = self._cached(i, specs, rank)
                else:
                    U, S, V = self._lora([i], specs, rank, acc)
                    parts[i] = (U[:, 0], S[:, 0], V[:, 0])
            dtype = parts[ids[0]][0].dtype
            yield Components(*(torch.stack([parts[i][f].to(dtype) for i in ids], 1) for f in range(3)))

    def _factored(self, i: int, specs: tuple[TensorSpec, ...]) -> bool:
        """Whether source i gives the group's factors without its weights: a component cache, or
        an adapter that replaces none of the group's matrices whole."""
        source = self.reader.sources[i]
        if isinstance(source, LoraSource):
            return all(source.touched(spec.key) != "dense" for spec in specs)
        return isinstance(source, ComponentCache)

    def read_group(self, specs: tuple[TensorSpec, ...], dtype: torch.dtype) -> Tensor:
        """The base's matrices of a group, (G, m, n) in `dtype`, checked finite."""
        W0 = torch.empty((len(specs), specs[0].m, specs[0].n), dtype=dtype, device=self.device)
        for g, spec in enumerate(specs):
            self.reader.base_rows(spec.key, 0, spec.rows, W0[g])
        for spec, finite in zip(specs, _extremes(W0)[0]):
            if not finite:
                self._refuse_non_finite_input(spec)
        self.progress.advance(W0.numel() * specs[0].dtype.itemsize)
        return W0

    def _factors(self, task: Task) -> Iterator[Merged]:
        spec0 = task.specs[0]
        factored = all(self._factored(i, task.specs) for i in range(self.T))
        W0 = None if factored and not self.want_base else self.read_group(task.specs, spec0.out_dtype)
        if W0 is None:  # the plan counts the base's bytes: not needed is done
            self.progress.advance(sum(spec.m * spec.n for spec in task.specs) * spec0.dtype.itemsize)
        rank = self.method.call(self.method.source_rank, spec0.k, self.T, spec0.m, spec0.n, **self.params)
        merged = self.method.call(self.method.merge, self.source_factors(task, W0, rank), k=spec0.k, T=self.T, svd=self.svd, **self.params)
        factors, rest = _adaptable(merged, spec0.k, self.svd)
        yield from self._group_outputs(task.specs, W0, factors, rest)

    def _matrices(self, task: Task) -> Iterator[Merged]:
        specs = task.specs
        acc = compute_dtype(specs[0].out_dtype)
        W0 = self.read_group(specs, acc)
        context = dict(k=specs[0].k, T=self.T, svd=self.svd, keys=[s.key for s in specs], **self.params)
        if self.method.factored is not None and self._adapter_width(specs, 1) is not None:
            merged = self.method.call(self.method.factored, self._adapter_chunks(specs, task.block, acc), **context)
        else:
            W = self._sources(specs, W0, list(range(self.T)), torch.empty((len(specs), self.T, specs[0].m, specs[0].n), dtype=acc, device=self.device))
            merged = self.method.call(self.method.merge, W0, W, **context)
            del W
        factors, rest = _adaptable(merged, specs[0].k, self.svd)
        yield from self._group_outputs(specs, W0, factors, rest)

    def _group_outputs(self, specs, W0: Tensor | None, factors: Factors | None, rest: Tensor | None) -> Iterator[Merged]:
        """The group's outputs; W0 None (not read: `want_base` is off) leaves a rank-k merge's
        `frozen` None."""
        if W0 is None and rest is not None:  # a dense part after all: its output is base + rest
            W0 = self.read_group(specs, specs[0].out_dtype)
        finite = None if factors is None else _factors_finite(factors.U, factors.S, factors.V)
        for g, spec in enumerate(specs):
            if factors is None:  # a dense merge, no rank asked for
                out = (W0[g].to(rest.dtype) + rest[g]).to(spec.out_dtype)
                self._check_merged(spec, 0, spec.rows, out)
                yield Merged(spec, 0, out.reshape(spec.shape), LayerReport(spec.key, spec.shape, 0, None))
                continue
            frozen = None if W0 is None else W0[g] if rest is None else W0[g].to(rest.dtype) + rest[g]
            yield self._low_rank(spec, frozen, factors, g, rest is not None, finite[g])

    def _low_rank(self, spec: TensorSpec, frozen: Tensor | None, factors: Factors, g: int, residual: bool, finite: bool | None = None) -> Merged:
        """Matrix g of `factors` as `spec`'s output; `finite`: whether its factors are, if the caller knows."""
        U, S, V = factors.U[g], factors.S[g], factors.V[g]
        counts = None if factors.counts is None else factors.counts[g].tolist()
        value = LowRank(None if frozen is None else frozen.reshape(spec.shape) if residual else frozen.reshape(spec.shape).to(spec.out_dtype), U, S, V)
        if not (_factors_finite(U[None], S[None], V[None])[0] if finite is None else finite):
            raise ValueError(f"{spec.key!r} {spec.shape}: the merged factors are not finite")
        return Merged(spec, 0, value, LayerReport(spec.key, spec.shape, S.shape[-1], counts), residual)
