"""Compute: one task of the plan at a time, piece by piece, through `svdfuse.ops` and the method.

`Compute.run(task)` yields what the sinks take, in plain terms: `Merged(spec, start, value)`, a
row block of a dense merged tensor (value: rows [start, start + R)) or a whole matrix as
`LowRank` factors, with the `LayerReport` of every matrix. It reads through the `Reader` and
knows nothing of where its output goes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from svdfuse.methods import Block, Factors, Kind, Method
from svdfuse.methods.trim import TRIM_SHARE, Trim, TrimScope, exact_trim
from svdfuse.ops import SVDOptions
from svdfuse.plan import ModelTrim, Role, Task, TensorSpec
from svdfuse.reference import compute_dtype
from svdfuse.result import LayerReport
from svdfuse.sinks import LowRank
from svdfuse.sources import ComponentCache, Reader, SourceError


@dataclass(frozen=True)
class Merged:
    """One output of the merge: rows [start, ...) of `spec`'s dense value, or its `LowRank` factors."""

    spec: TensorSpec
    start: int
    value: Tensor | LowRank
    layer: LayerReport | None = None


@dataclass
class Progress:
    """What compute tells the caller as it goes: bytes read, and which sources differ from the base."""

    differs: list[bool]
    advance: Callable[[int], None] = lambda nbytes: None


def _extremes(M: Tensor) -> tuple[list, list]:
    """Which matrices of M (..., m, n) are finite and which are all zeros, as nested lists (...):
    one pass over M in all (`aminmax` carries NaN and ±inf, and needs no temporary), where a
    check per matrix costs a parallel region each, ~16 ms of thread wake-up on a busy machine."""
    low, high = torch.aminmax(M.flatten(-2), dim=-1)
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
    top-k factors (for Stage 2); a file sink needs only the dense values.
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
    ) -> None:
        self.method, self.reader, self.svd, self.device = method, reader, svd, device
        self.budget, self.allow_non_finite = budget, allow_non_finite
        self.params, self.want_factors, self.progress = params, want_factors, progress
        self.T = len(reader.sources)
        self.trim_options = method.trim(params)
        self.model_trim = model_trim
        self._model_trim: Trim | None = None  # found by the first pass, at the first task that needs it

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
            yield from self._elementwise(spec, task.block)
        elif self.method.kind is Kind.FACTORS:
            yield from self._factors(task)
        else:
            yield from self._matrices(task)

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

    def _blocks(self, spec: TensorSpec, block: int, W0: Tensor, W: Tensor, check: bool) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """(start row, stop row, base rows, source rows) of `spec`, read into the buffers; with
        `check`, noting which sources differ from the base and refusing all-zero ones."""
        zero, base_zero = [check] * self.T, check  # all zeros so far (checked only while it matters)
        for start in range(0, spec.rows, block):
            stop = min(start + block, spec.rows)
            if stop < spec.rows:
                self.reader.prefetch(spec.key, stop, min(stop + block, spec.rows))
            w0, w = W0[: stop - start], W[:, : stop - start]
            self.reader.base_rows(spec.key, start, stop, w0)
            base_zero = base_zero and not bool(w0.any())
            for i in range(self.T):
                self.reader.source_rows(i, spec.key, start, stop, w[i])
                if check and not self.progress.differs[i]:
                    self.progress.differs[i] = not torch.equal(w[i], w0)
                zero[i] = zero[i] and not bool(w[i].any())
            yield start, stop, w0, w
        if not base_zero:
            self._refuse_zero(spec, [i for i in range(self.T) if zero[i]])

    def _refuse_zero(self, spec: TensorSpec, zero: list[int]) -> None:
        """A source whose tensor is all zeros where the base's is not is a checkpoint that was never
        written or was corrupted, not a fine-tune: merging it would subtract the base."""
        if zero:
            source = self.reader.sources[zero[0]]
            raise SourceError(
                f"{source.label}: tensor {spec.key!r} {spec.shape} is all zeros where the base's is not"
                + (f" (and in {len(zero) - 1} other sources)" if len(zero) > 1 else "")
                + "; a fine-tuned model holds the base's weights plus a change: is this checkpoint complete?"
            )

    def _taus(self, spec: TensorSpec, block: int, W0: Tensor, W: Tensor, offset: int = 0) -> Iterator[tuple[int, Tensor]]:
        """(flat index of the block's first entry + offset, task vectors of the block) over `spec`, a trim pass."""
        return ((offset + start * spec.row_numel, self._task_vectors(w, w0)) for start, _, w0, w in self._blocks(spec, block, W0, W, check=False))

    def _whole_model_trim(self, spec: TensorSpec) -> Trim:
        """Tensor `spec`'s view of the whole-model trim; the first call finds it, in passes over
        every floating tensor of the model in its row blocks (every process finds the same)."""
        scope = self.model_trim
        if self._model_trim is None:
            def taus() -> Iterator[tuple[int, Tensor]]:
                for task in scope.tasks:
                    each = task.specs[0]
                    rows = min(task.block, each.rows)
                    W0 = torch.empty((rows, each.row_numel), dtype=scope.dtype, device=self.device)
                    W = torch.empty((self.T, rows, each.row_numel), dtype=scope.dtype, device=self.device)
                    yield from self._taus(each, task.block, W0, W, scope.offsets[each.key])

            limit = int(TRIM_SHARE * self.budget) // scope.dtype.itemsize
            options = self.trim_options
            self._model_trim = exact_trim(taus, scope.numel, self.T, options.density, scope.dtype, limit=limit, keep_rule=options.keep)
        return dataclasses.replace(self._model_trim, offset=scope.offsets[spec.key])

    def _elementwise(self, spec: TensorSpec, block: int) -> Iterator[Merged]:
        method = self.method if self.method.kind is Kind.ELEMENTWISE else None
        context: dict[str, Any] = {"svd": self.svd, **self.params}
        options = self.trim_options if method is not None else None
        if options is not None and options.scope is TrimScope.MODEL:  # before this task's buffers: one piece at a time
            context["trim"] = self._whole_model_trim(spec)
        acc = compute_dtype(spec.out_dtype)
        c = spec.row_numel
        W0 = torch.empty((min(block, spec.rows), c), dtype=acc, device=self.device)
        W = torch.empty((self.T, min(block, spec.rows), c), dtype=acc, device=self.device)
        # (start, stop, base rows, task vectors): formed in place, the sources' rows are not kept.
        pieces = ((start, stop, w0, self._task_vectors(w, w0)) for start, stop, w0, w in self._blocks(spec, block, W0, W, check=True))
        if options is not None and options.scope is TrimScope.TENSOR:
            if spec.rows <= block:  # one piece: read it once, trim and merge it in memory
                resident = list(pieces)  # read to the end: the generator's checks run
                pieces = iter(resident)
                taus = lambda: iter([(0, resident[0][3])])  # noqa: E731
            else:
                taus = lambda: self._taus(spec, block, W0, W)  # noqa: E731
            limit = int(TRIM_SHARE * self.budget) // acc.itemsize  # values bracketing the thresholds
            context["trim"] = exact_trim(taus, spec.rows * c, self.T, options.density, acc, limit=limit, keep_rule=options.keep)
        whole = whole0 = None
        if spec.role is Role.MATRIX and spec.k is not None and self.want_factors:
            # the whole delta, for its SVD, and the base beside it (a matrix kept in memory anyway)
            whole, whole0 = (torch.empty((spec.rows, c), dtype=acc, device=self.device) for _ in range(2))
        for start, stop, w0, tau in pieces:
            if method is None:  # a tensor not merged as a matrix by a matrix method
                others = self.method.others
                delta = tau.mean(0) if others is None else self.method.call(others, tau, **self.params)
            else:
                delta = method.call(method.merge, tau, block=Block(spec.key, start * c, self.svd.seed), **context)
            self.progress.advance((self.T + 1) * (stop - start) * c * spec.dtype.itemsize)
            if whole is not None:
                whole[start:stop], whole0[start:stop] = delta, w0
                continue
            out = delta.add_(w0).to(spec.out_dtype)
            self._check_merged(spec, start, stop, out)
            layer = LayerReport(spec.key, spec.shape, 0, None) if spec.role is Role.MATRIX and start == 0 else None
            yield Merged(spec, start, out.reshape((stop - start, *spec.shape[1:]) if spec.shape else ()), layer)
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
        if self.allow_non_finite or bool(torch.isfinite(out).all()):
            return
        why = self.reader.non_finite(spec.key, start, stop, spec.shape)
        if why is not None:
            raise SourceError(why)
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(
            f"{spec.key!r} {spec.shape}: the merged value overflows {spec.out_dtype} in {bad} entries (rows {start}:{stop}) "
            f"though every input is finite; merge in a wider dtype (dtype=torch.float32) or lower the method's scaling"
        )

    # -- matrices: groups of same-shape matrices -----------------------------------------------

    def _refuse_non_finite(self, spec: TensorSpec) -> None:
        raise SourceError(self.reader.non_finite(spec.key, 0, spec.rows, spec.shape) or f"{spec.key!r}: not finite")

    def _sources(self, specs: tuple[TensorSpec, ...], W0: Tensor, ids: list[int], out: Tensor) -> Tensor:
        """Sources `ids` of the group into out (G, len(ids), m, n), checked finite, not all zeros
        where the base is not, and against the base."""
        for g, spec in enumerate(specs):
            for j, i in enumerate(ids):
                self.reader.source_rows(i, spec.key, 0, spec.rows, out[g, j])
        finite, zero = _extremes(out)
        base_zero = _extremes(W0)[1]
        for g, j in itertools.product(range(len(specs)), range(len(ids))):
            if not finite[g][j]:
                self._refuse_non_finite(specs[g])
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

    def source_factors(self, task: Task, W0: Tensor, rank: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The top-`rank` factors of every source's task matrices of a group, chunk by chunk of
        `task.block` sources: U (G, c, m, r), S (G, c, r), V (G, c, n, r); decomposed on the fly,
        or read from component caches. W0: the group's base (G, m, n)."""
        specs, chunk = task.specs, task.block
        buffer = torch.empty((len(specs), min(chunk, self.T), specs[0].m, specs[0].n), dtype=W0.dtype, device=self.device)
        for first in range(0, self.T, chunk):
            ids = list(range(first, min(first + chunk, self.T)))
            cached = [i for i in ids if isinstance(self.reader.sources[i], ComponentCache)]
            raw = [i for i in ids if i not in cached]
            parts: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
            if raw:
                W = self._sources(specs, W0, raw, buffer[:, : len(raw)])
                if W.dtype == compute_dtype(W.dtype):  # the task matrices in place: no working copy of them
                    U, S, V = self.svd.truncated_svd(W.sub_(W0.unsqueeze(1)), rank)
                else:
                    U, S, V = self.svd.truncated_svd(W, rank, base=W0.unsqueeze(1))
                if not cached:
                    yield U, S, V
                    continue
                parts.update({i: (U[:, j], S[:, j], V[:, j]) for j, i in enumerate(raw)})
            for i in cached:
                parts[i] = self._cached(i, specs, rank)
            yield tuple(torch.stack([parts[i][f] for i in ids], 1) for f in range(3))

    def read_group(self, specs: tuple[TensorSpec, ...], dtype: torch.dtype) -> Tensor:
        """The base's matrices of a group, (G, m, n) in `dtype`, checked finite."""
        W0 = torch.empty((len(specs), specs[0].m, specs[0].n), dtype=dtype, device=self.device)
        for g, spec in enumerate(specs):
            self.reader.base_rows(spec.key, 0, spec.rows, W0[g])
        for spec, finite in zip(specs, _extremes(W0)[0]):
            if not finite:
                self._refuse_non_finite(spec)
        self.progress.advance(W0.numel() * specs[0].dtype.itemsize)
        return W0

    def _factors(self, task: Task) -> Iterator[Merged]:
        spec0 = task.specs[0]
        W0 = self.read_group(task.specs, spec0.out_dtype)
        rank = self.method.call(self.method.source_rank, spec0.k, self.T, spec0.m, spec0.n, **self.params)
        merged = self.method.call(self.method.merge, self.source_factors(task, W0, rank), k=spec0.k, T=self.T, svd=self.svd, **self.params)
        factors, rest = _adaptable(merged, spec0.k, self.svd)
        yield from self._group_outputs(task.specs, W0, factors, rest)

    def _matrices(self, task: Task) -> Iterator[Merged]:
        specs = task.specs
        acc = compute_dtype(specs[0].out_dtype)
        W0 = self.read_group(specs, acc)
        W = self._sources(specs, W0, list(range(self.T)), torch.empty((len(specs), self.T, specs[0].m, specs[0].n), dtype=acc, device=self.device))
        merged = self.method.call(self.method.merge, W0, W, k=specs[0].k, svd=self.svd, keys=[s.key for s in specs], **self.params)
        del W
        factors, rest = _adaptable(merged, specs[0].k, self.svd)
        yield from self._group_outputs(specs, W0, factors, rest)

    def _group_outputs(self, specs, W0: Tensor, factors: Factors | None, rest: Tensor | None) -> Iterator[Merged]:
        finite = None if factors is None else _factors_finite(factors.U, factors.S, factors.V)
        for g, spec in enumerate(specs):
            if factors is None:  # a dense merge, no rank asked for
                out = (W0[g].to(rest.dtype) + rest[g]).to(spec.out_dtype)
                self._check_merged(spec, 0, spec.rows, out)
                yield Merged(spec, 0, out.reshape(spec.shape), LayerReport(spec.key, spec.shape, 0, None))
                continue
            frozen = W0[g] if rest is None else W0[g].to(rest.dtype) + rest[g]
            yield self._low_rank(spec, frozen, factors, g, rest is not None, finite[g])

    def _low_rank(self, spec: TensorSpec, frozen: Tensor, factors: Factors, g: int, residual: bool, finite: bool | None = None) -> Merged:
        """Matrix g of `factors` as `spec`'s output; `finite`: whether its factors are, if the caller knows."""
        U, S, V = factors.U[g], factors.S[g], factors.V[g]
        counts = None if factors.counts is None else factors.counts[g].tolist()
        value = LowRank(frozen.reshape(spec.shape) if residual else frozen.reshape(spec.shape).to(spec.out_dtype), U, S, V)
        if not (_factors_finite(U[None], S[None], V[None])[0] if finite is None else finite):
            raise ValueError(f"{spec.key!r} {spec.shape}: the merged factors are not finite")
        return Merged(spec, 0, value, LayerReport(spec.key, spec.shape, S.shape[-1], counts))

