"""TSV-M and Iso-CTS (bench_methods.py): svdfuse vs the published full-SVD path, ViT-B/32 shapes,
8 and 20 sources. The published path runs a full SVD per task per layer: one round each.
SVDFUSE_BENCH_BLOCKS (default 12 = 48 matrices) sets how many ViT-B/32 blocks are merged;
SVDFUSE_BENCH_SMALL=1 takes bench_methods.py's --small blocks and sources."""

import functools
import os

import pytest

pytest.importorskip("pytest_benchmark")

import svdfuse  # noqa: E402
from bench_methods import PUBLISHED, SMALL  # noqa: E402
from common import SMALL as SMALL_RUN  # noqa: E402
from workloads import vit_b32_sources  # noqa: E402

BLOCKS = SMALL["blocks"] if SMALL_RUN else int(os.environ.get("SVDFUSE_BENCH_BLOCKS", "12"))
SOURCES = SMALL["sources"] if SMALL_RUN else [8, 20]


@functools.cache
def _sources(T: int, device):
    return vit_b32_sources(BLOCKS, T, device, shrink=SMALL["shrink"] if SMALL_RUN else 1)


@pytest.mark.parametrize("path", ["svdfuse", "published"])
@pytest.mark.parametrize("T", SOURCES)
@pytest.mark.parametrize("method", list(PUBLISHED))
def test_method(cuda, timed, benchmark, method, T, path):
    benchmark.group = f"{method}, {T} sources, {4 * BLOCKS} matrices"
    base, sources = _sources(T, cuda)
    if path == "svdfuse":
        timed(lambda: svdfuse.merge(sources, base=base, method=method, device=cuda), rounds=3, warmup=1)
    else:
        timed(lambda: PUBLISHED[method](base, sources), rounds=1, warmup=0)
