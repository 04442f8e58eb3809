"""`svdfuse.merge`: any registered method over a whole model, one group of same-shape matrices at a time."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from svdfuse.methods import Factors, Method, get_method
from svdfuse.ops import SVDOptions
from svdfuse.plan import DEFAULT_EXCLUDE, make_plan
from svdfuse.reference import compute_dtype
from svdfuse.result import LayerReport, MergeReport, MergeResult
from svdfuse.sources import ModelLike, Reader, SourceError, open_source, open_sources

__all__ = ["SVDOptions", "merge"]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def _call(method: Method, fn, W0: Tensor, W: Tensor, **context) -> Factors | Tensor:
    if method.upcast:
        acc = compute_dtype(W.dtype)
        W0, W = W0.to(acc), W.to(acc)
    return fn(W0, W, **method.bind(fn, context))


def merge(
    models: Sequence[ModelLike] | Mapping[str, ModelLike],
    k: int | float | None = None,
    base: ModelLike | None = None,
    *,
    method: str = "axis",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    svd: SVDOptions = SVDOptions(),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    group_bytes: int = 1 << 29,
    progress: bool = False,
    **params: Any,
) -> MergeResult:
    """Merge fine-tuned `models` of one `base`, by AXIS (arXiv 2508.19353) or another method.

    AXIS, per matrix: decompose every task matrix `Δ_i = W_i - W0` into rank-one components,
    keep the global top-k by singular value across all sources, sum them and re-orthogonalize.
    Tensors that are not matrices (biases, norms) are averaged; integer buffers are the base's.
    Other methods (`svdfuse.methods.METHODS`): "average", "task_arithmetic", "ties", "dare",
    "tsv_m", "iso_c", "iso_cts"; their parameters go in `params`.

    Args:
        models: the T source models, a list or a name -> model mapping (names label the report);
            each an nn.Module, a state dict, a .safetensors file or a Hugging Face model
            directory, with the base's tensor names and shapes.
        k: per matrix, an int or a float in (0, 1] as floor(k * min(m, n)). For AXIS (required)
            the components kept; for other methods the rank adapted in Stage 2: the merged task
            matrix's top-k SVD components become `components`, the rest stays dense and frozen.
        base: the pre-trained model the sources were fine-tuned from (same kinds as `models`).
        method: the merge method's registered name.
        include: glob patterns of tensor names to merge as matrices (default: every weight with
            2 or more dims; conv kernels as out × in·kh·kw).
        exclude: glob patterns of names never merged as matrices (default: embedding tables).
        svd: decomposition options; the default picks randomized or exact SVD by shape.
        dtype: cast every tensor to this dtype first; by default mixed dtypes are an error.
        device: where to compute (default: CUDA when available).
        group_bytes: budget for one group of same-shape matrices over all sources.
        progress: show a progress bar.
        params: the method's parameters, e.g. `density=0.2` for "ties".

    Returns:
        A `MergeResult` with `state_dict()`, `components[name] = (U_t (m, k), S_t (k,), V_t (n, k))`,
        `report` (selected components per source per matrix) and `to_module(base)`.

    Example::

        result = svdfuse.merge(["ft-cars.safetensors", "ft-dtd.safetensors"], k=76, base="vit-b32.safetensors")
        ties = svdfuse.merge(sources, base=base, method="ties", density=0.2, k=0.1)
        result.save("merged.safetensors")
    """
    start = time.perf_counter()
    spec = get_method(method)
    spec.check_params(params)
    if base is None:
        raise TypeError("merge needs base=, the pre-trained model the sources were fine-tuned from")
    if spec.needs_k and k is None:
        raise TypeError(f"method {method!r} needs k, the number of components kept per matrix (int or fraction)")
    device = torch.device(device) if device is not None else _default_device()
    base_source = open_source(base, "base")
    sources = open_sources(models)
    plan = make_plan(base_source, sources, k, include=include, exclude=exclude, dtype=dtype, group_bytes=group_bytes)
    reader = Reader(base_source, sources, dtype, device)
    components: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    residuals: dict[str, Tensor] = {}
    layers: list[LayerReport] = []
    bar = tqdm(total=len(plan.matrices) + len(plan.elementwise), unit="tensor", desc=f"merge ({method})", disable=not progress)
    for entries in plan.groups:
        m, n, rank = entries[0].m, entries[0].n, entries[0].k
        # Read straight into the group's buffers: stacking per-matrix reads would hold the group twice.
        group_dtype = functools.reduce(torch.promote_types, [dtype or plan.dtypes[e.key] for e in entries])
        W0 = torch.empty((len(entries), m, n), dtype=group_dtype, device=device)
        W = torch.empty((len(entries), len(sources), m, n), dtype=group_dtype, device=device)
        for i, entry in enumerate(entries):
            reader.read(entry.key, (m, n), out=(W0[i], W[i]))
        keys = [e.key for e in entries]
        merged = _call(spec, spec.matrices, W0, W, k=rank, svd=svd, keys=keys, **params)
        del W0, W
        factors, rest = _adaptable(merged, rank, svd)
        for i, entry in enumerate(entries):
            if factors is not None:
                components[entry.key] = (factors.U[i], factors.S[i], factors.V[i])
            if rest is not None:
                residuals[entry.key] = rest[i]
            counts = None if factors is None or factors.counts is None else factors.counts[i].tolist()
            layers.append(LayerReport(entry.key, entry.shape, 0 if factors is None else factors.S.shape[-1], counts))
        bar.update(len(entries))
    tensors: dict[str, Tensor] = {}
    for key in plan.elementwise:
        shape, _ = base_source.meta(key)
        base_t, stack = reader.read(key, shape)
        delta = _call(spec, spec.tensors, base_t[None], stack[None], svd=svd, keys=[key], **params)[0]
        tensors[key] = (base_t.to(delta.dtype) + delta).to(base_t.dtype)
        bar.update(1)
    bar.close()
    unchanged = [s.label for s, d in zip(sources, reader.differs) if not d]
    if unchanged:
        raise SourceError(f"{', '.join(unchanged)}: identical to the base in every tensor; a source must be fine-tuned from it")
    # Groups follow shapes; users read results in the model's own order.
    position = {key: i for i, key in enumerate(plan.keys)}
    layers.sort(key=lambda layer: position[layer.key])
    components = {layer.key: components[layer.key] for layer in layers if layer.key in components}
    report = MergeReport(method, [s.label for s in sources], layers, time.perf_counter() - start)
    return MergeResult(base_source, plan, components, residuals, tensors, report, dtype)
