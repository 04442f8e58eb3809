"""One timing and recording helper for every svdfuse benchmark.

Times with CUDA events on the GPU (median of repeats after warm-up) and with perf_counter on the
CPU, optionally through a CUDA graph so that µs-scale ops are not measured as Python launch
overhead; turns times into % of the H100 byte/FLOP floor (DESIGN.md §4) and records results with
the device name, versions and git commit under bench/results/.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tabulate import tabulate

RESULTS = Path(__file__).parent / "results"

# Ceilings measured on the H100 80GB of the device tool, 2026-11-22 (DESIGN.md §4). Floors below
# are computed from these whatever the device, so on another GPU "% of floor" is vs an H100.
CEILINGS_SOURCE = "DESIGN.md §4: H100 80GB, measured 2026-11-22"
COPY_BYTES_PER_S = 3.0e12  # device-memory copy, read + write counted
BF16_GEMM_FLOPS = 744e12
TF32_GEMM_FLOPS = 394e12
FP32_FLOPS = 51e12

# SVDFUSE_BENCH_SMALL=1: the pytest-benchmark suites run on the CPU at the scripts' --small shapes,
# so that CI executes every suite in seconds (with --benchmark-disable); such timings mean nothing.
SMALL = os.environ.get("SVDFUSE_BENCH_SMALL") == "1"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark script shares: --device and --small (a seconds-long smoke run)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device(), help="cuda (default when available) or cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run whose timings mean nothing")
    return parser


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graph_replay(fn: Callable[[], object], inner: int) -> Callable[[], object]:
    # Warm-up on a side stream, as torch.cuda.graph requires (allocator and cuBLAS workspaces).
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return graph.replay


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    *,
    inner: int = 1,
    graph: bool = False,
) -> float:
    """Median wall time of one `fn()` in milliseconds (CUDA events on the GPU).

    Each of the `repeats` samples times `inner` back-to-back calls and divides by `inner`, so that
    a µs-scale op is not timed as one launch's latency. `graph=True` (CUDA only) captures the
    `inner` calls into one CUDA graph and times its replay: no Python or launch overhead at all.
    Capture fails (RuntimeError) if `fn` synchronizes with the host.
    """
    if graph and device.type == "cuda":
        fn = _graph_replay(fn, inner)
        calls = 1
    else:
        calls = inner
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / inner)
        else:
            tic = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - tic) * 1e3 / inner)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1, repeats: int = 5) -> dict[str, float]:
    """Median wall time in ms of each of `fns`, sampled in turns (a, b, c, a, b, c, ...): on a
    shared machine, load that comes and goes falls on all of them alike, so their ratios hold."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(median_ms(fn, device, warmup=0, repeats=1))
    return {name: statistics.median(times) for name, times in samples.items()}


def fast_op_us(fn: Callable[[], object], device: torch.device, inner: int = 50, repeats: int = 20) -> dict[str, float | None]:
    """A µs-scale op timed two ways: `loop_us` (`inner` eager calls per sample: includes Python and
    launch overhead) and `graph_us` (the same calls replayed from one CUDA graph: the kernels'
    own time); `graph_us` is None on the CPU or when `fn` cannot be captured."""
    out: dict[str, float | None] = {"loop_us": 1e3 * median_ms(fn, device, repeats=repeats, inner=inner), "graph_us": None}
    if device.type == "cuda":
        try:
            out["graph_us"] = 1e3 * median_ms(fn, device, repeats=repeats, inner=inner, graph=True)
        except RuntimeError as err:  # host synchronization inside fn: not capturable
            print(f"  (CUDA graph capture failed, loop timing only: {str(err).splitlines()[0][:100]})")
            torch.cuda.synchronize(device)
    return out


def floor_ms(bytes_moved: float = 0.0, flops: float = 0.0, flops_per_s: float = FP32_FLOPS) -> float:
    """Lower bound on the time of work that moves `bytes_moved` through device memory and does
    `flops` at the H100 ceilings: the larger of the two, in milliseconds."""
    return 1e3 * max(bytes_moved / COPY_BYTES_PER_S, flops / flops_per_s)


def pct_of_floor(floor: float, ms: float) -> float:
    """How close a measured time is to its floor: 100 means at the ceiling."""
    return 100.0 * floor / ms


def _versions() -> dict[str, str]:
    out = {}
    for name in ("triton", "transformers", "open_clip"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # absent or broken: record that, never fail a benchmark over it
            out[name] = "absent"
    try:
        import svdfuse._C  # noqa: F401

        out["svdfuse._C"] = "built"
    except ImportError:
        out["svdfuse._C"] = "absent"
    return out


@functools.cache
def _commit() -> str:
    # The device tool copies the working tree without .git: gpu_session.sh passes the commit in.
    commit = os.environ.get("SVDFUSE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return commit


def environment(device: torch.device) -> dict[str, str]:
    commit = _commit()
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        **_versions(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "ceilings": CEILINGS_SOURCE,
    }


def results_path(name: str, device: torch.device, *, small: bool = False, env: dict | None = None) -> Path:
    """bench/results/<name>-<device>.json (<name>-<device>-small.json for smoke runs)."""
    env = env or environment(device)
    slug = env["device"].replace(" ", "_").replace("/", "_") or device.type
    return RESULTS / f"{name}-{slug}{'-small' if small else ''}.json"


def record(name: str, device: torch.device, rows: list[dict], *, small: bool = False, notes: Sequence[str] = ()) -> Path:
    """Write `rows` with the environment and `notes` to bench/results/<name>-<device>.json;
    smoke runs (`small`) go to <name>-<device>-small.json, which git ignores. Returns the path."""
    RESULTS.mkdir(exist_ok=True)
    env = environment(device)
    path = results_path(name, device, small=small, env=env)
    tmp = path.with_name(path.name + ".tmp")  # never a half-written file, even when a time limit kills the run
    tmp.write_text(json.dumps({"environment": env, "notes": list(notes), "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


class Results:
    """One benchmark's JSON, rewritten after every `add`: a run cut off by a time limit (the GPU
    session's steps) keeps every workload that finished. Notes may be added at any time."""

    def __init__(self, name: str, device: torch.device, *, small: bool = False, notes: Sequence[str] = ()) -> None:
        self.name, self.device, self.small = name, device, small
        self.rows: list[dict] = []
        self.notes = list(notes)
        self.path: Path | None = None

    def add(self, rows: list[dict]) -> list[dict]:
        """Append `rows` and rewrite the file; returns `rows`."""
        self.rows += rows
        self.write()
        return rows

    def write(self) -> Path:
        self.path = record(self.name, self.device, self.rows, small=self.small, notes=self.notes)
        return self.path


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """The rows as a text table: floats to 5 significant digits, missing values as '-'."""
    print(tabulate([[row.get(c) for c in columns] for row in rows], headers=columns, floatfmt=".5g", missingval="-"))
