"""L1–L3 and the merged-model forwards of bench_lowrank_matmul.py (its SMALL grid with SVDFUSE_BENCH_SMALL=1)."""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import merged_models  # noqa: E402
from bench_lowrank_matmul import FULL, SMALL, layer, supports_task  # noqa: E402
from common import SMALL as SMALL_RUN  # noqa: E402
from svdfuse import ops  # noqa: E402

GRID = SMALL if SMALL_RUN else FULL
SINGLE = [(w, d, K, b) for w in ("L1", "L2") for d in GRID[w]["d"] for K in GRID[w]["K"] for b in GRID[w]["batch"]]


@pytest.mark.parametrize("method", ["svdfuse", "two_matmul", "dense"])
@pytest.mark.parametrize("workload,d,K,batch", SINGLE)
def test_lowrank_matmul(cuda, timed, benchmark, workload, d, K, batch, method):
    benchmark.group = f"{workload} d={d} K={K} batch={batch}"
    U, S, V = layer(d, K, torch.bfloat16, cuda)
    x = torch.randn(batch, d, device=cuda, dtype=torch.bfloat16)
    if method == "svdfuse":
        fn = lambda: ops.lowrank_matmul(x, U, S, V)  # noqa: E731
    elif method == "two_matmul":
        fn = lambda: ((x @ V) * S) @ U.T  # noqa: E731
    else:
        W = ((U.float() * S.float()) @ V.float().T).bfloat16()
        fn = lambda: x @ W.T  # noqa: E731
    timed(fn, rounds=100, iterations=10)


@pytest.mark.parametrize("sigma", ["per_row", "one"])
@pytest.mark.parametrize("d", GRID["L3"]["d"])
def test_per_row_sigma(cuda, timed, benchmark, d, sigma):
    if not supports_task():
        pytest.skip("ops.lowrank_matmul in this checkout has no `task` argument")
    batch, K = (GRID["L3"]["batch"][0], GRID["L3"]["K"][0]) if SMALL_RUN else (64, 128)
    benchmark.group = f"L3 d={d} K={K} batch={batch}"
    U, S_tasks, V = layer(d, K, torch.bfloat16, cuda, tasks=batch)
    x = torch.randn(batch, d, device=cuda, dtype=torch.bfloat16)
    task = torch.arange(batch, device=cuda)
    S = S_tasks[0].contiguous()
    if sigma == "per_row":
        timed(lambda: ops.lowrank_matmul(x, U, S_tasks, V, task=task), rounds=100, iterations=10)
    else:
        timed(lambda: ops.lowrank_matmul(x, U, S, V), rounds=100, iterations=10)


@functools.cache
def _model(name: str, device):
    return merged_models.build(name, device, torch.bfloat16, small=SMALL_RUN, sources=2 if SMALL_RUN else 3)


@pytest.mark.parametrize("kind", ["lowrank", "dense"])
@pytest.mark.parametrize("batch", GRID["models"]["batch"])
@pytest.mark.parametrize("name", ["minilm", "vit-b-32"])
def test_model_forward(cuda, timed, benchmark, name, batch, kind):
    missing = merged_models.available()[name]
    if missing:
        pytest.skip(missing)
    benchmark.group = f"{name} forward, batch {batch}, bf16"
    built = _model(name, cuda)
    x = built["inputs"](batch)
    with torch.inference_mode():
        timed(lambda: built["forward"](built[kind], x), rounds=20, warmup=3)
