"""Merged layers whose only trainable numbers are their top singular values.

`SVDLinear` replaces an `nn.Linear`: `y = x W0ᵀ + ((x V) ⊙ σ) Uᵀ + b` through
`svdfuse.ops.lowrank_matmul`, never building the dense matrix (`svdfuse.nn.conv.SVDConv` does the
same for convolutions). `SVDWeight` is a parametrization for weights that a module uses directly
(transposed conv kernels, the projections of attention modules `SVDMultiheadAttention` cannot
take): `W = W0 + U diag(σ) Vᵀ`, reshaped to the weight's shape, rebuilt every forward.

N, the number of trainable singular values, may exceed the merged rank k only by explicit choice
(`excess`): "error" (the default) refuses, "clip" trains all k and warns, "extend" adds N - k
directions orthogonal to U and V with σ = 0 and trains them too.

An `SVDLinear` or `SVDConv` (a `LowRankLayer`) may hold a σ bank (num_tasks, K) instead of σ (K,):
`svdfuse.serving` builds such models, serving many target adaptations of one merge in one batch.
"""

from __future__ import annotations

import enum


import torch
from torch import Tensor, nn

from svdfuse import ops
from svdfuse.plan import resolve_rank

__all__ = ["SVDLinear", "SVDWeight", "TaskCoefficients", "Excess", "LowRankLayer"]

class Excess(str, enum.Enum):
    """What Stage 2 does where N exceeds a layer's merged rank k: refuse, train all k, or add directions."""

    ERROR = "error"
    CLIP = "clip"
    EXTEND = "extend"


def _complement(Q: Tensor, extra: int, seed: int = 0) -> Tensor:
    """`extra` orthonormal columns orthogonal to the orthonormal columns of Q: (d, k) -> (d, extra)."""
    gen = torch.Generator().manual_seed(seed)
    fill = torch.randn(Q.shape[0], extra, generator=gen, dtype=torch.float64).to(Q.device)
    full = torch.linalg.qr(torch.cat([Q.to(torch.float64), fill], dim=1)).Q
    return full[:, Q.shape[1] :].to(Q.dtype)


def _requested(n: int | float, layer: "_SingularValues", name: str) -> int:
    return 0 if n == 0 else resolve_rank(n, layer.U.shape[0], layer.V.shape[0], f"{name}: trainable singular values")


def _dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An `nn.Linear` holding copies of `weight` (m, n) and `bias` (m,)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class _SingularValues(nn.Module):
    """U (m, K), V (n, K) frozen; σ split into a trainable head `sigma` (N,) and a frozen tail.

    A stacked `SVDLinear` or `SVDConv` (see `svdfuse.serving.stack_tasks`) holds one σ row per task:
    `sigma` (num_tasks, N), `sigma_frozen` (num_tasks, K - N).
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

    def delta(self, S: Tensor | None = None) -> Tensor:
        """The dense task matrix `U diag(σ) Vᵀ`, (m, n), of the layer's σ or the given S (K,); a σ
        bank has one per task, so none."""
        S = self.S if S is None else S
        if S.dim() != 1:
            raise ValueError(
                f"this layer holds a σ bank of {S.shape[0]} tasks, shape {tuple(S.shape)}, so no single dense weight; "
                "fold one task with svdfuse.nn.materialize(model, task=i)"
            )
        return (self.U * S) @ self.V.T


class LowRankLayer(_SingularValues):
    """An SVD layer that computes its own low-rank forward (`SVDLinear`, `SVDConv`), so it can hold a
    σ bank (num_tasks, K) and serve each request of a batch with its task's row (`svdfuse.serving`).

    Attributes:
        task_ids: int64 (batch,), the task of each request of the batch, while a σ bank serves
            inside `svdfuse.serving.serve_tasks`; None otherwise.
    """

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, trainable: int | float | None = None) -> None:
        super().__init__(U, S, V, trainable)
        self.task_ids: Tensor | None = None

    def set_sigma(self, S: Tensor) -> None:
        """Give the layer the singular values S, (K,) or a bank (num_tasks, K), all frozen."""
        self.sigma = nn.Parameter(S.detach().clone(), requires_grad=False)
        self.sigma_frozen = S.new_empty(*S.shape[:-1], 0)

    def _sigma_of(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """σ for input x: S (K,) for every request, or the bank (num_tasks, K) with each request's task id (batch,)."""
        S = self.S
        if S.dim() == 1:
            return S, None
        ids = self.task_ids
        if ids is None:
            if S.shape[0] == 1:
                return S[0], None
            raise ValueError(
                f"{self._name()} holds a σ bank of {S.shape[0]} tasks: run the model inside "
                "`with svdfuse.serving.serve_tasks(model, task_ids):` to say which task each request belongs to"
            )
        if not self._batched(x) or x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"serve_tasks: {ids.shape[0]} task ids (one per request) but {self._name()} got input of shape "
                f"{tuple(x.shape)}; serving needs batch-first inputs {self._batch_first_shape()} at every layer"
            )
        return S, ids

    def _name(self) -> str:
        raise NotImplementedError

    def _batched(self, x: Tensor) -> bool:
        raise NotImplementedError

    def _batch_first_shape(self) -> str:
        raise NotImplementedError

    def _sigma_repr(self) -> str:
        return f"tasks={self.sigma.shape[0]}" if self.sigma.dim() == 2 else f"trainable={self.sigma.numel()}"


class SVDLinear(LowRankLayer):
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

    @property
    def weight(self) -> Tensor:
        """The dense weight `W0 + U diag(σ) Vᵀ`, (m, n), built on demand (for code that reads `.weight`)."""
        return self.weight0 + self.delta().to(self.weight0.dtype)

    def to_dense(self) -> nn.Linear:
        """The equivalent `nn.Linear` with the dense weight (the current σ folded in)."""
        return _dense_linear(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        S, task = self._sigma_per_row(x)
        return ops.lowrank_matmul(x, self.U, S, self.V, base=self.weight0, bias=self.bias, task=task)

    def rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Output features [start, stop) of `self(x)`, reading only those rows of U, W0 and the bias:
        x (..., n) -> (..., stop - start). Used for the q, k and v parts of a fused in-projection."""
        S, task = self._sigma_per_row(x)
        bias = None if self.bias is None else self.bias[start:stop]
        return ops.lowrank_matmul(x, self.U[start:stop], S, self.V, base=self.weight0[start:stop], bias=bias, task=task)

    def _sigma_per_row(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """σ for `lowrank_matmul`: S (K,) alone, or a bank (num_tasks, K) with each row's task id."""
        S, ids = self._sigma_of(x)
        return S, None if ids is None else ids.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])

    def _name(self) -> str:
        return f"SVDLinear(in_features={self.in_features}, out_features={self.out_features})"

    def _batched(self, x: Tensor) -> bool:
        return x.dim() >= 2

    def _batch_first_shape(self) -> str:
        return f"(batch, ..., {self.in_features})"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {self._sigma_repr()}"


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
