"""Real peft LoRA adapters of all-MiniLM-L6-v2 for the adapter tests, and their reference merges."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps


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


