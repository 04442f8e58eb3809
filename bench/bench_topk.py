"""Global top-k selection: `svdfuse.ops.topk_components` vs `torch.topk` on the flattened values.

The AXIS selection step for a whole ViT-B/32 visual encoder at once: 48 layers, each pooling
every source's singular values, keeping k = 76. Two pools: 20 sources × 76 components (W1's
rank) and 400 sources × 16 (W3's). Singular values are positive and descending per source, as a
truncated SVD returns them. The baseline `torch.topk(S.flatten(-2), k)` gives values and flat
indices only; svdfuse also splits them into (source, component) with a stable tie rule.

Floor: read S (fp32) and write k values (fp32) + 2k indices (int64) per layer at 3.0 TB/s, far
below launch latency: these ops are launch-bound, so each is timed both as eager calls in a loop
(`loop_us`, what a merge pays) and replayed from a CUDA graph (`graph_us`, the kernels alone;
absent where the op synchronizes with the host, which makes it uncapturable).

    python bench/bench_topk.py
    python bench/bench_topk.py --device cpu --small
"""

from __future__ import annotations

import torch

from common import Results, arg_parser, fast_op_us, floor_ms, print_table
from svdfuse import ops

# name: (layers, sources, components per source, k)
CASES = {"20x76": (48, 20, 76, 76), "400x16": (48, 400, 16, 76)}
SMALL = {"20x76": (4, 5, 8, 8), "400x16": (4, 40, 4, 8)}


def singular_values(layers: int, sources: int, r: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(layers, sources, r) positive, descending along r."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(layers, sources, r, generator=gen, device=device).sort(dim=-1, descending=True).values


def run(name: str, case: tuple, device: torch.device) -> list[dict]:
    layers, sources, r, k = case
    S = singular_values(layers, sources, r, device)
    flat = S.flatten(-2)
    values, source, component = ops.topk_components(S, k)
    expected = torch.topk(flat, k).values
    exact = torch.equal(values, expected) and torch.equal(flat.gather(-1, source * r + component), values)
    floor_us = 1e3 * floor_ms(bytes_moved=S.numel() * 4 + layers * k * (4 + 8 + 8))
    common = {"case": name, "layers": layers, "sources": sources, "r": r, "k": k, "floor_us": floor_us}
    ours = fast_op_us(lambda: ops.topk_components(S, k), device)
    theirs = fast_op_us(lambda: torch.topk(flat, k), device)
    rows = [{**common, "method": "svdfuse", **ours, "selection_exact": exact}, {**common, "method": "torch.topk", **theirs}]
    for row in rows:
        for mode in ("loop", "graph"):
            us = row[f"{mode}_us"]
            if us is not None and ours[f"{mode}_us"] is not None:
                row[f"{mode}_ratio"] = ours[f"{mode}_us"] / us  # svdfuse time over this row's: the baseline's row has the ratio
    return rows


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    device = torch.device(args.device)
    notes = ["loop_ratio / graph_ratio on a baseline row: svdfuse time over the baseline's (< 1: svdfuse faster)",
             "floor_us: bytes of S read and of values + int64 indices written, at 3.0 TB/s"]
    results = Results("topk", device, small=args.small, notes=notes)
    for name, case in (SMALL if args.small else CASES).items():
        results.add(run(name, case, device))
    print_table(results.rows, ["case", "method", "loop_us", "graph_us", "loop_ratio", "graph_ratio", "floor_us", "selection_exact"])
    print("\n".join(notes))
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
