"""Many LoRA adapters of one base on the CPU: AXIS and Task Arithmetic → a LoRA, vs a plain read and peft.

Workload (DESIGN.md §4, C5): T synthetic rank-16 bf16 adapters in peft's exact layout
(`adapter_config.json` + `adapter_model.safetensors`, `base_model.model.` keys) of 4 decoder
layers shaped like Llama-2-7B (q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008), all
seven projections targeted, written once under --cache. Each merge runs in a fresh process
(`svdfuse.merge(adapters, base=..., output=DIR, save_format="lora", max_memory=...)`) that reports
its wall time and peak RSS (VmHWM):

- AXIS, k = 64 per matrix (every adapter's 16 components exact, from QR of its factors);
- Task Arithmetic (scaling 1) truncated to rank 64 (the same output rank), on the factored operator.

The floors, in the same run: a plain sequential read of the same adapter files (bytes per second of
the page cache, or the disk where they do not fit), and for AXIS the float64 Grams of every
adapter's factors (BᵀB, AAᵀ: their upper triangles, (m + n)r(r + 1) flops per module, the work its exact components cannot
skip) at the rate of a large float64 GEMM here; `pct_of_compute_floor` is the
larger floor over the merge's time. The baseline: peft's
`add_weighted_adapter(combination_type="svd", svd_rank=64)` on the same adapters, which forms every
ΔW densely and runs a full SVD per module; it cannot finish the 4 layers in reasonable time on 2
cores, so it runs on the q and v projections of one layer (the modules DESIGN.md's measurement
used), beside svdfuse's AXIS on exactly those inputs.

AXIS runs twice: from a warm page cache, and from a cold one (`--cold`, default on: every adapter
file and the base dropped from the page cache by `posix_fadvise(DONTNEED)` before the plain read
and again before the merge, so both read the disk; skipped where the filesystem keeps its pages).

    python bench/bench_lora.py                   # T = 16, 128, 1000; peft at T = 16
    python bench/bench_lora.py --sources 16 --peft 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench_scale import plain_read_gbps
from common import Results, arg_parser, print_table

PROJECTIONS = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
               "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
               "mlp.down_proj": (4096, 11008)}  # fmt: skip
RANK = 16

_RUN = r"""
import json, sys, time
import svdfuse
from svdfuse.resources import peak_rss
args = json.loads(sys.argv[1])
start = time.perf_counter()
svdfuse.merge(args["sources"], args["k"], base=args["base"], method=args["method"], device="cpu", output=args["output"],
              max_memory=args["budget"], progress=False, save_format="lora", **args["params"])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}))
"""

_PEFT = r"""
import json, sys, time
import torch
from torch import nn
from peft import LoraConfig, PeftModel
from svdfuse.resources import peak_rss
args = json.loads(sys.argv[1])

class Block(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        for name, (m, n) in shapes.items():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.add_module(leaf, nn.Linear(n, m, bias=False, dtype=torch.bfloat16))

model = Block(args["shapes"])
model = PeftModel.from_pretrained(model, args["sources"][0], adapter_name="a0")
for i, path in enumerate(args["sources"][1:], 1):
    model.load_adapter(path, adapter_name=f"a{i}")
names = [f"a{i}" for i in range(len(args["sources"]))]
start = time.perf_counter()
model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="svd", svd_rank=args["k"])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}))
"""


def _adapter(path: Path, modules: dict[str, tuple[int, int]], seed: int) -> None:
    """One rank-16 bf16 adapter in peft's layout: lora_A (16, n) as peft initializes it, lora_B
    (m, 16) as training leaves it (small, not zero)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (m, n) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.rand(RANK, n, generator=gen) * 2 - 1).div_(n**0.5).bfloat16()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(m, RANK, generator=gen) * 1e-3).bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rpartition(".")[2] for name in modules})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "base_model_name_or_path": None, "task_type": None}  # fmt: skip
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))


def write_workload(root: Path, name: str, modules: dict[str, tuple[int, int]], T: int) -> tuple[str, list[str]]:
    """The bf16 base (the modules' weights and, for whole layers, their norms) and T adapters, written once."""
    root = root / name
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base.safetensors"
    if not base.exists():
        gen = torch.Generator().manual_seed(0)
        tensors = {f"{k}.weight": (torch.randn(m, n, generator=gen) / n**0.5).bfloat16() for k, (m, n) in modules.items()}
        for layer in sorted({k.split(".mlp")[0].split(".self_attn")[0] for k in modules}):
            tensors.update({f"{layer}.{norm}.weight": torch.ones(4096).bfloat16() for norm in ("input_layernorm", "post_attention_layernorm")})
        save_file(tensors, str(base))
    adapters = []
    for i in range(T):
        path = root / f"adapter{i}"
        if not (path / "adapter_config.json").exists():
            _adapter(path, modules, 1000 + i)
        adapters.append(str(path))
    return str(base), adapters


def _run(script: str, args: dict, timeout: float | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _files(adapters: list[str]) -> list[str]:
    return [str(Path(a) / "adapter_model.safetensors") for a in adapters]


def evicted(files: list[str]) -> bool:
    """Drop `files`' pages from the page cache (clean ones: each file synced first); whether it
    worked (a read that may not wait for the disk fails on the first file afterwards)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    fd = os.open(files[0], os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def gram_floor_seconds(modules: dict[str, tuple[int, int]], T: int) -> tuple[float, float]:
    """(seconds, GFLOP/s): the float64 Grams BᵀB and AAᵀ of T rank-16 adapters of `modules`, the work
    AXIS's exact components cannot skip (their upper triangles: rows · r(r + 1) flops a factor), at
    the rate of a large float64 GEMM here (torch.mm 2048 × 2048, torch's threads, measured now): the
    hardware's compute floor beside the read floor."""
    X = torch.randn(2048, 2048, dtype=torch.float64)
    torch.mm(X, X)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(X, X)
        best = min(best, time.perf_counter() - start)
    rate = 2 * 2048**3 / best
    flops = sum(T * rows * RANK * (RANK + 1) for m, n in modules.values() for rows in (m, n))
    return flops / rate, rate / 1e9


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--sources", type=int, nargs="+", default=[16, 128, 1000], help="T values (default 16 128 1000)")
    parser.add_argument("--peft", type=int, nargs="*", default=[16], help="T values at which peft's svd combination also runs (default 16)")
    parser.add_argument("--methods", nargs="+", default=["axis", "task_arithmetic"])
    parser.add_argument("--budget", default="4GB", help="max_memory of every merge (default 4GB)")
    parser.add_argument("--peft-timeout", type=float, default=1800, help="seconds peft's svd combination may take before it counts as not finished (default 1800)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "svdfuse-bench-lora"))
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True, help="AXIS again from a cold page cache (default on)")
    args = parser.parse_args()
    layers = 1 if args.small else 4
    modules = {f"model.layers.{i}.{p}": shape for i in range(layers) for p, shape in PROJECTIONS.items()}
    if args.small:
        modules = {k: (m // 16, n // 16) for k, (m, n) in modules.items()}
    results = Results("lora", torch.device("cpu"), small=args.small, notes=[
        f"2 cores shared; OMP threads {torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.1f}",
        f"{layers} Llama-2-7B-shaped decoder layers, rank-{RANK} bf16 adapters, k = 64, budget {args.budget}",
        "peft: add_weighted_adapter(combination_type='svd', svd_rank=64) on q_proj and v_proj of one layer, svdfuse AXIS on the same inputs",
    ])  # fmt: skip
    rows = results.rows
    root = Path(args.cache)
    for T in args.sources:
        base, adapters = write_workload(root, "small" if args.small else "llama7b-4", modules, T)
        nbytes = sum(os.path.getsize(f) for f in _files(adapters))
        plain_read_gbps(_files(adapters))  # warm what the page cache holds
        floor = plain_read_gbps(_files(adapters))
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                params = {"scaling": 1.0} if method == "task_arithmetic" else {}
                measured = _run(_RUN, {"base": base, "sources": adapters, "k": 64, "method": method, "output": f"{tmp}/out", "budget": args.budget, "params": params})
            gbps = nbytes / measured["seconds"] / 1e9
            rows.append({"T": T, "modules": len(modules), "method": f"svdfuse {method} -> lora", "page_cache": "warm", "adapter_GB": nbytes / 1e9, "seconds": measured["seconds"],
                         "GB_per_s": gbps, "plain_read_GB_per_s": floor, "pct_of_read": 100 * gbps / floor, "peak_rss_GiB": measured["peak_rss"] / 2**30})  # fmt: skip
            if method == "axis":
                gram_s, gram_gflops = gram_floor_seconds(modules, T)
                rows[-1].update({"gram_floor_s": gram_s, "gram_GFLOP_per_s": gram_gflops, "pct_of_compute_floor": 100 * max(gram_s, nbytes / floor / 1e9) / measured["seconds"]})
            results.write()
            print_table(rows[-1:], list(rows[-1]))
        if args.cold and "axis" in args.methods:
            files = [*_files(adapters), base]
            if not evicted(files):
                results.notes.append("cold rows skipped: this filesystem keeps the files' pages cached")
            else:
                cold_floor = plain_read_gbps(_files(adapters))
                evicted(files)
                with tempfile.TemporaryDirectory() as tmp:
                    measured = _run(_RUN, {"base": base, "sources": adapters, "k": 64, "method": "axis", "output": f"{tmp}/out", "budget": args.budget, "params": {}})
                gbps = nbytes / measured["seconds"] / 1e9
                rows.append({"T": T, "modules": len(modules), "method": "svdfuse axis -> lora", "page_cache": "cold", "adapter_GB": nbytes / 1e9, "seconds": measured["seconds"],
                             "GB_per_s": gbps, "plain_read_GB_per_s": cold_floor, "pct_of_read": 100 * gbps / cold_floor, "peak_rss_GiB": measured["peak_rss"] / 2**30})  # fmt: skip
                results.write()
                print_table(rows[-1:], list(rows[-1]))
        if T in (args.peft or []):
            qv = {k: v for k, v in modules.items() if k.startswith("model.layers.0.") and k.endswith(("q_proj", "v_proj"))}
            sbase, subset = write_workload(root, "small-qv" if args.small else "llama7b-qv", qv, T)
            nb = sum(os.path.getsize(f) for f in _files(subset))
            with tempfile.TemporaryDirectory() as tmp:
                ours = _run(_RUN, {"base": sbase, "sources": subset, "k": 64, "method": "axis", "output": f"{tmp}/out", "budget": args.budget, "params": {}})
            shapes = {k: list(v) for k, v in qv.items()}
            try:
                theirs = _run(_PEFT, {"sources": subset, "k": 64, "shapes": shapes}, timeout=args.peft_timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                theirs = None
                print(f"peft did not finish at T = {T}: {err} (exit -9 is SIGKILL: the kernel log says whether the OOM killer sent it)")
                results.notes.append(f"peft's svd combination did not finish at T = {T}: {err}")
            for who, got in (("svdfuse axis -> lora", ours), ("peft svd", theirs)):
                if got is not None:
                    rows.append({"T": T, "modules": len(qv), "method": who, "page_cache": "warm", "adapter_GB": nb / 1e9, "seconds": got["seconds"], "GB_per_s": nb / got["seconds"] / 1e9,
                                 "plain_read_GB_per_s": None, "pct_of_read": None, "peak_rss_GiB": got["peak_rss"] / 2**30})  # fmt: skip
            if theirs is not None:
                rows[-1]["speedup_of_svdfuse"] = theirs["seconds"] / ours["seconds"]
            results.write()
            print_table(rows[-2:], list(rows[-2]))
    print_table(rows, list(rows[0]))
    print(f"wrote {results.write()}")


if __name__ == "__main__":
    main()
