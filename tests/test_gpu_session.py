"""The GPU session (`bench/gpu_session.sh`) checked on the CPU: its dry run, its step budget, and the
benchmark helpers it relies on (each workload's row on disk the moment it is measured; the
switches' winners chosen by time and accuracy)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry_run(**env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "WHEELS_OPTIONAL": "1", **env}  # CI carries no .whl/: checked where present
    environ.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)


def test_dry_run_passes():
    done = _dry_run()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "FAIL" not in done.stdout and "dry run: ok" in done.stdout, done.stdout
    for check in ("bash -n", "step caps add up to 300s", "GPU test selections collect", "every benchmark step"):
        assert check in done.stdout, done.stdout


def test_dry_run_fails_when_the_step_caps_exceed_the_budget():
    done = _dry_run(DRY_RUN_QUICK="1", BUDGET_S="299")
    assert done.returncode == 1, done.stdout
    assert "FAIL  step caps add up to 300s <= BUDGET_S 299s" in done.stdout, done.stdout


def test_results_are_on_disk_after_every_workload(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    results = common.Results("demo", torch.device("cpu"), small=True, notes=["first"])
    results.add([{"workload": "W1", "ms": 1.0}])
    on_disk = json.loads(results.path.read_text())
    assert on_disk["rows"] == [{"workload": "W1", "ms": 1.0}] and on_disk["notes"] == ["first"]
    results.notes.append("second")
    results.add([{"workload": "W2", "ms": 2.0}])
    on_disk = json.loads(results.path.read_text())
    assert [row["workload"] for row in on_disk["rows"]] == ["W1", "W2"] and on_disk["notes"] == ["first", "second"]
    assert [p.name for p in tmp_path.iterdir()] == [results.path.name]  # no temporary file left behind


def test_the_fastest_accurate_option_wins():
    from bench_rsvd import MAX_REC_OVER_OPTIMUM, choose

    rows = [
        {"choice": "projected_svd", "option": "jacobi", "ms": 1.0, "rec_over_optimum": MAX_REC_OVER_OPTIMUM + 0.01},
        {"choice": "projected_svd", "option": "gesvda", "ms": 2.0, "rec_over_optimum": 1.001},
        {"choice": "projected_svd", "option": "library", "ms": 3.0, "rec_over_optimum": 1.0},
        {"choice": "projected_svd", "option": "gesvdj", "error": "RuntimeError: refused"},
        {"choice": "sketch_tiling", "option": "whole", "ms": 0.5, "rec_over_optimum": 1.0},
    ]
    choose(rows, "projected_svd")
    assert [row.get("winner") for row in rows] == [False, True, False, None, None]
