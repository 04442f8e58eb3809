"""`svdfuse.decompose`: a source's task matrices as top-r SVD factors, computed once, merged many times.

A pool of 400 sources gains a member at the cost of one decomposition, not 400: each source is
decomposed against the base once, and `svdfuse.merge` takes the caches as sources for the methods
that only need per-source truncated SVDs (AXIS, TSV-M), with the same selection and factors as
decomposing on the fly with the same options.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from svdfuse import arguments
from svdfuse.methods import get_method
from svdfuse.ops import SVDOptions
from svdfuse.pipeline import Compute, Progress
from svdfuse.plan import DEFAULT_EXCLUDE, Plan, Role, make_plan, svd_fields
from svdfuse.reference import compute_dtype
from svdfuse.resources import default_budget, resolve_device
from svdfuse.sinks import SafetensorsWriter, check_output, parse_size
from svdfuse.sources import ComponentCache, MappingSource, ModelLike, Reader, SourceError, open_source

__all__ = ["decompose"]


def decompose(
    source: ModelLike,
    *,
    base: ModelLike,
    rank: int | float,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    svd: SVDOptions | str = SVDOptions(),
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    output: str | os.PathLike | None = None,
    max_memory: int | str | None = None,
) -> ComponentCache:
    """Decompose one source against its base into a component cache, a valid `svdfuse.merge` source.

    Every tensor merged as a matrix (the same `include`/`exclude` rules as `merge`) is stored as
    the top-`rank` factors of its task matrix `Δ = W − W0`: `NAME.U` (m, r), `NAME.S` (r,),
    `NAME.V` (n, r) in the accumulation dtype; every other tensor as it is. The SVD options, the
    rank, the original shapes and the digests of the base's matrices and of the source go in the
    file's metadata: a merge on another base, or with the source beside its cache, is refused.

    Args:
        source, base: a fine-tuned model and its pre-trained base (any kind `merge` takes).
        rank: components per matrix, an int or a fraction of min(m, n); a merge can use it for any
            k (AXIS) or budget (TSV-M) up to it.
        svd: the decomposition options; a merge using the cache must use the same.
        output: write the cache to this new `.safetensors` file (by convention `NAME.svd.safetensors`).
        max_memory: memory budget (default: half of the available memory).

    Returns:
        The `ComponentCache` (read from `output` when given).

    Example::

        svdfuse.decompose("ft-cars", base="vit-b32", rank=128, output="ft-cars.svd.safetensors")
        svdfuse.merge(["ft-cars.svd.safetensors", "ft-dtd.svd.safetensors"], k=76, base="vit-b32")
    """
    rank = arguments.count(rank, "rank")
    svd = arguments.svd_options(svd)
    dtype = None if dtype is None else arguments.dtype(dtype)
    include, exclude = arguments.patterns(include, "include"), arguments.patterns(exclude, "exclude")
    if output is not None:
        check_output(output)
    base_source = open_source(base, "base")
    src = open_source(source, "source 0", base_source)
    if isinstance(src, ComponentCache):
        raise SourceError(f"{src.label}: is already a component cache; decompose the fine-tuned model itself")
    device = resolve_device(device)
    budget = parse_size(max_memory, "max_memory") if max_memory is not None else default_budget()
    axis = get_method("axis")
    plan = make_plan(
        base_source, [src], axis, rank, include=include, exclude=exclude, dtype=dtype, budget=budget, svd=svd, params={}, rank_name="rank",
    )
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for spec in plan.specs:
        if spec.role is Role.MATRIX:
            acc = compute_dtype(spec.out_dtype)
            entries += [(f"{spec.key}.U", (spec.m, spec.k), acc), (f"{spec.key}.S", (spec.k,), acc), (f"{spec.key}.V", (spec.n, spec.k), acc)]
        else:
            entries.append((spec.key, spec.shape, spec.out_dtype))
    info = ComponentCache.info(
        rank, svd_fields(svd), base_source, src, {s.key: (s.shape, s.out_dtype) for s in plan.specs}, [s.key for s in plan.matrices],
    )
    compute = Compute(axis, Reader(base_source, [src], dtype), svd=svd, device=device, params={}, want_factors=False, progress=Progress([True]), budget=budget)
    produced = _decomposed(plan, compute)
    if output is None:
        tensors = {}
        for name, start, t in produced:
            tensors.setdefault(name, []).append(t)
        whole = {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in tensors.items()}
        return ComponentCache(src.label, MappingSource(src.label, whole), info)
    with SafetensorsWriter(output, entries, metadata=info) as writer:
        for name, start, t in produced:  # written as computed: one piece in memory at a time
            writer.write(name, t, start)
        writer.commit(name for name, _, _ in entries)
    return open_source(output, src.label)


def _decomposed(plan: Plan, compute: Compute) -> Iterator[tuple[str, int, Tensor]]:
    """(name, first row, rows) of the cache: every matrix group's factors, the other tensors as
    they are, in row blocks of the plan's size."""
    reader = compute.reader
    for task in plan.tasks:
        spec = task.specs[0]
        if spec.role is Role.MATRIX:
            W0 = compute.read_group(task.specs, spec.out_dtype)
            U, S, V = next(compute.source_factors(task, W0, spec.k))  # one source: one chunk
            # An adapter of rank below k (or that leaves the matrix alone) has fewer components: zeros after them.
            U, S, V = (torch.nn.functional.pad(t, (0, spec.k - t.shape[-1])) for t in (U, S, V))
            for g, spec in enumerate(task.specs):
                yield from ((f"{spec.key}.{part}", 0, t[g, 0].cpu()) for part, t in zip("USV", (U, S, V)))
            continue
        for start in range(0, spec.rows, task.block):
            stop = min(start + task.block, spec.rows)
            rows = torch.empty((stop - start, *spec.shape[1:]) if spec.shape else (), dtype=spec.out_dtype)
            yield spec.key, start, reader.source_rows(0, spec.key, start, stop, rows)
