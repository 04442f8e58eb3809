"""C1 and C2 (DESIGN.md §4, the CPU table): svdfuse on the CPU against the GEMM floor measured in
the same run, and against torch baselines.

C2: `ops.truncated_svd(A, 102, base=W0)` at the defaults (oversample p = 16, power iterations
q = 3), A = 8 sources × 5632×2048 bf16 (`workloads.rsvd_sources`: W0 + task-like Δ), W0 bf16.
Floor: the 2 + 2q GEMM passes at torch's rate on these shapes, timed here on the sources' fp32
task matrices stacked: (1 + q) × (t(Δ @ X) + t(Δᵀ @ Y)), X (n, w), Y (sources, m, w), w = r + p.
Baselines: the reference oracle `svdfuse.reference.randomized_svd` (what the CPU ran before
2026-12-01) and `torch.svd_lowrank(A.float(), q=w, niter=q, M=W0.float())`. Accuracy of the first
source against a float64 SVD. `--stages`: the orthonormalization of one source's sketches,
Householder against CholeskyQR2 with fp64 Grams, and the whole SVD with each
(`svdfuse.cpu.ORTHONORMALIZE` is set to the faster).

C1: `svdfuse.merge(sources, k=38, base=base, device="cpu")` with the real all-MiniLM-L6-v2 as base
and 6 perturbed copies (`workloads.minilm_sources`, 37 matrices), against the paper path
(`bench_merge.axis_paper`, a full SVD per source per matrix) and AXIS with one batched
`torch.svd_lowrank` per shape group, both on the 37 matrices. Floor: the GEMM passes of the
merge's randomized SVDs, timed as batched products over each shape group (all sources). The
merged task matrices are compared with the paper path's (relative Frobenius difference).

Every time is a median of samples taken in turns (`common.interleaved_ms`): on this shared 2-core
machine absolute times move with its load; the ratios are the result.

    python bench/bench_cpu.py                     # C1 and C2
    python bench/bench_cpu.py --only C2 --stages
    python bench/bench_cpu.py --small             # a smoke run at tiny shapes
    python bench/bench_cpu.py --only C1 --notes "load 2-4"   # C2's rows kept from the last run
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

import svdfuse
from bench_merge import axis_paper, merge_components
from bench_rsvd import accuracy
from common import Results, arg_parser, interleaved_ms, print_table, results_path
from svdfuse import _rsvd, cpu, ops, reference
from workloads import minilm_sources, rsvd_sources

P, Q = ops.DEFAULT_OVERSAMPLE, ops.DEFAULT_POWER_ITERS
C2 = dict(sources=8, m=5632, n=2048, rank=102)
C2_SMALL = dict(sources=2, m=704, n=256, rank=12)
C1 = dict(sources=6, k=38)
C1_SMALL = dict(sources=2, k=8)


def gemm_pass_fns(deltas: list[torch.Tensor], width: int) -> dict:
    """One forward and one transposed product per stack of fp32 task matrices (count, m, n):
    what one of the 1 + q forward and 1 + q transposed passes of a randomized SVD multiplies."""
    fns = {}
    for i, D in enumerate(deltas):
        X = torch.randn(D.shape[-1], width)
        Y = torch.randn(D.shape[0], D.shape[-2], width)
        fns[f"gemm {i} forward"] = lambda D=D, X=X: D @ X
        fns[f"gemm {i} transposed"] = lambda D=D, Y=Y: D.mT @ Y
    return fns


def floor_from(times: dict) -> float:
    return (1 + Q) * sum(ms for name, ms in times.items() if name.startswith("gemm "))


def c2(shape: dict, repeats: int) -> list[dict]:
    T, m, n, r = shape["sources"], shape["m"], shape["n"], shape["rank"]
    w = min(r + P, m, n)
    A32, W032 = rsvd_sources(T, m, n, torch.device("cpu"))
    A, W0 = A32.bfloat16(), W032.bfloat16()
    del A32, W032
    deltas = [A.float() - W0.float()]
    out = {}
    fns = {
        "svdfuse": lambda: out.update(svdfuse=ops.truncated_svd(A, r, base=W0)),
        "reference": lambda: reference.randomized_svd(A, r, W0, oversample=P, power_iters=Q, seed=0),
        "svd_lowrank": lambda: out.update(svd_lowrank=torch.svd_lowrank(A.float(), q=w, niter=Q, M=W0.float())),
        **gemm_pass_fns(deltas, w),
    }
    times = interleaved_ms(fns, torch.device("cpu"), warmup=1, repeats=repeats)
    floor = floor_from(times)
    flops = T * (2 + 2 * Q) * 2 * m * n * w
    delta0 = deltas[0][:1].double()
    exact = torch.linalg.svdvals(delta0)
    common = {"workload": "C2", "sources": T, "m": m, "n": n, "rank": r, "dtype": "bfloat16"}
    rows = [{**common, "method": "gemm floor", "ms": floor, "gflops": flops / floor / 1e6}]
    for method in ("svdfuse", "reference", "svd_lowrank"):
        row = {**common, "method": method, "ms": times[method], "ratio_to_floor": times[method] / floor,
               "speedup_of_svdfuse": times[method] / times["svdfuse"]}
        if method in out:
            U, S, V = (t[:1, ..., :r] if t.dim() == 3 else t[:1, :r] for t in out[method])
            row |= accuracy(delta0, exact, U, S, V, leading=r // 4)
        rows.append(row)
    return rows


def c2_stages(shape: dict, repeats: int) -> list[dict]:
    """One source's sketches orthonormalized both ways, and the whole C2 SVD with each."""
    T, m, n, r = shape["sources"], shape["m"], shape["n"], shape["rank"]
    w = min(r + P, m, n)
    A32, W032 = rsvd_sources(T, m, n, torch.device("cpu"))
    A, W0 = A32.bfloat16(), W032.bfloat16()
    D = A32[0] - W032
    del A32, W032
    Y = D @ torch.randn(n, w)
    Z = D.mT @ _rsvd.householder(Y)
    chosen = cpu.ORTHONORMALIZE

    def whole(orthonormalize):
        def run():
            cpu.ORTHONORMALIZE = orthonormalize
            try:
                ops.truncated_svd(A, r, base=W0)
            finally:
                cpu.ORTHONORMALIZE = chosen

        return run

    fns = {
        f"orthonormalize ({m}, {w}) Householder": lambda: _rsvd.householder(Y),
        f"orthonormalize ({m}, {w}) CholeskyQR2": lambda: _rsvd.cholesky_qr2(Y),
        f"orthonormalize ({n}, {w}) Householder": lambda: _rsvd.householder(Z),
        f"orthonormalize ({n}, {w}) CholeskyQR2": lambda: _rsvd.cholesky_qr2(Z),
        "whole SVD Householder": whole(_rsvd.householder),
        "whole SVD CholeskyQR2": whole(_rsvd.cholesky_qr2),
    }
    times = interleaved_ms(fns, torch.device("cpu"), warmup=1, repeats=repeats)
    return [{"workload": "C2", "step": step, "ms": ms, "default": ("Householder" in step) == (chosen is _rsvd.householder)}
            for step, ms in times.items()]


def matrix_keys(base: dict) -> list[str]:
    return [key for key, t in base.items() if t.dim() == 2 and t.is_floating_point() and "embeddings" not in key]


def axis_svd_lowrank(base: dict, sources: list[dict], k: int, niter: int = Q) -> dict:
    """AXIS with one batched `torch.svd_lowrank` per shape group (all matrices × all sources),
    `niter` power iterations."""
    groups = defaultdict(list)
    for key in matrix_keys(base):
        groups[tuple(base[key].shape)].append(key)
    out = {}
    for keys in groups.values():
        delta = torch.stack([torch.stack([src[key] - base[key] for src in sources]) for key in keys])  # (G, T, m, n)
        U, S, V = torch.svd_lowrank(delta.flatten(0, 1), q=k + P, niter=niter)
        U, S, V = (t.unflatten(0, delta.shape[:2]) for t in (U, S, V))
        for g, key in enumerate(keys):
            out[key] = merge_components(list(U[g, ..., :k]), list(S[g, :, :k]), list(V[g, ..., :k]), k)
    return out


def c1_workload(small: bool) -> tuple[dict, list[dict], dict, list[dict]]:
    """C1's base and sources (whole state dicts, what `merge` gets) and the same restricted to the
    merged matrices (what the baselines get); `small`: 2 sources, two layers' matrices only."""
    base, sources = minilm_sources(C1_SMALL["sources"] if small else C1["sources"])
    keys = matrix_keys(base)
    if small:
        keys = [key for key in keys if ".layer.0." in key or ".layer.1." in key]
    base_m = {key: base[key] for key in keys}
    sources_m = [{key: src[key] for key in keys} for src in sources]
    return (base_m, sources_m, base_m, sources_m) if small else (base, sources, base_m, sources_m)


def c1(repeats: int, small: bool) -> list[dict]:
    T, k = (C1_SMALL if small else C1)["sources"], (C1_SMALL if small else C1)["k"]
    base, sources, base_m, sources_m = c1_workload(small)
    keys = list(base_m)
    shapes = defaultdict(list)
    for key in keys:
        shapes[tuple(base[key].shape)].append(torch.stack([src[key] - base[key] for src in sources]))
    deltas = [torch.cat(ds) for ds in shapes.values()]  # (matrices × sources, m, n) per shape
    w = min(k + P, *min(shapes))
    out = {}
    fns = {
        "svdfuse": lambda: out.update(svdfuse=svdfuse.merge(sources, k=k, base=base, device="cpu")),
        "svd_lowrank": lambda: out.update(svd_lowrank=axis_svd_lowrank(base_m, sources_m, k)),
        "paper": lambda: out.update(paper=axis_paper(base_m, sources_m, k)),
        **gemm_pass_fns(deltas, w),
    }
    times = interleaved_ms(fns, torch.device("cpu"), warmup=1, repeats=repeats)
    floor = floor_from(times)
    paper = out["paper"]
    merged = {"svdfuse": {key: out["svdfuse"].delta(key) for key in keys}, "svd_lowrank": out["svd_lowrank"], "paper": paper}
    common = {"workload": "C1", "sources": T, "k": k, "matrices": len(keys)}
    rows = [{**common, "method": "gemm floor (randomized SVDs)", "ms": floor}]
    for method in ("svdfuse", "svd_lowrank", "paper"):
        diff = max(((merged[method][key] - paper[key]).norm() / paper[key].norm()).item() for key in keys)
        rows.append({**common, "method": method, "ms": times[method], "ratio_to_floor": times[method] / floor,
                     "speedup_of_svdfuse": times[method] / times["svdfuse"], "max_rel_diff_to_paper": diff})
    return rows


def earlier_rows(workloads: set[str], small: bool) -> list[dict]:
    """The rows of `workloads` in the results file as it stands, each row marked with the
    date and commit of its run: a run of some workloads (`--only`) keeps the others' figures."""
    path = results_path("cpu", torch.device("cpu"), small=small)
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    run = f"{earlier['environment']['date']} {earlier['environment']['commit']}"
    return [row if "run" in row else {"run": run, **row} for row in earlier["rows"] if row.get("workload") in workloads]


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--only", nargs="+", default=["C1", "C2"], choices=["C1", "C2"])
    parser.add_argument("--stages", action="store_true", help="C2: Householder against CholeskyQR2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--notes", help="a note for the results file (the machine's load, say)")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("the CPU workloads run on the CPU: --device cpu")
    repeats = 1 if args.small else args.repeats
    shape = C2_SMALL if args.small else C2
    notes = [
        f"threads: {torch.get_num_threads()}; medians of {repeats} samples taken in turns",
        "gemm floor: (1 + q) x (forward + transposed) batched fp32 products on the same shapes, timed in this run",
        "C2 accuracy: the first source against float64 torch.linalg.svdvals; sigma_rel_leading: the leading rank/4",
        "C1: paper and svd_lowrank on the 37 merged matrices only; svdfuse.merge on the whole state dicts",
    ]
    if args.notes:
        notes.append(args.notes)
    results = Results("cpu", torch.device("cpu"), small=args.small, notes=notes)
    results.add(earlier_rows({"C1", "C2"} - set(args.only), args.small))
    if "C2" in args.only:
        results.add(c2(shape, repeats))
    if "C1" in args.only:
        results.add(c1(repeats, args.small))
    print_table(results.rows, ["workload", "method", "ms", "ratio_to_floor", "speedup_of_svdfuse", "gflops", "rec_over_optimum",
                       "sigma_rel", "sigma_rel_leading", "max_rel_diff_to_paper"])
    if args.stages and "C2" in args.only:
        steps = c2_stages(shape, repeats)
        print_table(steps, ["workload", "step", "ms", "default"])
        results.add(steps)
    print("\n".join(notes))
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
