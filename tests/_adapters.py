"""Real peft LoRA adapters of all-MiniLM-L6-v2 for the adapter tests, and their reference merges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

EPS32 = torch.finfo(torch.float32).eps


class LayoutNet(nn.Module):
    """A module with every layout peft's LoRA has besides Linear: an embedding and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(6, 5)


def _train(model: nn.Module, seed: int, steps: int = 3) -> None:
    """A few SGD steps on random tokens: LoRA factors as training leaves them (B no longer zero)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 1000, (4, 12))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        out = model(input_ids=ids)
        (out.last_hidden_state[:, 0].pow(2).mean() + out.pooler_output.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()


def _adapter(base_dir: Path, out: Path, seed: int, **config) -> Path:
    import peft, transformers

    model = transformers.AutoModel.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    _train(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


def _peft_merged(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    import peft, transformers

    model = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(base_dir), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _close(actual: dict, expected: dict) -> None:
    """Equal within fp32 rounding of the values compared (a few ulps of their magnitude)."""
    for key, want in expected.items():
        got = actual[key].double()
        tol = 8 * EPS32 * max(want.double().abs().max().item(), 1e-30)
        err = (got - want.double()).abs().max().item()
        assert err <= tol, f"{key}: max error {err:.3g} > {tol:.3g}"




def peft_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """s·B·A of every module of a peft adapter, float64, s from its config by peft's documented
    rule (lora_alpha / r, or / √r with use_rslora; alpha per module from alpha_pattern)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, A in factors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = factors[key.replace("lora_A", "lora_B")]
            r = A.shape[0]
            alpha = next((v for p, v in (config.get("alpha_pattern") or {}).items() if module.endswith(p)), config["lora_alpha"])
            out[f"{module}.weight"] = alpha / (math.sqrt(r) if config.get("use_rslora") else r) * B.double() @ A.double()
    return out


# Edits of an adapter's weights that make it one svdfuse must refuse.


def first_key(weights: dict, part: str) -> str:
    return sorted(k for k in weights if part in k)[0]


def with_dora(weights: dict) -> dict:
    weights[first_key(weights, "lora_A").replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(3)
    return weights


def too_wide(weights: dict) -> dict:
    key = first_key(weights, "lora_A")
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    return weights


def edited_copy(adapter: Path, to: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of `adapter` in the new directory `to`, its config updated with `config` and its
    weights passed through `tensors` (one of the edits above), if given."""
    to.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(config or {})
    (to / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(tensors(weights) if tensors else weights, str(to / "adapter_model.safetensors"))
    return to
