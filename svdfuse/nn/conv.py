"""`nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d` with a low-rank merged kernel.

A merge sees a conv kernel W (out, in/groups, *kernel) as the matrix W.reshape(out, in/groups·∏kernel)
(DESIGN §1). `SVDConv` convolves with `W0 + U diag(σ) Vᵀ` two ways:

- one σ for the batch (training, serving one task): the kernel is rebuilt, a rank-K product of
  out × in/groups·∏kernel numbers, and convolved once. A conv reuses its kernel at every output
  position, so that costs about what the base conv does, where the low-rank form below adds two
  convs (measured on the CPU, MobileNetV2 merged at k = 4, batch 8 at 128²: 0.9–1.1× the dense
  forward with the kernel rebuilt, 3.6–5.3× low-rank);
- a σ bank (`svdfuse.serving`, a σ per request): the base conv, plus a conv with the K filters of
  V, scaled by each request's σ, and a 1×1 conv with U. The dense update is never built.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdfuse.nn.layers import LowRankLayer

__all__ = ["SVDConv", "is_plain_conv"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SPATIAL = {1: "length", 2: "height, width", 3: "depth, height, width"}


def _pad_widths(conv: nn.Module) -> list[int]:
    """`conv`'s padding as F.pad widths (last dim first, before then after), as torch's convs pad for
    a padding_mode other than "zeros": "same" puts the odd one of an odd total after."""
    if conv.padding == "valid":
        return [0, 0] * len(conv.kernel_size)
    widths = []
    for i in reversed(range(len(conv.kernel_size))):
        if conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            widths += [total // 2, total - total // 2]
        else:
            widths += [conv.padding[i], conv.padding[i]]
    return widths


def is_plain_conv(module: nn.Module) -> bool:
    """Whether `SVDConv` can take `module` over: an `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d` itself,
    not a subclass (which may convolve its own way)."""
    return type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SVDConv(LowRankLayer):
    """`nn.Conv1d/2d/3d` with kernel `W0 + (U diag(σ) Vᵀ).reshape(W0.shape)` served low-rank; only
    the top-N σ train. Any groups, stride, padding ("same", "valid" too), dilation, padding_mode, bias.

    With one σ it convolves once with the rebuilt kernel. With a σ bank the update costs
    `K·(in·∏kernel + out)` multiply-adds per output position against `out·in/groups·∏kernel` for
    the base conv: cheap when K ≪ out/groups, but K times the base for a depthwise conv (whose
    kernel matrix is out × ∏kernel).

    Args:
        conv: the module it replaces, an `is_plain_conv` module: its configuration and bias (a
            frozen copy, `self.base`, holds them and W0).
        U: (out, K), S: (K,), V: (in/groups·∏kernel, K) merged factors of the kernel matrix.
        weight0: (out, in/groups, *kernel) base kernel W0; None: `conv.weight`.
        trainable: N, top singular values to train (int or fraction of min(out, in/groups·∏kernel));
            None: all K.

    Example::

        layer = SVDConv(model.features[1].conv[0][0], *result.components["features.1.conv.0.0.weight"])
        y = layer(x)  # x: (batch, in, height, width) -> (batch, out, height', width')
    """

    def __init__(
        self,
        conv: nn.Module,
        U: Tensor,
        S: Tensor,
        V: Tensor,
        *,
        weight0: Tensor | None = None,
        trainable: int | float | None = None,
    ) -> None:
        if not is_plain_conv(conv):
            raise TypeError(
                f"SVDConv replaces an nn.Conv1d, nn.Conv2d or nn.Conv3d, found {type(conv).__name__}; "
                "other modules take an SVDWeight parametrization"
            )
        shape = tuple(conv.weight.shape)
        m, n, K = shape[0], math.prod(shape[1:]), S.shape[-1]
        if S.dim() != 1 or tuple(U.shape) != (m, K) or tuple(V.shape) != (n, K):
            raise ValueError(
                f"SVDConv: a kernel of shape {shape} needs U ({m}, K), S (K,) and V ({n}, K); found U "
                f"{tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)}"
            )
        if weight0 is not None and tuple(weight0.shape) != shape:
            raise ValueError(f"SVDConv: weight0 must have the kernel's shape {shape}, found {tuple(weight0.shape)}")
        dtype = conv.weight.dtype
        super().__init__(U.to(dtype), S.to(dtype), V.to(dtype), trainable)
        self.base = copy.deepcopy(conv).requires_grad_(False)
        if weight0 is not None:
            with torch.no_grad():
                self.base.weight.copy_(weight0)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    @property
    def weight(self) -> Tensor:
        """The dense kernel `W0 + (U diag(σ) Vᵀ).reshape(W0.shape)`, built on demand (for code that reads `.weight`)."""
        return self._kernel(self.delta())

    def _kernel(self, delta: Tensor) -> Tensor:
        """W0 + the task matrix `delta` (out, in/groups·∏kernel) in the kernel's shape and dtype."""
        weight0 = self.base.weight
        return weight0 + delta.to(weight0.dtype).reshape(weight0.shape)

    @property
    def bias(self) -> Tensor | None:
        """The frozen bias (out,), or None."""
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, in, *spatial) or (in, *spatial) -> (batch, out, *spatial') or (out, *spatial');
        a σ bank needs the batched form."""
        S, ids = self._sigma_of(x)
        base = self.base
        if ids is None:  # one σ for the batch: one conv with the rebuilt kernel (see the module docstring)
            return self._conv(x, self._kernel(self.delta(S)), base.bias)  # not base(x): no hooks of the replaced conv
        # A σ per request. Why a conv with V's filters and a grouped 1×1 conv with U compute the update. Group j
        # reads input channels [j·c, (j+1)·c), c = in/g, and writes output channels [j·o, (j+1)·o),
        # o = out/g. At each output position, output channel r of group j = r // o is W[r] · p_j,
        # p_j the patch of group j flattened in the order of W[r].flatten() (c, *kernel). Row r of
        # the merged matrix is W[r].flatten(), so the update adds Σ_k U[r, k] σ_k (V[:, k] · p_j).
        # V[:, k] · p_j for all j, k is one conv with groups g and g·K filters, filter j·K + k =
        # V[:, k] viewed (c, *kernel): the K filters repeated per group, as group j writes channels
        # [j·K, (j+1)·K). Channel j·K + k times σ_k, then Σ_k U[r, k] · channel j·K + k for r in
        # group j is a 1×1 conv with groups g and weight row r = U[r]: U viewed (out, K, 1, ...).
        # Stride, padding, dilation and padding_mode shape the patches p_j, so they go to the V conv.
        ones = [1] * self._dims
        g, K = base.groups, self.rank
        filters = self.V.T.reshape(K, -1, *self.kernel_size).repeat(g, 1, *ones)
        z = self._conv(x, filters, None)  # (batch, g·K, *spatial'), with the base's padding_mode
        z = (z.unflatten(1, (g, K)) * S[ids].view(-1, 1, K, *ones)).flatten(1, 2)  # each request's σ, per group
        update = _CONV[self._dims](z, self.U.view(*self.U.shape, *ones), groups=g)
        return self._conv(x, base.weight, base.bias) + update

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base conv's convolution of x with `weight`: its stride, padding, dilation, groups and
        padding_mode, as `nn.Conv*d.forward` applies them (a non-zeros mode pads with F.pad first)."""
        base, conv = self.base, _CONV[self._dims]
        if base.padding_mode == "zeros":
            return conv(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)
        x = F.pad(x, _pad_widths(base), mode=base.padding_mode)
        return conv(x, weight, bias, base.stride, 0, base.dilation, base.groups)

    def to_dense(self) -> nn.Module:
        """The equivalent conv of the replaced class with the dense kernel (the current σ folded in)."""
        dense = copy.deepcopy(self.base).requires_grad_(True)
        with torch.no_grad():
            dense.weight.copy_(self.weight)
        return dense

    @property
    def _dims(self) -> int:
        return len(self.kernel_size)

    def _name(self) -> str:
        return f"SVDConv({self.base})"

    def _batched(self, x: Tensor) -> bool:
        return x.dim() == self._dims + 2

    def _batch_first_shape(self) -> str:
        return f"(batch, {self.in_channels}, {_SPATIAL[self._dims]})"

    def extra_repr(self) -> str:
        return f"rank={self.rank}, {self._sigma_repr()}"
