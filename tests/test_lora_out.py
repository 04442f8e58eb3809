"""LoRA out: `merge(..., save_format="lora")` writes a peft adapter from the merged factors; peft
loads it and its `merge_and_unload()` is svdfuse's dense merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import svdfuse
from svdfuse.lora_out import VLLM_RANKS

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _adapters import _adapter, _close, _peft_merged  # noqa: E402


@pytest.fixture(scope="module")
def adapters(minilm_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("lora-out")
    return [
        _adapter(minilm_dir, root / "a", 0, r=4, lora_alpha=8, target_modules=["query", "value"]),
        _adapter(minilm_dir, root / "b", 1, r=8, lora_alpha=4, use_rslora=True, target_modules=["query", "key"], rank_pattern={"key": 2}),
        _adapter(minilm_dir, root / "c", 2, r=4, lora_alpha=16, target_modules=["value"], modules_to_save=["pooler.dense"]),
    ]


def _factors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_axis_lora_loads_in_peft_and_is_the_merge(minilm_dir, adapters, tmp_path):
    svdfuse.merge(adapters, 6, base=minilm_dir, device="cpu", output=str(tmp_path / "out"), save_format="lora")
    dense = svdfuse.merge(adapters, 6, base=minilm_dir, device="cpu")
    got = _peft_merged(minilm_dir, tmp_path / "out")
    _close(got, {k: v for k, v in dense.state_dict().items() if k in got})
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    # adapter c saved the trained pooler whole: AXIS merges its weight as a matrix (a LoRA update) and
    # averages its bias, which goes in lora_B's bias
    assert config["r"] == 6 and config["lora_alpha"] == 6 and config["modules_to_save"] is None and config["lora_bias"] is True
    assert "pooler.dense" in config["target_modules"]
    # lora_B = U diag(σ), lora_A = Vᵀ: Vᵀ's rows orthonormal, U diag(σ)'s columns orthogonal with norms σ
    f = _factors(tmp_path / "out")
    A, B = f["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"], f["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
    U, S, V = dense.components["encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(A, V.T)
    torch.testing.assert_close(B, U * S)


def test_task_arithmetic_of_adapters_is_their_concatenation(minilm_dir, adapters, tmp_path):
    two = adapters[:2]
    svdfuse.merge(two, base=minilm_dir, device="cpu", method="task_arithmetic", output=str(tmp_path / "out"), save_format="lora")
    dense = svdfuse.merge(two, base=minilm_dir, device="cpu", method="task_arithmetic").state_dict()
    got = _peft_merged(minilm_dir, tmp_path / "out")
    _close(got, {k: v for k, v in dense.items() if k in got})
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ranks = {"encoder.layer.0.attention.self.query": 4 + 8, "encoder.layer.0.attention.self.key": 2, "encoder.layer.0.attention.self.value": 4}
    f = _factors(tmp_path / "out")
    for module, r in ranks.items():
        assert f[f"base_model.model.{module}.lora_A.weight"].shape[0] == r, module


def test_task_arithmetic_truncated_is_the_best_rank_r(minilm_dir, adapters, tmp_path):
    """--rank R: the top-R of the concatenation by the factored SVD is the Eckart–Young optimum of the sum."""
    two = adapters[:2]
    svdfuse.merge(two, 5, base=minilm_dir, device="cpu", method="task_arithmetic", scaling=1.0, output=str(tmp_path / "out"), save_format="lora")
    dense = svdfuse.merge(two, base=minilm_dir, device="cpu", method="task_arithmetic", scaling=1.0, dtype=torch.float64).state_dict()
    base = load_file(str(minilm_dir / "model.safetensors"))
    f = _factors(tmp_path / "out")
    key = "encoder.layer.0.attention.self.query"
    A, B = f[f"base_model.model.{key}.lora_A.weight"].double(), f[f"base_model.model.{key}.lora_B.weight"].double()
    assert A.shape[0] == 5
    delta = dense[f"{key}.weight"] - base[f"{key}.weight"].double()
    S = torch.linalg.svdvals(delta)
    optimum = S[5:].norm()
    error = (delta - B @ A).norm()
    assert error <= optimum * (1 + 1e-5) + 1e-6 * S[0], (error, optimum)


def test_for_vllm_pads_ranks_and_refuses_whole_modules(minilm_dir, adapters, tmp_path, no_work):
    with pytest.raises(ValueError, match="vLLM's LoRA loader takes no full modules .* pass drop_full_modules=True"):
        svdfuse.merge(adapters, 6, base=minilm_dir, device="cpu", output=str(tmp_path / "out"), save_format="lora", serve="vllm")
    assert not (tmp_path / "out").exists()


def test_for_vllm(minilm_dir, adapters, tmp_path):
    with pytest.warns(UserWarning, match="changed tensors left at the base's value"):
        svdfuse.merge(adapters, 6, base=minilm_dir, device="cpu", output=str(tmp_path / "out"), save_format="lora", serve="vllm", drop_full_modules=True)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["r"] in VLLM_RANKS and config["rank_pattern"] == {} and config["modules_to_save"] is None
    f = _factors(tmp_path / "out")
    A = f["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"]
    assert A.shape[0] == 8 and not A[6:].any()
    # the same merge, the pooler's bias left at the base's value
    dense = svdfuse.merge(adapters, 6, base=minilm_dir, device="cpu").state_dict()
    got = _peft_merged(minilm_dir, tmp_path / "out")
    base = load_file(str(minilm_dir / "model.safetensors"))
    dense["pooler.dense.bias"] = base["pooler.dense.bias"]
    _close(got, {k: v for k, v in dense.items() if k in got})


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(save_format="lora"), "writes a new adapter directory: pass output=DIR"),
        (dict(save_format="lora", output="x.safetensors"), "writes a new adapter directory"),
        (dict(save_format="zip", output="x"), "save_format must be 'auto' or 'lora'"),
        (dict(serve="vllm", output="x"), "pass save_format='lora'"),
        (dict(save_format="lora", output="x", drop_full_modules=True), "drop_full_modules= is for serve='vllm'"),
    ],
)
def test_bad_options_refused_before_any_work(minilm_dir, adapters, no_work, kwargs, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=expected):
        svdfuse.merge(adapters, 6, base=minilm_dir, device="cpu", **kwargs)
    assert not list(tmp_path.iterdir())


def test_a_dense_merge_is_no_lora(minilm_dir, adapters, tmp_path, no_work):
    full = _peft_merged(minilm_dir, adapters[1])
    with pytest.raises(ValueError, match="ties merges element by element, which is low-rank only as task_arithmetic or average of LoRA adapters alone"):
        svdfuse.merge([adapters[0], full], 4, base=minilm_dir, device="cpu", method="ties", output=str(tmp_path / "out"), save_format="lora")
    with pytest.raises(ValueError, match="task_arithmetic merges element by element"):  # adapters mixed with a full fine-tune
        svdfuse.merge([adapters[0], full], base=minilm_dir, device="cpu", method="task_arithmetic", output=str(tmp_path / "out"), save_format="lora")
    assert not list(tmp_path.iterdir())


def test_never_a_partial_output(minilm_dir, adapters, tmp_path, monkeypatch):
    import svdfuse.lora_out

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(svdfuse.lora_out, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        svdfuse.merge(adapters[:2], 4, base=minilm_dir, device="cpu", output=str(tmp_path / "out"), save_format="lora")
    assert not list(tmp_path.iterdir())


def test_cli(minilm_dir, adapters, tmp_path, capsys):
    from svdfuse.cli import main

    args = ["merge", *map(str, adapters[:2]), "--base", str(minilm_dir), "--method", "task_arithmetic", "--rank", "4", "--format", "lora", "--device", "cpu", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4
    assert main(["merge", *map(str, adapters), "--base", str(minilm_dir), "-k", "4", "--format", "lora", "--for", "vllm", "-o", str(tmp_path / "v"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--drop-full-modules" in err and "Traceback" not in err and not (tmp_path / "v").exists()
