"""Elementwise merges of task vectors: Average, Task Arithmetic, TIES, DARE.

Each takes `W0: (G, *shape)` and the sources `W: (G, T, *shape)` and returns the merged task
vectors `(G, *shape)`; the same rule merges matrices and every other tensor.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from svdfuse.methods import mean_delta, register
from svdfuse.ops import SVDOptions


def _check_scaling(scaling: float) -> None:
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, found {scaling}")


def average(W0: Tensor, W: Tensor) -> Tensor:
    """Model soup: the mean of the sources, i.e. the mean task vector."""
    return mean_delta(W0, W)


register("average", reference_url="https://arxiv.org/abs/2203.05482", tensors=average)(average)


def task_arithmetic(W0: Tensor, W: Tensor, *, scaling: float = 0.3) -> Tensor:
    """`scaling · Σ_i (W_i − W0)`; 0.3 is the value the paper found best for many tasks."""
    _check_scaling(scaling)
    return scaling * (W - W0.unsqueeze(1)).sum(1)


register("task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089", tensors=task_arithmetic)(task_arithmetic)


def _keep_top(tau: Tensor, density: float) -> Tensor:
    """Zero all but the floor(density · numel) largest-magnitude entries of each task vector.

    tau: (G, T, *shape), trimmed per (layer, source) tensor.
    """
    flat = tau.flatten(2)
    keep = math.floor(density * flat.shape[-1])
    if keep == 0:
        return torch.zeros_like(tau)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(-1, flat.abs().topk(keep, dim=-1).indices, True)
    return (flat * mask).reshape(tau.shape)


def ties(W0: Tensor, W: Tensor, *, density: float = 0.2, scaling: float = 1.0) -> Tensor:
    """TIES: trim each task vector to its top `density` fraction by magnitude (per tensor), elect
    the sign of each entry by the sum of the trimmed values, and average only the values that
    agree with it (disjoint mean); times `scaling`."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"ties: density must be in [0, 1], found {density}")
    _check_scaling(scaling)
    trimmed = _keep_top(W - W0.unsqueeze(1), density)
    elected = torch.sign(trimmed.sum(1, keepdim=True))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(1).clamp(min=1)
    return scaling * (trimmed * agree).sum(1) / count


register("ties", reference_url="https://arxiv.org/abs/2306.01708", tensors=ties)(ties)


def _drop_mask(shape: torch.Size, drop_rate: float, seed: int, key: str, source: int, device: torch.device) -> Tensor:
    # Seeded per (tensor, source), so the masks don't depend on how tensors are grouped.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}:{source}".encode()))
    return (torch.rand(shape, generator=gen) >= drop_rate).to(device)


def dare(
    W0: Tensor, W: Tensor, *, keys: list[str], svd: SVDOptions, drop_rate: float = 0.9, rescale: bool = True, scaling: float = 1.0
) -> Tensor:
    """DARE: drop each task-vector entry with probability `drop_rate`, rescale the survivors by
    1 / (1 − drop_rate) (when `rescale`), then add them up as Task Arithmetic with `scaling`.
    The masks are seeded by `svd.seed`, the merge's one seed."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dare: drop_rate must be in [0, 1), found {drop_rate}")
    _check_scaling(scaling)
    tau = W - W0.unsqueeze(1)
    G, T = tau.shape[:2]
    masks = torch.stack(
        [torch.stack([_drop_mask(tau.shape[2:], drop_rate, svd.seed, keys[g], t, tau.device) for t in range(T)]) for g in range(G)]
    )
    kept = tau * masks
    if rescale:
        kept = kept / (1.0 - drop_rate)
    return scaling * kept.sum(1)


register("dare", reference_url="https://arxiv.org/abs/2311.03099", tensors=dare)(dare)
