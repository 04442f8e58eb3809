"""Merging on many processes with torch.distributed (torchrun): who does what, and agreeing on it.

A merge inside an initialized process group splits its tasks between the ranks by bytes; every
task is computed whole by one rank, so no number depends on how many ranks there are. Every rank
must be given the same request (`agree`), and a failure on any rank is raised on every rank at the
same point (`Group.settle`), so that no rank waits for a peer that has given up. Outside a process
group everything here is a no-op for one process.
"""

from __future__ import annotations

import atexit
import heapq
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from svdfuse.resources import default_device

__all__ = ["Group", "PeerFailure", "agree", "current", "fingerprint", "partition", "init_from_env"]


# Set by `init_from_env`: this process is svdfuse's own, started by torchrun for the command line.
_OWN_PROCESS = False


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

    def settle(self, failure: Exception | None, undo: Callable[[], None] | None = None) -> None:
        """Every rank calls this at the same point with its own failure or None. If any rank
        failed, `undo` runs on every rank, and once every rank has run it, every rank raises: its
        own error, or a `PeerFailure` carrying the failing ranks' messages."""
        failures = self.gather(None if failure is None else f"rank {self.rank}: {type(failure).__name__}: {failure}")
        if not any(failures):
            return
        if undo is not None:
            undo()
        self.barrier()  # no rank leaves (and torchrun stops the others) before every undo is done
        _finish_alone()
        if failure is not None:
            raise failure
        raise PeerFailure("merge failed on another process: " + "; ".join(f for f in failures if f))

    @contextmanager
    def together(self, undo: Callable[[], None] | None = None) -> Iterator[None]:
        """Run the block on every rank and `settle` its outcome (an exception ends the block)."""
        try:
            yield
        except Exception as err:
            self.settle(err, undo)
            raise  # settle raised already; this keeps type checkers informed
        self.settle(None)


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


def fingerprint(model: Any) -> str:
    """Where a model argument comes from, comparable across ranks: a path resolved, an object in
    memory by its type (its contents are compared once opened: `Source.fingerprint`)."""
    if isinstance(model, (str, os.PathLike)):
        try:
            return str(Path(model).resolve())
        except (OSError, ValueError, RuntimeError):
            return os.fspath(model)  # opening it says what is wrong
    return f"a {type(model).__name__} in memory"


def agree(group: Group, request: Callable[[], Mapping[str, Any]], failure: Exception | None) -> None:
    """Refuse on every rank a request that differs between ranks (sources, base, method,
    parameters, options, output: `request()` maps each to a comparable value, `fingerprint` for
    models; called only on many processes); then `settle` this rank's `failure` of the checks
    made before the work."""
    mine = None
    if group.active:
        try:
            mine = dict(request())
        except Exception as err:  # this rank's failure, settled below with the others'
            failure = failure or err
    requests = group.gather(mine) if group.active else []
    for rank, other in enumerate(requests[1:], 1):
        if requests[0] is None or other is None:
            continue
        differ = [key for key in requests[0] if other.get(key) != requests[0][key]]
        if differ:
            where, first, theirs = differ[0], requests[0][differ[0]], other.get(differ[0])
            if isinstance(first, list) and isinstance(theirs, list) and len(first) == len(theirs):
                i = next(i for i, (a, b) in enumerate(zip(first, theirs)) if a != b)
                where, first, theirs = f"{where}[{i}]", first[i], theirs[i]
            _finish_alone()
            raise ValueError(
                f"the processes of this merge were given different requests: rank {rank} and rank 0 differ in "
                f"{', '.join(differ)} ({where}: {_short(theirs)} on rank {rank}, {_short(first)} on rank 0); "
                "every process must merge the same sources with the same options"
            )
    group.settle(failure)


def _finish_alone() -> None:
    """Every rank knows the merge failed and is about to say why and exit with its own status:
    torchrun's stop signal, sent when the first rank exits, must not cut another one short."""
    if _OWN_PROCESS:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def init_from_env(device: str | None) -> torch.device | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join the process group: NCCL with one
    GPU per local rank when the merge runs on CUDA, else gloo. Returns the rank's device, or None
    outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    cuda = torch.device(device).type == "cuda" if device is not None else default_device().type == "cuda"
    # Left at exit, the group's threads may find a peer gone first and abort the process (SIGABRT)
    # instead of letting it exit with its own status.
    atexit.register(_leave)
    global _OWN_PROCESS
    _OWN_PROCESS = True
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
