"""C1 and C2: the CPU workloads of bench_cpu.py, with their GEMM floors as benchmarks of their own.

They run on the CPU whatever the machine has (no `cuda` fixture); SVDFUSE_BENCH_SMALL=1 takes
bench_cpu.py's --small shapes:

    python -m pytest bench/test_bench_cpu.py --benchmark-only
"""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import svdfuse  # noqa: E402
from bench_cpu import C1, C1_SMALL, C2, C2_SMALL, P, Q, axis_svd_lowrank, c1_workload  # noqa: E402
from bench_merge import axis_paper  # noqa: E402
from common import SMALL  # noqa: E402
from svdfuse import ops, reference  # noqa: E402
from workloads import rsvd_sources  # noqa: E402

C1_SHAPE, C2_SHAPE = (C1_SMALL, C2_SMALL) if SMALL else (C1, C2)


@functools.cache
def _c2():
    A, W0 = rsvd_sources(C2_SHAPE["sources"], C2_SHAPE["m"], C2_SHAPE["n"], torch.device("cpu"))
    return A.bfloat16(), W0.bfloat16()


@functools.cache
def _c1():
    return c1_workload(SMALL)


def _gemm_passes(deltas: list[torch.Tensor], width: int):
    """The 1 + q forward and 1 + q transposed products of a randomized SVD over fp32 stacks."""
    operands = [(D, torch.randn(D.shape[-1], width), torch.randn(D.shape[0], D.shape[-2], width)) for D in deltas]

    def run():
        for _ in range(1 + Q):
            for D, X, Y in operands:
                D @ X
                D.mT @ Y

    return run


@pytest.mark.parametrize("method", ["svdfuse", "reference", "svd_lowrank", "gemm floor"])
def test_c2(benchmark, method):
    benchmark.group = "C2 rSVD {sources} x {m}x{n} bf16, rank {rank}".format(**C2_SHAPE)
    A, W0 = _c2()
    r = C2_SHAPE["rank"]
    w = r + P
    fns = {
        "svdfuse": lambda: ops.truncated_svd(A, r, base=W0),
        "reference": lambda: reference.randomized_svd(A, r, W0, oversample=P, power_iters=Q, seed=0),
        "svd_lowrank": lambda: torch.svd_lowrank(A.float(), q=w, niter=Q, M=W0.float()),
    }
    fn = fns.get(method) or _gemm_passes([A.float() - W0.float()], w)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("method", ["svdfuse", "svd_lowrank", "paper", "gemm floor"])
def test_c1(benchmark, method):
    benchmark.group = "C1 AXIS, {sources} MiniLM sources, k = {k}".format(**C1_SHAPE)
    base, sources, base_m, sources_m = _c1()
    k = C1_SHAPE["k"]
    shapes: dict = {}
    for key in base_m:
        shapes.setdefault(tuple(base_m[key].shape), []).append(torch.stack([src[key] - base_m[key] for src in sources_m]))
    fns = {
        "svdfuse": lambda: svdfuse.merge(sources, k=k, base=base, device="cpu"),
        "svd_lowrank": lambda: axis_svd_lowrank(base_m, sources_m, k),
        "paper": lambda: axis_paper(base_m, sources_m, k),
    }
    fn = fns.get(method) or _gemm_passes([torch.cat(ds) for ds in shapes.values()], k + P)
    benchmark.pedantic(fn, rounds=1 if method == "paper" else 3, warmup_rounds=0 if method == "paper" else 1)
