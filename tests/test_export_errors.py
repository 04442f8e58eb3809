"""`svdfuse export lora` on bad requests and bad inputs: a rank it cannot honour, non-finite merged
weights and a base other than the merge's are refused with one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from svdfuse.cli import main
from svdfuse.merging import MERGE_METADATA

from _helpers import tiny_llama_dirs

pytest.importorskip("transformers")

Q = "model.layers.0.self_attn.q_proj.weight"  # (64, 64), the first matrix
UP = "model.layers.0.mlp.up_proj.weight"  # (176, 64)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base, an AXIS merge of two fine-tunes at k = 2 (`svdfuse merge -o`), and
    another base of the same shapes (other weights)."""
    root = tmp_path_factory.mktemp("export-errors")
    base, sources = tiny_llama_dirs(root / "a", 2)
    other, _ = tiny_llama_dirs(root / "b", 0, seed=1)
    merged = root / "hfm"
    assert main(["merge", "--base", str(base), "-k", "2", "-o", str(merged), "--quiet", "--device", "cpu", *map(str, sources)]) == 0
    return {"base": base, "other": other, "merged": merged}


def _export(merged: Path, base: Path, out: Path, *flags: str) -> list[str]:
    return ["export", "lora", str(merged), "--base", str(base), "-o", str(out), "--device", "cpu", *flags]


def _rewritten(merged: Path, out: Path, tensors=lambda t: t, metadata=lambda m: m) -> Path:
    """A copy of the merged directory with its tensors and `svdfuse.merge` record changed."""
    shutil.copytree(merged, out)
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta[MERGE_METADATA] = json.dumps(metadata(json.loads(meta[MERGE_METADATA])))
    save_file(tensors(state), str(out / "model.safetensors"), metadata=meta)
    return out


@pytest.mark.parametrize(
    "rank, expected",
    [
        ("0", "rank must be positive, found 0"),
        ("-3", "rank must be positive, found -3"),
        ("1", "rank 1 is below the rank 2 it was merged at"),
        ("100000", f"merged ('hfm'): rank 100000 is more than min(m, n) = 64 of '{Q}' (64, 64)"),
    ],
)
def test_a_rank_the_adapter_cannot_honour_is_refused(hf, rank, expected, tmp_path, capsys):
    assert main(_export(hf["merged"], hf["base"], tmp_path / "out", "-r", rank)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # transformers' loading bar may come before
    assert last.startswith("svdfuse export: error: ") and expected in last, last
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_a_given_rank_is_the_adapters_rank(hf, tmp_path, capsys):
    assert main(_export(hf["merged"], hf["base"], tmp_path / "r3", "-r", "3")) == 0
    assert "LoRA r=3" in capsys.readouterr().out
    assert json.loads((tmp_path / "r3" / "adapter_config.json").read_text())["r"] == 3
    # Below the merge's rank only as an approximation, whose error the report gives.
    assert main(_export(hf["merged"], hf["base"], tmp_path / "r1", "-r", "1", "--approximate")) == 0
    out = capsys.readouterr().out
    assert "LoRA r=1" in out and "approximated tensor" in out and UP in out


def test_non_finite_merged_weights_are_refused_naming_tensor_and_count(hf, tmp_path, capsys):
    def poison(state):
        state[UP][0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
        return state

    merged = _rewritten(hf["merged"], tmp_path / "hfm-nan", tensors=poison)
    assert main(_export(merged, hf["base"], tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"merged ('hfm-nan'): '{UP}' (176, 64) holds 3 non-finite values (NaN or inf) of 11264" in err, err
    assert "internal error" not in err and not (tmp_path / "out").exists()


def test_another_base_is_refused_by_the_recorded_digest(hf, tmp_path, capsys):
    assert main(_export(hf["merged"], hf["other"], tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"merged ('hfm'): was merged against another base (recorded as '{hf['base']}'): base ('base') differs" in err, err
    assert not (tmp_path / "out").exists()


def test_without_a_recorded_base_a_residual_near_one_blames_the_base(hf, tmp_path, capsys):
    older = _rewritten(hf["merged"], tmp_path / "older", metadata=lambda m: {"method": m["method"], "ranks": m["ranks"]})
    assert main(_export(older, hf["other"], tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "so the base is likely not the one it was merged against" in err, err
    assert err.index("likely not the one") < err.index("--approximate")
    assert main(_export(older, hf["base"], tmp_path / "out")) == 0  # the right base needs no record


@pytest.mark.parametrize(
    "record, found",
    [
        ("[1]", "a JSON list, not an object"),
        ('{"ranks": 5}', "ranks 5, not a map of matrix names to positive ints"),
        (json.dumps({"ranks": {Q: "2"}}), f"ranks {{'{Q}': '2'}}, not a map of matrix names to positive ints"),
        (json.dumps({"ranks": {Q: -4}}), f"ranks {{'{Q}': -4}}, not a map of matrix names to positive ints"),
        (json.dumps({"ranks": {Q: 2}, "base_sha256": 7}), "base_sha256 7, not a string"),
        ("{", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("[" * 100_000, "JSON nested too deeply (a model's files nest a few levels)"),
    ],
    ids=["list", "ranks-int", "rank-str", "rank-negative", "digest-int", "not-json", "deep"],
)
def test_a_damaged_merge_record_is_refused_naming_the_file(record, found, hf, tmp_path, capsys):
    damaged = _rewritten(hf["merged"], tmp_path / "damaged")
    with safe_open(str(damaged / "model.safetensors"), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file(state, str(damaged / "model.safetensors"), metadata={**meta, MERGE_METADATA: record})
    assert main(_export(damaged, hf["base"], tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"svdfuse export: error: merged ('damaged'): its 'svdfuse.merge' metadata is damaged ({found}); export the file svdfuse merge wrote"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, found", [("a\0b", "holds a NUL byte"), ("n" * 300, "is too long, 300 bytes")], ids=["nul", "long"])
def test_a_task_name_no_directory_can_have_is_refused_before_any_work(name, found, hf, tmp_path, no_work, monkeypatch):
    import svdfuse.export

    def load(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(svdfuse.export, "_base_module", load)
    with pytest.raises(ValueError, match=f"^output path '.*' ?(: the name '.*' )?{found}"):
        svdfuse.export.export_lora({name: hf["merged"]}, tmp_path / "out", base=hf["base"], device="cpu")
    assert list(tmp_path.iterdir()) == []
