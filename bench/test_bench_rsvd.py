"""W1–W3: the randomized SVD methods of bench_rsvd.py (linalg.svd, seconds per call, only there);
its SMALL shapes with SVDFUSE_BENCH_SMALL=1."""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

from bench_rsvd import SMALL, WORKLOADS, methods  # noqa: E402
from common import SMALL as SMALL_RUN  # noqa: E402
from workloads import rsvd_sources  # noqa: E402

SHAPES = SMALL if SMALL_RUN else WORKLOADS


@functools.cache
def _sources(name: str, device):
    batch, m, n, *_ = SHAPES[name]
    return rsvd_sources(batch, m, n, device)


@pytest.mark.parametrize("method", ["svdfuse", "torch_rsvd", "svd_lowrank"])
@pytest.mark.parametrize("workload", list(SHAPES))
def test_rsvd(cuda, timed, benchmark, workload, method):
    benchmark.group = f"rsvd {workload}"
    A, W0 = _sources(workload, cuda)
    timed(methods(A, W0, SHAPES[workload][3])[method], rounds=5)
