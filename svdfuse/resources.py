"""The machine a merge runs on: default device, default memory budget, peak memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys

import psutil
import torch

__all__ = ["default_device", "default_budget", "peak_rss", "bound_allocator", "release_free_memory", "BUDGET_SHARE"]

# Allocations at least this large get their own mappings from glibc, returned to the system when
# freed. Left to itself glibc raises its threshold to the largest freed block (up to 32 MiB), and
# the pieces' temporaries, tens of MiB each and of changing sizes, then fragment its heap: a
# streamed TIES over 16 sources of a 7B layer at a 2 GB budget peaked at 3.7 GiB that way, at
# 1.7 GiB with this threshold and a trim after each task (2026-12-01, 2-core dev machine).
MMAP_THRESHOLD = 8 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h

# A merge takes this share of the memory available when it starts, unless told otherwise.
BUDGET_SHARE = 0.5


def default_device() -> torch.device:
    """Where svdfuse computes unless told otherwise: CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device` as a torch.device (None: `default_device()`), refused with a clear error when it
    does not name a device that exists here: an unknown name, CUDA without a usable GPU, an index
    past the last GPU."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', found {device!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no NVIDIA GPU or driver is usable"
            raise ValueError(f"device {str(device)!r} was asked for, but {why}; use device='cpu' (or leave device unset)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPUs (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r}: svdfuse computes on 'cpu' or 'cuda'")
    return device


def default_budget(processes: int = 1) -> int:
    """Half of the memory available now, shared by the merging processes on this machine."""
    return int(BUDGET_SHARE * psutil.virtual_memory().available / max(1, processes))


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes.

    On Linux, VmHWM: the high-water mark of this program's own memory. `ru_maxrss` would carry the
    peak of the process it was started from (Linux keeps it across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_allocator() -> None:
    """Have glibc serve large allocations with their own mappings (`MMAP_THRESHOLD`), so freed
    pieces leave resident memory at once; a process-wide setting, made by `merge` unless the
    environment chose one (MALLOC_MMAP_THRESHOLD_)."""
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Return glibc's free heap memory to the system (between tasks of a merge)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
