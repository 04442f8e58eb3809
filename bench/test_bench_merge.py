"""M1 of bench_merge.py: a full AXIS merge, 20 sources of ViT-B/32 visual shape, GPU-resident.

The paper's path takes seconds per block: it is benchmarked on one block (4 matrices) beside
svdfuse on the same block; svdfuse also on all 12 blocks (48 matrices). SVDFUSE_BENCH_SMALL=1: bench_merge.py's --small M1.
"""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

import svdfuse  # noqa: E402
from bench_merge import SMALL, axis_paper, subset  # noqa: E402
from common import SMALL as SMALL_RUN  # noqa: E402
from workloads import vit_b32_sources  # noqa: E402

T, K, BLOCKS = (SMALL["sources"], SMALL["k"], SMALL["blocks"]) if SMALL_RUN else (20, 76, 12)


@functools.cache
def _sources(device):
    return vit_b32_sources(BLOCKS, T, device, biases=True, shrink=SMALL["shrink"] if SMALL_RUN else 1)


@pytest.mark.parametrize("path,blocks", [("svdfuse", BLOCKS), ("svdfuse", 1), ("paper", 1)])
def test_merge(cuda, timed, benchmark, path, blocks):
    benchmark.group = f"axis merge, {T} sources, {4 * blocks} matrices"
    base, sources = _sources(cuda)
    base, sources = subset(base, blocks), [subset(s, blocks) for s in sources]
    if path == "svdfuse":
        timed(lambda: svdfuse.merge(sources, k=K, base=base, device=cuda), rounds=5, warmup=1)
    else:
        timed(lambda: axis_paper(base, sources, K), rounds=1, warmup=1)
