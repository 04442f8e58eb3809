"""`nn.MultiheadAttention` with low-rank merged projections.

`nn.MultiheadAttention` reads `in_proj_weight` and `out_proj.weight` itself, so a merge could only
reach them as dense weights rebuilt every forward, one σ for the whole batch. `SVDMultiheadAttention`
computes the same attention with its in- and out-projections as `SVDLinear` layers: nothing dense
is built, and a stacked serving model (`svdfuse.serving`) gives every request its own σ there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdfuse.nn.layers import SVDLinear

__all__ = ["SVDMultiheadAttention", "convertible"]


def convertible(attention: nn.MultiheadAttention) -> bool:
    """Whether `SVDMultiheadAttention` can take `attention` over: one fused (3E, E) in-projection,
    no bias_k/bias_v, no zero attention (what every transformer in open_clip and torch uses)."""
    E = attention.embed_dim
    return attention.kdim == E and attention.vdim == E and attention.bias_k is None and not attention.add_zero_attn


def _rows(layer: nn.Module, x: Tensor, start: int, stop: int) -> Tensor:
    if isinstance(layer, SVDLinear):
        return layer.rows(x, start, stop)
    return F.linear(x, layer.weight[start:stop], None if layer.bias is None else layer.bias[start:stop])


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: may not attend) as 0 / -inf, a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class SVDMultiheadAttention(nn.Module):
    """Drop-in `nn.MultiheadAttention` whose projections are `SVDLinear` (or frozen dense `nn.Linear`
    where that weight was not merged); same arguments, masks, dropout and outputs.

    Args:
        attention: the module it replaces (its configuration: embed_dim, num_heads, dropout,
            batch_first); must be `convertible`.
        in_proj: (3E, E) layer computing q, k and v (rows [0, E), [E, 2E), [2E, 3E)).
        out_proj: (E, E) layer.

    Example::

        attn = SVDMultiheadAttention(mha, SVDLinear(W_in0, U, S, V, b_in), mha.out_proj)
        out, _ = attn(x, x, x, need_weights=False)  # x: (batch, seq, E) with batch_first
    """

    # Not read here: torch's TransformerEncoderLayer asks every self-attention module for it, and
    # False keeps it off its fused inference path, which reads a dense in_proj_weight (none exists
    # for a σ bank) instead of calling forward.
    _qkv_same_embed_dim = False

    def __init__(self, attention: nn.MultiheadAttention, in_proj: nn.Module, out_proj: nn.Module) -> None:
        super().__init__()
        if not convertible(attention):
            raise ValueError(
                "SVDMultiheadAttention needs a fused in-projection without bias_k/bias_v or add_zero_attn; "
                f"found kdim={attention.kdim}, vdim={attention.vdim}, embed_dim={attention.embed_dim}, "
                f"bias_k={attention.bias_k is not None}, add_zero_attn={attention.add_zero_attn}"
            )
        E = attention.embed_dim
        for name, layer, shape in (("in_proj", in_proj, (3 * E, E)), ("out_proj", out_proj, (E, E))):
            found = (layer.out_features, layer.in_features)
            if found != shape:
                raise ValueError(f"SVDMultiheadAttention: {name} must be {shape[0]}x{shape[1]} for embed_dim {E}, found {found[0]}x{found[1]}")
        self.embed_dim, self.num_heads, self.head_dim = E, attention.num_heads, attention.head_dim
        self.dropout, self.batch_first = attention.dropout, attention.batch_first
        self.in_proj, self.out_proj = in_proj, out_proj

    @property
    def in_proj_weight(self) -> Tensor:
        """The dense (3E, E) in-projection, built on demand (for code that reads it)."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias

    def to_dense(self) -> nn.MultiheadAttention:
        """The equivalent `nn.MultiheadAttention` with dense weights (the current σ folded in)."""
        ref = self.in_proj.weight
        dense = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.in_proj.bias is not None,
            batch_first=self.batch_first, device=ref.device, dtype=ref.dtype,
        )  # fmt: skip
        with torch.no_grad():
            dense.in_proj_weight.copy_(ref)
            dense.out_proj.weight.copy_(self.out_proj.weight)
            if self.in_proj.bias is not None:
                dense.in_proj_bias.copy_(self.in_proj.bias)
                dense.out_proj.bias.copy_(self.out_proj.bias)
        return dense.train(self.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`nn.MultiheadAttention.forward`: query (L, E), (L, N, E) or (N, L, E) with batch_first;
        key, value likewise with S positions -> (output like query, weights (N, L, S) averaged over
        heads, (N, H, L, S) per head, or None)."""
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal is a hint that attn_mask is the causal mask: pass attn_mask too")
        self_attention = query is key and key is value  # before the reshapes below make new tensors
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # projections run batch-first: per-request σ is indexed by the batch
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, self_attention)
        q, k, v = (t.reshape(N, -1, H, D).transpose(1, 2) for t in (q, k, v))  # (N, H, L or S, D)
        mask = self._mask(attn_mask, key_padding_mask, N, L, k.shape[2], q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * D**-0.5) @ k.transpose(-2, -1)
            weights = (scores if mask is None else scores + mask).softmax(-1)
            if p > 0:
                weights = F.dropout(weights, p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        if self_attention:  # one launch for q, k and v
            return self.in_proj(query).chunk(3, dim=-1)
        return tuple(_rows(self.in_proj, x, i * E, (i + 1) * E) for i, x in enumerate((query, key, value)))

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, N: int, L: int, S: int, dtype: torch.dtype) -> Tensor | None:
        """attn_mask (L, S) or (N·H, L, S) and key_padding_mask (N, S) as one additive (N|1, H|1, L, S) mask."""
        H = self.num_heads
        mask = _additive(attn_mask, dtype)
        if mask is not None:
            if tuple(mask.shape) not in ((L, S), (N * H, L, S)):
                raise ValueError(f"attn_mask must be ({L}, {S}) or ({N * H}, {L}, {S}), found {tuple(mask.shape)}")
            mask = mask.view(N, H, L, S) if mask.dim() == 3 else mask
        padding = _additive(key_padding_mask, dtype)
        if padding is not None:
            if tuple(padding.shape) != (N, S):
                raise ValueError(f"key_padding_mask must be ({N}, {S}), found {tuple(padding.shape)}")
            padding = padding.view(N, 1, 1, S)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"
