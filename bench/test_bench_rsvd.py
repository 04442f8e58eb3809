"""W1–W3: the randomized SVD methods of bench_rsvd.py (linalg.svd, seconds per call, only there)."""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

from bench_rsvd import WORKLOADS, methods  # noqa: E402
from workloads import rsvd_sources  # noqa: E402


@functools.cache
def _sources(name: str, device):
    batch, m, n, *_ = WORKLOADS[name]
    return rsvd_sources(batch, m, n, device)


@pytest.mark.parametrize("method", ["svdfuse", "torch_rsvd", "svd_lowrank"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_rsvd(cuda, timed, benchmark, workload, method):
    benchmark.group = f"rsvd {workload}"
    A, W0 = _sources(workload, cuda)
    timed(methods(A, W0, WORKLOADS[workload][3])[method], rounds=5)
