"""Converting models to and from svdfuse layers, and choosing what Stage 2 trains.

`attach` (`MergeResult.to_module`) replaces merged `nn.Linear` layers by `SVDLinear`,
`nn.MultiheadAttention` by `SVDMultiheadAttention`, `nn.Conv1d/2d/3d` by `SVDConv`, and
parametrizes every other merged weight (transposed convs, attention projections
`SVDMultiheadAttention` cannot take) with `SVDWeight`; `materialize` folds them all back.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from svdfuse.nn.attention import SVDMultiheadAttention, convertible
from svdfuse.nn.conv import SVDConv, is_plain_conv
from svdfuse.nn.layers import (
    Excess, LowRankLayer, SVDLinear, SVDWeight, TaskCoefficients, _requested, _SingularValues, _dense_linear,
)  # fmt: skip
from svdfuse.plan import resolve_rank

# name -> (U (m, k), S (k,), V (n, k)) of every merged matrix that has components.
Components = dict[str, tuple[Tensor, Tensor, Tensor]]

__all__ = [
    "svd_layers", "adaptable_layers", "set_trainable", "materialize", "attach", "parametrize_tensor", "sigma_banks",
    "count_tasks", "weight_spectrum", "BASES",
]  # fmt: skip

# What Stage 2 trains: the merge's own components of Δ_m ("delta"), or the top singular
# components of the merged weight W0 + Δ_m itself ("weight").
BASES = ("delta", "weight")


def adaptable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every svdfuse layer Stage 2 trains: SVD layers and aTLAS coefficients."""
    for name, module in model.named_modules():
        if isinstance(module, (_SingularValues, TaskCoefficients)):
            yield name, module


def svd_layers(model: nn.Module) -> Iterator[tuple[str, _SingularValues]]:
    """(name, layer) of every `SVDLinear`, `SVDConv` and `SVDWeight` in `model`."""
    return ((name, layer) for name, layer in adaptable_layers(model) if isinstance(layer, _SingularValues))


def set_trainable(model: nn.Module, n: int | float, excess: Excess = "error") -> int:
    """Freeze everything in `model` but the top-`n` singular values of each SVD layer and the
    coefficients of each aTLAS layer (which ignore `n`).

    Returns the number of trainable scalars. Raises if `model` has no svdfuse layers.
    """
    layers = list(svd_layers(model))
    coefficients = [layer for _, layer in adaptable_layers(model) if isinstance(layer, TaskCoefficients)]
    if not layers and not coefficients:
        raise ValueError("model has no svdfuse layers; convert it with result.to_module(base) or svdfuse.atlas first")
    model.requires_grad_(False)
    for layer in coefficients:
        layer.coefficients.requires_grad_(True)
    clipped = []
    for name, layer in layers:
        rank = layer.rank
        if layer.set_trainable(n, excess, name=name) < _requested(n, layer, name):
            clipped.append(f"{name!r} ({rank})")
    if clipped:
        warnings.warn(
            f"excess='clip': {len(clipped)} layers train all their merged singular values, fewer than the n={n} "
            f"asked for: {', '.join(clipped[:3])}{' ...' if len(clipped) > 3 else ''}",
            stacklevel=2,
        )
    return sum(layer.sigma.numel() for _, layer in layers) + sum(layer.coefficients.numel() for layer in coefficients)


def _copy_with_own_parametrizations(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """`copy.deepcopy(module)` for a module with parametrizations: a replica of its class before
    parametrization, whose parametrizations are registered again through the public API."""
    # torch's parametrize moves a module into a subclass of its own class holding one property per
    # parametrized tensor, and its deep copy shares that subclass, whose properties key
    # parametrize.cached() by the module they were made for. So removing a parametrization from a
    # copy (materialize) would delete the original's property, and under cached() the copies would
    # read each other's weights. Registering the copied parametrizations on a plain replica gives it
    # a subclass and properties of its own.
    cls = parametrize.type_before_parametrizations(module)
    replica = cls.__new__(cls)
    memo[id(module)] = replica
    vars(replica).update(copy.deepcopy({key: value for key, value in vars(module).items() if key != "__deepcopy__"}, memo))
    lists = replica.parametrizations
    del replica.parametrizations
    for name, chain in lists.items():
        if not chain.is_tensor:
            raise TypeError(f"deepcopy of {cls.__name__}: parametrization of {name!r} holds several tensors")
        original = chain.original
        # A right_inverse runs again at registration; the copy keeps the stored value as it was.
        stored = original.detach().clone() if any(hasattr(p, "right_inverse") for p in chain) else None
        if isinstance(original, nn.Parameter):
            replica.register_parameter(name, original)
        else:
            replica.register_buffer(name, original)
        for parametrization in chain:
            parametrize.register_parametrization(replica, name, parametrization, unsafe=chain.unsafe)
        if stored is not None:
            with torch.no_grad():
                replica.parametrizations[name].original.set_(stored)
    _copy_parametrizations_too(replica)
    return replica


def _copy_parametrizations_too(module: nn.Module) -> None:
    # An instance attribute, which copy.deepcopy looks up before the class's __deepcopy__ (torch's,
    # the one that shares the subclass); the module's class is left as torch made it.
    module.__deepcopy__ = functools.partial(_copy_with_own_parametrizations, module)


def parametrize_tensor(module: nn.Module, name: str, parametrization: nn.Module) -> None:
    """`parametrize.register_parametrization(module, name, parametrization, unsafe=True)`, with deep
    copies of `module` that own their parametrizations (see `_copy_with_own_parametrizations`)."""
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    _copy_parametrizations_too(module)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _frozen_weight(frozen: dict[str, Tensor], key: str, own: dict[str, Tensor]) -> Tensor:
    """The frozen part of merged weight `key`: the base plus whatever of the merge is not in the components."""
    weight0 = frozen[key].to(own[key])
    if own[key].shape != weight0.shape:
        raise ValueError(f"{key!r}: module has shape {tuple(own[key].shape)}, merge base has {tuple(weight0.shape)}")
    return weight0


def _merged_linear(
    components: Components, frozen: dict[str, Tensor], key: str, own: dict[str, Tensor], bias: Tensor | None, trainable: int | float | None
) -> nn.Module:
    """The layer computing weight `key`: an `SVDLinear` over its merged components, else a frozen dense `nn.Linear`."""
    if key in components:
        return SVDLinear(_frozen_weight(frozen, key, own), *components[key], bias, trainable)
    return _dense_linear(own[key], bias).requires_grad_(False)


def weight_spectrum(components: Components, frozen: dict[str, Tensor], n: int | float | None) -> tuple[Components, dict[str, Tensor]]:
    """Re-split each merged weight W = W0 + U diag(σ) Vᵀ (m, d) along its own SVD: its top-`n`
    singular components (int, or fraction of min(m, d); None: as many as the merge kept) and the
    frozen rest W − U_n diag(σ_n) V_nᵀ, in W0's shape. Computed in float64, so the weight a layer
    starts from is the merged one to float64 rounding."""
    new_components: Components = {}
    new_frozen = dict(frozen)
    for key, (U, S, V) in components.items():
        weight0 = frozen[key]
        m, d = U.shape[0], V.shape[0]
        count = U.shape[1] if n is None else resolve_rank(n, m, d, f"{key}: trainable singular values")
        W = weight0.to(torch.float64).reshape(m, d) + (U.to(torch.float64) * S.to(torch.float64)) @ V.to(torch.float64).T
        Uw, Sw, Vhw = torch.linalg.svd(W, full_matrices=False)
        Uw, Sw, Vw = Uw[:, :count], Sw[:count], Vhw[:count].T
        new_frozen[key] = (W - (Uw * Sw) @ Vw.T).reshape(weight0.shape).to(weight0.dtype)
        new_components[key] = (Uw.to(U.dtype), Sw.to(S.dtype), Vw.to(V.dtype))
    return new_components, new_frozen


def attach(
    base: nn.Module,
    components: Components,
    frozen: dict[str, Tensor],
    tensors: dict[str, Tensor],
    matrices: list[str],
    method: str,
    trainable: int | float | None = None,
    basis: str = "delta",
) -> nn.Module:
    """Implementation of `MergeResult.to_module`: a deep copy of `base` holding a merge given as
    plain data (name -> factors, frozen parts, dense tensors; the names merged as matrices).
    `basis="weight"` swaps the components for the merged weights' own top-`trainable` SVD."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {', '.join(map(repr, BASES))}, found {basis!r}")
    if basis == "weight":
        components, frozen = weight_spectrum(components, frozen, trainable)
    model = copy.deepcopy(base)
    own = model.state_dict()
    for key in list(components) + list(tensors):
        if key not in own:
            raise ValueError(f"module {type(base).__name__} has no tensor {key!r} that the merge produced")
        merged = tensors[key].shape if key in tensors else frozen[key].shape
        if own[key].shape != merged:
            raise ValueError(
                f"module {type(base).__name__}: tensor {key!r} is {tuple(own[key].shape)}, the merge produced {tuple(merged)}; "
                "is this the architecture of the merge's base?"
            )
    if matrices and not components:
        raise ValueError(
            f"this {method} merge has no components to adapt: pass k to svdfuse.merge to make the top-k "
            "singular components of each merged matrix trainable"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    modules = dict(model.named_modules())
    done: set[str] = set()
    for name, attention in modules.items():
        # nn.MultiheadAttention reads its projection weights itself: the whole module is replaced.
        if not name or not isinstance(attention, nn.MultiheadAttention) or not convertible(attention):
            continue
        keys = (f"{name}.in_proj_weight", f"{name}.out_proj.weight")
        if any(key in components for key in keys):
            in_proj = _merged_linear(components, frozen, keys[0], own, attention.in_proj_bias, trainable)
            out_proj = _merged_linear(components, frozen, keys[1], own, attention.out_proj.bias, trainable)
            _replace(model, name, SVDMultiheadAttention(attention, in_proj, out_proj))
            done.update(keys)
    for key in components:
        if key in done:
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = modules[owner_name]
        weight0 = _frozen_weight(frozen, key, own)
        U, S, V = components[key]
        parent = modules.get(owner_name.rpartition(".")[0]) if owner_name else None
        # A layer that is the model itself cannot be swapped inside it: it keeps SVDWeight.
        replaceable = attr == "weight" and owner_name != ""
        if replaceable and isinstance(owner, nn.Linear) and not isinstance(parent, nn.MultiheadAttention):
            _replace(model, owner_name, SVDLinear(weight0, U, S, V, owner.bias, trainable))
        elif replaceable and is_plain_conv(owner):
            _replace(model, owner_name, SVDConv(owner, U, S, V, weight0=weight0, trainable=trainable))
        else:  # transposed convs; projections of an attention module SVDMultiheadAttention cannot take
            with torch.no_grad():
                getattr(owner, attr).copy_(weight0)
            getattr(owner, attr).requires_grad_(False)
            layer = SVDWeight(U.to(weight0.dtype), S.to(weight0.dtype), V.to(weight0.dtype), trainable)
            parametrize_tensor(owner, attr, layer)
    return model


def materialize(model: nn.Module, task: int | None = None) -> nn.Module:
    """Fold every svdfuse layer of `model` back into dense weights, in place; returns `model`.

    `SVDLinear` becomes `nn.Linear(W0 + U diag(σ) Vᵀ)`, `SVDConv` the conv it replaced with the dense
    kernel, `SVDMultiheadAttention` an `nn.MultiheadAttention`; `SVDWeight` and `TaskCoefficients`
    are removed leaving the dense weight. The state dict then has the base architecture's names again.

    Args:
        model: a module with svdfuse layers.
        task: for a model from `stack_tasks`, which task's σ to fold, in [0, num_tasks); required
            when it serves more than one task. Must be None for other models.
    """
    banks = sigma_banks(model)
    if banks or task is not None:
        _select_task(banks, task)
    # Layers first, then the attention modules holding them (which fold whatever projections they hold).
    for kinds in ((SVDLinear, SVDConv), SVDMultiheadAttention):
        for name, module in list(model.named_modules()):
            if isinstance(module, kinds):
                _replace(model, name, module.to_dense())
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations):
                if isinstance(module.parametrizations[attr][0], (SVDWeight, TaskCoefficients)):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


def sigma_banks(model: nn.Module) -> list[tuple[str, LowRankLayer]]:
    """(name, layer) of every `SVDLinear` and `SVDConv` of `model` holding a σ bank (num_tasks, K)."""
    return [(name, layer) for name, layer in svd_layers(model) if isinstance(layer, LowRankLayer) and layer.sigma.dim() == 2]


def count_tasks(banks: list[tuple[str, LowRankLayer]]) -> int:
    """The number of tasks, num_tasks, of `sigma_banks`' (name, layer) list, one or more; raises
    ValueError naming two layers whose banks disagree."""
    (first, layer), *rest = banks
    for name, other in rest:
        if other.sigma.shape[0] != layer.sigma.shape[0]:
            raise ValueError(
                f"the σ banks disagree on the number of tasks: {first!r} has {layer.sigma.shape[0]}, "
                f"{name!r} has {other.sigma.shape[0]}"
            )
    return layer.sigma.shape[0]


def _select_task(banks: list[tuple[str, LowRankLayer]], task: int | None) -> None:
    """Replace every σ bank by its row `task` (the only row when None)."""
    if not banks:
        raise ValueError(
            f"materialize: task={task} picks one task of a model from svdfuse.serving.stack_tasks; this model has no σ bank"
        )
    num_tasks = count_tasks(banks)
    if task is None:
        if num_tasks > 1:
            raise ValueError(
                f"materialize: the model serves {num_tasks} tasks (σ banks of {num_tasks} rows); pass task=i to fold task i"
            )
        task = 0
    if not 0 <= task < num_tasks:
        raise ValueError(f"materialize: task must be in [0, {num_tasks}), found {task}")
    for _, layer in banks:
        layer.set_sigma(layer.S[task])
