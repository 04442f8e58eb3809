"""Agreement of svdfuse's runs of mergekit configs with mergekit 0.1.5 itself, on the same inputs.

Both tools merge the same tiny Llama (transformers' save_pretrained, fp32, 3 fine-tunes with
seeded task vectors) from one YAML config; two variants of the values: continuous fp32, and on
the bf16 grid (as fine-tunes trained in bf16), where many task-vector magnitudes tie. Counts the
elements that differ, the largest difference in units of eps x the largest input there, and for
TIES how many differences remain once each tool's rule for tied magnitudes is taken into account.
DARE is random in both: with one source, the kept fraction and the rescale factor per tensor.
Not a timing benchmark. Needs mergekit 0.1.5 (`pip install mergekit==0.1.5`, in the test extra).

    python bench/compare_mergekit.py      # -> bench/results/mergekit-<device>.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import svdfuse  # noqa: E402
from _helpers import mergekit_ties, tiny_llama_dirs  # noqa: E402
from common import print_table, record  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def run_mergekit(text: str, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options=MergeOptions(allow_crimes=True, copy_tokenizer=False, quiet=True))
    return load_file(out / "model.safetensors")


def config(method: str, base: Path, sources: list[Path], weights: list[float], density: float | None, extra: str = "") -> str:
    models = "".join(f"  - model: {s}\n    parameters: {{weight: {w}{'' if density is None else f', density: {density}'}}}\n" for s, w in zip(sources, weights))
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}dtype: float32\n{extra}"


def both(text: str, root: Path, name: str) -> tuple[dict, dict]:
    (root / f"{name}.yml").write_text(text)
    theirs = run_mergekit(text, root / f"mk-{name}")
    ours = svdfuse.merge_config(root / f"{name}.yml", device="cpu").state_dict()
    return ours, theirs


def agreement(ours: dict, theirs: dict, inputs: list[dict]) -> dict:
    total = sum(v.numel() for v in theirs.values())
    differ, worst = 0, 0.0
    for key, value in theirs.items():
        differ += int((ours[key] != value).sum())
        scale = torch.stack([m[key].abs() for m in inputs]).amax(0)
        worst = max(worst, float(((ours[key] - value).abs() / (EPS * scale)).max()))
    return {"elements": total, "differ": differ, "agree_pct": 100 * (1 - differ / total), "max_diff_eps_x_input": worst}


def dare_stats(ours: dict, theirs: dict, W0: dict, W: dict, density: float) -> dict:
    """One source, weight 1: the kept fraction and the factor survivors are scaled by, per tensor."""
    rows = {}
    for tool, merged in (("svdfuse", ours), ("mergekit", theirs)):
        kept, factors = [], []
        for key, w0 in W0.items():
            delta, tau = merged[key].double() - w0.double(), W[key].double() - w0.double()
            alive = delta != 0
            kept.append(float(alive.double().mean()))
            if bool(alive.any()):
                factors.append(float((delta[alive] / tau[alive]).median()))
        rows[tool] = {"kept_mean": sum(kept) / len(kept), "kept_min": min(kept), "kept_max": max(kept),
                      "factor_min": min(factors), "factor_max": max(factors), "one_over_density": 1 / density}
    return rows


def main() -> None:
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for grid in (False, True):
            root = Path(tmp) / ("grid" if grid else "fp32")
            base, sources = tiny_llama_dirs(root, 3, grid=grid)
            W0 = load_file(base / "model.safetensors")
            W = [load_file(p / "model.safetensors") for p in sources]
            values = "bf16 grid" if grid else "fp32"
            cases = [
                ("task_arithmetic", config("task_arithmetic", base, sources, [0.7, 0.5, 1.3], None, "parameters:\n  lambda: 0.9\n")),
                ("ties", config("ties", base, sources, [1.0, 1.0, 1.0], 0.2)),
                ("ties weighted, lambda", config("ties", base, sources, [0.7, 0.5, 1.3], 0.2, "parameters:\n  lambda: 0.9\n")),
                ("linear", config("linear", base, sources, [0.7, 0.5, 1.3], None, "parameters:\n  weight: 0.25\n")),
                ("dare_linear density 1", config("dare_linear", base, sources, [0.7, 0.5, 1.3], 1.0)),
            ]
            for i, (name, text) in enumerate(cases):
                ours, theirs = both(text, root, f"case{i}")
                row = {"values": values, "config": name, **agreement(ours, theirs, [W0, *W])}
                if name == "ties":
                    argsort = mergekit_ties(W0, W, 0.2, lambda a: torch.argsort(a, descending=True))
                    stable = mergekit_ties(W0, W, 0.2, lambda a: torch.sort(a, descending=True, stable=True).indices)
                    row["mergekit_vs_formula_argsort_ties"] = agreement(argsort, theirs, [W0, *W])["differ"]
                    row["svdfuse_vs_formula_first_ties"] = agreement(stable, ours, [W0, *W])["differ"]
                    # svdfuse's own default election (no sign where the trimmed values sum to exactly 0)
                    unsigned = svdfuse.merge([str(p) for p in sources], base=str(base), method="ties", density=0.2, weights=[1.0] * 3, device="cpu").state_dict()
                    row["zero_sign_none_differ"] = agreement(unsigned, theirs, [W0, *W])["differ"]
                rows.append(row)
            if not grid:
                ours, theirs = both(config("dare_linear", base, sources[:1], [1.0], 0.5), root, "dare")
                for tool, stats in dare_stats(ours, theirs, W0, W[0], 0.5).items():
                    notes.append(f"dare_linear, one source, density 0.5, {tool}: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    notes += [
        "mergekit 0.1.5 against svdfuse.merge_config on the same YAML; tiny Llama (2 layers, hidden 64, vocab 256) from "
        "tests/_helpers.tiny_llama_dirs, 3 fine-tunes with seeded task vectors; fp32 values, or rounded to the bf16 grid",
        "ties differences on the bf16 grid: mergekit keeps the top max(1, int(density n)) |tau| in torch.argsort order, so among "
        "magnitudes tied at the threshold it keeps whichever argsort puts first; svdfuse keeps the first in row-major order. "
        "mergekit_vs_formula_argsort_ties = 0 and svdfuse_vs_formula_first_ties = 0: with each tool's tie rule the formula is "
        "exact, so every difference is a tie at the threshold",
        "zero_sign_none_differ: the same TIES with svdfuse's default zero_sign='none' (an entry whose trimmed values sum to "
        "exactly 0 keeps the base) against mergekit, which elects + there; mergekit configs run with zero_sign='positive'",
        "mergekit 0.1.5 fails on BERT directories (all-MiniLM-L6-v2): plan.py:186 builds [w_in.name] + (w_in.aliases or []) "
        "for optional weights, and WeightInfo.aliases is a tuple; BERT's optional embeddings.position_ids has aliases",
    ]
    print_table(rows, list(dict.fromkeys(k for row in rows for k in row)))
    for note in notes:
        print("-", note)
    print(record("mergekit", torch.device("cpu"), rows, notes=notes))


if __name__ == "__main__":
    main()
