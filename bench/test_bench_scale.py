"""Streamed merges on the CPU (bench_scale.py): MiniLM-shaped sources written as files, merged to a
directory under a memory budget, against a plain read of the same files. T = 8 by default
(SVDFUSE_BENCH_SOURCES); the script adds T = 48, peak RSS and the table. SVDFUSE_BENCH_SMALL=1:
the `tiny` workload, 2 sources."""

import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import svdfuse  # noqa: E402
from bench_scale import PARAMS, plain_read_gbps, write_sources  # noqa: E402
from common import SMALL  # noqa: E402

WORKLOAD = "tiny" if SMALL else "minilm"
T = 2 if SMALL else int(os.environ.get("SVDFUSE_BENCH_SOURCES", "8"))
CACHE = Path(tempfile.gettempdir()) / "svdfuse-bench"


@pytest.fixture(scope="module")
def files():
    return write_sources(CACHE, WORKLOAD, T)


def test_plain_read(benchmark, files):
    benchmark.group = f"{WORKLOAD}, {T} sources, streamed"
    base, sources = files
    benchmark.pedantic(lambda: plain_read_gbps([base, *sources]), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("method", list(PARAMS))
def test_streamed_merge(benchmark, files, method, tmp_path):
    benchmark.group = f"{WORKLOAD}, {T} sources, streamed"
    base, sources = files
    outputs = iter(range(1000))

    def run():
        svdfuse.merge(sources, base=base, method=method, device="cpu", output=tmp_path / f"out{next(outputs)}", max_memory="2GB", progress=False, **PARAMS[method])

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
