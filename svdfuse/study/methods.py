"""The compared methods, each through svdfuse's public API, at matched trainable parameters.

Every merge method + Stage 2 trains exactly N singular values per merged matrix:
- AXIS keeps K = `k` per matrix (the paper's 10%); where N > K, Stage 2 extends each layer by
  N − K directions orthogonal to U and V with σ = 0 (`excess="extend"`), so the count matches.
- The other merges are made with k = N: the top-N SVD components of each merged task matrix are
  trained, the rest stays frozen (`svdfuse.merge` with `k`).
- "pretrained": the pretrained weights alone, with the top-N singular values of each *weight
  matrix itself* trained (a merge of the one pretrained model over a zero base).
- aTLAS (`svdfuse.atlas`) trains one coefficient per source and tensor, whatever N: its count is
  reported beside its accuracy. The linear probe and the target's full fine-tune are references.

Method parameters are svdfuse's defaults, except DARE's scaling, set to Task Arithmetic's 0.3
(DARE is Task Arithmetic over dropped-and-rescaled task vectors); nothing is tuned per method.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import svdfuse
from svdfuse.study.training import Batches, accuracy

__all__ = ["MERGES", "REFERENCES", "METHOD_LABELS", "Target", "RunResult", "run_method", "noisy", "pruned"]

MERGES = ("axis", "axis_exact", "average", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c")
REFERENCES = ("pretrained", "atlas", "linear_probe", "finetune")
METHOD_LABELS = {
    "axis": "AXIS (rSVD) + S2", "axis_exact": "AXIS (exact SVD) + S2", "average": "Average + S2",
    "task_arithmetic": "Task Arithmetic + S2", "ties": "TIES + S2", "dare": "DARE + S2", "tsv_m": "TSV-M + S2",
    "iso_c": "Iso-C + S2", "pretrained": "Pretrained + S2 (own top σ)", "atlas": "aTLAS",
    "linear_probe": "Linear probe (pretrained)", "finetune": "Full fine-tune on target",
}
_PARAMS: dict[str, dict[str, Any]] = {"dare": {"scaling": 0.3}}


@dataclass
class Target:
    """One leave-one-out target: the pretrained top, the target's frozen head and its data."""

    name: str
    top: nn.Module
    base: dict[str, Tensor]
    head: nn.Linear
    include: list[str]
    train: tuple[Any, Tensor]
    val: tuple[Any, Tensor]
    test: tuple[Any, Tensor]
    k: float
    epochs: int
    lr: float
    batch: int


@dataclass
class RunResult:
    """One method on one target: accuracies (%) before Stage 2 (merge alone) and after, trainable scalars."""

    merged_val: float | None
    merged_test: float | None
    val: float
    test: float
    trainable: int
    seconds: float
    cpu_seconds: float


def _merge(target: Target, sources: Mapping[str, dict[str, Tensor]], method: str, n: float, seed: int) -> nn.Module:
    if method in ("axis", "axis_exact"):
        svd = svdfuse.SVDOptions(method="randomized" if method == "axis" else "exact", seed=seed)
        result = svdfuse.merge(sources, k=target.k, base=target.base, method="axis", include=target.include, svd=svd, device="cpu", progress=False)
    elif method == "pretrained":
        zeros = {key: torch.zeros_like(value) for key, value in target.base.items()}
        result = svdfuse.merge(
            {"pretrained": target.base}, k=n, base=zeros, method="average", include=target.include, svd=svdfuse.SVDOptions(method="exact"),
            device="cpu", progress=False,
        )
    else:
        # The merge rule does not depend on the SVD, only which top-N directions Stage 2 trains: exact.
        svd = svdfuse.SVDOptions(method="exact", seed=seed)
        result = svdfuse.merge(
            sources, k=n, base=target.base, method=method, include=target.include, svd=svd, device="cpu", progress=False, **_PARAMS.get(method, {})
        )
    return result.to_module(target.top)


def run_method(target: Target, sources: Mapping[str, dict[str, Tensor]], method: str, n: float, seed: int, finetuned: dict[str, Tensor] | None = None) -> RunResult:
    """Build `method`'s model for `target` from `sources`, measure it, adapt it (Stage 2 or aTLAS
    coefficients) with seed `seed`, measure again. `finetuned` is the target's own fine-tune (for
    the "finetune" reference)."""
    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    if method in ("linear_probe", "finetune"):
        top = copy.deepcopy(target.top)
        if method == "finetune":
            top.load_state_dict(finetuned)
        model = nn.Sequential(top, target.head)
        trainable = sum(p.numel() for p in target.head.parameters()) + (sum(p.numel() for p in top.parameters()) if method == "finetune" else 0)
        val, test = accuracy(model, *target.val), accuracy(model, *target.test)
        return RunResult(None, None, val, test, trainable, time.perf_counter() - start, time.process_time() - cpu)
    if method == "atlas":
        body = svdfuse.atlas(sources, base=target.base, module=target.top, device="cpu")
    else:
        body = _merge(target, sources, method, n, seed)
    model = nn.Sequential(body, target.head)
    merged_val, merged_test = accuracy(model, *target.val), accuracy(model, *target.test)
    report = svdfuse.adapt(
        model, Batches(target.train[0], target.train[1], target.batch, seed), n=n, epochs=target.epochs, lr=target.lr,
        excess="extend", progress=False,
    )
    val, test = accuracy(model, *target.val), accuracy(model, *target.test)
    return RunResult(merged_val, merged_test, val, test, report.trainable, time.perf_counter() - start, time.process_time() - cpu)


# ---------------------------------------------------------------------------------- robustness


def noisy(base: dict[str, Tensor], source: dict[str, Tensor], scale: float, seed: int) -> dict[str, Tensor]:
    """`source` with Gaussian noise added to each floating tensor's task vector Δ, the noise's
    Frobenius norm `scale`·‖Δ‖_F (its entries' std `scale`·‖Δ‖_F / sqrt(numel))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in source.items():
        delta = value - base[key]
        if not value.is_floating_point() or delta.norm() == 0:
            out[key] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=gen, dtype=value.dtype)
        out[key] = value + noise * (scale * delta.norm() / noise.norm())
    return out


def pruned(base: dict[str, Tensor], source: dict[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """`source` with each tensor's task vector magnitude-pruned: its `fraction` smallest |Δ|
    entries set to 0 (ties broken by position)."""
    out = {}
    for key, value in source.items():
        delta = (value - base[key]).flatten()
        drop = int(fraction * delta.numel())
        if drop > 0 and value.is_floating_point():
            smallest = delta.abs().argsort(stable=True)[:drop]
            delta = delta.clone()
            delta[smallest] = 0
        out[key] = base[key] + delta.view_as(value)
    return out
