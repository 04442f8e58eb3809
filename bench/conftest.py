"""pytest-benchmark suites over the workloads of the bench_*.py scripts (DESIGN.md §4).

    python -m pytest bench/ --benchmark-only                  # on the GPU machine
    python -m pytest bench/ --benchmark-only -k "W1 or L1"    # a subset

Every suite needs CUDA and skips without it (checked when a test runs, never at collection);
SVDFUSE_BENCH_DEVICE=cpu runs them on the CPU instead, to smoke-test a `-k` subset (full shapes).
SVDFUSE_BENCH_SMALL=1 runs every suite on the CPU at the scripts' --small shapes, what CI does:

    SVDFUSE_BENCH_SMALL=1 python -m pytest bench/ --benchmark-disable -q   # executes each once
pytest-benchmark times wall clock around `fn(); torch.cuda.synchronize()`, so µs-scale ops include
launch overhead here; the scripts' CUDA-event and CUDA-graph timings are the headline numbers.
The repository's `python -m pytest` (testpaths = tests) never collects this directory.
"""

from collections.abc import Callable

import os

import pytest
import torch

from common import SMALL, sync


@pytest.fixture
def cuda() -> torch.device:
    if SMALL or os.environ.get("SVDFUSE_BENCH_DEVICE") == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("benchmark suites need a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def timed(cuda, benchmark) -> Callable:
    """timed(fn, rounds=..., warmup=..., iterations=...): benchmark `fn` synchronized with the GPU."""

    def run(fn: Callable[[], object], rounds: int = 20, warmup: int = 2, iterations: int = 1) -> None:
        def call() -> None:
            fn()
            sync(cuda)

        benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=iterations)

    return run
