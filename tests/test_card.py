"""The model card README.md of every directory output: what it says, where it goes, all-or-nothing."""

import json

import pytest
import torch
from safetensors.torch import save_file

import svdfuse
import svdfuse.merging


@pytest.fixture
def dirs(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(16, 12, generator=gen), "b.weight": torch.randn(12, 16, generator=gen), "a.bias": torch.randn(16, generator=gen)}
    paths = []
    for name in ("base", "ft0", "ft1"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
        (d / "README.md").write_text("the base's own card\n")
        save_file(base if name == "base" else {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}, d / "model.safetensors")
        paths.append(str(d))
    return tmp_path, paths[0], paths[1:]


def test_streamed_directory_output_carries_a_card_of_the_merge(dirs):
    tmp_path, base, sources = dirs
    report = svdfuse.merge({"cars": sources[0], "dtd": sources[1]}, k=3, base=base, output=tmp_path / "out", device="cpu")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + base) and "the base's own card" not in card
    assert f"svdfuse {svdfuse.__version__}" in card and "`axis`" in card and "https://arxiv.org/abs/2508.19353" in card
    totals = report.totals()
    assert sum(totals) == 2 * 3
    for label, count in zip(report.sources, totals):  # each source's share, as the report counts it
        assert f"| `{label}`" in card and f"{count} | {100 * count / sum(totals):.1f}%" in card.replace("  ", " ").replace("  ", " ")
    assert "k: 3" in card and "oversample:" in card


def test_in_memory_save_writes_the_card_and_single_files_have_none(dirs):
    tmp_path, base, sources = dirs
    result = svdfuse.merge(sources, base=base, method="ties", density=0.5, weights=[2.0, 0.5], device="cpu")
    result.save(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "`ties`" in card and "density: 0.5" in card and "weight" in card.split("## Sources")[1]
    result.save(tmp_path / "one.safetensors")
    svdfuse.merge(sources, base=base, method="ties", output=tmp_path / "two.safetensors", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".md") == []


def test_a_config_merge_quotes_its_file(dirs):
    tmp_path, base, sources = dirs
    text = f"base: {base}\nsources: [{sources[0]}, {sources[1]}]\nmethod: task_arithmetic\nparameters: {{scaling: 0.4}}\n"
    (tmp_path / "m.yaml").write_text(text)
    svdfuse.merge_config(tmp_path / "m.yaml", output=tmp_path / "out", device="cpu")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Configuration" in card and text.rstrip() in card and "scaling: 0.4" in card


def test_a_failing_card_leaves_no_output(dirs, monkeypatch):
    tmp_path, base, sources = dirs

    def broken(report, output):
        raise RuntimeError("card failed")

    monkeypatch.setattr(svdfuse.merging, "card_files", broken)
    with pytest.raises(RuntimeError, match="card failed"):
        svdfuse.merge(sources, k=2, base=base, output=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
