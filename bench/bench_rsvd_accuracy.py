"""Accuracy of the randomized truncated SVD against exact, over oversampling × power iterations.

Spectra like task matrices': power-law decay with and without a noise floor. Reports the
reconstruction error as a ratio to the Eckart–Young optimum and the worst relative error of the
singular values, over all r kept and over the leading r/4 (a global top-k over many sources takes
mostly those); the defaults in `svdfuse.ops` are chosen from this table. Input precisions other
than "ieee" are what the GPU's tensor cores compute; on the CPU the reference emulates them.

    python bench/bench_rsvd_accuracy.py [--device cuda] [--size 768] [--rank 76] [--precision ieee tf32x3 tf32]
    python bench/bench_rsvd_accuracy.py --device cpu --small    # a smoke run (128x128, rank 12)
"""

from __future__ import annotations

import itertools

import torch

from bench_rsvd import accuracy
from common import arg_parser, record
from svdfuse import ops
from svdfuse.reference import PRECISIONS
from workloads import task_like

SPECTRA = [(0.5, 0.0), (1.0, 0.0), (1.0, 0.02), (2.0, 0.01)]  # (power-law exponent, noise floor)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--rank", type=int, default=76)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--oversample", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--power-iters", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    args = parser.parse_args()
    if args.small:
        args.size, args.rank = 128, 12
    device, r = torch.device(args.device), args.rank
    lead = max(1, r // 4)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'alpha':>5} {'noise':>5} {'precision':>9} {'p':>3} {'q':>2} {'rec/opt':>8} {'σ rel':>8} {f'σ rel ≤{lead}':>9}")
    for alpha, noise in SPECTRA:
        delta = task_like(args.batch, args.size, args.size, alpha, noise, gen)
        exact = torch.linalg.svdvals(delta)
        A = delta.float().to(device)
        for precision, p, q in itertools.product(args.precision, args.oversample, args.power_iters):
            U, S, V = ops.truncated_svd(A, r, method="randomized", oversample=p, power_iters=q, precision=precision)
            acc = accuracy(delta, exact, U, S, V, leading=lead)
            rows.append({"alpha": alpha, "noise": noise, "precision": precision, "oversample": p, "power_iters": q, **acc, "leading": lead})
            print(f"{alpha:5.1f} {noise:5.2f} {precision:>9} {p:3d} {q:2d} {acc['rec_over_optimum']:8.4f} "
                  f"{acc['sigma_rel']:8.1e} {acc['sigma_rel_leading']:9.1e}")  # fmt: skip
    print(f"wrote {record('rsvd_accuracy', device, rows, small=args.small)}")


if __name__ == "__main__":
    main()
