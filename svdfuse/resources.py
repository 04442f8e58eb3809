"""The machine a merge runs on: default device, default memory budget, peak memory."""

from __future__ import annotations

import resource
import sys

import psutil
import torch

__all__ = ["default_device", "default_budget", "peak_rss", "BUDGET_SHARE"]

# A merge takes this share of the memory available when it starts, unless told otherwise.
BUDGET_SHARE = 0.5


def default_device() -> torch.device:
    """Where svdfuse computes unless told otherwise: CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
