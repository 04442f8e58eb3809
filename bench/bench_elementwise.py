"""Element-wise merges (Average, Task Arithmetic, DARE, TIES) against a plain read of the same files.

Workload: all-MiniLM-L6-v2's real weights as the base and T fine-tuned copies (every tensor
perturbed, bench_scale's `minilm`), fp32 or bf16, written once as safetensors files under --cache
(page cache warm). Each merge reads T + 1 models; its rate is their bytes over its wall time, and
the floor is a plain sequential read of the same files (`bench_scale.plain_read_gbps`), measured
beside every merge in the same run. Two modes: `memory` (state dicts already loaded,
`svdfuse.merge(...)` to an in-memory result) and `streamed` (the files merged to a directory under
a 2 GB budget). Two loads: `quiet`, and `busy`: a process this script starts spins on one core for
the whole pass. The load average seen at the start and end of each pass is recorded: the machine
may be shared.

Targets (issue 24): Average, Task Arithmetic, DARE >= 50% of the read rate, TIES >= 25%; busy >= 50%
of quiet.

    python bench/bench_elementwise.py                      # T = 8, 12, 48; fp32, bf16; memory, streamed
    python bench/bench_elementwise.py --sources 12 --dtypes fp32 --modes memory
    python bench/bench_elementwise.py --methods ties   # one method: results in elementwise-ties-<device>.json
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench_scale import _minilm_base, _perturb, plain_read_gbps
from common import Results, arg_parser, print_table

import svdfuse

METHODS = {"average": {}, "task_arithmetic": {}, "dare": {"drop_rate": 0.9}, "ties": {"density": 0.2}}
TARGETS = {"average": 0.5, "task_arithmetic": 0.5, "dare": 0.5, "ties": 0.25}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_sources(cache: Path, T: int, dtype: str) -> tuple[str, list[str]]:
    """The base and T perturbed MiniLM copies as safetensors files in `dtype`, written once."""
    root = cache / f"minilm-{dtype}"
    root.mkdir(parents=True, exist_ok=True)
    base_file = root / "base.safetensors"
    base = None
    if not base_file.exists():
        base = _minilm_base()
        save_file({k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in base.items()}, str(base_file))
    files = []
    for i in range(T):
        file = root / f"source{i}.safetensors"
        if not file.exists():
            base = base if base is not None else load_file(str(base_file))
            fp32 = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
            source = _perturb(fp32, torch.Generator().manual_seed(1000 + i))
            save_file({k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in source.items()}, str(file))
        files.append(str(file))
    return str(base_file), files


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, allocator, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _spinner() -> subprocess.Popen:
    """A process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_pass(base: str, files: list[str], T: int, dtype: str, mode: str, load: str, repeats: int, out: Path, methods: list[str]) -> list[dict]:
    nbytes = sum(os.path.getsize(f) for f in [base, *files])
    models = None
    if mode == "memory":
        models = (load_file(base), [load_file(f) for f in files])
    rows = []
    for method in methods:
        params = METHODS[method]
        read = max(plain_read_gbps([base, *files]) for _ in range(repeats + 1))

        runs = iter(range(1000))

        def merge() -> None:
            if models is not None:
                svdfuse.merge(models[1], base=models[0], method=method, device="cpu", progress=False, **params)
            else:
                target = out / f"{load}-{method}-{next(runs)}"  # svdfuse never overwrites
                svdfuse.merge(files, base=base, method=method, device="cpu", output=target, max_memory="2GB", progress=False, **params)
                shutil.rmtree(target)

        before = os.getloadavg()[0]
        seconds = _best(merge, repeats)
        gbps = nbytes / seconds / 1e9
        rows.append({
            "method": method, "T": T, "dtype": dtype, "mode": mode, "load": load, "GB": round(nbytes / 1e9, 3),
            "seconds": round(seconds, 4), "merge GB/s": round(gbps, 3), "read GB/s": round(read, 3),
            "% of read": round(100 * gbps / read, 1), "target %": 100 * TARGETS[method],
            "loadavg": f"{before:.1f}-{os.getloadavg()[0]:.1f}",
        })  # fmt: skip
        print_table(rows[-1:], list(rows[-1]))
    del models
    gc.collect()
    return rows


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--sources", type=int, nargs="+", default=[8, 12, 48])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["memory", "streamed"], choices=["memory", "streamed"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "svdfuse-bench")
    args = parser.parse_args()
    if args.small:
        args.sources, args.dtypes, args.modes, args.repeats = [2], ["fp32"], ["memory"], 1
    name = "elementwise" if args.methods == list(METHODS) else "-".join(["elementwise", *args.methods])
    results = Results(name, torch.device("cpu"), small=args.small, notes=[
        f"{os.cpu_count()} CPUs; machine shared with other jobs: see each row's loadavg (1-minute, start-end of the merge)",
        "merge GB/s: bytes of the T + 1 files over the merge's best wall time; read GB/s: best plain read of the same files, same pass",
        "busy: a process started by this script spins on one core for the whole pass",
    ])  # fmt: skip
    for T in args.sources:
        for dtype in args.dtypes:
            base, files = write_sources(args.cache, T, dtype)
            for mode in args.modes:
                with tempfile.TemporaryDirectory() as out:
                    results.add(run_pass(base, files, T, dtype, mode, "quiet", args.repeats, Path(out), args.methods))
                    spinner = _spinner()
                    try:
                        busy = run_pass(base, files, T, dtype, mode, "busy", args.repeats, Path(out), args.methods)
                    finally:
                        spinner.kill()
                        spinner.wait()
                quiet = {row["method"]: row["merge GB/s"] for row in results.rows[-len(args.methods):]}
                for row in busy:
                    row["% of quiet"] = round(100 * row["merge GB/s"] / quiet[row["method"]], 1)
                results.add(busy)
    print_table(results.rows, list(results.rows[-1]))
    print(f"wrote {results.write()}")


if __name__ == "__main__":
    main()
