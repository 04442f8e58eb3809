"""Accuracy of the randomized truncated SVD against exact, over oversampling × power iterations.

Spectra like task matrices': power-law decay with and without a noise floor.

- grid: per matrix, the reconstruction error as a ratio to the Eckart–Young optimum and the worst
  relative error of the singular values, over all r kept and over the leading r/4; over
  oversampling × power iterations × input precision ("tf32x3"/"tf32" are what the GPU's tensor
  cores compute; on the CPU the reference emulates them).
- pooled: what AXIS keeps. T sources of one layer, each its own scale (log-uniform over 4×), rank
  r = k each, then the global top-k over all T·r components, as `svdfuse.merge` selects them:
  the worst relative error of the k selected σ against the exact top-k of the pooled exact
  spectra, and how many of the k (source, component) picks differ from exact's.
- shapes: reconstruction at the default oversampling and each of `--power-iters`, over the
  shapes and ranks of the workloads (square and ViT MLP/attention rectangles, rank 16/76/128).

    python bench/bench_rsvd_accuracy.py [--device cuda] [--size 768] [--rank 76] [--precision ieee tf32x3 tf32]
    python bench/bench_rsvd_accuracy.py --part pooled --sources 20
    python bench/bench_rsvd_accuracy.py --part shapes --power-iters 2 3
    python bench/bench_rsvd_accuracy.py --device cpu --small    # a smoke run (128x128, rank 12)
"""

from __future__ import annotations

import itertools

import torch

from bench_rsvd import accuracy
from common import Results, arg_parser
from svdfuse import ops
from svdfuse.reference import PRECISIONS
from workloads import task_like

SPECTRA = [(0.5, 0.0), (1.0, 0.0), (1.0, 0.02), (2.0, 0.01)]  # (power-law exponent, noise floor)
# (batch, m, n, rank) for the shapes part; --small shrinks every size by 8
SHAPES = [(8, 768, 768, 76), (3, 3072, 768, 76), (3, 768, 3072, 76), (3, 2304, 768, 76), (4, 768, 768, 16),
          (2, 1536, 1536, 128), (1, 2048, 2048, 128)]


def grid(args, device: torch.device, gen: torch.Generator, results: Results) -> None:
    """Each row is written the moment it is measured."""
    r, lead = args.rank, max(1, args.rank // 4)
    print(f"{'alpha':>5} {'noise':>5} {'precision':>9} {'p':>3} {'q':>2} {'rec/opt':>8} {'σ rel':>8} {f'σ rel ≤{lead}':>9}")
    for alpha, noise in SPECTRA:
        delta = task_like(args.batch, args.size, args.size, alpha, noise, gen)
        exact = torch.linalg.svdvals(delta)
        A = delta.float().to(device)
        for precision, p, q in itertools.product(args.precision, args.oversample, args.power_iters):
            U, S, V = ops.truncated_svd(A, r, method="randomized", oversample=p, power_iters=q, precision=precision)
            acc = accuracy(delta, exact, U, S, V, leading=lead)
            results.add([{"part": "grid", "alpha": alpha, "noise": noise, "precision": precision, "oversample": p, "power_iters": q,
                          **acc, "leading": lead}])
            print(f"{alpha:5.1f} {noise:5.2f} {precision:>9} {p:3d} {q:2d} {acc['rec_over_optimum']:8.4f} "
                  f"{acc['sigma_rel']:8.1e} {acc['sigma_rel_leading']:9.1e}")  # fmt: skip


def pooled(args, device: torch.device, gen: torch.Generator, results: Results) -> None:
    """Each row is written the moment it is measured."""
    k, T = args.rank, args.sources
    print(f"{'alpha':>5} {'noise':>5} {'precision':>9} {'p':>3} {'q':>2} {'top-k σ rel':>11} {'picks differ':>12}")
    for alpha, noise in SPECTRA:
        scales = 2.0 ** (2 * torch.rand(T, 1, 1, generator=gen, dtype=torch.float64) - 1)  # 0.5 .. 2
        delta = scales * task_like(T, args.size, args.size, alpha, noise, gen)
        exact = torch.linalg.svdvals(delta)[:, :k]  # (T, k): the global top-k lies in every source's top k
        exact_values, exact_src, exact_comp = ops.topk_components(exact, k)
        A = delta.float().to(device)
        for precision, p, q in itertools.product(args.precision, args.oversample, args.power_iters):
            _, S, _ = ops.truncated_svd(A, k, method="randomized", oversample=p, power_iters=q, precision=precision)
            values, src, comp = (t.cpu() for t in ops.topk_components(S, k))
            rel = ((values.double() - exact_values) / exact_values).abs().max().item()
            differ = k - len(set(zip(src.tolist(), comp.tolist())) & set(zip(exact_src.tolist(), exact_comp.tolist())))
            results.add([{"part": "pooled", "alpha": alpha, "noise": noise, "sources": T, "k": k, "precision": precision,
                          "oversample": p, "power_iters": q, "topk_sigma_rel": rel, "picks_differ": differ}])
            print(f"{alpha:5.1f} {noise:5.2f} {precision:>9} {p:3d} {q:2d} {rel:11.1e} {differ:12d}")


def shapes(args, device: torch.device, gen: torch.Generator, results: Results) -> None:
    """Each row is written the moment it is measured."""
    print(f"{'m':>5} {'n':>5} {'rank':>4} {'alpha':>5} {'noise':>5} {'q':>2} {'rec/opt':>8}")
    for batch, m, n, r in SHAPES:
        if args.small:
            m, n, r = m // 8, n // 8, max(2, r // 8)
        for alpha, noise in SPECTRA[1:] + [(1.5, 0.02)]:
            delta = task_like(batch, m, n, alpha, noise, gen)
            exact = torch.linalg.svdvals(delta)
            A = delta.float().to(device)
            for q in args.power_iters:
                U, S, V = ops.truncated_svd(A, r, method="randomized", power_iters=q)
                rec = accuracy(delta, exact, U, S, V)["rec_over_optimum"]
                results.add([{"part": "shapes", "batch": batch, "m": m, "n": n, "rank": r, "alpha": alpha, "noise": noise,
                              "oversample": ops.DEFAULT_OVERSAMPLE, "power_iters": q, "rec_over_optimum": rec}])
                print(f"{m:5d} {n:5d} {r:4d} {alpha:5.1f} {noise:5.2f} {q:2d} {rec:8.4f}")


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--part", nargs="+", default=["grid", "pooled", "shapes"], choices=["grid", "pooled", "shapes"])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--rank", type=int, default=76)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sources", type=int, default=20, help="T of the pooled part")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--oversample", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--power-iters", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    args = parser.parse_args()
    if args.small:
        args.size, args.rank, args.sources = 128, 12, 4
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    for part in args.part:
        results = Results("rsvd_accuracy" if part == "grid" else f"rsvd_accuracy_{part}", device, small=args.small)
        {"grid": grid, "pooled": pooled, "shapes": shapes}[part](args, device, gen, results)
        print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
