"""Merged layers whose only trainable numbers are their top singular values.

`SVDLinear` replaces an `nn.Linear`: `y = x W0ᵀ + ((x V) ⊙ σ) Uᵀ + b` through
`svdfuse.ops.lowrank_matmul`, never building the dense matrix. `SVDWeight` is a parametrization
for weights that a module uses directly (`nn.MultiheadAttention.in_proj_weight`, conv kernels):
`W = W0 + U diag(σ) Vᵀ`, reshaped to the weight's shape.

N, the number of trainable singular values, may exceed the merged rank k only by explicit choice
(`excess`): "error" (the default) refuses, "clip" trains all k and warns, "extend" adds N - k
directions orthogonal to U and V with σ = 0 and trains them too.

An `SVDLinear` may hold a σ bank (num_tasks, K) instead of σ (K,): `svdfuse.serving` builds such
models, serving many target adaptations of one merge in one batch.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from svdfuse import ops
from svdfuse.plan import resolve_rank

if TYPE_CHECKING:
    from svdfuse.result import MergeResult

__all__ = [
    "SVDLinear",
    "SVDWeight",
    "TaskCoefficients",
    "Excess",
    "svd_layers",
    "adaptable_layers",
    "set_trainable",
    "materialize",
]

Excess = Literal["error", "clip", "extend"]


def _complement(Q: Tensor, extra: int, seed: int = 0) -> Tensor:
    """`extra` orthonormal columns orthogonal to the orthonormal columns of Q: (d, k) -> (d, extra)."""
    gen = torch.Generator().manual_seed(seed)
    fill = torch.randn(Q.shape[0], extra, generator=gen, dtype=torch.float64).to(Q.device)
    full = torch.linalg.qr(torch.cat([Q.to(torch.float64), fill], dim=1)).Q
    return full[:, Q.shape[1] :].to(Q.dtype)


def _requested(n: int | float, layer: "_SingularValues", name: str) -> int:
    return 0 if n == 0 else resolve_rank(n, layer.U.shape[0], layer.V.shape[0], f"{name}: trainable singular values")


class _SingularValues(nn.Module):
    """U (m, K), V (n, K) frozen; σ split into a trainable head `sigma` (N,) and a frozen tail.

    A stacked `SVDLinear` (see `svdfuse.serving.stack_tasks`) holds one σ row per task: `sigma` (num_tasks, N),
    `sigma_frozen` (num_tasks, K - N).
    """

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, trainable: int | float | None = None) -> None:
        super().__init__()
        self.register_buffer("U", U.detach().clone())
        self.register_buffer("V", V.detach().clone())
        self.sigma = nn.Parameter(S.detach().clone())
        self.register_buffer("sigma_frozen", S.new_empty(0))
        if trainable is not None:
            self.set_trainable(trainable)

    @property
    def S(self) -> Tensor:
        """All K singular values, (K,) or a bank (num_tasks, K), trainable head first."""
        if self.sigma_frozen.shape[-1] == 0:  # every σ trainable, or a stacked bank: no copy per forward
            return self.sigma
        return torch.cat([self.sigma, self.sigma_frozen], dim=-1)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def set_trainable(self, n: int | float, excess: Excess = "error", *, name: str = "layer") -> int:
        """Make the top `n` singular values trainable (int, or fraction of min(m, n)); returns N."""
        m, d = self.U.shape[0], self.V.shape[0]
        N = _requested(n, self, name)
        S = self.S.detach()
        if N > self.rank:
            if excess == "error":
                raise ValueError(
                    f"{name}: {N} trainable singular values requested but the merged rank is {self.rank}; merge with "
                    f"k >= {N}, or pass excess='clip' (train all {self.rank}) or excess='extend' (add {N - self.rank} "
                    "orthogonal directions with σ = 0)"
                )
            if excess == "clip":
                N = self.rank
            elif excess == "extend":
                if N > min(m, d):
                    raise ValueError(f"{name}: cannot extend to {N} directions in a {m}x{d} matrix")
                extra = N - self.rank
                self.U = torch.cat([self.U, _complement(self.U, extra)], dim=1)
                self.V = torch.cat([self.V, _complement(self.V, extra, seed=1)], dim=1)
                S = torch.cat([S, S.new_zeros(*S.shape[:-1], extra)], dim=-1)
            else:
                raise ValueError(f"excess must be 'error', 'clip' or 'extend', found {excess!r}")
        self.sigma = nn.Parameter(S[..., :N].clone())
        self.sigma_frozen = S[..., N:].clone()
        return N

    def delta(self) -> Tensor:
        """The dense task matrix `U diag(σ) Vᵀ`, (m, n); a σ bank has one per task, so none."""
        S = self.S
        if S.dim() != 1:
            raise ValueError(
                f"this layer holds a σ bank of {S.shape[0]} tasks, shape {tuple(S.shape)}, so no single dense weight; "
                "fold one task with svdfuse.nn.materialize(model, task=i)"
            )
        return (self.U * S) @ self.V.T


class SVDLinear(_SingularValues):
    """`nn.Linear` with weight `W0 + U diag(σ) Vᵀ` served low-rank; only the top-N σ train.

    Args:
        weight0: (m, n) base weight W0 (frozen buffer).
        U: (m, K), S: (K,), V: (n, K) merged factors.
        bias: optional (m,), frozen.
        trainable: N, top singular values to train (int or fraction of min(m, n)); None: all K.

    Example::

        layer = SVDLinear(W0, *result.components["encoder.layer.0.output.dense.weight"], bias=b, trainable=38)
        y = layer(x)  # x: (..., n) -> (..., m)
    """

    def __init__(
        self, weight0: Tensor, U: Tensor, S: Tensor, V: Tensor, bias: Tensor | None = None, trainable: int | float | None = None
    ) -> None:
        dtype = weight0.dtype
        super().__init__(U.to(dtype), S.to(dtype), V.to(dtype), trainable)
        self.register_buffer("weight0", weight0.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight0.shape[1], weight0.shape[0]
        self._task_ids: Tensor | None = None  # (batch,) while inside serve_tasks

    @property
    def weight(self) -> Tensor:
        """The dense weight `W0 + U diag(σ) Vᵀ`, (m, n), built on demand (for code that reads `.weight`)."""
        return self.weight0 + self.delta().to(self.weight0.dtype)

    def forward(self, x: Tensor) -> Tensor:
        S, task = self._sigma_of(x)
        return ops.lowrank_matmul(x, self.U, S, self.V, base=self.weight0, bias=self.bias, task=task)

    def _sigma_of(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """σ for `lowrank_matmul`: S (K,) alone, or a bank (num_tasks, K) with each row's task id."""
        S = self.S
        if S.dim() == 1:
            return S, None
        ids = self._task_ids
        if ids is None:
            if S.shape[0] == 1:
                return S[0], None
            raise ValueError(
                f"{self._name()} holds a σ bank of {S.shape[0]} tasks: run the model inside "
                "`with svdfuse.serving.serve_tasks(model, task_ids):` to say which task each request belongs to"
            )
        if x.dim() < 2 or x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"serve_tasks: {ids.shape[0]} task ids (one per request) but {self._name()} got input of shape "
                f"{tuple(x.shape)}; serving needs batch-first inputs (batch, ..., {self.in_features}) at every layer"
            )
        return S, ids.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])

    def _name(self) -> str:
        return f"SVDLinear(in_features={self.in_features}, out_features={self.out_features})"

    def extra_repr(self) -> str:
        sigma = f"tasks={self.sigma.shape[0]}" if self.sigma.dim() == 2 else f"trainable={self.sigma.numel()}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {sigma}"


class SVDWeight(_SingularValues):
    """Parametrization `W0 -> W0 + (U diag(σ) Vᵀ).reshape(W0.shape)` for weights used directly by a module."""

    def forward(self, weight0: Tensor) -> Tensor:
        return weight0 + self.delta().to(weight0.dtype).reshape(weight0.shape)


class TaskCoefficients(nn.Module):
    """aTLAS parametrization `W0 -> W0 + Σ_i λ_i τ_i`: one trainable coefficient per source.

    Args:
        tau: (T, *shape) the sources' task vectors of one weight (frozen buffer).
        init: initial value of every λ_i.
    """

    def __init__(self, tau: Tensor, init: float) -> None:
        super().__init__()
        self.register_buffer("tau", tau.detach().clone())
        self.coefficients = nn.Parameter(torch.full((tau.shape[0],), float(init), dtype=tau.dtype, device=tau.device))

    def forward(self, weight0: Tensor) -> Tensor:
        return weight0 + torch.tensordot(self.coefficients, self.tau, dims=1).to(weight0.dtype)


def adaptable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every svdfuse layer Stage 2 trains: SVD layers and aTLAS coefficients."""
    for name, module in model.named_modules():
        if isinstance(module, (_SingularValues, TaskCoefficients)):
            yield name, module


def svd_layers(model: nn.Module) -> Iterator[tuple[str, _SingularValues]]:
    """(name, layer) of every `SVDLinear` and `SVDWeight` in `model`."""
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


def _deepcopy_with_own_class(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    # torch's parametrize moves a module into its own subclass holding one property per
    # parametrized tensor, but its deepcopy shares that class, and each property keys
    # parametrize.cached() by the module it was made for. So removing a parametrization from a copy
    # (materialize) deleted the original's property, and under cached() the copies read each
    # other's weights. The replica gets its own class and properties instead; the private helpers
    # are the ones register_parametrization itself uses.
    replica = self.__new__(parametrize.type_before_parametrizations(self))
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    parametrize._inject_new_class(replica)
    type(replica).__deepcopy__ = _deepcopy_with_own_class
    for name in replica.parametrizations:
        parametrize._inject_property(replica, name)
    return replica


def parametrize_tensor(module: nn.Module, name: str, parametrization: nn.Module) -> None:
    """`parametrize.register_parametrization(module, name, parametrization, unsafe=True)`, with deep
    copies of `module` that own their parametrized class (see `_deepcopy_with_own_class`)."""
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    type(module).__deepcopy__ = _deepcopy_with_own_class


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def attach(base: nn.Module, result: "MergeResult", trainable: int | float | None = None) -> nn.Module:
    """Implementation of `MergeResult.to_module`: a deep copy of `base` holding the merge."""
    model = copy.deepcopy(base)
    own = model.state_dict()
    for key in result.matrices + list(result.tensors):
        if key not in own:
            raise ValueError(f"module {type(base).__name__} has no tensor {key!r} that the merge produced")
    if result.matrices and not result.components:
        raise ValueError(
            f"this {result.report.method} merge has no components to adapt: pass k to svdfuse.merge to make the top-k "
            "singular components of each merged matrix trainable"
        )
    with torch.no_grad():
        for key, value in result.tensors.items():
            own[key].copy_(value)
    modules = dict(model.named_modules())
    for key in result.matrices:
        owner_name, _, attr = key.rpartition(".")
        owner = modules[owner_name]
        # The frozen part of the weight: the base plus whatever of the merge is not in the components.
        weight0 = result.base_tensor(key).to(own[key])
        if own[key].shape != weight0.shape:
            raise ValueError(f"{key!r}: module has shape {tuple(own[key].shape)}, merge base has {tuple(weight0.shape)}")
        rest = result.frozen_delta(key)
        if rest is not None:
            weight0 = weight0 + rest.to(weight0)
        if key not in result.components:
            with torch.no_grad():
                own[key].copy_(weight0)
            continue
        U, S, V = result.components[key]
        parent = modules.get(owner_name.rpartition(".")[0]) if owner_name else None
        if isinstance(owner, nn.Linear) and attr == "weight" and not isinstance(parent, nn.MultiheadAttention):
            # nn.MultiheadAttention reads out_proj.weight itself, so its out_proj stays an nn.Linear.
            _replace(model, owner_name, SVDLinear(weight0, U, S, V, owner.bias, trainable))
        else:
            with torch.no_grad():
                getattr(owner, attr).copy_(weight0)
            getattr(owner, attr).requires_grad_(False)
            layer = SVDWeight(U.to(weight0.dtype), S.to(weight0.dtype), V.to(weight0.dtype), trainable)
            parametrize_tensor(owner, attr, layer)
    return model


def materialize(model: nn.Module, task: int | None = None) -> nn.Module:
    """Fold every svdfuse layer of `model` back into dense weights, in place; returns `model`.

    `SVDLinear` becomes `nn.Linear(W0 + U diag(σ) Vᵀ)`, `SVDWeight` and `TaskCoefficients` are removed
    leaving the dense weight; the state dict then has the base architecture's names again.

    Args:
        model: a module with svdfuse layers.
        task: for a model from `stack_tasks`, which task's σ to fold, in [0, num_tasks); required
            when it serves more than one task. Must be None for other models.
    """
    banks = _banks(model)
    if banks or task is not None:
        _select_task(banks, task)
    for name, layer in list(svd_layers(model)):
        if isinstance(layer, SVDLinear):
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            dense = dense.to(device=layer.weight0.device, dtype=layer.weight0.dtype)
            with torch.no_grad():
                dense.weight.copy_(layer.weight)
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            _replace(model, name, dense)
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations):
                if isinstance(module.parametrizations[attr][0], (SVDWeight, TaskCoefficients)):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


def _banks(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    """(name, layer) of every `SVDLinear` of `model` holding a σ bank (num_tasks, K)."""
    return [(name, layer) for name, layer in svd_layers(model) if isinstance(layer, SVDLinear) and layer.sigma.dim() == 2]


def _num_tasks(banks: list[tuple[str, SVDLinear]]) -> int:
    (first, layer), *rest = banks
    for name, other in rest:
        if other.sigma.shape[0] != layer.sigma.shape[0]:
            raise ValueError(
                f"the σ banks disagree on the number of tasks: {first!r} has {layer.sigma.shape[0]}, "
                f"{name!r} has {other.sigma.shape[0]}"
            )
    return layer.sigma.shape[0]


def _set_sigma(layer: _SingularValues, S: Tensor) -> None:
    """Give `layer` the singular values S, (K,) or (num_tasks, K), all frozen."""
    layer.sigma = nn.Parameter(S.detach().clone(), requires_grad=False)
    layer.sigma_frozen = S.new_empty(*S.shape[:-1], 0)


def _select_task(banks: list[tuple[str, SVDLinear]], task: int | None) -> None:
    """Replace every σ bank by its row `task` (the only row when None)."""
    if not banks:
        raise ValueError(
            f"materialize: task={task} picks one task of a model from svdfuse.serving.stack_tasks; this model has no σ bank"
        )
    num_tasks = _num_tasks(banks)
    if task is None:
        if num_tasks > 1:
            raise ValueError(
                f"materialize: the model serves {num_tasks} tasks (σ banks of {num_tasks} rows); pass task=i to fold task i"
            )
        task = 0
    if not 0 <= task < num_tasks:
        raise ValueError(f"materialize: task must be in [0, {num_tasks}), found {task}")
    for _, layer in banks:
        _set_sigma(layer, layer.S[task])
