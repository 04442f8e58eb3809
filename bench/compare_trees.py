"""svdfuse checkouts timed against each other in the same run: C1 and AXIS over 48 MiniLM
sources from the CLI (issue 24, item 3).

C1 (`bench_cpu.py`'s workload: real all-MiniLM-L6-v2 + 6 perturbed copies, k = 38, in memory):
each checkout runs in a process of its own, in turns (before, after, before, after, ...), and
times in that process `svdfuse.merge` and the same AXIS with one batched `torch.svd_lowrank` per
shape group (`bench_cpu.axis_svd_lowrank`) at q = 3 and at q = 2, alternately. CLI: `svdfuse merge
--method axis -k 0.05` over `bench_scale.py`'s 48 MiniLM source files with `--max-memory 2GB`, each
checkout by `python -m svdfuse` with PYTHONPATH on it, in turns. Load averages are recorded with
every sample: the machine is shared, so only what was measured in the same run compares.

    python bench/compare_trees.py BEFORE_TREE AFTER_TREE --rounds 3 [--cli] [--labels before after]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(tree: str, repeats: int) -> dict:
    """In a process whose svdfuse is `tree`'s: C1's merge and the svd_lowrank baselines, seconds."""
    import torch

    import svdfuse
    from bench_cpu import C1, P, axis_svd_lowrank, c1_workload

    assert Path(svdfuse.__file__).resolve().is_relative_to(Path(tree).resolve()), svdfuse.__file__
    base, sources, base_m, sources_m = c1_workload(False)
    k = C1["k"]
    fns = {
        "merge": lambda: svdfuse.merge(sources, k=k, base=base, device="cpu"),
        "svd_lowrank q=3": lambda: axis_svd_lowrank(base_m, sources_m, k, niter=3),
        "svd_lowrank q=2": lambda: axis_svd_lowrank(base_m, sources_m, k, niter=2),
    }
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"times": times, "threads": torch.get_num_threads(), "oversample": P}


ACCURACY = {"axis": {"k": 38}, "tsv_m": {}, "iso_c": {}, "iso_cts": {}}


def accuracy(tree: str) -> dict:
    """Per SVD method, in `tree`: the worst relative Frobenius difference over the merged matrices
    between a merge of fp32 sources and the same merge in float64 (bench_cpu's small C1: real
    MiniLM, two layers' 12 matrices, here 3 sources)."""
    import torch

    import svdfuse
    from workloads import minilm_sources

    assert Path(svdfuse.__file__).resolve().is_relative_to(Path(tree).resolve()), svdfuse.__file__
    base, sources = minilm_sources(3)
    keys = [key for key, t in base.items() if t.dim() == 2 and "embeddings" not in key and (".layer.0." in key or ".layer.1." in key)]
    base, sources = {key: base[key] for key in keys}, [{key: src[key] for key in keys} for src in sources]
    wide = lambda state: {key: t.double() for key, t in state.items()}  # noqa: E731
    out = {}
    for method, params in ACCURACY.items():
        narrow = svdfuse.merge(sources, base=base, method=method, device="cpu", **params).state_dict()
        exact = svdfuse.merge([wide(s) for s in sources], base=wide(base), method=method, device="cpu", **params).state_dict()
        out[method] = max(float(((narrow[key].double() - base[key].double()) - (exact[key] - base[key].double())).norm()
                                / (exact[key] - base[key].double()).norm()) for key in keys)
    return out


def run_child(tree: str, repeats: int, *flags: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, str(HERE)])}
    out = subprocess.run([sys.executable, __file__, "--child", tree, "--repeats", str(repeats), *flags], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_cli(tree: str, base: str, files: list[str], out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "svdfuse", "merge", *files, "--base", base, "--method", "axis", "-k", "0.05",
                    "--max-memory", "2GB", "--device", "cpu", "--quiet", "-o", str(out)], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="checkouts, the first the baseline")
    parser.add_argument("--labels", nargs="+", help="a name per checkout (default: before, after)")
    parser.add_argument("--child")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cli", action="store_true", help="also AXIS over 48 MiniLM source files from the CLI")
    parser.add_argument("--no-c1", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="also each SVD method's fp32 merge against its float64 merge")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "svdfuse-bench"))
    parser.add_argument("--output", default=str(HERE / "results" / "compare_trees-x86_64.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(accuracy(args.child) if args.accuracy else child(args.child, args.repeats)))
        return
    samples = []
    names = dict(zip(args.labels or ["before", "after"], args.trees, strict=True))
    for r in range(args.rounds if not args.no_c1 else 0):
        for label, tree in names.items():
            result = run_child(tree, args.repeats)
            samples.append({"workload": "C1", "tree": label, "round": r, "loadavg": os.getloadavg(), **result})
            print(label, {k: [round(t, 3) for t in v] for k, v in result["times"].items()}, "load", os.getloadavg(), flush=True)
    if args.accuracy:
        for label, tree in names.items():
            samples.append({"workload": "fp32 against float64 merge", "tree": label, **run_child(tree, 0, "--accuracy")})
            print(label, samples[-1], flush=True)
    if args.cli:
        from bench_scale import write_sources

        base, files = write_sources(Path(args.cache), "minilm", 48)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for label, tree in names.items():
                    seconds = run_cli(tree, base, files, Path(tmp) / f"{label}{r}")
                    samples.append({"workload": "CLI axis 48 minilm", "tree": label, "round": r, "loadavg": os.getloadavg(), "seconds": seconds})
                    print(label, "cli", round(seconds, 2), "load", os.getloadavg(), flush=True)
    summary = []
    for label in names:
        c1 = [s for s in samples if s["workload"] == "C1" and s["tree"] == label]
        if c1:
            med = {name: statistics.median(t for s in c1 for t in s["times"][name]) for name in c1[0]["times"]}
            summary.append({"workload": "C1", "tree": label, **{f"{k} s": v for k, v in med.items()},
                            "merge / svd_lowrank q=3": med["merge"] / med["svd_lowrank q=3"],
                            "merge / svd_lowrank q=2": med["merge"] / med["svd_lowrank q=2"]})
        cli = [s["seconds"] for s in samples if s["workload"].startswith("CLI") and s["tree"] == label]
        if cli:
            summary.append({"workload": "CLI axis 48 minilm", "tree": label, "median s": statistics.median(cli), "best s": min(cli)})
    summary += [s for s in samples if s["workload"].startswith("fp32")]
    print(json.dumps(summary, indent=1))
    Path(args.output).write_text(json.dumps({"trees": names, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                             "summary": summary, "samples": samples}, indent=1))
    print("wrote", args.output)


if __name__ == "__main__":
    main()
