"""The merge plan: what happens to every tensor, cut into tasks and pieces that fit a memory budget.

Everything here is decided from shapes and dtypes alone, before any data is read, so a mismatch
between the base and a source fails at once with the source, tensor and expected vs found, and a
budget too small for the smallest piece fails before any work.

A *task* is a unit of work that is never split between processes: one tensor (merged
elementwise, in row blocks over all sources) or a group of same-shape matrices (SVD methods, over
source chunks where the method allows). A *piece* is what is held in memory at once: one row block,
or one source chunk of a group. Its size comes from the budget, never from the model or the number
of sources.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from svdfuse import arguments
from svdfuse import cpu
from svdfuse.adapters import LoraSource
from svdfuse.methods import Kind, Method
from svdfuse.methods.trim import TRIM_SHARE, TrimScope
from svdfuse.ops import SVDOptions
from svdfuse.reference import compute_dtype
from svdfuse.sources import ComponentCache, MappingSource, Source, SourceError

# Embedding tables are lookups, not linear maps of the activations: merged elementwise unless a
# user includes them on purpose.
DEFAULT_EXCLUDE: tuple[str, ...] = ("*embed*",)

# Temporaries of an elementwise piece beyond its (T + 1)-row buffer, in units of that buffer
# (measured peaks, tests/test_memory.py): task vectors are formed in place; TIES adds |τ|, its
# masks and one product; DARE a mask per source.
_ELEMENTWISE_WORKSPACE = {"ties": 2.5, "dare": 0.6}
_DEFAULT_WORKSPACE = 0.5
# Rows of a source an elementwise piece reads from files at a time, at most: the T + 1 buffers that
# a block is read into are reused for every block, so held to about 1 MiB a source they stay in the
# L3 cache from the read to the kernel, and their page faults are paid once for a few MiB instead of
# once per large tensor. Task Arithmetic of 12 MiniLM fp32 files, streamed: 0.57 s with blocks of the
# whole budget, 0.31 s at 1 MiB, 0.37 s at 256 KiB, 0.34 s at 4 MiB (2-core machine, 2026-12-07).
# Models held in memory are not read (the kernel takes views): their blocks stay budget-sized, fewer
# kernel calls (Average of 8 MiniLM fp32 in memory: 0.107 s capped, 0.095 s not). TIES keeps
# budget-sized blocks: its trim passes pay per block (T = 48 bf16: 1.7 s -> 2.3 s at 1 MiB).
SOURCE_BLOCK_BYTES = 1 << 20


class Role(str, enum.Enum):
    """What the merge does with a tensor."""

    MATRIX = "matrix"  # merged as an m×n matrix by the method's SVD rule
    ELEMENTWISE = "elementwise"  # the method's elementwise rule (mean task vector for SVD methods)
    COPIED = "copied"  # integer buffers: the base's, checked equal in every source


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: name, shape, stored dtype, the dtype it is written in, its role
    and, for matrices, the rank k (None: no rank asked for)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    out_dtype: torch.dtype
    role: Role
    k: int | None = None

    @property
    def m(self) -> int:
        return self.shape[0]

    @property
    def n(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def rows(self) -> int:
        """Rows of the first dim (a scalar is one row of one entry)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def out_nbytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize


@dataclass(frozen=True)
class Task:
    """A unit of work: `specs` (one tensor, or G same-shape matrices), cut into pieces of `block`
    rows (elementwise) or `block` sources (matrix groups); `nbytes` read from base and sources."""

    specs: tuple[TensorSpec, ...]
    block: int
    nbytes: int


@dataclass(frozen=True)
class ModelTrim:
    """A trim whose thresholds span the whole model's task vector (TIES, `trim_scope="model"`),
    found in a first pass over `tasks` (every floating tensor, in model order) before the merge.

    offsets: each tensor's first entry's flat index in that vector of `numel` entries; dtype: the
    accumulation dtype shared by all of them.
    """

    tasks: tuple[Task, ...]
    offsets: dict[str, int]
    numel: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Plan:
    """Every tensor of the model in model order, the tasks that merge them, and the whole-model
    trim that must run before them, if any."""

    specs: list[TensorSpec]
    tasks: list[Task]
    sources: int
    budget: int
    model_trim: ModelTrim | None = None

    @property
    def matrices(self) -> list[TensorSpec]:
        return [spec for spec in self.specs if spec.role is Role.MATRIX]

    @property
    def nbytes(self) -> int:
        """Bytes read from the base and all sources over the whole merge."""
        return sum(task.nbytes for task in self.tasks)


def resolve_rank(k: int | float, m: int, n: int, what: str) -> int:
    """Rank for an m×n matrix: an int as given, a float in (0, 1] as floor(k * min(m, n)), at least 1."""
    limit = min(m, n)
    k = arguments.count(k, what)
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"{what} as a fraction of min(m, n) must be in (0, 1], found {k}")
        return max(1, math.floor(k * limit))
    if k <= 0:
        raise ValueError(f"{what} must be positive, found {k}")
    return k


def matches_any(key: str, patterns: Sequence[str]) -> bool:
    """Whether `key` matches any of the glob `patterns`."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _is_matrix(key: str, shape: tuple[int, ...], dtype: torch.dtype, named: bool) -> bool:
    """Whether a floating tensor is merged as a matrix: 2+ dims, and a name ending in "weight"
    unless an `include` pattern names it (open_clip's `proj`, `positional_embedding`)."""
    return len(shape) >= 2 and dtype.is_floating_point and (named or key.rsplit(".", 1)[-1].endswith("weight"))


def tensor_role(key: str, shape: tuple[int, ...], dtype: torch.dtype, include: Sequence[str] | None, exclude: Sequence[str]) -> Role:
    """What a merge does with tensor `key`: integer tensors are copied; floating tensors with 2+
    dims that `include` (None: all weights) names and `exclude` does not are merged as matrices
    (any name when an `include` pattern names it); the rest elementwise."""
    if not dtype.is_floating_point:
        return Role.COPIED
    named = include is not None and matches_any(key, include)
    wanted = (include is None or named) and not matches_any(key, exclude)
    return Role.MATRIX if wanted and _is_matrix(key, shape, dtype, named) else Role.ELEMENTWISE


def _check_sources(base: Source, sources: list[Source], dtype: torch.dtype | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    meta = {key: base.meta(key) for key in base.keys()}
    floating = [key for key, (_, d) in meta.items() if d.is_floating_point]
    for source in sources:
        have = set(source.keys())
        missing = [key for key in floating if key not in have]
        extra = sorted(key for key in have - set(meta) if source.meta(key)[1].is_floating_point)
        if missing or extra:
            raise SourceError(
                f"{source.label}: its tensors differ from the base's: "
                + (f"missing {len(missing)} (e.g. {missing[:3]})" if missing else "")
                + ("; " if missing and extra else "")
                + (f"{len(extra)} not in the base (e.g. {extra[:3]})" if extra else "")
            )
        for key in floating:
            shape, found_dtype = source.meta(key)
            want_shape, want_dtype = meta[key]
            if shape != want_shape:
                raise SourceError(f"{source.label}: {key!r} has shape {shape}, base has {want_shape}")
            if dtype is None and found_dtype != want_dtype:
                raise SourceError(
                    f"{source.label}: {key!r} is {found_dtype}, base is {want_dtype}; mixed dtypes are not cast "
                    "silently: pass dtype=... to merge in one dtype"
                )
    return meta


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def _too_small(budget: int, need: int, what: str) -> ValueError:
    return ValueError(
        f"max_memory={_size(budget)} is smaller than the smallest piece this merge can compute: {what} needs "
        f"{_size(need)}; give at least max_memory={math.ceil(need / 1024)}KiB"
    )


def _trimmed(method: Method, spec: TensorSpec) -> bool:
    """Whether `spec`'s pieces share the budget with a trim's search (the floating tensors of TIES)."""
    return method.trim_density is not None and spec.role is not Role.COPIED


def _room(budget: int, trimmed: bool) -> int:
    """What a piece may hold of `budget`: all of it, or beside a trim what the values bracketing its
    thresholds leave (they may hold `TRIM_SHARE` of the budget, the pipeline's `exact_trim` limit)."""
    return budget - int(TRIM_SHARE * budget) if trimmed else budget


def _row_bytes(spec: TensorSpec, sources: int, method: Method) -> int:
    """Bytes one row of an elementwise piece holds: the base's and every source's rows in the
    accumulation dtype with the method's temporaries (an integer tensor: the base's and one source's)."""
    if spec.role is Role.COPIED:
        return 2 * spec.row_numel * spec.dtype.itemsize
    workspace = _ELEMENTWISE_WORKSPACE.get(method.name, _DEFAULT_WORKSPACE) if method.kind is Kind.ELEMENTWISE else _DEFAULT_WORKSPACE
    return math.ceil((sources + 1) * (1 + workspace) * spec.row_numel * compute_dtype(spec.out_dtype).itemsize)


def _elementwise_least(spec: TensorSpec, sources: int, method: Method) -> tuple[int, str]:
    """(the smallest budget whose room holds one row of `spec`, what that piece is)."""
    per_row, trimmed = _row_bytes(spec, sources, method), _trimmed(method, spec)
    what = f"one row of {spec.key!r} {spec.shape} over {sources} sources"
    if not trimmed:
        return per_row, what
    least = math.ceil(per_row / (1 - TRIM_SHARE))  # then exact: the room grows with the budget, by at most a byte a step
    while _room(least - 1, True) >= per_row:
        least -= 1
    while _room(least, True) < per_row:
        least += 1
    return least, f"{what}, beside the {TRIM_SHARE:.0%} of the budget that {method.name}'s trim holds,"


def _elementwise_task(spec: TensorSpec, sources: int, method: Method, budget: int, read: bool) -> Task:
    """`spec` merged in row blocks; `read`: some model is read into buffers (not all held in memory)."""
    trimmed = _trimmed(method, spec)
    rows = _room(budget, trimmed) // _row_bytes(spec, sources, method)
    if read and not trimmed:
        rows = min(rows, max(1, SOURCE_BLOCK_BYTES // (spec.row_numel * spec.dtype.itemsize)))
    return Task((spec,), min(spec.rows, rows), (sources + 1) * spec.nbytes)


def _svd_piece_bytes(m: int, n: int, matrices: int, sources: int, width: int, itemsize: int) -> int:
    """Bytes of a group piece: its matrices in their buffer dtype, the randomized SVD's working
    copy of a few task matrices in fp32 (`svdfuse.cpu`), its sketches and factors, and one fp32
    matrix of workspace."""
    data = matrices * (sources + 1) * m * n * itemsize
    working = cpu.buffer_matrices(matrices * sources, m, n, 4) * m * n * 4
    sketches = 4 * matrices * sources * (m + n) * width * 4
    return data + working + sketches + m * n * 4


def _adapter_ranks(entries: list[TensorSpec], sources: Sequence[Source], method: Method) -> tuple[int, int] | None:
    """(Σ r at the group's widest matrix, the widest adapter's r) when `method` merges the group
    from the adapters' factors (`Method.factored`; every source an adapter that replaces none of
    its matrices whole), else None."""
    if method.factored is None or not all(isinstance(s, LoraSource) and all(s.touched(e.key) != "dense" for e in entries) for s in sources):
        return None
    ranks = [[s.modules[e.key].rank for s in sources if e.key in s.modules] for e in entries]
    return max(map(sum, ranks)), max(max(r, default=1) for r in ranks)


@dataclass(frozen=True)
class _Group:
    """Same-shape matrices merged together: `rank` components per source, pieces of `itemsize`
    buffers; `summed`: Σ r where the group is merged from adapters' factors (`_adapter_ranks`; then
    `rank` is the widest adapter's)."""

    entries: list[TensorSpec]
    rank: int
    itemsize: int
    summed: int | None = None

    def piece_bytes(self, matrices: int, sources: int, oversample: int) -> int:
        m, n = self.entries[0].m, self.entries[0].n
        if self.summed is not None:  # `sources` adapters' factors beside the held part
            return self.held_bytes(matrices) + matrices * sources * self.adapter_bytes()
        return _svd_piece_bytes(m, n, matrices, sources, min(self.rank + oversample, m, n), self.itemsize)

    def held_bytes(self, matrices: int) -> int:
        """A factored group's bytes whatever its adapters: the base and the merged output, and the
        running sum's factors (at most min(m, n) wide) with their QR and SVD copies."""
        m, n = self.entries[0].m, self.entries[0].n
        return matrices * (2 * m * n + 4 * (m + n) * min(m, n, self.summed)) * self.itemsize

    def adapter_bytes(self) -> int:
        """A factored group's bytes per matrix per adapter of a chunk: its factors and their copies."""
        m, n = self.entries[0].m, self.entries[0].n
        return 8 * (m + n) * max(self.rank, 16) * self.itemsize


def _matrix_least(group: _Group, sources: int, method: Method, oversample: int) -> tuple[int, str]:
    """(the smallest budget that holds one piece of `group`, what that piece is): one matrix over
    one source at a time for methods that stream sources, else over all of them."""
    m, n, key = group.entries[0].m, group.entries[0].n, group.entries[0].key
    if group.summed is not None:
        return group.piece_bytes(1, 1, oversample), f"{method.name} of one {m}x{n} matrix ({key!r}) from the adapters' factors, one adapter at a time"
    if method.kind is Kind.FACTORS:
        return group.piece_bytes(1, 1, oversample), f"{method.name} of one {m}x{n} matrix ({key!r}) one source at a time"
    return group.piece_bytes(1, sources, oversample), f"{method.name} over {sources} sources of one {m}x{n} matrix ({key!r})"


def _matrix_tasks(group: _Group, sources: int, method: Method, oversample: int, budget: int) -> list[Task]:
    entries = group.entries
    read = lambda g: g * (sources + 1) * entries[0].m * entries[0].n * entries[0].dtype.itemsize  # noqa: E731
    if group.summed is not None:  # as many matrices as hold their part and one adapter each; the rest of the budget is the chunk
        size = max(1, min(len(entries), budget // group.piece_bytes(1, 1, oversample)))
        tasks = []
        for i in range(0, len(entries), size):
            part = entries[i : i + size]
            chunk = max(1, (budget - group.held_bytes(len(part))) // (len(part) * group.adapter_bytes()))
            tasks.append(Task(tuple(part), min(chunk, sources), read(len(part))))
        return tasks
    per_matrix = group.piece_bytes(1, sources, oversample)
    if per_matrix <= budget:
        size = max(1, budget // per_matrix)
        return [Task(tuple(entries[i : i + size]), sources, read(len(entries[i : i + size]))) for i in range(0, len(entries), size)]
    # One matrix over all sources does not fit (a method that streams sources): stream it through source chunks.
    chunk = 1
    while chunk < sources and group.piece_bytes(1, chunk + 1, oversample) <= budget:
        chunk += 1
    return [Task((entry,), chunk, read(1)) for entry in entries]


def make_plan(
    base: Source,
    sources: list[Source],
    method: Method,
    k: int | float | None,
    *,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    dtype: torch.dtype | None,
    budget: int,
    svd: SVDOptions,
    params: dict,
    rank_name: str = "k",
) -> Plan:
    """Check every source against the base, give every tensor its role and cut the work into tasks
    (`rank_name`: how errors name `k`, e.g. decompose's "rank").

    Matrices of one shape form groups whose pieces fit the budget; everything else is merged in
    row blocks over all sources. Peak memory is the budget plus a constant, whatever the number of
    sources or the size of the model.
    """
    if not sources:
        raise SourceError("merge needs at least one source model, found an empty list")
    meta = _check_sources(base, sources, dtype)
    specs: list[TensorSpec] = []
    too_small = []
    for key, (shape, key_dtype) in meta.items():
        out_dtype = dtype or key_dtype if key_dtype.is_floating_point else key_dtype
        role = tensor_role(key, shape, key_dtype, include, exclude)
        if role is not Role.MATRIX:
            specs.append(TensorSpec(key, shape, key_dtype, out_dtype, role))
            continue
        m, n = shape[0], math.prod(shape[1:])
        rank = None if k is None else resolve_rank(k, m, n, rank_name)
        if rank is not None and rank > min(m, n):
            too_small.append(f"{key!r} {m}x{n}")
        specs.append(TensorSpec(key, shape, key_dtype, out_dtype, Role.MATRIX, rank))
    if too_small:
        raise ValueError(
            f"{rank_name}={k} is larger than min(m, n) of {len(too_small)} matrices (e.g. {too_small[:3]}); "
            f"give {rank_name} as a fraction of min(m, n), or exclude them with a name pattern"
        )
    T = len(sources)
    elementwise: list[TensorSpec] = []
    by_shape: dict[tuple[int, int, int | None, torch.dtype], list[TensorSpec]] = {}
    for spec in specs:
        if spec.role is Role.MATRIX and method.kind is not Kind.ELEMENTWISE:
            by_shape.setdefault((spec.m, spec.n, spec.k, spec.out_dtype), []).append(spec)
        else:
            elementwise.append(spec)
    groups = []
    ranks: dict[str, int] = {}  # components each source gives, per matrix (methods working from per-source SVDs)
    for (m, n, rank, out_dtype), entries in by_shape.items():
        r = rank or 1
        if method.source_rank is not None:
            r = method.call(method.source_rank, rank, T, m, n, **params)
        itemsize = compute_dtype(out_dtype).itemsize if method.kind is Kind.MATRICES else out_dtype.itemsize
        factored = _adapter_ranks(entries, sources, method) if method.kind is Kind.MATRICES else None
        if factored is not None:
            summed, r = factored
        groups.append(_Group(entries, r, itemsize, None if factored is None else summed))
        ranks.update({entry.key: r for entry in entries})
    # The largest of the smallest pieces: a budget that holds it holds every piece, so the minimum
    # a refusal names is accepted when given back.
    least = [_elementwise_least(spec, T, method) for spec in elementwise] + [_matrix_least(g, T, method, svd.oversample) for g in groups]
    need, what = max(least, key=lambda pair: pair[0], default=(0, ""))
    if need > budget:
        raise _too_small(budget, need, what)
    read = not all(isinstance(model, MappingSource) for model in (base, *sources))
    tasks = [_elementwise_task(spec, T, method, budget, read) for spec in elementwise]
    for group in groups:
        tasks += _matrix_tasks(group, T, method, svd.oversample, budget)
    _check_caches(base, sources, method, svd, ranks)
    trim = method.trim(params)
    model_trim = _model_trim(tasks) if trim is not None and trim.scope is TrimScope.MODEL else None
    return Plan(specs, tasks, T, budget, model_trim)


def _model_trim(tasks: list[Task]) -> ModelTrim:
    """The whole-model trim over the floating tensors of `tasks`; one accumulation dtype, or an error."""
    trimmed = tuple(task for task in tasks if task.specs[0].role is not Role.COPIED)
    dtypes: dict[torch.dtype, str] = {}
    offsets, numel = {}, 0
    for task in trimmed:
        spec = task.specs[0]
        dtypes.setdefault(compute_dtype(spec.out_dtype), spec.key)
        offsets[spec.key] = numel
        numel += math.prod(spec.shape)
    if len(dtypes) > 1:
        found = ", ".join(f"{d} ({key!r})" for d, key in dtypes.items())
        raise ValueError(
            f"trim_scope='model' takes one threshold per source over every tensor, compared in one dtype; these tensors "
            f"accumulate in {found}: pass dtype=... to merge in one dtype, or use trim_scope='tensor'"
        )
    return ModelTrim(trimmed, offsets, numel, next(iter(dtypes), torch.float32))


def svd_fields(svd: SVDOptions) -> dict:
    """The decomposition options as plain JSON values: what a component cache records and a merge must match."""
    return {name: getattr(value, "value", value) for name, value in dataclasses.asdict(svd).items()}


def _check_caches(base: Source, sources: list[Source], method: Method, svd: SVDOptions, ranks: dict[str, int]) -> None:
    """Component caches fit this merge: a method that works from per-source factors, the same SVD
    options, the same matrices, enough components, the same base (last: it reads the base's matrices)."""
    for source in sources:
        if not isinstance(source, ComponentCache):
            continue
        if method.kind is not Kind.FACTORS:
            raise SourceError(
                f"{source.label}: is a component cache (rank {source.rank}); method {method.name!r} needs the full weights: "
                "merge the source itself, or use a method that works from per-source SVDs (axis, tsv_m)"
            )
        if source.svd != svd_fields(svd):
            differ = {k: (v, svd_fields(svd).get(k)) for k, v in source.svd.items() if svd_fields(svd).get(k) != v}
            raise SourceError(
                f"{source.label}: was decomposed with other SVD options than this merge's: "
                + ", ".join(f"{k}={cached!r} (merge: {asked!r})" for k, (cached, asked) in differ.items())
                + "; decompose it again or merge with the cache's options"
            )
        if set(ranks) != source.matrices:
            key = sorted(set(ranks) ^ source.matrices)[0]
            stored = "factors only" if key in source.matrices else "the whole tensor"
            raise SourceError(
                f"{source.label}: stores {stored} of {key!r}, which this merge {'does not merge' if key in source.matrices else 'merges'} "
                "as a matrix; decompose with the merge's include/exclude patterns"
            )
        for key, rank in ranks.items():
            if source.stored_rank(key) < rank:
                raise SourceError(
                    f"{source.label}: {key!r} is cached at rank {source.stored_rank(key)}, {method.name} needs "
                    f"{rank} components per source; decompose at a higher rank"
                )
        source.check_base(base)
