"""Shared helpers of the test modules."""

from __future__ import annotations

import copy

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
