"""Elementwise merges of task vectors: Average, Task Arithmetic, TIES, DARE.

Each takes the task vectors of a row block of one tensor, `tau: (T, R, *s)` (τ_i = W_i − W0) in
the accumulation dtype, and returns the merged task vector `(R, *s)`. `tau` is the merge's own
buffer: a method may overwrite it.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from svdfuse import ops, reference
from svdfuse.methods.registry import Block, Kind, Method, check_finite_param, check_weights, register
from svdfuse.methods.trim import Trim, TrimKeep, TrimScope
from svdfuse.reference import compute_dtype


class Disjoint(str, enum.Enum):
    """How TIES combines the trimmed values that agree with the elected sign."""

    MEAN = "mean"  # their mean (the TIES paper, mergekit)
    SUM = "sum"  # their sum (FusionBench's default merge_func)


@dataclass(frozen=True)
class Linear:
    """A merge that is a weighted sum of the task vectors, `Σ_i w_i keep_i τ_i / divisor · scale`,
    which `svdfuse.ops.merge_block` computes with the block's checks in one read of the block
    (Average, Task Arithmetic, DARE). `mean`: the divisor is T, or Σ_i w_i with weights (else 1);
    `drop_rate`: DARE's, its masks seeded per entry (`chunk_seeds`)."""

    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    mean: bool = False
    drop_rate: float | None = None

    def merge_block(
        self, W: Tensor | Sequence[Tensor], W0: Tensor, block: Block, *, same_is_zero: bool = False, add_base: bool = True, dtype: torch.dtype | None = None
    ) -> ops.MergedBlock:
        """The merge of a block: W (T, N) or T tensors (N,), the sources' entries, W0 (N,) the base's,
        from flat index `block.start` of tensor `block.key`; see `svdfuse.ops.merge_block`."""
        T = len(W)
        acc = compute_dtype(W0.dtype)
        weights = None if self.weights is None else torch.tensor(self.weights, dtype=acc, device=W0.device)
        divisor = 1.0
        if self.mean:
            divisor = float(T) if weights is None else weights.sum().item()  # Σw rounded as the weights are
        seeds = None
        if self.drop_rate is not None:
            seeds = chunk_seeds(block.seed, block.key, T, block.start, W0.shape[0])
        return ops.merge_block(
            W, W0, weights, scale=self.scale, divisor=divisor, seeds=seeds, start=block.start,
            drop_rate=self.drop_rate or 0.0, same_is_zero=same_is_zero, add_base=add_base, dtype=dtype,
        )  # fmt: skip

    def apply(self, tau: Tensor, block: Block | None = None) -> Tensor:
        """The merged task vector of task vectors `tau` (T, R, *s) -> (R, *s)."""
        flat = tau.reshape(tau.shape[0], -1)
        merged = self.merge_block(flat, torch.zeros_like(flat[0]), block or Block("", 0, 0), add_base=False)
        return merged.value.reshape(tau.shape[1:])


MEAN = Linear(mean=True)  # the mean task vector: non-matrix tensors of the matrix methods


def _weights(method: str, weights: Sequence[float] | None, T: int) -> tuple[float, ...] | None:
    if weights is None:
        return None
    check_weights(method, weights, T)
    return tuple(float(w) for w in weights)


def _average(T: int, *, weights: Sequence[float] | None = None) -> Linear:
    return Linear(_weights("average", weights, T), mean=True)


@register("average", reference_url="https://arxiv.org/abs/2203.05482", kind=Kind.ELEMENTWISE, follows="the model soups paper: the uniform mean")
def average(tau: Tensor, *, weights: Sequence[float] | None = None) -> Tensor:
    """Model soup: the mean of the sources, i.e. the mean task vector; with `weights` (one per
    source) the weighted mean `Σ_i w_i τ_i / Σ_i w_i`."""
    return _average(tau.shape[0], weights=weights).apply(tau)


def _task_arithmetic(T: int, *, scaling: float = 0.3, weights: Sequence[float] | None = None) -> Linear:
    check_finite_param("task_arithmetic", "scaling", scaling)
    return Linear(_weights("task_arithmetic", weights, T), scale=scaling)


@register(
    "task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089", kind=Kind.ELEMENTWISE,
    follows="the Task Arithmetic paper: one scaling for the summed task vectors, 0.3",
)  # fmt: skip
def task_arithmetic(tau: Tensor, *, scaling: float = 0.3, weights: Sequence[float] | None = None) -> Tensor:
    """`scaling · Σ_i w_i (W_i − W0)` (w_i = 1 without `weights`); 0.3 is the value the paper
    found best for many tasks."""
    return _task_arithmetic(tau.shape[0], scaling=scaling, weights=weights).apply(tau)


@register(
    "ties", reference_url="https://arxiv.org/abs/2306.01708", kind=Kind.ELEMENTWISE, trim_density="density",
    follows=(
        "mergekit for the trim (each tensor on its own, exactly floor(density·n) entries); the TIES paper for the "
        "sign election and disjoint mean. trim_scope='model' with trim_keep='inclusive' is the TIES authors' code "
        "and FusionBench (the whole model's task vector, floor(density·n)+1 entries and every tie); disjoint='sum' "
        "is FusionBench's default merge_func"
    ),
)  # fmt: skip
def ties(
    tau: Tensor,
    *,
    block: Block,
    trim: Trim | None = None,
    density: float = 0.2,
    scaling: float = 1.0,
    trim_scope: TrimScope = TrimScope.TENSOR,
    trim_keep: TrimKeep = TrimKeep.COUNT,
    disjoint: Disjoint = Disjoint.MEAN,
    weights: Sequence[float] | None = None,
    zero_sign: str = "none",
) -> Tensor:
    """TIES: trim each task vector to its top `density` fraction by magnitude, elect the sign of
    each entry by the sum of the trimmed values, and average only the values that agree with it
    (disjoint mean; `disjoint="sum"` adds them instead); times `scaling`.

    What survives the trim is `trim` (computed by the pipeline, `svdfuse.methods.trim`): per
    source, over each tensor (`trim_scope="tensor"`) or the whole model's task vector
    (`"model"`), exactly floor(density · n) entries, ties at the threshold to the entries first in
    row-major order (`trim_keep="count"`), or every entry at least the (floor(density · n) + 1)-th
    largest magnitude (`"inclusive"`).

    With `weights` (mergekit's TIES), the trimmed task vectors are weighted first, the sign is
    elected from the weighted sum and the agreeing values are combined with their weights:
    `Σ_i w_i τ̂_i [agree] / Σ_i w_i [agree]`. `zero_sign`: the sign elected where the trimmed
    values sum to exactly 0: "none" (nothing agrees, the entry keeps the base) or "positive"
    (+1, as mergekit 0.1.5 does)."""
    terms = _ties(tau.shape[0], density=density, scaling=scaling, disjoint=disjoint, weights=weights, zero_sign=zero_sign)
    flat = tau.reshape(tau.shape[0], -1)
    merged = terms.merge_block(flat, torch.zeros_like(flat[0]), block, trim=trim, add_base=False)
    return merged.value.reshape(tau.shape[1:])


@dataclass(frozen=True)
class Ties:
    """TIES's settings as `svdfuse.ops.ties_block` takes them; the trim comes per tensor."""

    weights: tuple[float, ...] | None
    scaling: float
    mean: bool
    positive: bool

    def merge_block(
        self, W: Tensor | Sequence[Tensor], W0: Tensor, block: Block, *, trim: Trim, same_is_zero: bool = False,
        add_base: bool = True, dtype: torch.dtype | None = None,
    ) -> ops.MergedBlock:  # fmt: skip
        """The merge of a block (as `Linear.merge_block`) under `trim`, the block's first entry at
        flat index `block.start` of its tensor."""
        acc = compute_dtype(W0.dtype)
        weights = None if self.weights is None else torch.tensor(self.weights, dtype=acc, device=W0.device)
        return ops.ties_block(
            W, W0, trim.threshold.to(W0.device, acc), trim.cutoff.to(W0.device), start=block.start + trim.offset,
            keep_none=trim.keep_none, weights=weights, scale=self.scaling, mean=self.mean, positive=self.positive,
            same_is_zero=same_is_zero, add_base=add_base, dtype=dtype,
        )  # fmt: skip


def _ties(
    T: int, *, density: float = 0.2, scaling: float = 1.0, disjoint: Disjoint = Disjoint.MEAN,
    weights: Sequence[float] | None = None, zero_sign: str = "none",
) -> Ties:  # fmt: skip
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"ties: density must be in [0, 1], found {density}")
    if zero_sign not in ("none", "positive"):
        raise ValueError(f"ties: zero_sign must be 'none' or 'positive', found {zero_sign!r}")
    check_finite_param("ties", "scaling", scaling)
    return Ties(_weights("ties", weights, T), scaling, Disjoint(disjoint) is Disjoint.MEAN, zero_sign == "positive")


# DARE's random numbers come in fixed chunks of a tensor's flat index space, each from its own
# seeded generator: any block of a tensor draws the same numbers whatever the blocks around it.
_CHUNK = reference.DARE_CHUNK


def chunk_seeds(seed: int, key: str, sources: int, start: int, numel: int) -> Tensor:
    """The seeds of DARE's draws for `numel` entries of tensor `key` from flat index `start`: (sources, chunks) int64."""
    chunks = range(start // _CHUNK, -(-(start + numel) // _CHUNK))
    return torch.tensor([[zlib.crc32(f"{seed}:{key}:{i}:{c}".encode()) for c in chunks] for i in range(sources)], dtype=torch.int64)


def survivors(seed: int, key: str, source: int, start: int, shape: torch.Size, drop_rate: float, device: torch.device) -> Tensor:
    """DARE's keep-mask of `shape` entries of tensor `key`, source `source`, from flat index `start`.

    Entry j survives iff a uniform number drawn for (seed, key, source, j) is >= drop_rate; the
    numbers come from CPU generators seeded per chunk of `_CHUNK` entries, so a mask does not
    depend on how the tensor is cut into blocks, on the device or on the number of processes.
    """
    parts = []
    for chunk_seed in chunk_seeds(seed, key, source + 1, start, shape.numel())[source].tolist():
        gen = torch.Generator().manual_seed(chunk_seed)
        parts.append(torch.rand(_CHUNK, generator=gen))
    draws = torch.cat(parts) if len(parts) > 1 else parts[0]
    offset = start - (start // _CHUNK) * _CHUNK
    return (draws[offset : offset + shape.numel()] >= drop_rate).reshape(shape).to(device)


def _dare(
    T: int, *, drop_rate: float = 0.9, rescale: bool = True, scaling: float = 1.0, weights: Sequence[float] | None = None
) -> Linear:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dare: drop_rate must be in [0, 1), found {drop_rate}")
    check_finite_param("dare", "scaling", scaling)
    factor = scaling / (1.0 - drop_rate) if rescale else scaling
    return Linear(_weights("dare", weights, T), scale=factor, drop_rate=drop_rate)


@register(
    "dare", reference_url="https://arxiv.org/abs/2311.03099", kind=Kind.ELEMENTWISE,
    follows="the DARE paper: drop at rate p, rescale by 1/(1-p), add as Task Arithmetic; masks seeded per entry (svdfuse)",
)  # fmt: skip
def dare(
    tau: Tensor, *, block: Block, drop_rate: float = 0.9, rescale: bool = True, scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """DARE: drop each task-vector entry with probability `drop_rate`, rescale the survivors by
    1 / (1 − drop_rate) (when `rescale`), then add them up as Task Arithmetic with `scaling`
    (and per-source `weights`, as mergekit's dare_linear). The masks are seeded by the merge's
    seed (`SVDOptions.seed`): entry j of source i survives iff `survivors` keeps it."""
    return _dare(tau.shape[0], drop_rate=drop_rate, rescale=rescale, scaling=scaling, weights=weights).apply(tau, block)


_FUSED = {"average": _average, "task_arithmetic": _task_arithmetic, "dare": _dare, "ties": _ties}


def fused(method: Method, T: int, params: dict[str, Any]) -> Linear | Ties | None:
    """The settings of elementwise `method` under `params` (checked as the method checks them) as
    its fused op takes them: `Linear` (`merge_block`) or `Ties` (`ties_block`); None for others."""
    terms = _FUSED.get(method.name)
    return None if terms is None else method.call(terms, T, **params)
