"""L1–L3 (DESIGN.md §4): `svdfuse.ops.lowrank_matmul`, `y = ((x V) ⊙ σ) Uᵀ`, vs torch; and
whole merged models served low-rank vs dense.

Square layers d × d of rank K, bf16, no base (the low-rank part alone, as in DESIGN.md). Every
configuration times, in one process: svdfuse; the two-matmul torch sequence `((x @ V) * S) @ U.T`;
and the dense `x @ W.T` with W = U diag(σ) Vᵀ materialized.

- L1: d = 4096, 8192; K = 64, 128, 256; batch 1, 4, 16.
- L2: the same layers at batch 4096 (target: ≤ 1.1× the two matmuls).
- L3: batch 64 where each row takes its own σ (S: (64, K), `task` picks the row) vs one σ for
  all rows (target: ≤ 1.2×). Runs only where `ops.lowrank_matmul` has the `task` argument.
- models: a MiniLM-config BertModel (sequence 128) and open_clip ViT-B-32's image encoder (if
  importable) merged by svdfuse, `result.to_module(base)` vs the same model materialized dense,
  batch 1 and 64, bf16 on the GPU (fp32 on the CPU); at batch 64 also 8 adaptations stacked and
  served in one batch, a σ per request (`served_ms`, `ratio_served` over the one-σ model).

Timing: single ops run µs-scale, so each is timed two ways (common.fast_op_us): `graph` replays
50 calls from one CUDA graph (the kernels' own time, the headline) and `loop` issues 50 eager
calls per sample (what Python serving pays, launch overhead included). Models are timed eagerly
only (5 forwards per sample): Hugging Face forwards may synchronize with the host, which a CUDA
graph cannot capture.

Floor: bytes of U, V, x and y at 3.0 TB/s, or the bf16 FLOP floor 2·batch·K·2d at 744 TFLOP/s,
whichever is larger (bytes for every shape here).

    python bench/bench_lowrank_matmul.py
    python bench/bench_lowrank_matmul.py --device cpu --small
"""

from __future__ import annotations

import functools
import inspect

import torch

import merged_models
from common import BF16_GEMM_FLOPS, Results, arg_parser, fast_op_us, floor_ms, median_ms, pct_of_floor, print_table
from svdfuse import ops
from svdfuse.serving import serve_tasks

FULL = {
    "L1": {"d": (4096, 8192), "K": (64, 128, 256), "batch": (1, 4, 16)},
    "L2": {"d": (4096, 8192), "K": (64, 128, 256), "batch": (4096,)},
    "L3": {"d": (4096, 8192), "K": (64, 128, 256), "batch": (64,)},
    "models": {"batch": (1, 64)},
}
SERVED_TASKS = 8  # adaptations served in one batch by the model rows (request b runs task b mod 8)
SMALL = {
    "L1": {"d": (256,), "K": (16,), "batch": (1, 4)},
    "L2": {"d": (256,), "K": (16,), "batch": (64,)},
    "L3": {"d": (256,), "K": (16,), "batch": (8,)},
    "models": {"batch": (1, 2)},
}


def supports_task() -> bool:
    """Whether this checkout's `ops.lowrank_matmul` takes a per-row σ selector `task`."""
    return "task" in inspect.signature(ops.lowrank_matmul).parameters


def layer(d: int, K: int, dtype: torch.dtype, device: torch.device, tasks: int | None = None, seed: int = 0):
    """U (d, K), S (K,) or (tasks, K), V (d, K) with O(1) outputs for unit-variance inputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    U = torch.randn(d, K, generator=gen, device=device) / K**0.5
    V = torch.randn(d, K, generator=gen, device=device) / d**0.5
    S = torch.rand((K,) if tasks is None else (tasks, K), generator=gen, device=device) + 0.5
    return U.to(dtype), S.to(dtype), V.to(dtype)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _headline(timings: dict[str, dict]) -> str:
    """graph if every method could be captured, else loop: ratios compare like with like."""
    return "graph" if all(t["graph_us"] is not None for t in timings.values()) else "loop"


def single_op(workload: str, d: int, K: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    U, S, V = layer(d, K, dtype, device)
    x = torch.randn(batch, d, device=device).to(dtype)
    W = ((U.float() * S.float()) @ V.float().T).to(dtype)
    fns = {
        "svdfuse": lambda: ops.lowrank_matmul(x, U, S, V),
        "two_matmul": lambda: ((x @ V) * S) @ U.T,
        "dense": lambda: x @ W.T,
    }
    ref = ((x.float() @ V.float()) * S.float()) @ U.float().T
    inner = 20 if batch >= 1024 else 50
    timings = {name: fast_op_us(fn, device, inner=inner) for name, fn in fns.items()}
    mode = _headline(timings)
    el = x.element_size()
    floor = 1e3 * floor_ms(bytes_moved=(2 * d * K + 2 * batch * d) * el, flops=2 * batch * K * 2 * d, flops_per_s=BF16_GEMM_FLOPS)
    us = {name: t[f"{mode}_us"] for name, t in timings.items()}
    return {
        "workload": workload, "d": d, "K": K, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "timing": mode,
        **{f"{name}_us": v for name, v in us.items()},
        **{f"{name}_loop_us": t["loop_us"] for name, t in timings.items()},
        "ratio_two_matmul": us["svdfuse"] / us["two_matmul"], "ratio_dense": us["svdfuse"] / us["dense"],
        "floor_us": floor, "pct_floor": pct_of_floor(floor, us["svdfuse"]),
        "err_svdfuse": _rel_err(fns["svdfuse"](), ref), "err_two_matmul": _rel_err(fns["two_matmul"](), ref),
    }


def per_row_sigma(d: int, K: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    U, S_tasks, V = layer(d, K, dtype, device, tasks=batch)
    S = S_tasks[0].contiguous()
    x = torch.randn(batch, d, device=device).to(dtype)
    task = torch.arange(batch, device=device)  # every row a different σ
    fns = {
        "svdfuse_task": lambda: ops.lowrank_matmul(x, U, S_tasks, V, task=task),
        "svdfuse_one_sigma": lambda: ops.lowrank_matmul(x, U, S, V),
        "torch_task": lambda: ((x @ V) * S_tasks[task]) @ U.T,
    }
    ref = ((x.float() @ V.float()) * S_tasks.float()[task]) @ U.float().T
    timings = {name: fast_op_us(fn, device) for name, fn in fns.items()}
    mode = _headline(timings)
    us = {name: t[f"{mode}_us"] for name, t in timings.items()}
    return {
        "workload": "L3", "d": d, "K": K, "batch": batch, "tasks": batch, "dtype": str(dtype).removeprefix("torch."), "timing": mode,
        **{f"{name}_us": v for name, v in us.items()},
        **{f"{name}_loop_us": t["loop_us"] for name, t in timings.items()},
        "ratio_one_sigma": us["svdfuse_task"] / us["svdfuse_one_sigma"], "ratio_torch_task": us["svdfuse_task"] / us["torch_task"],
        "err_svdfuse_task": _rel_err(fns["svdfuse_task"](), ref),
    }


def _served(forward, stacked: torch.nn.Module, ids: torch.Tensor, x):
    """One forward of a stacked model, request b with the σ of task ids[b]."""
    with serve_tasks(stacked, ids):
        return forward(stacked, x)


@torch.inference_mode()
def model_forwards(batches: tuple[int, ...], device: torch.device, small: bool) -> tuple[list[dict], list[str]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, notes = [], []
    for name, missing in merged_models.available().items():
        if missing:
            notes.append(f"model {name} skipped: {missing}")
            print(notes[-1])
            continue
        built = merged_models.build(name, device, dtype, small=small, sources=2 if small else 3)
        for batch in batches:
            x = built["inputs"](batch)
            run = {kind: functools.partial(built["forward"], built[kind], x) for kind in ("lowrank", "dense")}
            reps = dict(warmup=1, repeats=2, inner=1) if small else dict(warmup=2, repeats=10, inner=5)
            ms = {kind: median_ms(fn, device, **reps) for kind, fn in run.items()}
            y, y_dense = run["lowrank"]().float(), run["dense"]().float()
            row = {"workload": "model", "model": name, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                   "k": built["k"], "timing": "loop", "lowrank_ms": ms["lowrank"], "dense_ms": ms["dense"],
                   "ratio_dense": ms["lowrank"] / ms["dense"], "rel_diff_vs_dense": _rel_err(y, y_dense)}
            if batch > 1:  # the whole model serving a σ per request (the model-level L3)
                ids = torch.arange(batch, device=device) % SERVED_TASKS
                served = functools.partial(_served, built["forward"], built["stacked"](SERVED_TASKS), ids, x)
                ms["served"] = median_ms(served, device, **reps)
                row.update(tasks=SERVED_TASKS, served_ms=ms["served"], ratio_served=ms["served"] / ms["lowrank"])
                del served
            rows.append(row)
        del built
    return rows, notes


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--only", nargs="+", default=list(FULL), choices=list(FULL))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    grid = SMALL if args.small else FULL
    results = Results("lowrank_matmul", device, small=args.small, notes=[
        "timing 'graph': 50 calls replayed from one CUDA graph; 'loop': eager calls; *_loop_us always eager",
        "ratio_*: svdfuse time over the baseline's (< 1: svdfuse faster)",
        "floor_us: max(bytes of U, V, x, y at 3.0 TB/s, 2*batch*K*2d FLOP at 744 TFLOP/s bf16)"])
    rows = []  # L1 and L2, each row written the moment it is measured
    for workload in ("L1", "L2"):
        if workload in args.only:
            g = grid[workload]
            rows += [results.add([single_op(workload, d, K, b, dtype, device)])[0] for d in g["d"] for K in g["K"] for b in g["batch"]]
    if rows:
        print_table(rows, ["workload", "d", "K", "batch", "timing", "svdfuse_us", "two_matmul_us", "dense_us", "ratio_two_matmul",
                           "ratio_dense", "floor_us", "pct_floor", "svdfuse_loop_us", "err_svdfuse", "err_two_matmul"])
    if "L3" in args.only:
        if supports_task():
            g = grid["L3"]
            l3 = [results.add([per_row_sigma(d, K, b, dtype, device)])[0] for d in g["d"] for K in g["K"] for b in g["batch"]]
            print_table(l3, ["d", "K", "batch", "timing", "svdfuse_task_us", "svdfuse_one_sigma_us", "torch_task_us",
                             "ratio_one_sigma", "ratio_torch_task", "err_svdfuse_task"])
        else:
            results.notes.append("L3 skipped: ops.lowrank_matmul in this checkout has no `task` argument")
            results.write()
            print(results.notes[-1])
    if "models" in args.only:
        model_rows, model_notes = model_forwards(grid["models"]["batch"], device, args.small)
        results.notes += model_notes
        results.add(model_rows)
        print_table(model_rows, ["model", "batch", "dtype", "k", "lowrank_ms", "dense_ms", "ratio_dense", "served_ms", "ratio_served",
                                 "rel_diff_vs_dense"])
    print(f"wrote {results.write()}")


if __name__ == "__main__":
    main()
