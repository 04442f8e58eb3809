"""AXIS: global top-k rank-one components across sources (arXiv 2508.19353)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from svdfuse import ops
from svdfuse.methods.registry import Factors, Kind, check_finite_param, register


def _axis_rank(k: int, T: int, m: int, n: int) -> int:
    return k  # a global top-k takes at most k components from any one source


@register(
    "axis", reference_url="https://arxiv.org/abs/2508.19353", kind=Kind.FACTORS, needs_k=True, source_rank=_axis_rank,
    follows="the AXIS paper: raw singular values, one global top-k per matrix, unscaled; non-matrix tensors averaged",
)  # fmt: skip
def axis(chunks: Iterator[tuple[Tensor, Tensor, Tensor]], *, k: int, T: int, scaling: float = 1.0) -> Factors:
    """Keep the k largest components by singular value over all sources, sum them and
    re-orthogonalize; times `scaling` (1: the paper's sum at full size; 1/T puts it on
    Average's scale).

    chunks: factors of consecutive sources, U (G, c, m, r), S (G, c, r), V (G, c, n, r) -> Factors
    of rank k, with counts (G, T) per source. Only the running top-k is held between chunks: the
    top-k of a union is the top-k of the union of its parts' top-k, and the kept components,
    which come from lower source indices, go first, so ties still go to the lower source index.
    """
    check_finite_param("axis", "scaling", scaling)
    U_s = S_s = V_s = source_s = None
    first = 0
    for U, S, V in chunks:
        G, c = S.shape[:2]
        layer = torch.arange(G, device=S.device).unsqueeze(1)
        if S_s is None:
            values, source, comp = ops.topk_components(S, min(k, S.shape[1] * S.shape[2]))
            U_s, V_s = U[layer, source, :, comp], V[layer, source, :, comp]  # (G, k, m), (G, k, n)
            S_s, source_s = values, source + first
        else:
            pool_S = torch.cat([S_s, S.flatten(1)], 1)[:, None]  # (G, 1, kept + c·r): kept ones first
            values, _, pos = ops.topk_components(pool_S, min(k, pool_S.shape[-1]))
            old = pos < S_s.shape[1]
            new = (pos - S_s.shape[1]).clamp(min=0)
            src, comp = new // S.shape[2], new % S.shape[2]
            keep = old.unsqueeze(-1)
            pick = lambda kept, fresh: torch.where(keep, kept.gather(1, pos.clamp(max=kept.shape[1] - 1).unsqueeze(-1).expand(-1, -1, kept.shape[-1])), fresh[layer, src, :, comp])  # noqa: E731
            U_s, V_s = pick(U_s, U), pick(V_s, V)
            source_s = torch.where(old, source_s.gather(1, pos.clamp(max=S_s.shape[1] - 1)), src + first)
            S_s = values
        first += c
    U_t, S_t, V_t = ops.reorthogonalize(U_s.mT, S_s, V_s.mT)
    return Factors(U_t, S_t * scaling, V_t, torch.nn.functional.one_hot(source_s, T).sum(1))
