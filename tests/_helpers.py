"""Shared helpers of the test modules."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

import svdfuse


def module_from(state: dict[str, Tensor]) -> nn.Module:
    """An nn.Module whose state_dict() has exactly `state`'s dotted names."""
    root = nn.Module()
    for key, t in state.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if t.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(t.clone()))
        else:
            mod.register_buffer(leaf, t.clone())
    return root


def merge_perturbed(
    base: nn.Module, *, sources: int, scale: float, seed: int, k: int, buffers: bool = True
) -> "svdfuse.MergeResult":
    """AXIS merge (CPU) of `sources` copies of `base` with Gaussian noise of std `scale` on every
    tensor (on parameters only without `buffers`: BatchNorm variances stay positive); source i
    draws from seed `seed + i`."""
    skip = set() if buffers else {key for key, _ in base.named_buffers()}
    perturbed = []
    for i in range(sources):
        gen = torch.Generator().manual_seed(seed + i)
        perturbed.append(
            {key: v if key in skip else v + scale * torch.randn(v.shape, generator=gen) for key, v in base.state_dict().items()}
        )
    return svdfuse.merge(perturbed, k=k, base=base, device="cpu")


def sigma_perturbed(model: nn.Module, num_tasks: int, *, seed: int, stackable_only: bool = False) -> list[nn.Module]:
    """`num_tasks` copies of `model` whose σ each scaled by its own factors in [1, 2), as Stage 2
    would leave them (copy t draws from seed `seed + t`); with `stackable_only`, only the layers that
    can hold a σ bank (`SVDLinear`, `SVDConv`), the others' σ stay shared."""
    stackable = (svdfuse.nn.SVDLinear, svdfuse.nn.SVDConv)
    models = []
    for t in range(num_tasks):
        copy_t = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(seed + t)
        with torch.no_grad():
            for _, layer in svdfuse.nn.svd_layers(copy_t):
                if not stackable_only or isinstance(layer, stackable):
                    layer.sigma.mul_(1 + torch.rand(layer.sigma.shape, generator=gen, dtype=layer.sigma.dtype))
        models.append(copy_t)
    return models


def assert_within_torch_error(out: Tensor, truth: Tensor, torch_out: Tensor, *, truth_check: Tensor | None = None) -> None:
    """The pass rule of DESIGN §5: `out`'s error against the float64 `truth` is at most 2× that of
    `torch_out` (torch's own result in the same dtype), plus an eps-sized floor so that a case where
    torch happens to be exact does not demand exactness. NaN anywhere fails.

    Where `truth` comes from svdfuse's own oracle (`svdfuse.reference`), `truth_check` must be the
    same value computed in float64 another way (plain torch): the oracle is first held to it at
    float64 rounding, so an oracle error fails here instead of widening torch's error, and with it
    the tolerance."""
    assert not out.isnan().any(), "NaN in the output"
    if truth_check is not None:
        assert truth.dtype == truth_check.dtype == torch.float64
        oracle_error = (truth - truth_check).abs().max().item() if truth.numel() else 0.0
        bound = 1e4 * torch.finfo(torch.float64).eps * max(truth_check.abs().max().item() if truth.numel() else 0.0, 1e-300)
        assert oracle_error <= bound, f"the oracle disagrees with plain float64 torch by {oracle_error:.3g} > {bound:.3g}"
    torch_error = (torch_out.double() - truth).abs().max().item()
    floor = torch.finfo(out.dtype).eps * truth.abs().max().item()
    error = (out.double() - truth).abs()
    assert error.max().item() <= 2 * torch_error + floor, (
        f"max error {error.max().item():.3g} at flat index {error.argmax().item()} > 2 x torch's {torch_error:.3g} + {floor:.3g}"
    )


def tiny_llama_dirs(root: Path, count: int, *, grid: bool = False, seed: int = 0) -> tuple[Path, list[Path]]:
    """A tiny Llama (2 layers, hidden 64, vocab 256, fp32) saved with transformers' save_pretrained
    as `root/base`, and `count` fine-tunes `root/ft{i}` with seeded task vectors (1% of each
    tensor's mean magnitude). `grid`: every value rounded to the bf16 grid (stored as fp32), as in
    fine-tunes trained in bf16, so many task-vector entries tie in magnitude."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    if grid:
        base = {k: v.bfloat16().float() for k, v in base.items()}
        save_file(base, root / "base" / "model.safetensors", metadata={"format": "pt"})
    sources = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed + 100 + i)
        tuned = {k: v + 0.01 * v.abs().mean().clamp_min(1e-3) * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        if grid:
            tuned = {k: v.bfloat16().float() for k, v in tuned.items()}
        shutil.copytree(root / "base", root / f"ft{i}", ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tuned, root / f"ft{i}" / "model.safetensors", metadata={"format": "pt"})
        sources.append(root / f"ft{i}")
    return root / "base", sources


def mergekit_ties(W0: dict[str, Tensor], W: list[dict[str, Tensor]], density: float, order) -> dict[str, Tensor]:
    """mergekit 0.1.5's TIES with weights 1 (generalized_task_arithmetic.py, sparsify.magnitude),
    written out: keep the top max(1, int(density · n)) |τ| of each source in `order(|τ|)` (mergekit:
    torch.argsort descending), elect + where the sum is >= 0, average the agreeing values."""
    out = {}
    for key, w0 in W0.items():
        taus = []
        for w in W:
            tau = (w[key] - w0).reshape(-1)
            mask = torch.zeros_like(tau)
            mask[order(tau.abs())[: max(1, int(density * tau.numel()))]] = 1
            taus.append(tau * mask)
        t = torch.stack(taus)
        elected = (t.sum(0) >= 0).float() * 2 - 1
        agree = t.sign() == elected
        count = agree.float().sum(0)
        count[count == 0] = 1
        out[key] = w0 + ((t * agree).sum(0) / count).reshape(w0.shape)
    return out
