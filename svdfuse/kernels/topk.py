"""Global top-k components over sources × components, a batch of layers in one Triton launch.

Each value is packed with its flat index into one int64 key, high word an order-preserving image
of the fp32 bits (-0.0 folded onto +0.0, every NaN onto one NaN above +inf), low word
`2³¹ - 1 - index`. Keys are unique, so sorting them descending is exactly a stable descending sort
of the values (equal values: lower index first) — the selection of `reference.topk_components`,
bit for bit, with no comparison of floats in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# A program keeps its best BUFFER keys in registers and merges one chunk of that size at a time;
# past this size a sort spills, and the reference's one-pass sort is the better choice.
MAX_K = 2048
_MIN_CHUNK = 1024  # small k still scans in chunks this wide: fewer, larger sorts


@triton.jit
def _topk_components_kernel(S, values, indices, total, k, BUFFER: tl.constexpr):
    # One program per layer: S row (total,) fp32 -> its top k values and flat indices, descending.
    # Offsets are int64 through `layer`; an index within a layer stays below total, which the key's
    # 31-bit low word bounds by 2³¹ anyway (sources × r, never near it).
    layer = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BUFFER)
    best = tl.full((BUFFER,), -(2**63), tl.int64)  # below every real key; k <= total never picks it
    for start in range(0, total, BUFFER):
        idx = start + offs
        bits = tl.load(S + layer * total + idx, mask=idx < total, other=0.0).to(tl.int32, bitcast=True)
        # torch.sort's order, on the bits: -0.0 ties with +0.0, and every NaN (either sign, any
        # payload) becomes one value above +inf, so NaNs tie and are selected first, never dropped.
        bits = tl.where(bits == -(2**31), 0, bits)
        bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed int order
        key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)  # 2³¹ - 1 - index
        key = tl.where(idx < total, key, -(2**63))
        # Bitonic top-k: best (descending) against the chunk (ascending), elementwise max, holds
        # exactly the BUFFER largest keys of both.
        best = tl.sort(tl.maximum(best, tl.sort(key)), descending=True)
    chosen = 0x7FFFFFFF - (best & 0xFFFFFFFF)
    out = layer * k + offs
    # Values are read back from S rather than decoded, so they are the inputs themselves (-0.0 too).
    tl.store(values + out, tl.load(S + layer * total + chosen, mask=offs < k), mask=offs < k)
    tl.store(indices + out, chosen, mask=offs < k)


def topk_components(S: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-k of `S: (..., sources, r)` fp32 over sources × components, k <= MAX_K;
    `reference.topk_components` is its oracle.

    Returns values (..., k) fp32 descending, source index (..., k) and component index (..., k) int64.
    """
    sources, r = S.shape[-2:]
    total = sources * r
    flat = S.reshape(-1, total).contiguous()
    layers = flat.shape[0]
    values = torch.empty(layers, k, dtype=torch.float32, device=S.device)
    index = torch.empty(layers, k, dtype=torch.int64, device=S.device)
    if layers:
        buffer = max(triton.next_power_of_2(k), min(_MIN_CHUNK, triton.next_power_of_2(total)))
        _topk_components_kernel[(layers,)](flat, values, index, total, k, BUFFER=buffer)
    lead = S.shape[:-2]
    index = index.reshape(*lead, k)
    return values.reshape(*lead, k), torch.div(index, r, rounding_mode="floor"), index % r
