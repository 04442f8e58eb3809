"""The compared methods, each through svdfuse's public API, and how each is adapted to a target.

A variant is a merge method and what its Stage 2 trains (the basis):
- "delta": the top-N singular components of the merged task matrix Δ_m (the merge made with
  k = max(K, N), so no direction is padded; where the sources span fewer than N, as LoRA
  adapters of rank r span T·r, all of them);
- "weight": the top-N singular components of the merged weight W0 + Δ_m itself
  (`to_module(basis="weight")`), for every method;
- "extend" (AXIS only): the paper's K = 10% components, extended to N by directions with σ = 0.
References: "pretrained" (the pretrained weights' own top-N σ), aTLAS (one coefficient per source
and tensor) and the linear probe (the head alone).

Every variant's head is trained the same way (`stage2`): a linear probe refitted on that
variant's merged features, then trained jointly with its Stage-2 parameters by `training.train`.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

import svdfuse
from svdfuse.nn import set_trainable
from svdfuse.study.training import Schedule, correct, embed, fit_head, train

__all__ = ["MERGES", "Variant", "Target", "Outcome", "variants", "grid", "merge", "body", "probe", "stage2"]

MERGES = ("axis", "average", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c")
AXIS_BASES = ("delta", "weight", "extend")
LABELS = {
    "axis": "AXIS", "average": "Average", "task_arithmetic": "Task Arithmetic", "ties": "TIES", "dare": "DARE", "tsv_m": "TSV-M",
    "iso_c": "Iso-C", "pretrained": "Pretrained", "atlas": "aTLAS", "linear_probe": "Linear probe",
}  # fmt: skip
_SCALED = {"axis", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c"}
_DENSITY = {"ties": ("density", (0.2, 0.5)), "dare": ("drop_rate", (0.5, 0.9))}


@dataclass(frozen=True)
class Variant:
    """A method and what its Stage 2 trains: "delta", "weight", "extend" (merges), "weight"
    (pretrained), "coefficients" (aTLAS) or "head" (linear probe)."""

    method: str
    basis: str

    @property
    def name(self) -> str:
        return f"{self.method}/{self.basis}"

    @property
    def label(self) -> str:
        return f"{LABELS[self.method]} ({self.basis})"


def variants(bases: tuple[str, ...]) -> list[Variant]:
    """AXIS in its three Stage-2 variants, every other merge in `bases`, then the references."""
    out = [Variant("axis", b) for b in AXIS_BASES]
    out += [Variant(m, b) for m in MERGES[1:] for b in bases]
    return out + [Variant("pretrained", "weight"), Variant("atlas", "coefficients"), Variant("linear_probe", "head")]


def grid(variant: Variant, sources: int, k: float) -> list[dict[str, float]]:
    """The merge parameters tried on validation: the scale (1/T, 0.3, 1) of every method that has
    one, TIES's density and DARE's drop rate, AXIS's K where Stage 2 does not fix it."""
    axes: dict[str, tuple[float, ...]] = {}
    if variant.method in _SCALED:
        axes["scaling"] = tuple(sorted({1 / sources, 0.3, 1.0}))
    if variant.method in _DENSITY:
        name, values = _DENSITY[variant.method]
        axes[name] = values
    if variant == Variant("axis", "weight"):
        axes["k"] = (k, 2 * k)
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


@dataclass
class Target:
    """One leave-one-out target: the pretrained top (features -> embedding), its merged matrices,
    the few-shot training examples, validation and test (None while tuning: never read there)."""

    name: str
    top: nn.Module
    base: dict[str, Tensor]
    include: list[str]
    classes: int
    train: tuple[Any, Tensor]
    val: tuple[Any, Tensor]
    test: tuple[Any, Tensor] | None
    n: float
    k: float

    def without_test(self) -> Target:
        return replace(self, test=None)


@dataclass
class Outcome:
    """One variant on one target after Stage 2: validation accuracy (%) of the kept epoch, that
    epoch, test correctness per example (None while tuning), trainable scalars (head excluded)."""

    val: float
    epoch: int
    test: Tensor | None
    trainable: int


def merge(target: Target, sources: Mapping[str, Any], variant: Variant, params: Mapping[str, float]) -> Any:
    """`variant`'s merge of `sources` (state dicts of the top, or peft adapter directories of it:
    the LoRA track) for `target` (a `MergeResult`), or None where there is none (aTLAS, the linear
    probe). Exact SVDs: the merge rule does not depend on a seed."""
    exact = svdfuse.SVDOptions(method="exact")
    common = {"include": target.include, "svd": exact, "device": "cpu", "progress": False}
    if variant.method == "pretrained":
        zeros = {key: torch.zeros_like(value) for key, value in target.base.items()}
        return svdfuse.merge({"pretrained": target.base}, k=target.n, base=zeros, method="average", **common)
    if variant.method not in MERGES:
        return None
    params = dict(params)
    if variant.method == "axis":
        k = {"delta": max(target.k, target.n), "extend": target.k}.get(variant.basis, params.pop("k", target.k))
    else:
        k = target.n
    return svdfuse.merge(sources, k=k, base=target.base, method=variant.method, **params, **common)


def body(target: Target, sources: Mapping[str, Any], variant: Variant, merged: Any) -> nn.Module:
    """A fresh model of `variant` (features -> embedding) with its Stage-2 parameters trainable."""
    if variant.method == "linear_probe":
        return copy.deepcopy(target.top).requires_grad_(False)
    if variant.method == "atlas":
        module = svdfuse.atlas(sources, base=target.base, module=target.top, include=target.include, device="cpu")
        set_trainable(module, target.n)
        return module
    if variant.basis == "extend":
        module = merged.to_module(target.top)
        set_trainable(module, target.n, excess="extend")
        return module
    if variant.basis == "weight":
        module = merged.to_module(target.top, target.n, basis="weight")
        set_trainable(module, target.n)
        return module
    # A delta spans at most what its sources do: on the LoRA track, Σ r of the adapters merged,
    # which may be fewer than N; it then trains all of them (each run records its trainable count).
    module = merged.to_module(target.top)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="excess='clip'")
        set_trainable(module, target.n, excess="clip")
    return module


def probe(model: nn.Module, target: Target) -> tuple[nn.Linear, float]:
    """A linear probe fitted on `model`'s features of the target's few-shot examples: the head and
    its validation accuracy (%)."""
    train_emb = embed(model, target.train[0])
    return fit_head((train_emb, target.train[1]), (embed(model, target.val[0]), target.val[1]), target.classes)


def stage2(model: nn.Module, target: Target, lr: float, schedule: Schedule, seed: int) -> Outcome:
    """Refit the probe on `model`'s features, then train it jointly with `model`'s trainable
    parameters (learning rate `lr`; the head at `schedule.head_lr`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    head, _ = probe(model, target)
    full = nn.Sequential(model, head)
    kept = train(full, [(params, lr), (head.parameters(), schedule.head_lr)], target.train, target.val, schedule, seed)
    test = correct(full, *target.test) if target.test is not None else None
    return Outcome(kept.val, kept.epoch, test, sum(p.numel() for p in params))
