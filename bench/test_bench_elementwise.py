"""Element-wise merges on the CPU (bench_elementwise.py): MiniLM-shaped sources merged in memory,
against a plain read of the same files. T = 8 by default (SVDFUSE_BENCH_SOURCES); the script adds
T = 12 and 48, bf16, streamed merges, a busy core and the table."""

import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import svdfuse  # noqa: E402
from bench_elementwise import METHODS, write_sources  # noqa: E402
from bench_scale import plain_read_gbps  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

T = int(os.environ.get("SVDFUSE_BENCH_SOURCES", "8"))
CACHE = Path(tempfile.gettempdir()) / "svdfuse-bench"


@pytest.fixture(scope="module")
def files():
    return write_sources(CACHE, T, "fp32")


def test_plain_read(benchmark, files):
    benchmark.group = f"minilm, {T} sources, in memory"
    base, sources = files
    benchmark.pedantic(lambda: plain_read_gbps([base, *sources]), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_in_memory(benchmark, files, method):
    benchmark.group = f"minilm, {T} sources, in memory"
    base, sources = load_file(files[0]), [load_file(f) for f in files[1]]
    benchmark.pedantic(lambda: svdfuse.merge(sources, base=base, method=method, device="cpu", progress=False, **METHODS[method]),
                       rounds=3, warmup_rounds=1)  # fmt: skip
