"""W1–W3 (DESIGN.md §4): `svdfuse.ops.truncated_svd` of a batch of task matrices vs torch.

Sources are `A_i = W0 + Δ_i` (fp32) with W0 dense Gaussian and Δ_i task-matrix-like (power-law
spectrum σ_j = j^-1 plus a noise floor); every method gets A and W0, never Δ. In one process:

- svdfuse: `ops.truncated_svd(A, r, base=W0)` at its defaults (what a merge runs);
- `torch.linalg.svd(A - W0)` batched. Seconds per call: timed once on a subset of the batch and
  scaled linearly to the whole batch (`extrapolated`, `timed_matrices` in the JSON);
- `torch.svd_lowrank(A, q=r+p, niter=q, M=W0)` batched, same sketch width and power iterations;
- the plain batched torch rSVD `svdfuse.reference.randomized_svd` (same settings and seed).

Floor: a randomized SVD with q power iterations reads the batch 2 + 2q times (the sketch
(A - W0)Ω, then (A - W0)ᵀQ and (A - W0)Q per iteration, then the final (A - W0)ᵀQ): 8 passes at
the defaults (DESIGN.md's 6 counts q = 2), at 3.0 TB/s. The same passes are GEMMs of
2·batch·m·n·(r + p) FLOP each: the fp32 FLOP floor at 51 TFLOP/s (tf32 at 394 is listed too).
QRs and the small SVD are left out of both floors.

Accuracy on the first matrices against float64 singular values: reconstruction error over the
Eckart–Young optimum, and the worst relative error of the top-r σ.

    python bench/bench_rsvd.py                      # W1, W2, W3
    python bench/bench_rsvd.py --stages             # + each step and the alternatives behind the defaults
    python bench/bench_rsvd.py --part alternatives  # the whole SVD under each switch (sketch tiling, projected SVD), winner marked
    python bench/bench_rsvd.py --device cpu --small # a smoke run at tiny shapes
"""

from __future__ import annotations

from collections.abc import Iterator
from unittest import mock

import torch

from common import FP32_FLOPS, TF32_GEMM_FLOPS, Results, arg_parser, floor_ms, median_ms, pct_of_floor, print_table
from svdfuse import _rsvd, ops, reference
from workloads import rsvd_sources

# name: (batch, m, n, rank, matrices timed for linalg.svd, matrices checked for accuracy)
WORKLOADS = {"W1": (100, 768, 768, 76, 100, 2), "W2": (16, 4096, 4096, 128, 2, 1), "W3": (400, 768, 768, 16, 20, 2)}
SMALL = {"W1": (6, 96, 96, 8, 6, 2), "W2": (2, 192, 192, 16, 1, 1), "W3": (12, 96, 96, 4, 3, 2)}


def methods(A: torch.Tensor, W0: torch.Tensor, r: int) -> dict:
    """The randomized methods, each a zero-argument call returning (U (b, m, r), S (b, r), V (b, n, r))."""
    p, q = ops.DEFAULT_OVERSAMPLE, ops.DEFAULT_POWER_ITERS

    def svd_lowrank():
        U, S, V = torch.svd_lowrank(A, q=r + p, niter=q, M=W0)
        return U[..., :r], S[..., :r], V[..., :r]

    return {
        "svdfuse": lambda: ops.truncated_svd(A, r, base=W0),
        "torch_rsvd": lambda: reference.randomized_svd(A, r, W0, oversample=p, power_iters=q, seed=0),
        "svd_lowrank": svd_lowrank,
    }


def accuracy(delta: torch.Tensor, exact: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, leading: int = 0) -> dict:
    """delta (b, m, n) and exact σ (b, min(m, n)) in float64; worst over the batch. With `leading`,
    also the worst relative error of the first `leading` σ (`sigma_rel_leading`)."""
    r = S.shape[-1]
    U, S, V = (t.to(delta.device, torch.float64) for t in (U, S, V))
    optimum = exact[:, r:].square().sum(-1).sqrt()
    rec = (delta - (U * S.unsqueeze(-2)) @ V.mT).flatten(1).norm(dim=1) / optimum
    rel = (S - exact[:, :r]).abs() / exact[:, :r]
    out = {"rec_over_optimum": rec.max().item(), "sigma_rel": rel.max().item()}
    if leading:
        out["sigma_rel_leading"] = rel[:, :leading].max().item()
    return out


def run(name: str, shape: tuple, device: torch.device) -> list[dict]:
    batch, m, n, r, svd_subset, acc_subset = shape
    A, W0 = rsvd_sources(batch, m, n, device)
    width = r + ops.DEFAULT_OVERSAMPLE
    passes = 2 + 2 * ops.DEFAULT_POWER_ITERS
    data = A.numel() * A.element_size()
    flops = passes * 2 * batch * m * n * width
    common = {"workload": name, "batch": batch, "m": m, "n": n, "rank": r}
    delta = A[:acc_subset].double() - W0.double()
    exact = torch.linalg.svdvals(delta)
    rows = []
    for method, fn in methods(A, W0, r).items():
        ms = median_ms(fn, device, warmup=2, repeats=5)
        U, S, V = fn()
        rows.append({**common, "method": method, "ms": ms, **accuracy(delta, exact, U[:acc_subset], S[:acc_subset], V[:acc_subset])})
    torch.linalg.svd(A[0, :64, :64])  # cuSOLVER's one-time set-up is not part of the baseline
    sub = A[:svd_subset]
    ms_sub = median_ms(lambda: torch.linalg.svd(sub - W0, full_matrices=False), device, warmup=0, repeats=1)
    rows.append({**common, "method": "linalg.svd", "ms": ms_sub * batch / svd_subset, "timed_matrices": svd_subset,
                 "extrapolated": svd_subset < batch})
    ours = rows[0]["ms"]
    bytes_floor = floor_ms(bytes_moved=passes * data)
    ours_row = rows[0]
    ours_row |= {"passes": passes, "bytes_floor_ms": bytes_floor, "pct_bytes_floor": pct_of_floor(bytes_floor, ours),
                 "fp32_flop_floor_ms": floor_ms(flops=flops, flops_per_s=FP32_FLOPS),
                 "tf32_flop_floor_ms": floor_ms(flops=flops, flops_per_s=TF32_GEMM_FLOPS)}
    ours_row["pct_fp32_flop_floor"] = pct_of_floor(ours_row["fp32_flop_floor_ms"], ours)
    for row in rows:
        row["speedup_of_svdfuse"] = row["ms"] / ours  # baseline time over svdfuse's: > 1 means svdfuse is faster
    return rows


# (BLOCK_M, BLOCK_K, warps, stages) of the projection kernel, around its untuned defaults.
TILES = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 8, 4), (128, 32, 8, 4), (32, 64, 4, 4)]


def tile_sweep(A: torch.Tensor, omega: torch.Tensor, W0: torch.Tensor, device: torch.device) -> Iterator[tuple[str, float]]:
    """The sketch projection under each tile configuration: what to set the kernel's constants to."""
    from svdfuse.kernels import rsvd

    saved = rsvd._BLOCK_M, rsvd._BLOCK_K, rsvd._NUM_WARPS, rsvd._NUM_STAGES
    for tile in TILES:
        rsvd._BLOCK_M, rsvd._BLOCK_K, rsvd._NUM_WARPS, rsvd._NUM_STAGES = tile
        try:
            ms = median_ms(lambda: rsvd.rsvd_project(A, omega, W0), device)
        finally:
            rsvd._BLOCK_M, rsvd._BLOCK_K, rsvd._NUM_WARPS, rsvd._NUM_STAGES = saved
        yield "m{} k{} w{} s{}".format(*tile), ms


# What a result must meet to be chosen (DESIGN.md §4): reconstruction within 1.02× Eckart–Young.
MAX_REC_OVER_OPTIMUM = 1.02


def choose(rows: list[dict], choice: str) -> list[dict]:
    """Mark the fastest row of `choice` whose accuracy meets the target `winner` (the others False)."""
    candidates = [row for row in rows if row.get("choice") == choice and row.get("ms") is not None]
    good = [row for row in candidates if row.get("rec_over_optimum", 1.0) <= MAX_REC_OVER_OPTIMUM]
    best = min(good, key=lambda row: row["ms"], default=None)
    for row in candidates:
        row["winner"] = row is best
    return rows


def alternatives(name: str, A: torch.Tensor, W0: torch.Tensor, r: int, device: torch.device) -> Iterator[dict]:
    """The whole randomized SVD under each setting of the GPU backend's switches (each call run
    with the module's switch patched: `mock.patch.object` as a decorator), timed in the
    same run with its accuracy: the sketch tiling (`rsvd.SKETCH_TILING`, only where the sketch is
    wider than 128 columns) and the projected SVD (`rsvd.PROJECTED_SVD`). Each choice's fastest
    accurate option is marked `winner` (by `choose`, once all are in). Yields each row as measured."""
    from svdfuse.kernels import rsvd

    delta = A[:2].double() - W0.double()
    exact = torch.linalg.svdvals(delta)
    options = dict(oversample=ops.DEFAULT_OVERSAMPLE, power_iters=ops.DEFAULT_POWER_ITERS, seed=0)
    whole = lambda: rsvd.randomized_svd(A, r, W0, **options)  # noqa: E731
    runs = {}
    if r + ops.DEFAULT_OVERSAMPLE > rsvd.SKETCH_TILINGS["split"]:
        runs |= {("sketch_tiling", t): mock.patch.object(rsvd, "SKETCH_TILING", t)(whole) for t in rsvd.SKETCH_TILINGS}
    projected = [p for p in rsvd.PROJECTED_SVDS if device.type == "cuda" or not p.startswith("gesvd")]  # drivers: CUDA only
    runs |= {("projected_svd", p): mock.patch.object(rsvd, "PROJECTED_SVD", p)(whole) for p in projected}
    for (choice, option), fn in runs.items():
        row = {"workload": name, "step": f"whole SVD, {choice} {option}", "choice": choice, "option": option,
               "default": option == getattr(rsvd, choice.upper())}
        try:
            row["ms"] = median_ms(fn, device, warmup=1, repeats=3)
            U, S, V = fn()
            row |= accuracy(delta, exact, U[:2], S[:2], V[:2])
        except Exception as err:  # a driver this torch or GPU refuses: recorded, never the end of the run
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        yield row


def stages(name: str, shape: tuple, device: torch.device) -> Iterator[dict]:
    """Each step of svdfuse's randomized SVD on its own, with the alternatives the defaults choose
    between: projection tiles and input precision, CholeskyQR2 vs Householder, the projected SVDs;
    and the whole SVD with each precision. Needs Triton (the GPU backend's primitives). Yields each
    row as measured."""
    from svdfuse.kernels import rsvd

    batch, m, n, r = shape[:4]
    A, W0 = rsvd_sources(batch, m, n, device)
    width = r + ops.DEFAULT_OVERSAMPLE
    omega = torch.randn(n, width, device=device)
    Y = rsvd.rsvd_project(A, omega, W0)
    Q = _rsvd.cholesky_qr2(Y)
    B_t = rsvd.rsvd_project(A, Q, W0, transpose=True)
    steps = {f"project {p}": (lambda p=p: rsvd.rsvd_project(A, omega, W0, precision=p)) for p in reference.PRECISIONS}
    steps |= {
        "project transposed": lambda: rsvd.rsvd_project(A, Q, W0, transpose=True),
        "orthonormalize CholeskyQR2": lambda: _rsvd.cholesky_qr2(Y),
        "orthonormalize Householder": lambda: _rsvd.householder(Y),
    }
    steps |= {f"projected SVD {p}": (lambda p=p: rsvd.PROJECTED_SVDS[p](B_t)) for p in rsvd.PROJECTED_SVDS
              if device.type == "cuda" or not p.startswith("gesvd")}
    options = dict(oversample=ops.DEFAULT_OVERSAMPLE, power_iters=ops.DEFAULT_POWER_ITERS, seed=0)
    for precision in reference.PRECISIONS:
        steps[f"whole SVD {precision}"] = lambda precision=precision: rsvd.randomized_svd(A, r, W0, precision=precision, **options)
    delta = A[:2].double() - W0.double()
    exact = torch.linalg.svdvals(delta)
    for tile, ms in tile_sweep(A, omega, W0, device):
        yield {"workload": name, "step": f"project ieee tile {tile}", "ms": ms}
    for step, fn in steps.items():
        row = {"workload": name, "step": step}
        try:
            row["ms"] = median_ms(fn, device, warmup=2, repeats=5)
            if step.startswith("whole"):
                U, S, V = fn()
                row |= accuracy(delta, exact, U[:2], S[:2], V[:2])
        except Exception as err:  # recorded, never the end of the run
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        yield row


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--part", nargs="+", default=["workloads"], choices=["workloads", "stages", "alternatives"],
                        help="workloads: W1-W3 against the baselines; stages: each step and its alternatives; "
                             "alternatives: the whole SVD under each switch of the GPU backend, winner marked")
    parser.add_argument("--stages", action="store_true", help="same as --part workloads stages")
    args = parser.parse_args()
    parts = ["workloads", "stages"] if args.stages else args.part
    device = torch.device(args.device)
    shapes = SMALL if args.small else WORKLOADS
    if "workloads" in parts:
        notes = [
            "linalg.svd: timed once on `timed_matrices` of the batch, scaled linearly to the batch where `extrapolated`",
            "bytes floor: (2 + 2 * power_iters) reads of the batch at 3.0 TB/s; FLOP floors: the same passes as GEMMs",
            "accuracy: worst over the first matrices of the batch, against float64 torch.linalg.svdvals",
        ]
        results = Results("rsvd", device, small=args.small, notes=notes)
        for name in args.workloads:
            print(f"{name}: {shapes[name][0]} x {shapes[name][1]}x{shapes[name][2]}, rank {shapes[name][3]}", flush=True)
            print_table(results.add(run(name, shapes[name], device)),
                        ["workload", "method", "ms", "speedup_of_svdfuse", "pct_bytes_floor", "pct_fp32_flop_floor",
                         "rec_over_optimum", "sigma_rel", "extrapolated"])
        print("\n".join(notes))
        print(f"wrote {results.path}")
    if "alternatives" in parts:
        results = Results("rsvd_alternatives", device, small=args.small, notes=[
            f"winner: the fastest option of its choice with rec_over_optimum <= {MAX_REC_OVER_OPTIMUM}; default: the option in force"])
        for name in args.workloads:
            batch, m, n, r = shapes[name][:4]
            A, W0 = rsvd_sources(batch, m, n, device)
            rows = [results.add([row])[0] for row in alternatives(name, A, W0, r, device)]
            for choice in ("sketch_tiling", "projected_svd"):
                choose(rows, choice)
            results.write()
            print_table(rows, ["workload", "choice", "option", "ms", "rec_over_optimum", "sigma_rel", "default", "winner", "error"])
            del A, W0
        print(f"wrote {results.path}")
    if "stages" in parts:
        steps = Results("rsvd_stages", device, small=args.small)
        for name in args.workloads:
            rows = [steps.add([row])[0] for row in stages(name, shapes[name], device)]
            print_table(rows, ["workload", "step", "ms", "rec_over_optimum", "sigma_rel", "error"])
        print(f"wrote {steps.path}")


if __name__ == "__main__":
    main()
