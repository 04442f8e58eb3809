"""AXIS: global top-k rank-one components across sources (arXiv 2508.19353)."""

from __future__ import annotations

import torch
from torch import Tensor

from svdfuse import ops
from svdfuse.methods import Factors, register


@register("axis", reference_url="https://arxiv.org/abs/2508.19353", needs_k=True, upcast=False)
def axis(W0: Tensor, W: Tensor, *, k: int, svd: ops.SVDOptions) -> Factors:
    """Decompose every task matrix, keep the k largest components by singular value over all
    sources, sum them and re-orthogonalize.

    W0: (G, m, n), W: (G, T, m, n) -> Factors of rank k, with counts (G, T) per source.
    """
    G, T = W.shape[:2]
    U, S, V = svd.truncated_svd(W, k, base=W0.unsqueeze(1))
    values, source, comp = ops.topk_components(S, k)  # (G, k) each
    layer = torch.arange(G, device=W.device).unsqueeze(1)
    U_s = U[layer, source, :, comp].mT  # (G, m, k)
    V_s = V[layer, source, :, comp].mT  # (G, n, k)
    U_t, S_t, V_t = ops.reorthogonalize(U_s, values, V_s)
    return Factors(U_t, S_t, V_t, torch.nn.functional.one_hot(source, T).sum(1))
