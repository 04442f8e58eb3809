"""Many LoRA adapters merged to a LoRA on the CPU (bench_lora.py): AXIS and Task Arithmetic of T
rank-16 bf16 adapters of Llama-2-7B-shaped layers, beside a plain read of the same files.
T = 16 and one layer by default (SVDFUSE_BENCH_ADAPTERS, SVDFUSE_BENCH_LAYERS); the script adds
T = 128 and 1000, peak RSS, peft's svd combination and the table. SVDFUSE_BENCH_SMALL=1 (CI): 4
adapters of one layer with every size divided by 32."""

import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import svdfuse  # noqa: E402
from bench_lora import PROJECTIONS, _files, write_workload  # noqa: E402
from bench_scale import plain_read_gbps  # noqa: E402
from common import SMALL  # noqa: E402

T = int(os.environ.get("SVDFUSE_BENCH_ADAPTERS", "4" if SMALL else "16"))
SHAPES = {p: (m // 32, n // 32) for p, (m, n) in PROJECTIONS.items()} if SMALL else PROJECTIONS
LAYERS = int(os.environ.get("SVDFUSE_BENCH_LAYERS", "1"))
CACHE = Path(tempfile.gettempdir()) / "svdfuse-bench-lora"


@pytest.fixture(scope="module")
def workload():
    modules = {f"model.layers.{i}.{p}": shape for i in range(LAYERS) for p, shape in SHAPES.items()}
    return write_workload(CACHE, f"llama7b-{LAYERS}" + ("-small" if SMALL else ""), modules, T)


def test_plain_read(benchmark, workload):
    benchmark.group = f"{T} r16 adapters, {LAYERS} 7B layers"
    benchmark.pedantic(lambda: plain_read_gbps(_files(workload[1])), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("method", ["axis", "task_arithmetic"])
def test_merge_to_lora(benchmark, workload, method, tmp_path):
    benchmark.group = f"{T} r16 adapters, {LAYERS} 7B layers"
    base, adapters = workload
    outputs = iter(range(1000))

    def run():
        svdfuse.merge(adapters, 64, base=base, method=method, device="cpu", output=str(tmp_path / f"out{next(outputs)}"),
                      save_format="lora", max_memory="4GB", progress=False)  # fmt: skip

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
