"""The merge plan: which tensors are merged as matrices, at which rank, in which groups.

Everything here is decided from shapes and dtypes alone, before any data is read, so a mismatch
between the base and a source fails at once with the source, tensor and expected vs found.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from svdfuse.sources import Source, SourceError

# Embedding tables are lookups, not linear maps of the activations: merged by averaging unless
# a user includes them on purpose.
DEFAULT_EXCLUDE: tuple[str, ...] = ("*embed*",)


@dataclass(frozen=True)
class MatrixEntry:
    """One tensor merged as an m×n matrix (conv kernels as out × in·kh·kw) at rank `k`."""

    key: str
    shape: tuple[int, ...]
    m: int
    n: int
    k: int | None


@dataclass(frozen=True)
class Plan:
    """Matrices in groups of one shape (k None: no rank asked for); other floating tensors merged elementwise; the rest copied from the base."""

    keys: list[str]
    dtypes: dict[str, torch.dtype]
    groups: list[list[MatrixEntry]]
    elementwise: list[str]
    copied: list[str]

    @property
    def matrices(self) -> list[MatrixEntry]:
        return [entry for group in self.groups for entry in group]


def resolve_rank(k: int | float, m: int, n: int, what: str) -> int:
    """Rank for an m×n matrix: an int as given, a float in (0, 1] as floor(k * min(m, n)), at least 1."""
    limit = min(m, n)
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{what} must be an int or a float fraction, found {type(k).__name__}")
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


def _is_matrix(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return len(shape) >= 2 and dtype.is_floating_point and key.rsplit(".", 1)[-1].endswith("weight")


def _check_sources(base: Source, sources: list[Source], dtype: torch.dtype | None) -> tuple[list[str], dict]:
    keys = base.keys()
    meta = {key: base.meta(key) for key in keys}
    floating = [key for key in keys if meta[key][1].is_floating_point]
    known = set(keys)
    for source in sources:
        have = set(source.keys())
        missing = [key for key in floating if key not in have]
        extra = sorted(key for key in have - known if source.meta(key)[1].is_floating_point)
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
    return keys, meta


def make_plan(
    base: Source,
    sources: list[Source],
    k: int | float | None,
    *,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    dtype: torch.dtype | None,
    group_bytes: int,
) -> Plan:
    """Check every source against the base and split the model into matrix groups.

    A group holds same-shape matrices whose data over all sources fits in `group_bytes` (at least
    one matrix), so peak memory is O(sources × one group), never O(sources × model).
    """
    if not sources:
        raise SourceError("merge needs at least one source model, found an empty list")
    keys, meta = _check_sources(base, sources, dtype)
    by_shape: dict[tuple[int, int], list[MatrixEntry]] = {}
    elementwise, copied, too_small = [], [], []
    for key in keys:
        shape, key_dtype = meta[key]
        if not key_dtype.is_floating_point:
            copied.append(key)
            continue
        wanted = (include is None or matches_any(key, include)) and not matches_any(key, exclude)
        if not (wanted and _is_matrix(key, shape, key_dtype)):
            elementwise.append(key)
            continue
        m, n = shape[0], math.prod(shape[1:])
        rank = None if k is None else resolve_rank(k, m, n, "k")
        if rank is not None and rank > min(m, n):
            too_small.append(f"{key!r} {m}x{n}")
        by_shape.setdefault((m, n), []).append(MatrixEntry(key, shape, m, n, rank))
    if too_small:
        raise ValueError(
            f"k={k} is larger than min(m, n) of {len(too_small)} matrices (e.g. {too_small[:3]}); "
            "give k as a fraction of min(m, n), or exclude them with a name pattern"
        )
    groups = []
    for (m, n), entries in by_shape.items():
        itemsize = (dtype or meta[entries[0].key][1]).itemsize
        per_matrix = (len(sources) + 1) * m * n * max(itemsize, 4)
        size = max(1, group_bytes // per_matrix)
        groups += [entries[i : i + size] for i in range(0, len(entries), size)]
    return Plan(keys, {key: meta[key][1] for key in keys}, groups, elementwise, copied)
