"""`export_lora(..., serve="vllm")` and `svdfuse export lora --for vllm` (a merge, or a bundle's
adapter or mix): one rank for every module, padded with zero components to the next of vLLM's
`max_lora_rank` values, loaded by peft as the same model; whole modules and lora_B biases refused,
or dropped with a warning. The reference is the export without `serve`, loaded by peft."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse.bundle import export_adapter
from svdfuse.cli import main
from svdfuse.lora_out import VLLM_RANKS
from test_compress import make_adapter, make_base

peft = pytest.importorskip("peft")

EPS32 = torch.finfo(torch.float32).eps


def _peft_model(base, adapter):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    base, path = make_base(root)
    adapters = [make_adapter(base, root / f"ad{i}", seed=20 + i, r=3) for i in range(3)]
    svdfuse.compress({f"ad{i}": a for i, a in enumerate(adapters)}, k=5, base=path, output=root / "b.safetensors", core="full")
    return base, path, adapters, root


def _check_padded(adapter, rank: int) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank and not config["rank_pattern"] and not config["alpha_pattern"]
    for key, t in load_file(str(adapter / "adapter_model.safetensors")).items():
        assert ".lora_" in key, f"{key}: a whole tensor vLLM's loader refuses"
        assert t.shape[0 if "lora_A" in key else 1] == rank, (key, tuple(t.shape))


def _same_model(got: dict, want: dict) -> None:
    for key, w in want.items():
        assert (got[key] - w).abs().max() <= 8 * EPS32 * max(w.abs().max().item(), 1.0), key


def test_a_merge_exported_for_vllm_is_the_same_model_at_a_vllm_rank(setup, tmp_path):
    base, path, adapters, _ = setup
    result = svdfuse.merge([str(a) for a in adapters], 5, base=path, device="cpu", exclude=["head.*"])
    svdfuse.export_lora(result, tmp_path / "plain", base=copy.deepcopy(base))
    report = svdfuse.export_lora(result, tmp_path / "vllm", base=copy.deepcopy(base), serve="vllm")
    assert report.r == 8 and set(report.targets.values()) == {8}  # the report says what was written
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 5
    _check_padded(tmp_path / "vllm", 8)  # 5 -> the next of VLLM_RANKS
    assert 8 in VLLM_RANKS
    _same_model(_peft_model(base, tmp_path / "vllm"), _peft_model(base, tmp_path / "plain"))


def test_a_bundles_adapter_and_mix_for_vllm(setup, tmp_path):
    base, _, _, root = setup
    bundle = root / "b.safetensors"
    export_adapter(bundle, tmp_path / "plain", base=copy.deepcopy(base), request={"ad0": 0.5, "ad2": 0.5})
    export_adapter(bundle, tmp_path / "vllm", base=copy.deepcopy(base), request={"ad0": 0.5, "ad2": 0.5}, serve="vllm")
    _check_padded(tmp_path / "vllm", 8)  # K = 5
    _same_model(_peft_model(base, tmp_path / "vllm"), _peft_model(base, tmp_path / "plain"))


def test_export_lora_for_vllm_from_the_command_line(minilm_dir, tmp_path):
    """A real Hugging Face base: two MiniLM adapters compressed to a bundle, one exported with
    --for vllm and without, loaded by peft onto the model transformers builds."""
    from _adapters import _adapter

    transformers = pytest.importorskip("transformers")
    adapters = [_adapter(minilm_dir, tmp_path / f"a{i}", i, r=4, lora_alpha=8, target_modules=["query", "value"]) for i in range(2)]
    bundle = tmp_path / "b.safetensors"
    svdfuse.compress(adapters, k=6, base=minilm_dir, output=bundle, core="full")
    common = ["export", "lora", "--bundle", str(bundle), "--adapter", "a1", "--base", str(minilm_dir)]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    assert main([*common, "-o", str(tmp_path / "vllm"), "--for", "vllm"]) == 0
    _check_padded(tmp_path / "vllm", 8)
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    _same_model(_peft_model(model, tmp_path / "vllm"), _peft_model(model, tmp_path / "plain"))
    assert main([*common, "-o", str(tmp_path / "x"), "--drop-full-modules"]) == 2  # without --for vllm
    assert not (tmp_path / "x").exists()


def test_whole_modules_are_refused_for_vllm_or_dropped_with_a_warning(setup, tmp_path):
    base, path, adapters, root = setup
    saved = make_adapter(base, root / "saves-head", seed=7, r=3, modules_to_save=["head"])
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    save_file({k: v + 0.1 if ".head." in k else v for k, v in tensors.items()}, str(saved / "adapter_model.safetensors"))  # a trained head
    result = svdfuse.merge([str(saved)], 3, base=path, device="cpu", exclude=["head.*"])  # the head changes whole
    svdfuse.export_lora(result, tmp_path / "plain", base=copy.deepcopy(base))
    assert any(".lora_" not in k for k in load_file(str(tmp_path / "plain" / "adapter_model.safetensors")))
    with pytest.raises(ValueError, match=r"export_lora for vLLM: the merge changed 2 tensors a LoRA update cannot carry \(e\.g\. \['head\.weight', 'head\.bias'\]\)"):
        svdfuse.export_lora(result, tmp_path / "refused", base=copy.deepcopy(base), serve="vllm")
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match="2 changed tensors left at the base's value"):
        svdfuse.export_lora(result, tmp_path / "dropped", base=copy.deepcopy(base), serve="vllm", drop_full_modules=True)
    _check_padded(tmp_path / "dropped", 8)
    with pytest.raises(ValueError, match="drop_full_modules goes with serve='vllm'"):
        svdfuse.export_lora(result, tmp_path / "x", base=copy.deepcopy(base), drop_full_modules=True)
