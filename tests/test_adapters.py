"""peft LoRA adapters as sources: read exactly as peft merges them, decomposed exactly from their
factors, refused with the adapter and key where they cannot be merged exactly.

Real adapters: a few SGD steps of peft LoRAs on all-MiniLM-L6-v2 (seconds); peft's own
`merge_and_unload` is the reference for what an adapter means, float64 for the arithmetic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import svdfuse
from svdfuse import factored
from svdfuse.sources import SourceError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _adapters import LayoutNet, _adapter, _close, _peft_merged, edited_copy, first_key, too_wide, with_dora  # noqa: E402

@pytest.fixture(scope="module")
def adapters(minilm_dir, tmp_path_factory) -> list[Path]:
    """Three trained MiniLM adapters: plain, rslora with a rank pattern, alpha pattern with a
    module to save."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        _adapter(minilm_dir, root / "plain", 0, r=4, lora_alpha=8, target_modules=["query", "value"]),
        _adapter(minilm_dir, root / "rslora", 1, r=8, lora_alpha=4, use_rslora=True, target_modules=["query", "key", "dense"]),
        _adapter(
            minilm_dir, root / "patterns", 2, r=4, lora_alpha=16, target_modules=["query", "value", "dense"],
            rank_pattern={"layer.0.attention.self.query": 2, "output.dense": 6}, alpha_pattern={"value": 3},
            modules_to_save=["pooler.dense"],
        ),
    ]


def _truth(minilm_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """W0 + s·B·A in float64, s computed here from the config by peft's documented rule."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = load_file(str(minilm_dir / "model.safetensors"))
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {k: v.double() for k, v in base.items()}
    for key, A in factors.items():
        if ".lora_A." not in key:
            if "lora_" not in key:
                out[key.removeprefix("base_model.model.")] = A.double()
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = factors[key.replace("lora_A", "lora_B")]
        r = A.shape[0]
        alpha = next((v for p, v in (config["alpha_pattern"] or {}).items() if module.endswith(p)), config["lora_alpha"])
        s = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        out[f"{module}.weight"] += s * B.double() @ A.double()
    return out


def test_one_adapter_by_task_arithmetic_is_w0_plus_sBA(minilm_dir, adapters):
    for adapter in adapters:
        merged = svdfuse.merge([adapter], base=minilm_dir, method="task_arithmetic", scaling=1.0, device="cpu").state_dict()
        truth = _truth(minilm_dir, adapter)
        changed = [k for k in truth if not torch.equal(truth[k], load_file(str(minilm_dir / "model.safetensors"))[k].double())]
        assert changed, "the adapter changed nothing: the test would prove nothing"
        _close(merged, truth)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["plain", "rslora+rank_pattern", "alpha_pattern+modules_to_save"])
def test_adapter_reads_as_peft_merges_it(minilm_dir, adapters, which):
    merged = svdfuse.merge([adapters[which]], base=minilm_dir, method="task_arithmetic", scaling=1.0, device="cpu").state_dict()
    _close(merged, _peft_merged(minilm_dir, adapters[which]))


def test_row_blocks_under_a_small_budget(minilm_dir, adapters):
    """Element-wise methods rebuild W0 + s·B·A one row block at a time; the blocks agree with one piece."""
    whole = svdfuse.merge(adapters, base=minilm_dir, method="task_arithmetic", scaling=1.0, device="cpu").state_dict()
    blocks = svdfuse.merge(adapters, base=minilm_dir, method="task_arithmetic", scaling=1.0, device="cpu", max_memory="200KB").state_dict()
    assert svdfuse.merge(adapters, base=minilm_dir, method="task_arithmetic", device="cpu", max_memory="200KB", output=None).report.budget < 2**20
    _close(blocks, whole)  # the row blocks' products round like the whole one's, up to the GEMM's blocking


def test_factored_svd_equals_dense_svd():
    torch.manual_seed(0)
    for m, n, r in [(37, 23, 5), (64, 200, 16), (9, 9, 9)]:
        L, R = torch.randn(3, m, r, dtype=torch.float64), torch.randn(3, r, n, dtype=torch.float64)
        U, S, V = factored.factored_svd(L, R)
        S_dense = torch.linalg.svdvals(L @ R)[..., :r]
        torch.testing.assert_close(S, S_dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close((U * S.unsqueeze(-2)) @ V.mT, L @ R, rtol=0, atol=1e-11 * S_dense.max().item())
        eye = torch.eye(S.shape[-1], dtype=torch.float64)
        torch.testing.assert_close(U.mT @ U, eye.expand_as(U.mT @ U), rtol=0, atol=1e-12)
        torch.testing.assert_close(V.mT @ V, eye.expand_as(V.mT @ V), rtol=0, atol=1e-12)


def test_axis_with_k_above_all_ranks_is_the_sum(minilm_dir, adapters):
    """Σ r over the three adapters is at most 4 + 8 + 6 = 18 per matrix: k = 32 keeps every component."""
    axis = svdfuse.merge(adapters, 32, base=minilm_dir, device="cpu", dtype=torch.float64).state_dict()
    base = load_file(str(minilm_dir / "model.safetensors"))
    truths = [_truth(minilm_dir, a) for a in adapters]
    for key in axis:
        if axis[key].dim() < 2 or "embeddings" in key or "pooler" in key:
            continue  # tensors not merged as matrices are averaged; the pooler is saved whole (full rank), not a LoRA
        want = base[key].double() + sum(t[key] - base[key].double() for t in truths)
        err = (axis[key] - want).abs().max().item()
        assert err <= 1e-10 * max(want.abs().max().item(), 1.0), f"{key}: {err}"


def test_axis_of_adapters_equals_axis_of_their_merged_models(minilm_dir, adapters):
    """The factored decomposition selects and merges exactly what the dense one does."""
    dense = [_peft_merged(minilm_dir, a) for a in adapters]
    a = svdfuse.merge(adapters, 6, base=minilm_dir, device="cpu", svd="exact", dtype=torch.float64)
    b = svdfuse.merge(dense, 6, base=minilm_dir, device="cpu", svd="exact", dtype=torch.float64)
    assert [layer.counts for layer in a.report.layers] == [layer.counts for layer in b.report.layers]
    for key, want in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[key], want, rtol=0, atol=1e-6 * max(want.abs().max().item(), 1.0))


def test_adapters_never_form_a_dense_task_matrix(minilm_dir, adapters, monkeypatch):
    """AXIS reads adapters' factors, never their weights: a dense read of a merged matrix fails here."""
    from svdfuse.adapters import LoraSource

    real = LoraSource.read

    def read(self, key, start, stop, out):
        assert key not in self.modules, f"dense read of {key!r}"
        real(self, key, start, stop, out)

    monkeypatch.setattr(LoraSource, "read", read)
    svdfuse.merge(adapters[:2], 8, base=minilm_dir, device="cpu")
    svdfuse.merge(adapters[:2], base=minilm_dir, device="cpu", method="tsv_m", budget=4)


def test_adapters_mixed_with_a_full_fine_tune(minilm_dir, adapters):
    full = _peft_merged(minilm_dir, adapters[1])
    mixed = svdfuse.merge([adapters[0], full], 6, base=minilm_dir, device="cpu", svd="exact", dtype=torch.float64)
    dense = svdfuse.merge([_peft_merged(minilm_dir, adapters[0]), full], 6, base=minilm_dir, device="cpu", svd="exact", dtype=torch.float64)
    for key, want in dense.state_dict().items():
        torch.testing.assert_close(mixed.state_dict()[key], want, rtol=0, atol=1e-6 * max(want.abs().max().item(), 1.0))


def test_decompose_an_adapter(minilm_dir, adapters, tmp_path):
    cache = svdfuse.decompose(adapters[1], base=minilm_dir, rank=8, output=tmp_path / "a.svd.safetensors", svd="exact")
    direct = svdfuse.merge([adapters[1], adapters[0]], 8, base=minilm_dir, device="cpu", svd="exact").state_dict()
    cached = svdfuse.merge([cache, adapters[0]], 8, base=minilm_dir, device="cpu", svd="exact").state_dict()
    for key, want in direct.items():
        torch.testing.assert_close(cached[key], want)


# -- peft's other layouts: fan_in_fan_out (GPT-2's Conv1D), convs, embeddings, lora_bias -------------


def test_fan_in_fan_out_matches_peft(gpt2_dir, tmp_path):
    model = transformers.GPT2Model.from_pretrained(gpt2_dir)
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "a")
    want = peft.PeftModel.from_pretrained(transformers.GPT2Model.from_pretrained(gpt2_dir), tmp_path / "a").merge_and_unload().state_dict()
    got = svdfuse.merge([tmp_path / "a"], base=gpt2_dir, method="task_arithmetic", scaling=1.0, device="cpu").state_dict()
    _close(got, {k: v for k, v in want.items() if k in got})
    assert not torch.equal(got["h.0.attn.c_attn.weight"], transformers.GPT2Model.from_pretrained(gpt2_dir).state_dict()["h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("targets, bias", [(["conv", "emb", "lin"], False), (["conv", "lin"], True)], ids=["conv+embedding", "lora_bias"])
def test_conv_embedding_and_bias_loras_match_peft(tmp_path, targets, bias):
    torch.manual_seed(0)
    base = LayoutNet()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False, lora_bias=bias)
    model = peft.get_peft_model(_net_like(base), config)
    if bias:
        for name, p in model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                p.data.normal_()
    model.save_pretrained(tmp_path / "a")
    want = model.merge_and_unload().state_dict()
    got = svdfuse.merge([tmp_path / "a"], base=tmp_path / "base.safetensors", method="task_arithmetic", scaling=1.0, device="cpu").state_dict()
    _close(got, want)
    assert not torch.equal(got["conv.weight"], base.state_dict()["conv.weight"])
    if bias:
        assert not torch.equal(got["lin.bias"], base.state_dict()["lin.bias"])


def _net_like(base: nn.Module) -> nn.Module:
    net = LayoutNet()
    net.load_state_dict(base.state_dict())
    return net


# -- refusals ---------------------------------------------------------------------------------------


def _bad_rank(w):
    key = first_key(w, "lora_B")
    w[key] = w[key][:, :-1].contiguous()
    return w


def _nan(w):
    key = first_key(w, "lora_A")
    w[key] = w[key].clone()
    w[key][0, 0] = float("nan")
    return w


@pytest.mark.parametrize(
    "config, tensors, expected",
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"peft_type": "IA3"}, None, "IA3 adapter"),
        ({"peft_type": "LOHA"}, None, "LOHA adapter"),
        ({}, with_dora, "DoRA magnitude vector"),
        ({}, _bad_rank, "mismatched ranks"),
        ({"rank_pattern": {"query": 3}}, None, "rank_pattern says 3"),
        ({}, too_wide, "do not fit the base's"),
        ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, None, "is an adapter of 'meta-llama/Llama-2-7b-hf'"),
    ],
    ids=["dora", "ia3", "loha", "dora-weights", "ranks", "rank_pattern", "shape", "other-base"],
)
def test_refused_before_any_work(minilm_dir, adapters, tmp_path, no_work, config, tensors, expected):
    bad = edited_copy(adapters[0], tmp_path / "bad", config, tensors)
    with pytest.raises(SourceError, match=expected) as err:
        svdfuse.merge([bad], 4, base=minilm_dir, device="cpu", output=str(tmp_path / "out"))
    assert "source 0 ('bad')" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def _inf_in_last_b(w):
    key = sorted(k for k in w if "lora_B" in k)[-1]
    w[key] = w[key].clone()
    w[key][-1, -1] = float("-inf")
    return w


@pytest.mark.parametrize(
    "edit, position, tensor",
    [(_nan, 0, r"encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight"), (_inf_in_last_b, 1, r"encoder\.layer\.5\.attention\.self\.value\.lora_B\.weight")],
    ids=["nan-in-A", "inf-in-B-of-the-second"],
)  # fmt: skip
def test_non_finite_factors_named(minilm_dir, adapters, tmp_path, edit, position, tensor):
    """Named however the merge reads the factors: AXIS (checked by their Gram matrices), Task
    Arithmetic to a LoRA (checked as read)."""
    bad = edited_copy(adapters[0], tmp_path / "bad", None, edit)
    sources = [adapters[1], bad] if position else [bad]
    expected = rf"source {position} \('bad'\): 'base_model\.model\.{tensor}' holds NaN or Inf"
    with pytest.raises(SourceError, match=expected):
        svdfuse.merge(sources, 4, base=minilm_dir, device="cpu", output=str(tmp_path / "out"))
    with pytest.raises(SourceError, match=expected):
        svdfuse.merge(sources, base=minilm_dir, method="task_arithmetic", device="cpu", output=str(tmp_path / "out"), save_format="lora")
    assert not (tmp_path / "out").exists()


def test_factors_whose_grams_overflow_float64_are_refused(minilm_dir, adapters, tmp_path):
    """float64 factors finite but too large to square: refused, naming the module, not a LAPACK error."""

    def huge(w):
        key = first_key(w, "lora_A")
        w[key] = w[key].double() * 1e160
        return w

    big = edited_copy(adapters[0], tmp_path / "big", None, huge)
    with pytest.raises(SourceError, match=r"source 0 \('big'\): the factors of 'encoder\.layer\.0\.attention\.self\.query\.weight' are too large: their float64 Gram matrices overflow"):
        svdfuse.merge([big], 4, base=minilm_dir, device="cpu", output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_architecture(gpt2_dir, adapters, tmp_path):
    with pytest.raises(SourceError, match="fits no tensor of the base; is this an adapter of another model"):
        svdfuse.merge([adapters[0]], 4, base=gpt2_dir, device="cpu")


def test_missing_files(minilm_dir, adapters, tmp_path):
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    with pytest.raises(SourceError, match="holds no adapter_model.safetensors or adapter_model.bin"):
        svdfuse.merge([tmp_path / "noweights"], 4, base=minilm_dir, device="cpu")
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "adapter_model.safetensors").write_bytes((adapters[0] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(SourceError, match="cannot read .*adapter_config.json.* as a peft adapter config"):
        svdfuse.merge([tmp_path / "noconfig"], 4, base=minilm_dir, device="cpu")


def test_an_adapters_files_never_lead_outside_its_directory(minilm_dir, adapters, tmp_path, no_work):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (outside / name).write_bytes((adapters[0] / name).read_bytes())
        linked = tmp_path / f"linked-{name}"
        linked.mkdir()
        for other in ("adapter_config.json", "adapter_model.safetensors"):
            (linked / other).symlink_to(outside / other) if other == name else (linked / other).write_bytes((adapters[0] / other).read_bytes())
        with pytest.raises(SourceError, match=f"names '{name}', which links to .* outside the model directory"):
            svdfuse.merge([linked], 4, base=minilm_dir, device="cpu")


def test_adapter_needs_a_base(adapters):
    from svdfuse.sources import open_source

    with pytest.raises(SourceError, match="is a peft adapter; it is read against a base"):
        open_source(adapters[0], "model")


def test_cli_refusal_exits_2(minilm_dir, adapters, tmp_path, capsys):
    from svdfuse.cli import main

    bad = edited_copy(adapters[0], tmp_path / "bad", {"use_dora": True})
    assert main(["merge", str(bad), "--base", str(minilm_dir), "-k", "4", "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
