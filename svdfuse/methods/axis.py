"""AXIS: global top-k rank-one components across sources (arXiv 2508.19353)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from svdfuse import ops
from svdfuse.methods.registry import Components, Factors, Kind, check_finite_param, register


def _axis_rank(k: int, T: int, m: int, n: int) -> int:
    return k  # a global top-k takes at most k components from any one source


@register(
    "axis", reference_url="https://arxiv.org/abs/2508.19353", kind=Kind.FACTORS, needs_k=True, source_rank=_axis_rank,
    follows="the AXIS paper: raw singular values, one global top-k per matrix, unscaled; non-matrix tensors averaged",
)  # fmt: skip
def axis(chunks: Iterator[Components], *, k: int, T: int, scaling: float = 1.0) -> Factors:
    """Keep the k largest components by singular value over all sources, sum them and
    re-orthogonalize; times `scaling` (1: the paper's sum at full size; 1/T puts it on
    Average's scale).

    chunks: factors of consecutive sources, U (G, c, m, r), S (G, c, r), V (G, c, n, r) -> Factors
    of rank k, with counts (G, T) per source. Only the running top-k is held between chunks: the
    top-k of a union is the top-k of the union of its parts' top-k, and the kept components,
    which come from lower source indices, go first, so ties still go to the lower source index;
    of a chunk, only the singular vectors that enter the top-k are formed (`Components.vectors`).
    """
    check_finite_param("axis", "scaling", scaling)
    U_s = S_s = V_s = source_s = None
    first = 0
    for chunk in chunks:
        S = chunk.S
        G, c = S.shape[:2]
        layer = torch.arange(G, device=S.device).unsqueeze(1)
        if S_s is None:
            values, source, comp = ops.topk_components(S, min(k, S.shape[1] * S.shape[2]))
            U_s, V_s = chunk.vectors(layer, source, comp)  # (G, k, m), (G, k, n)
            S_s, source_s = values, source + first
        else:
            pool_S = torch.cat([S_s, S.flatten(1)], 1)[:, None]  # (G, 1, kept + c·r): kept ones first
            values, _, pos = ops.topk_components(pool_S, min(k, pool_S.shape[-1]))
            old = pos < S_s.shape[1]
            new = (pos - S_s.shape[1]).clamp(min=0)
            src, comp = new // S.shape[2], new % S.shape[2]
            # the kept vectors at their new places, then the vectors of the chunk's entrants formed
            # alone (of many sources, most of a later chunk's top-k is kept from before)
            moved = lambda kept: kept.gather(1, pos.clamp(max=kept.shape[1] - 1).unsqueeze(-1).expand(-1, -1, kept.shape[-1]))  # noqa: E731
            U_s, V_s = moved(U_s), moved(V_s)
            entrants = (~old).nonzero(as_tuple=True)  # (layers, places)
            if entrants[0].numel():
                U_s[entrants], V_s[entrants] = chunk.vectors(entrants[0], src[entrants], comp[entrants])
            source_s = torch.where(old, source_s.gather(1, pos.clamp(max=S_s.shape[1] - 1)), src + first)
            S_s = values
        first += c
    U_t, S_t, V_t = ops.reorthogonalize(U_s.mT, S_s, V_s.mT)
    return Factors(U_t, S_t * scaling, V_t, torch.nn.functional.one_hot(source_s, T).sum(1))
