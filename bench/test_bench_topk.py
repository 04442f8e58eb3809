"""Global top-k selection of bench_topk.py: ops.topk_components vs torch.topk on the flattened values
(its SMALL cases with SVDFUSE_BENCH_SMALL=1)."""

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from bench_topk import CASES, SMALL, singular_values  # noqa: E402
from common import SMALL as SMALL_RUN  # noqa: E402
from svdfuse import ops  # noqa: E402


@pytest.mark.parametrize("method", ["svdfuse", "torch.topk"])
@pytest.mark.parametrize("case", list(SMALL if SMALL_RUN else CASES))
def test_topk(cuda, timed, benchmark, case, method):
    layers, sources, r, k = (SMALL if SMALL_RUN else CASES)[case]
    benchmark.group = f"topk {case}"
    S = singular_values(layers, sources, r, cuda)
    flat = S.flatten(-2)
    timed((lambda: ops.topk_components(S, k)) if method == "svdfuse" else (lambda: torch.topk(flat, k)), rounds=200, iterations=10)
