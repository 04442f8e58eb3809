"""`svdfuse.atlas`: the aTLAS adaptation baseline, one learned coefficient per source and tensor.

aTLAS (arXiv 2411.03055) adapts `W = W0 + Σ_i λ_i τ_i` with a coefficient λ_i per source and
parameter tensor, trained on the target task. Its model must hold every source's task vector,
O(sources × model) memory, unlike AXIS whose Stage 2 needs only the merged factors.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from svdfuse.methods import get_method
from svdfuse.ops import SVDOptions
from svdfuse.nn.convert import parametrize_tensor
from svdfuse.nn.layers import TaskCoefficients
from svdfuse.plan import Role, make_plan, matches_any
from svdfuse.resources import resolve_device
from svdfuse.sources import ModelLike, Reader, SourceError, open_source, open_sources

__all__ = ["atlas"]


def atlas(
    models: Sequence[ModelLike] | Mapping[str, ModelLike],
    base: ModelLike,
    module: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    init: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A copy of `module` whose parameters are `W0 + Σ_i λ_i τ_i`, ready for `svdfuse.adapt`.

    Args:
        models: the T source models (as for `svdfuse.merge`).
        base: the pre-trained model they were fine-tuned from.
        module: the base architecture; its parameters named by the base get coefficients.
        include, exclude: glob patterns of parameter names that get coefficients (default: all
            floating parameters); the others keep the base's values.
        init: initial λ of every source (default 1 / T: the average of the sources).
        dtype: cast every tensor to this dtype first.
        device: where the task vectors live (default: CUDA when available, as for `merge`).

    Returns:
        The model; `svdfuse.adapt(model, data)` trains only its T coefficients per tensor.

    Example::

        model = svdfuse.atlas(sources, base="vit-b32.safetensors", module=clip_model)
        svdfuse.adapt(model, loader, epochs=10, lr=1e-1)
    """
    device = resolve_device(device)
    base_source = open_source(base, "base")
    sources = open_sources(models, base, base_source)
    # The plan only checks the sources against the base here: aTLAS holds every task vector anyway.
    plan = make_plan(
        base_source, sources, get_method("average"), None, include=None, exclude=(), dtype=dtype, budget=1 << 62, svd=SVDOptions(), params={}
    )
    reader = Reader(base_source, sources, dtype)
    lam = 1.0 / len(sources) if init is None else init
    model = copy.deepcopy(module)
    params = dict(model.named_parameters())
    wrong = [(s.key, tuple(params[s.key].shape), s.shape) for s in plan.specs if s.key in params and tuple(params[s.key].shape) != s.shape]
    if wrong or not any(s.key in params for s in plan.specs):
        found = f"tensor {wrong[0][0]!r} is {wrong[0][1]}, the base's is {wrong[0][2]}" if wrong else "none of its parameters has a name of the base's"
        raise ValueError(f"atlas: module {type(module).__name__} is not the base's architecture: {found}")
    for spec in plan.specs:
        key = spec.key
        if key not in params or spec.role is Role.COPIED:
            continue
        if (include is not None and not matches_any(key, include)) or matches_any(key, exclude):
            continue
        W0 = reader.base_rows(key, 0, spec.rows, torch.empty(spec.shape, dtype=spec.out_dtype, device=device))
        W = torch.empty((len(sources), *spec.shape), dtype=spec.out_dtype, device=device)
        for i in range(len(sources)):
            reader.source_rows(i, key, 0, spec.rows, W[i])
        if not (torch.isfinite(W0).all() and torch.isfinite(W).all()):
            raise SourceError(reader.non_finite(key, 0, spec.rows, spec.shape) or f"{key!r}: not finite")
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        with torch.no_grad():
            params[key].copy_(W0)
        params[key].requires_grad_(False)
        tau = (W - W0).to(params[key])
        parametrize_tensor(owner, attr, TaskCoefficients(tau, lam))
    return model
