"""The Triton kernels compiled for the H100/H200 (sm_90a) on a machine without a GPU, at the
specialisations their launchers create for the DESIGN.md §4 workloads, and what the machine code
does: 16-byte loads where the launcher proves alignment, no register spills at the default
configurations, tensor-core instructions exactly where the precision asks for them.

Triton ships its own ptxas, so `triton.compile` for a CUDA target needs no device; this catches what
the interpreter never checks (types, layouts, shared memory, registers) before a GPU session. One
subprocess per test session compiles every case (`tests/_sm90_compile.py`: about 40 s cold, a few
seconds from Triton's cache), outside TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

pytestmark = pytest.mark.sm90

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ["rsvd fp32 ieee", "rsvd fp32 ieee transposed", "rsvd fp32 tf32", "rsvd fp32 tf32x3", "rsvd bf16 ieee",
               "rsvd bf16 ieee transposed", "rsvd fp32 ieee W2", "rsvd fp32 ieee W2 whole"]  # fmt: skip
DEFAULTS = [*PROJECTIONS, "rsvd fp32 ieee unaligned", "topk 20x76", "topk 400x16", "merge_block fp32", "merge_block bf16",
            "ties_block fp32", "ties_block bf16"]


@pytest.fixture(scope="module")
def sm90(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sm90") / "kernels.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "_sm90_compile.py"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if done.returncode == 3:  # tests/_sm90_compile.MISSING_API
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def _describe(case: dict) -> str:
    keys = ("constexprs", "num_warps", "registers", "spill_stores", "async_copy_bytes", "global_loads", "wgmma", "ptxas")
    return json.dumps({key: case[key] for key in keys})


def test_every_kernel_compiles_for_sm90a(sm90):
    expected = {*DEFAULTS, "small_svd w92", "small_svd w144"}
    assert expected <= set(sm90), f"missing: {expected - set(sm90)}"
    for name, case in sm90.items():
        assert case["registers"] > 0, (name, _describe(case))


@pytest.mark.parametrize("name", PROJECTIONS)
def test_projection_copies_are_16_bytes_wide(sm90, name):
    # Every tile of A, the base and the sketch reaches shared memory in 16-byte async copies; the
    # only other global loads are the three 8-byte offset-table reads.
    case = sm90[name]
    assert case["constexprs"]["ALIGNED"] and case["constexprs"]["X_ROWS_ALIGNED"], _describe(case)
    assert set(case["async_copy_bytes"]) == {"16"}, f"{name}: {_describe(case)}"
    assert case["global_loads"] == {"1x64": 3}, f"{name}: {_describe(case)}"


def test_unaligned_offsets_take_the_unhinted_kernel(sm90):
    case = sm90["rsvd fp32 ieee unaligned"]  # 33×17 matrices: the second starts 561 floats in
    assert case["constexprs"]["ALIGNED"] is False, _describe(case)
    assert "16" not in case["async_copy_bytes"], _describe(case)


@pytest.mark.parametrize(
    ("shape", "dtype", "aligned"),
    [((2, 768, 768), torch.float32, True), ((2, 33, 17), torch.float32, False), ((2, 33, 16), torch.float32, True),
     ((2, 33, 12), torch.bfloat16, False), ((2, 33, 16), torch.bfloat16, True), ((1, 33, 17), torch.float32, True)],
)  # fmt: skip
def test_launcher_hints_alignment_only_when_every_offset_is_16_bytes(shape, dtype, aligned):
    from svdfuse.kernels.rsvd import _batch_offsets

    A = torch.zeros(shape, dtype=dtype)
    offsets, found = _batch_offsets(A, A.shape[:-2])
    assert found is aligned
    assert bool((offsets * A.element_size() % 16 == 0).all()) or not found
    base = torch.zeros(shape[-2:], dtype=dtype)  # broadcast over the batch: every offset is 0
    assert _batch_offsets(base, A.shape[:-2])[1] is True


@pytest.mark.parametrize("name", DEFAULTS)
def test_no_register_spills_at_the_default_configurations(sm90, name):
    case = sm90[name]
    assert case["spill_stores"] == 0, f"{name}: {_describe(case)}"


@pytest.mark.parametrize("name", ["small_svd w92", "small_svd w144"])
@pytest.mark.xfail(strict=True, reason="known: the Jacobi kernel holds (W, W/2) tiles in registers; at W = 144 they "
                   "exceed the register file. bench_rsvd.py --stages measures it against the library")  # fmt: skip
def test_jacobi_kernel_does_not_spill(sm90, name):
    assert sm90[name]["spill_stores"] == 0, _describe(sm90[name])


@pytest.mark.parametrize(("precision", "tensor_cores"), [("ieee", False), ("tf32", True), ("tf32x3", True)])
def test_tensor_cores_exactly_where_the_precision_asks(sm90, precision, tensor_cores):
    # "ieee" is exact fp32 (FMA); "tf32"/"tf32x3" ask for the tensor cores, which on sm_90a are
    # warpgroup MMAs (tf32x3: three products per step).
    case = sm90[f"rsvd fp32 {precision}"]
    assert (case["wgmma"] > 0) is tensor_cores, _describe(case)
    assert case["mma"] == 0 or tensor_cores, _describe(case)
    if precision == "tf32x3":
        assert case["wgmma"] == 3 * sm90["rsvd fp32 tf32"]["wgmma"], _describe(case)
