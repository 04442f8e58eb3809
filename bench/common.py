"""One timing and recording helper for every svdfuse benchmark.

Times with CUDA events on the GPU (median of repeats after warm-up) and with perf_counter on the
CPU, and records results with the device name, versions and git commit under bench/results/.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def environment(device: torch.device) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


def record(name: str, device: torch.device, rows: list[dict]) -> Path:
    """Write `rows` with the environment to bench/results/<name>-<device>.json; returns the path."""
    RESULTS.mkdir(exist_ok=True)
    env = environment(device)
    slug = env["device"].replace(" ", "_").replace("/", "_") or device.type
    path = RESULTS / f"{name}-{slug}.json"
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    return path
