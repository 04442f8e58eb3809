"""Merges and Stage-2 tasks as peft LoRA adapters (`svdfuse.export_lora`, `svdfuse export lora`).

peft loads what svdfuse writes (it is not used to write it). Numerics: an adapter's model is
judged as the integration tests judge low-rank models: its error against a float64 run of the
merged model within 2x the dense fp32 model's own error plus one rounding of the output scale.
Merged weights from `merge_and_unload()`: peft computes W0 + B A in fp32 (a dot product of r
terms), svdfuse frozen + (U S) Vᵀ the same way, and each rounds once to fp32, so they may differ
by 2·eps·|W| + 2·r·eps·(|B| |A|) per entry.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import svdfuse
from svdfuse.cli import main
from svdfuse.nn import materialize, svd_layers

from _helpers import sigma_perturbed

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow

EPS32 = torch.finfo(torch.float32).eps
K = 8
SENTENCES = ["A gripping, beautifully acted film.", "The plot was dull and far too long.", "I walked out halfway through."]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _dense64(model: nn.Module, template: nn.Module) -> nn.Module:
    """`model` (with svdfuse layers) as a dense float64 copy of `template`, each merged weight
    W0 + U diag(σ) Vᵀ computed in float64 from the factors."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in materialize(copy.deepcopy(model)).state_dict().items()}
    for name, layer in svd_layers(model):
        key = f"{name}.weight"
        W0 = layer.weight0 if hasattr(layer, "weight0") else layer.base.weight
        delta = (layer.U.double() * layer.S.double()) @ layer.V.double().T
        state[key] = W0.double() + delta.reshape(W0.shape)
    dense = copy.deepcopy(template).double()
    dense.load_state_dict(state)
    return dense.eval()


def _assert_within_dense_error(name: str, y: torch.Tensor, y_dense: torch.Tensor, ref64: torch.Tensor) -> None:
    err = (y.double() - ref64).abs().max().item()
    dense_err = (y_dense.double() - ref64).abs().max().item()
    bound = 2 * dense_err + EPS32 * ref64.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {bound:.3e} (2x the dense fp32 model's {dense_err:.3e} + one rounding)"


def _assert_merged_weights(state: dict, expected: dict, adapter: Path) -> None:
    """`merge_and_unload()`'s state dict against svdfuse's: same names, each entry within the
    rounding bound of the module docstring (exact for tensors peft copies)."""
    assert sorted(state) == sorted(expected)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    for key, want in expected.items():
        got = state[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        module = key.rpartition(".")[0]
        prefix = f"base_model.model.{module}"
        A, B = lora.get(f"{prefix}.lora_A.weight"), lora.get(f"{prefix}.lora_B.weight")
        bound = 2 * EPS32 * want.abs().double()
        if A is not None and key.endswith("weight"):
            r = A.shape[0]
            bound = bound + 2 * r * EPS32 * (B.abs().double().reshape(B.shape[0], -1) @ A.abs().double().reshape(r, -1)).reshape(want.shape)
        elif f"{prefix}.lora_embedding_A" in lora and key.endswith("weight"):  # peft: Δ = (B A)ᵀ
            A, B = lora[f"{prefix}.lora_embedding_A"], lora[f"{prefix}.lora_embedding_B"]
            bound = bound + 2 * A.shape[0] * EPS32 * (B.abs().double() @ A.abs().double()).T
        err = (got.double() - want.double()).abs()
        bad = err > bound
        assert not bad.any(), f"{key}: merge_and_unload differs by {err.max().item():.3e} at {bad.nonzero()[0].tolist()}"


def _tokens(minilm_dir: Path) -> dict:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(minilm_dir)(SENTENCES, padding=True, return_tensors="pt"))


def _hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(minilm_base, tmp_path_factory) -> list[Path]:
    """Two fine-tunes saved with save_pretrained: dense noise on every encoder/pooler matrix,
    bias and LayerNorm, and on the token-type embedding table (merged by averaging)."""
    root = tmp_path_factory.mktemp("sources")
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(2):
        model = copy.deepcopy(minilm_base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("encoder.", "pooler.", "embeddings.LayerNorm", "embeddings.token_type")):
                    p.add_((0.02 if p.dim() == 2 else 0.01) * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"ft-{i}")
        dirs.append(root / f"ft-{i}")
    return dirs


@pytest.fixture(scope="module")
def result(sources, minilm_base):
    return svdfuse.merge(sources, k=K, base=minilm_base, device="cpu", progress=False)


@pytest.fixture(scope="module")
def batch(minilm_dir):
    return _tokens(minilm_dir)


def test_adapter_config_names_the_real_modules_at_rank_k(result, minilm_base, tmp_path):
    report = svdfuse.export_lora(result, tmp_path / "adapter", base=minilm_base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    linear = sorted(name for name, m in minilm_base.named_modules() if isinstance(m, nn.Linear))
    norms = sorted(name for name, m in minilm_base.named_modules() if isinstance(m, nn.LayerNorm))
    assert config["peft_type"] == "LORA" and config["r"] == K and config["lora_alpha"] == K
    assert config["target_modules"] == linear and len(linear) == 37
    assert config["rank_pattern"] == {} and config["lora_bias"] is True
    assert config["modules_to_save"] == sorted(norms + ["embeddings.token_type_embeddings"])
    assert config["base_model_name_or_path"] == minilm_base.name_or_path
    assert report.targets == {name: K for name in linear} and not report.approximated
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        U, S, V = result.components["encoder.layer.0.attention.self.query.weight"]
        name = "base_model.model.encoder.layer.0.attention.self.query"
        assert torch.equal(f.get_tensor(f"{name}.lora_A.weight"), V.T)  # lora_A = Vᵀ (k, n)
        assert torch.equal(f.get_tensor(f"{name}.lora_B.weight"), U * S)  # lora_B = U diag(σ) (m, k)
    assert f"{name}.lora_B.bias" in keys and "base_model.model.encoder.layer.0.output.LayerNorm.weight" in keys
    assert "base_model.model.embeddings.word_embeddings.weight" not in keys  # unchanged by the merge


def test_peft_model_reproduces_the_merge_and_merge_and_unload_its_state_dict(result, minilm_base, batch, tmp_path):
    from peft import PeftModel

    svdfuse.export_lora(result, tmp_path / "adapter", base=minilm_base)
    with _no_warning():
        model = PeftModel.from_pretrained(copy.deepcopy(minilm_base), tmp_path / "adapter").eval()
    svd_model = result.to_module(minilm_base).eval()
    ref64 = _hidden(_dense64(svd_model, minilm_base), batch)
    dense = copy.deepcopy(minilm_base)
    dense.load_state_dict(result.state_dict())
    y_dense = _hidden(dense, batch)
    _assert_within_dense_error("PeftModel", _hidden(model, batch), y_dense, ref64)
    _assert_within_dense_error("svdfuse", _hidden(svd_model, batch), y_dense, ref64)
    _assert_merged_weights(model.merge_and_unload().state_dict(), result.state_dict(), tmp_path / "adapter")


class _no_warning:
    """Fails on any warning raised inside (peft warns on adapters it cannot merge or load cleanly)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        ours = [str(w.message) for w in self.records if "peft" in (w.filename or "") or "PeftWarning" in type(w.message).__name__]
        assert not ours, f"peft warned: {ours}"


def test_stage2_tasks_load_side_by_side_each_as_its_own_model(result, minilm_base, batch, tmp_path):
    from peft import PeftModel

    tasks = sigma_perturbed(result.to_module(minilm_base).eval(), 2, seed=7)
    reports = svdfuse.export_lora({"sst2": tasks[0], "imdb": tasks[1]}, tmp_path / "tasks", base=minilm_base)
    assert sorted(reports) == ["imdb", "sst2"]
    files = [safe_open(str(tmp_path / "tasks" / name / "adapter_model.safetensors"), "pt") for name in ("sst2", "imdb")]
    a_keys = [k for k in files[0].keys() if ".lora_A." in k]
    assert len(a_keys) == 37
    for key in a_keys:  # shared factors: lora_A is Vᵀ in every task; σ lives in lora_B
        assert torch.equal(files[0].get_tensor(key), files[1].get_tensor(key)), key
    assert not torch.equal(files[0].get_tensor(a_keys[0].replace("lora_A", "lora_B")), files[1].get_tensor(a_keys[0].replace("lora_A", "lora_B")))

    model = PeftModel.from_pretrained(copy.deepcopy(minilm_base), tmp_path / "tasks" / "sst2", adapter_name="sst2")
    model.load_adapter(tmp_path / "tasks" / "imdb", adapter_name="imdb")
    model.eval()
    dense = copy.deepcopy(minilm_base)
    for name, task in (("sst2", tasks[0]), ("imdb", tasks[1]), ("sst2", tasks[0])):
        model.set_adapter(name)
        dense.load_state_dict(materialize(copy.deepcopy(task)).state_dict())
        ref64 = _hidden(_dense64(task, minilm_base), batch)
        _assert_within_dense_error(f"adapter {name}", _hidden(model, batch), _hidden(dense, batch), ref64)
    merged = model.merge_and_unload(adapter_names=["imdb"])
    _assert_merged_weights(merged.state_dict(), materialize(copy.deepcopy(tasks[1])).state_dict(), tmp_path / "tasks" / "imdb")


def test_cli_exports_a_dense_merged_directory_at_its_recorded_rank(sources, minilm_dir, minilm_base, batch, tmp_path, capsys):
    from peft import PeftModel

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(minilm_dir), "-k", str(K), "-o", str(merged), "--quiet", "--device", "cpu", *map(str, sources)]) == 0
    assert main(["export", "lora", "--base", str(minilm_dir), str(merged), "-o", str(tmp_path / "adapter"), "--device", "cpu"]) == 0
    assert "LoRA r=8 on 37 modules" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == K and config["base_model_name_or_path"] == str(minilm_dir)
    from transformers import AutoModel

    dense = AutoModel.from_pretrained(merged).eval()
    model = PeftModel.from_pretrained(copy.deepcopy(minilm_base), tmp_path / "adapter").eval()
    _assert_merged_weights(model.merge_and_unload().state_dict(), dense.state_dict(), tmp_path / "adapter")
    # Without recorded ranks (not an svdfuse merge) the rank must be given.
    export_ft0 = ["export", "lora", "--base", str(minilm_dir), str(sources[0]), "-o", str(tmp_path / "ft0"), "--device", "cpu"]
    assert main(export_ft0) == 2 and "pass rank= (--rank)" in capsys.readouterr().err
    # A fine-tune's update is of full rank: more than rounding is left beyond rank 8.
    assert main([*export_ft0, "--rank", "8"]) == 2
    assert "is not of rank 8: beyond its top 8 components the merged update keeps a residual" in capsys.readouterr().err
    assert main([*export_ft0, "--rank", "8", "--approximate"]) == 0 and (tmp_path / "ft0" / "adapter_config.json").is_file()


def test_a_merge_beyond_rank_k_is_refused_unless_approximate(sources, minilm_base, batch, tmp_path):
    from peft import PeftModel

    layer0 = ["encoder.layer.0.*"]  # six matrices are enough; the other weights are averaged (modules to save)
    ties = svdfuse.merge(sources, k=K, base=minilm_base, method="ties", density=0.2, include=layer0, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"is not of rank 8: beyond its top 8 components .* approximate=True"):
        svdfuse.export_lora(ties, tmp_path / "refused", base=minilm_base)
    assert not (tmp_path / "refused").exists()
    report = svdfuse.export_lora(ties, tmp_path / "adapter", base=minilm_base, approximate=True)
    assert sorted(report.approximated) == sorted(ties.components)
    assert all(0 < e < 1 for e in report.approximated.values())
    PeftModel.from_pretrained(copy.deepcopy(minilm_base), tmp_path / "adapter")  # loads cleanly


# ---------------------------------------------------------------------------------------------
# Part 4: a transformers module as the base writes a loadable directory
# ---------------------------------------------------------------------------------------------


def test_module_base_saves_a_loadable_hf_directory_in_memory_and_streamed(sources, minilm_base, minilm_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    average = svdfuse.merge(sources, base=minilm_base, method="average", device="cpu", progress=False)
    average.save(tmp_path / "saved")
    svdfuse.merge(sources, base=minilm_base, method="average", device="cpu", progress=False, output=tmp_path / "streamed")
    expected = average.state_dict()
    for out in (tmp_path / "saved", tmp_path / "streamed"):
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
        model, info = AutoModel.from_pretrained(out, output_loading_info=True)
        assert not any(info[field] for field in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        state = model.state_dict()
        for key, value in expected.items():
            assert torch.equal(state[key], value), f"{out.name}: {key}"
        assert AutoTokenizer.from_pretrained(out)("a test")["input_ids"] == AutoTokenizer.from_pretrained(minilm_dir)("a test")["input_ids"]
        assert (out / "modules.json").is_file()  # the sentence-transformers files of the model's own directory


def test_module_without_config_cannot_be_saved_as_a_directory(tmp_path):
    base = nn.Sequential(nn.Linear(4, 4))
    sources = [{k: v + 0.1 * (i + 1) for k, v in base.state_dict().items()} for i in range(2)]
    result = svdfuse.merge(sources, base=base, method="average", device="cpu", progress=False)
    with pytest.raises(ValueError, match="a plain nn.Module, a state dict or a .safetensors file carries none"):
        result.save(tmp_path / "out")
    result.save(tmp_path / "out.safetensors")


# ---------------------------------------------------------------------------------------------
# Small models: conv, embedding, ranks per module, what cannot be represented
# ---------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, groups: int = 1, attention: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, stride=2, groups=groups)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True) if attention else None

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.conv(images).mean(dim=(2, 3)) + self.emb(ids).mean(1)
        if self.attn is not None:
            x = x + self.attn(x[:, None], x[:, None], x[:, None], need_weights=False)[0][:, 0]
        return self.head(torch.relu(self.fc(self.norm(x))))


def _merge_small(base: nn.Module, k, biases: bool = True, **kwargs) -> svdfuse.MergeResult:
    gen = torch.Generator().manual_seed(3)
    sources = [
        {key: v if key.endswith("bias") and not biases else v + 0.05 * torch.randn(v.shape, generator=gen) for key, v in base.state_dict().items()}
        for _ in range(3)
    ]
    return svdfuse.merge(sources, k=k, base=base, device="cpu", progress=False, **kwargs)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 9, 9, generator=gen), torch.randint(0, 20, (2, 5), generator=gen)


@pytest.mark.parametrize("embedding", [True, False], ids=["embedding", "biases"])
def test_conv_embedding_and_per_module_ranks(embedding, tmp_path):
    """k = 0.5 of min(m, n): conv 8x36 -> 4, emb 20x8 -> 4, fc 16x8 -> 4, head 3x16 -> 1, so
    rank_pattern holds the head. peft's lora_bias cannot go with an Embedding target: the
    embedding case keeps the biases, the other merges them (lora_B's bias of conv and linears)."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = _Net().eval()
    include = ["conv.weight", "fc.weight", "head.weight"] + (["emb.weight"] if embedding else [])
    result = _merge_small(base, 0.5, biases=not embedding, include=include, exclude=["emb.*"] if not embedding else [])
    report = svdfuse.export_lora(result, tmp_path / "adapter", base=base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"^head": 1} and config["alpha_pattern"] == {"^head": 1}
    assert config["lora_bias"] is not embedding
    assert config["modules_to_save"] == ["norm"] if embedding else ["emb", "norm"]
    assert report.targets == {"conv": 4, "fc": 4, "head": 1, **({"emb": 4} if embedding else {})}
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    svd_model = result.to_module(base).eval()
    images, ids = _inputs()
    with torch.no_grad():
        y, y_svd = model(images, ids), svd_model(images, ids)
        dense = copy.deepcopy(base)
        dense.load_state_dict(result.state_dict())
        ref64 = copy.deepcopy(base).double()
        ref64.load_state_dict({k: v.double() for k, v in result.state_dict().items()})
        for key, (U, S, V) in result.components.items():
            ref64.get_parameter(key).copy_(result.frozen[key].double() + ((U.double() * S.double()) @ V.double().T).reshape(result.frozen[key].shape))
        truth = ref64(images.double(), ids)
    _assert_within_dense_error("PeftModel", y, dense(images, ids), truth)
    _assert_within_dense_error("svdfuse", y_svd, dense(images, ids), truth)
    _assert_merged_weights(model.merge_and_unload().state_dict(), result.state_dict(), tmp_path / "adapter")


def test_a_tensor_of_a_module_with_updates_is_not_representable(tmp_path):
    base = nn.Module()
    base.proj = nn.Parameter(torch.randn(6, 4))  # like open_clip's `proj`: a tensor of the model itself
    base.fc = nn.Linear(6, 5)
    result = _merge_small(base, 2, include=["fc.weight"])
    with pytest.raises(ValueError, match=r"changed 'proj', held by the model itself; no LoRA adapter can carry it"):
        svdfuse.export_lora(result, tmp_path / "adapter", base=base)
    report = svdfuse.export_lora(result, tmp_path / "adapter", base=base, approximate=True)
    assert list(report.approximated) == ["proj"] and report.approximated["proj"] > 0


def test_unsupported_layers_are_refused_naming_the_module(tmp_path):
    base = _Net(groups=4).eval()
    result = _merge_small(base, 2, include=["conv.weight"])
    with pytest.raises(ValueError, match=r"'conv.weight': .* groups=4"):
        svdfuse.export_lora(result, tmp_path / "grouped", base=base)
    base = _Net(attention=True).eval()
    result = _merge_small(base, 2, include=["attn.*"])
    with pytest.raises(ValueError, match=r"'attn.in_proj_weight' belongs to an nn.MultiheadAttention, which peft 0.21"):
        svdfuse.export_lora(result, tmp_path / "attention", base=base)
    assert not any(tmp_path.iterdir())


def test_lora_bias_needs_a_bias_on_every_target(tmp_path):
    base = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4, bias=False))
    result = _merge_small(base, 2)
    with pytest.raises(ValueError, match=r"changed the bias of '0'.* '1' \(Linear\) has none"):
        svdfuse.export_lora(result, tmp_path / "adapter", base=base)


def test_a_stacked_model_is_refused_with_what_to_pass(result, minilm_base, tmp_path):
    tasks = sigma_perturbed(result.to_module(minilm_base), 2, seed=1)
    stacked = svdfuse.serving.stack_tasks(tasks)
    with pytest.raises(ValueError, match="σ bank of 2 tasks .* as a name -> model mapping"):
        svdfuse.export_lora(stacked, tmp_path / "adapter", base=minilm_base)


class _Nested(nn.Module):
    """Modules whose full names end in each other's: 'fc', 'block.fc', 'other.fc'."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block, self.other = nn.Module(), nn.Module()
        self.block.fc, self.other.fc = nn.Linear(8, 2), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.fc(self.fc(x)) + self.other.fc(x)[:, :2]


def test_names_that_end_in_each_other_reach_exactly_their_modules(tmp_path):
    """peft reads a listed target 'fc' as 'fc' or any '*.fc', and a rank_pattern key as a suffix:
    the export names exactly the modules meant (a regex for the targets, anchored rank keys)."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = _Nested().eval()
    # k = 0.5: fc 8x8 -> 4, block.fc 2x8 -> 1; other.fc is averaged (a module to save).
    result = _merge_small(base, 0.5, include=["fc.weight", "block.fc.weight"])
    report = svdfuse.export_lora(result, tmp_path / "adapter", base=base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == r"block\.fc|fc" and config["rank_pattern"] == {r"^block\.fc": 1}
    assert report.modules_to_save == ["other.fc"] and report.targets == {"fc": 4, "block.fc": 1}
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert model.base_model.model.block.fc.r == {"default": 1} and model.base_model.model.fc.r == {"default": 4}
    _assert_merged_weights(model.merge_and_unload().state_dict(), result.state_dict(), tmp_path / "adapter")
