"""`svdfuse inspect ADAPTER_DIR` and `inspection.inspect_adapter`: a peft LoRA adapter's modules as
peft itself reads them (rank, alpha, scale from the loaded `PeftModel`), from headers alone, checked
against a base when one is given, refused with the merge's own messages.

Real adapters: a few SGD steps of peft LoRAs on all-MiniLM-L6-v2, a tiny GPT-2 (fan_in_fan_out) and
a small conv/embedding net (lora_bias), as in tests/test_adapters.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import svdfuse
from svdfuse.cli import main
from svdfuse.inspection import adapter_report, inspect_adapter, inspect_model
from svdfuse.plan import _size
from svdfuse.sources import SafetensorsSource, SourceError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _adapters import LayoutNet, _adapter, edited_copy, first_key, too_wide, with_dora  # noqa: E402


@pytest.fixture(scope="module")
def adapters(minilm_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("inspect-adapters")
    return [
        _adapter(minilm_dir, root / "plain", 0, r=4, lora_alpha=8, target_modules=["query", "value"]),
        _adapter(
            minilm_dir, root / "patterns", 2, r=4, lora_alpha=16, target_modules=["query", "value", "dense"], use_rslora=True,
            rank_pattern={"layer.0.attention.self.query": 2, "output.dense": 6}, alpha_pattern={"value": 3},
            modules_to_save=["pooler.dense"],
        ),
    ]


def _peft_layers(base: nn.Module, adapter: Path) -> dict[str, nn.Module]:
    """peft's own LoRA layers of `adapter` loaded on `base`, by module name without peft's prefix."""
    model = peft.PeftModel.from_pretrained(base, adapter)
    return {
        name.removeprefix("base_model.model."): module for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


@pytest.mark.parametrize("which", [0, 1], ids=["plain", "rslora+patterns+modules_to_save"])
def test_each_module_as_peft_reads_it(minilm_dir, adapters, which):
    info = inspect_adapter(adapters[which])
    layers = _peft_layers(transformers.AutoModel.from_pretrained(minilm_dir), adapters[which])
    stored = load_file(str(adapters[which] / "adapter_model.safetensors"))
    assert sorted(m.module for m in info.modules) == sorted(layers)
    for m in info.modules:
        layer = layers[m.module]
        assert (m.kind, m.rank, m.alpha) == ("linear", layer.r["default"], layer.lora_alpha["default"])
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert m.shape == tuple(layer.get_base_layer().weight.shape)
        a, b = (stored[f"base_model.model.{m.module}.lora_{x}.weight"] for x in "AB")
        assert m.dtypes == (torch.float32,) and m.nbytes == a.nbytes + b.nbytes
    assert {layer.scaling["default"] for layer in layers.values()} != {1.0}, "every scale 1: the scale checks would prove nothing"
    whole = sorted((t.name, t.role, t.shape) for t in info.tensors)
    assert whole == ([("pooler.dense.bias", "whole", (384,)), ("pooler.dense.weight", "whole", (384, 384))] if which else [])
    assert info.base_model == str(minilm_dir) and info.base is None


def test_headers_only(minilm_dir, adapters, monkeypatch):
    """No tensor's data is read, of the adapter or of the base."""

    def refuse(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(SafetensorsSource, "read", refuse)
    monkeypatch.setattr(SafetensorsSource, "get", refuse, raising=False)
    monkeypatch.setattr(torch, "load", refuse)
    assert inspect_adapter(adapters[1], base=minilm_dir).modules


def test_against_a_base_each_module_names_its_tensor(minilm_dir, adapters):
    info = inspect_adapter(adapters[1], base=minilm_dir)
    base = SafetensorsSource("base", [minilm_dir / "model.safetensors"])
    for m in info.modules:
        assert m.base_key == f"{m.module}.weight" and m.base_shape == base.meta(m.base_key)[0] == m.shape
    assert sorted((t.name, t.base_key) for t in info.tensors) == [("pooler.dense.bias", "pooler.dense.bias"), ("pooler.dense.weight", "pooler.dense.weight")]
    assert info.base == str(minilm_dir)


def test_fan_in_fan_out_is_transposed(gpt2_dir, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    peft.get_peft_model(transformers.GPT2Model.from_pretrained(gpt2_dir), config).save_pretrained(tmp_path / "a")
    info = inspect_adapter(tmp_path / "a", base=gpt2_dir)
    assert {m.kind for m in info.modules} == {"transposed"}
    for m in info.modules:  # c_attn's Conv1D weight is in × out = 32 × 96: not square, so a swapped shape shows
        assert m.shape == m.base_shape, m
    assert ("h.0.attn.c_attn", (32, 96)) in [(m.module, m.shape) for m in info.modules]


def _net_adapter(root: Path, targets: list[str], bias: bool) -> tuple[Path, Path, nn.Module]:
    torch.manual_seed(0)
    base = LayoutNet()
    root.mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False, lora_bias=bias)
    net = LayoutNet()
    net.load_state_dict(base.state_dict())
    model = peft.get_peft_model(net, config)
    model.save_pretrained(root / "a")
    return root / "a", root / "base.safetensors", model


def test_conv_and_embedding_layouts(tmp_path):
    adapter, base, _ = _net_adapter(tmp_path / "net", ["conv", "emb", "lin"], bias=False)
    info = inspect_adapter(adapter, base=base)
    kinds = {m.module: (m.kind, m.shape, m.base_shape) for m in info.modules}
    assert kinds == {"conv": ("conv", (8, 3, 3, 3), (8, 3, 3, 3)), "emb": ("embedding", (20, 6), (20, 6)), "lin": ("linear", (5, 6), (5, 6))}
    assert inspect_adapter(adapter).modules == [m.__class__(**{**m.__dict__, "base_key": None, "base_shape": None}) for m in info.modules]


def test_lora_bias_entries(tmp_path):
    adapter, base, model = _net_adapter(tmp_path / "net", ["conv", "lin"], bias=True)
    info = inspect_adapter(adapter, base=base)
    scale = model.base_model.model.lin.scaling["default"]
    biases = {(t.name, t.role, t.shape, t.base_key) for t in info.tensors}
    assert biases == {("conv.bias", "lora_bias", (8,), "conv.bias"), ("lin.bias", "lora_bias", (5,), "lin.bias")}
    assert [t.scale for t in info.tensors] == pytest.approx([scale, scale], rel=1e-12) and scale != 1.0
    assert "lora_bias (× 1.66667)" in adapter_report(info) and f"{scale:.6g}" == "1.66667"


def test_cli_tables_and_summary(minilm_dir, adapters, capsys):
    assert main(["inspect", str(adapters[1])]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("encoder.layer.0.attention.self.query "))
    assert row.split() == ["encoder.layer.0.attention.self.query", "linear", "2", "16", f"{16 / 2 ** 0.5:.6g}", "float32", "384×384", "6.0", "KiB"]
    summary = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.split("\n\n")[-1].splitlines())
    info = inspect_adapter(adapters[1])
    assert summary["modules"] == f"{len(info.modules)} (linear {len(info.modules)})"
    assert summary["total rank"] == f"{sum(m.rank for m in info.modules):,}" and summary["total rank"] != "0"
    assert summary["factor bytes"] == _size(sum(m.nbytes for m in info.modules))
    assert summary["whole tensors"] == "2" and summary["lora_bias"] == "0"
    assert summary["base_model_name_or_path"] == str(minilm_dir)
    assert "use_dora" in summary["refused, none present"] and "rslora" in summary["uses"]
    assert main(["inspect", str(adapters[1]), "--base", str(minilm_dir)]) == 0
    with_base = capsys.readouterr().out
    assert "base tensor" in with_base and "encoder.layer.0.attention.self.query.weight" in with_base and "fits base" in with_base
    assert main(["inspect", str(adapters[0]), "--summary"]) == 0
    only = capsys.readouterr().out
    assert "encoder.layer" not in only and "total rank" in only
    assert adapter_report(inspect_adapter(adapters[0]), per_module=False) == only.rstrip("\n")


def test_cli_options_that_do_not_apply(minilm_dir, adapters, capsys):
    assert main(["inspect", str(adapters[0]), "--include", "*query*"]) == 2
    assert "--include/--exclude choose a model's tensors" in capsys.readouterr().err
    assert main(["inspect", str(minilm_dir), "--base", str(minilm_dir)]) == 2
    assert "--base is for a peft adapter directory" in capsys.readouterr().err
    with pytest.raises(SourceError, match=r"is a peft adapter; inspect it with inspect_adapter"):
        inspect_model(adapters[0])
    with pytest.raises(SourceError, match="is not a peft adapter directory"):
        inspect_adapter(minilm_dir)


def _bad_rank(w):
    w[first_key(w, "lora_B")] = w[first_key(w, "lora_B")][:, :-1].contiguous()
    return w


@pytest.mark.parametrize(
    "config, tensors, needs_base",
    [
        ({"use_dora": True}, None, False),
        ({"peft_type": "IA3"}, None, False),
        ({"alora_invocation_tokens": [1, 2]}, None, False),
        ({}, with_dora, False),
        ({}, _bad_rank, False),
        ({"rank_pattern": {"query": 3}}, None, False),
        ({"r": 0}, None, False),
        ({}, too_wide, True),
        ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, None, True),
    ],
    ids=["dora", "ia3", "alora", "dora-weights", "ranks", "rank_pattern", "r", "shape", "other-base"],
)
def test_refusals_are_the_merges_own(minilm_dir, adapters, tmp_path, capsys, config, tensors, needs_base):
    """The same one line as the merge's (its label aside), alone where no base is needed to see it,
    and with --base where one is; on the CLI exit 2 with that line."""
    bad = edited_copy(adapters[0], tmp_path / "bad", config, tensors)
    with pytest.raises(SourceError) as merged:
        svdfuse.merge([bad], 4, base=minilm_dir, device="cpu")
    expected = str(merged.value).replace("source 0 ('bad')", "model ('bad')")
    base = {"base": minilm_dir} if needs_base else {}
    with pytest.raises(SourceError) as inspected:
        inspect_adapter(bad, **base)
    assert str(inspected.value) == expected and "\n" not in expected
    if needs_base:
        inspect_adapter(bad)  # alone, nothing to refuse: the base decides
    assert main(["inspect", str(bad), *(["--base", str(minilm_dir)] if needs_base else [])]) == 2
    assert capsys.readouterr().err == f"svdfuse inspect: error: {expected}\n"
