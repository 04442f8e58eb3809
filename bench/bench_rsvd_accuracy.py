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
        optimum = exact[:, r:].square().sum(-1).sqrt()
        A = delta.float().to(device)
        for precision, p, q in itertools.product(args.precision, args.oversample, args.power_iters):
            U, S, V = ops.truncated_svd(A, r, method="randomized", oversample=p, power_iters=q, precision=precision)
            U, S, V = U.double().cpu(), S.double().cpu(), V.double().cpu()
            rec = ((delta - (U * S.unsqueeze(-2)) @ V.mT).flatten(1).norm(dim=1) / optimum).max().item()
            rel = (S - exact[:, :r]).abs() / exact[:, :r]
            worst, worst_lead = rel.max().item(), rel[:, :lead].max().item()
            rows.append(
                {"alpha": alpha, "noise": noise, "precision": precision, "oversample": p, "power_iters": q,
                 "rec_over_optimum": rec, "sigma_rel": worst, "sigma_rel_leading": worst_lead, "leading": lead}
            )  # fmt: skip
            print(f"{alpha:5.1f} {noise:5.2f} {precision:>9} {p:3d} {q:2d} {rec:8.4f} {worst:8.1e} {worst_lead:9.1e}")
    print(f"wrote {record('rsvd_accuracy', device, rows, small=args.small)}")


if __name__ == "__main__":
    main()
