"""One adapter given twice under different names is refused as the same model, like a source beside
its own component cache: two adapters are the same when their factors and scales are, whatever their
directories are called or how their weights are stored; an adapter and a full checkpoint are never
compared byte for byte. Real peft adapters of all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse.sources import Source, SourceError, open_source, open_sources

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _adapters import _adapter  # noqa: E402

SAME = "(an adapter is its factors and scales, whatever its directory is called); give each source once (its components would count twice)"


@pytest.fixture(scope="module")
def adapters(minilm_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("duplicates")
    return [
        _adapter(minilm_dir, root / "plain", 0, r=4, lora_alpha=8, target_modules=["query", "value"]),
        _adapter(minilm_dir, root / "other", 1, r=4, lora_alpha=8, target_modules=["query", "value"]),
    ]


def _variant(adapter: Path, to: Path, config: dict | None = None, tensors=None, as_bin: bool = False) -> Path:
    """A copy of `adapter` under another name, its config updated, its tensors edited or saved as torch's .bin."""
    to.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (to / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights = tensors(weights) if tensors else weights
    if as_bin:
        torch.save(dict(reversed(weights.items())), to / "adapter_model.bin")  # another order too
    else:
        save_file(weights, str(to / "adapter_model.safetensors"))
    return to


def test_a_copy_under_another_name_is_refused_before_any_work(minilm_dir, adapters, tmp_path, no_work):
    copy = tmp_path / "copy"
    shutil.copytree(adapters[0], copy)
    with pytest.raises(SourceError) as err:
        svdfuse.merge([adapters[0], adapters[1], copy], 4, base=minilm_dir, device="cpu", output=str(tmp_path / "out"))
    assert str(err.value) == f"source 2 ('copy') is the same model as source 0 ('plain') {SAME}"
    assert not (tmp_path / "out").exists()


def test_the_same_adapter_stored_otherwise_is_the_same(minilm_dir, adapters, tmp_path):
    """A .bin copy, tensors in another order, another base path and inference flag in its config."""
    copy = _variant(adapters[0], tmp_path / "bin", {"base_model_name_or_path": "/copied/minilm", "inference_mode": False}, as_bin=True)
    with pytest.raises(SourceError, match=r"source 1 \(.bin.\) is the same model as source 0 \(.plain.\) \(an adapter is"):
        svdfuse.merge([adapters[0], copy], 4, base=minilm_dir, device="cpu")


def _scaled(w):
    return {k: v * 2 if "lora_A" in k else v / 2 if "lora_B" in k else v for k, v in w.items()}


def _one_inner_value(w):
    """One value of one A factor changed, away from its first and last rows: the quick fingerprint
    (which reads only B's rows) is equal, only the full one tells the two apart."""
    key = sorted(k for k in w if "lora_A" in k)[0]
    w[key] = w[key].clone()
    w[key][1, 5] += 0.25
    return w


@pytest.mark.parametrize(
    "config, tensors",
    [({"lora_alpha": 16}, None), ({"use_rslora": True}, None), ({}, _one_inner_value), ({}, _scaled)],
    ids=["alpha", "rslora", "one-inner-value", "same-product-other-factors"],
)
def test_other_scales_or_factors_are_other_adapters(minilm_dir, adapters, tmp_path, config, tensors):
    variant = _variant(adapters[0], tmp_path / "variant", config, tensors)
    base = open_source(minilm_dir, "base")
    sources = open_sources([adapters[0], variant], minilm_dir, base)
    if tensors is _one_inner_value:
        assert sources[0].fingerprint(quick=True) == sources[1].fingerprint(quick=True), "the full check would go untested"
    assert sources[0].fingerprint() != sources[1].fingerprint()


def test_an_adapter_beside_a_full_checkpoint_is_never_read_to_compare(minilm_dir, adapters, tmp_path, monkeypatch):
    """The full model's digest is never computed, quick or whole (a model and an adapter are
    different kinds); two adapters beside it still are compared."""
    full = tmp_path / "full.safetensors"
    save_file({k: v + 1e-3 for k, v in load_file(str(minilm_dir / "model.safetensors")).items() if v.is_floating_point()}, str(full))
    digested: list[str] = []
    digest = Source.digest

    def recording(self, keys=None, *, quick=False):
        digested.append(self.label)
        return digest(self, keys, quick=quick)

    monkeypatch.setattr(Source, "digest", recording)
    base = open_source(minilm_dir, "base")
    open_sources([adapters[0], full, adapters[1]], minilm_dir, base)
    assert "source 1 ('full.safetensors')" not in digested and digested, digested
    copy = tmp_path / "copy"
    shutil.copytree(adapters[0], copy)
    with pytest.raises(SourceError, match=r"source 2 \('copy'\) is the same model as source 0 \('plain'\)"):
        open_sources([adapters[0], full, copy], minilm_dir, base)
    assert "source 1 ('full.safetensors')" not in digested


def test_a_cache_of_an_adapter_beside_it(minilm_dir, adapters, tmp_path):
    """The cache records the adapter's fingerprint: the pair is refused with the cache's reason."""
    cache = tmp_path / "a.svd.safetensors"
    svdfuse.decompose(adapters[1], base=minilm_dir, rank=4, output=cache, svd="exact", include=["*.query.weight", "*.value.weight"])
    reason = "(a component cache stands for the source it was decomposed from); give each source once (its components would count twice)"
    with pytest.raises(SourceError) as err:
        svdfuse.merge([adapters[1], cache], 4, base=minilm_dir, device="cpu")
    assert str(err.value) == f"source 1 ('a.svd.safetensors') is the same model as source 0 ('other') {reason}"
    with pytest.raises(SourceError) as err:
        svdfuse.merge([cache, adapters[1]], 4, base=minilm_dir, device="cpu")
    assert str(err.value) == f"source 1 ('other') is the same model as source 0 ('a.svd.safetensors') {reason}"
    svdfuse.merge([adapters[0], cache], 4, base=minilm_dir, device="cpu", svd="exact", include=["*.query.weight", "*.value.weight"])  # another adapter's cache


def test_cli_exit_2_one_line(minilm_dir, adapters, tmp_path, capsys):
    from svdfuse.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(adapters[0], copy)
    assert main(["merge", str(adapters[0]), str(copy), "--base", str(minilm_dir), "-k", "4", "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err == f"svdfuse merge: error: source 1 ('copy') is the same model as source 0 ('plain') {SAME}\n"
    assert not (tmp_path / "out").exists()
