"""Merging on many processes with torch.distributed (torchrun): who does what, and agreeing on it.

A merge inside an initialized process group splits its tasks between the ranks by bytes; every
task is computed whole by one rank, so no number depends on how many ranks there are. Outside a
process group everything here is a no-op for one process.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from svdfuse.resources import default_device

__all__ = ["Group", "PeerFailure", "current", "partition", "init_from_env"]


class PeerFailure(RuntimeError):
    """Another process of the merge failed; the message is its error."""


@dataclass(frozen=True)
class Group:
    """This process's rank among `world` merging processes."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def current() -> Group:
    """The process group a merge runs in: the default one when initialized, else one process."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def partition(sizes: list[int], world: int) -> list[list[int]]:
    """Task indices per rank: largest first to the least-loaded rank (ties to the lower rank), so
    every rank gets about the same bytes; deterministic, so every rank computes the same split."""
    loads = [(0, rank) for rank in range(world)]
    heapq.heapify(loads)
    out: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        out[rank].append(index)
        heapq.heappush(loads, (load + sizes[index], rank))
    return [sorted(indices) for indices in out]


def init_from_env(device: str | None) -> torch.device | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join the process group: NCCL with one
    GPU per local rank when the merge runs on CUDA, else gloo. Returns the rank's device, or None
    outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    cuda = torch.device(device).type == "cuda" if device is not None else default_device().type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")
