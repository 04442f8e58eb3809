"""The study's results as markdown tables and PNG plots, from results.json.

Every comparison is a paired difference AXIS − baseline with its 95% bootstrap interval
(`stats`); an ordering is stated only where the interval excludes 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from svdfuse.study.stats import Interval, paired_difference, pooled_difference, verdict

__all__ = ["write_report", "markdown", "correctness"]

AXIS_VARIANTS = ("axis/delta", "axis/weight", "axis/extend")


def correctness(runs: list[dict], modality: str, target: str, shots: int, variant: str) -> np.ndarray | None:
    """Per-example test correctness (seeds, examples), rows in seed order; None if not run."""
    rows = sorted((r for r in runs if (r["modality"], r["target"], r["shots"], r["variant"]) == (modality, target, shots, variant)), key=lambda r: r["seed"])
    if not rows:
        return None
    return np.array([[c == "1" for c in r["correct"]] for r in rows])


def _cell(i: Interval) -> str:
    return f"{i.mean:+.1f} [{i.lo:+.1f}, {i.hi:+.1f}] {verdict(i)}"


def _accuracy(runs: list[dict], modality: str, targets: list[str], shots: int, variant: str, resamples: int) -> Interval | None:
    """Mean test accuracy over targets and seeds, with its bootstrap interval."""
    mats = [correctness(runs, modality, t, shots, variant) for t in targets]
    if any(m is None for m in mats):
        return None
    return pooled_difference([(m, np.zeros_like(m)) for m in mats], resamples)


def _differences(results: dict[str, Any], modality: str, axis: str, shots: int) -> dict[str, dict[str, Interval]]:
    """baseline -> target (and "all") -> AXIS variant `axis` minus the baseline."""
    runs, resamples = results["runs"], results["config"]["resamples"]
    info = results["modalities"][modality]
    targets = list(info["tasks"])
    out = {}
    for baseline in info["variants"]:
        if baseline == axis:
            continue
        pairs = [(correctness(runs, modality, t, shots, axis), correctness(runs, modality, t, shots, baseline)) for t in targets]
        if any(a is None or b is None for a, b in pairs):
            continue
        cells = {t: paired_difference(a, b, resamples) for t, (a, b) in zip(targets, pairs)}
        cells["all"] = pooled_difference(pairs, resamples)
        out[baseline] = cells
    return out


def _modality_md(results: dict[str, Any], modality: str) -> list[str]:
    config, runs = results["config"], results["runs"]
    info = results["modalities"][modality]
    targets, labels = list(info["tasks"]), info["variants"]
    lines = [
        f"## {modality}: {info['backbone']}, {len(targets)} targets (leave-one-out, {len(targets) - 1} sources each)",
        "",
        f"Merged and fine-tuned matrices: `{', '.join(info['include'])}`. N = {config['n']:g}, AXIS's K = {config['k']:g} of min(m, n) per matrix. "
        f"Seeds {', '.join(map(str, config['seeds']))} redraw the few-shot examples"
        + (f"; at {config['source_seeds_at']}-shot they also re-fine-tune the sources." if config["source_seeds_at"] is not None else "."),
        "",
        "| task | classes | pool / val / test | linear probe (val %) | sources' lr per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for t, d in info["tasks"].items():
        lrs = ", ".join(f"{s}: {lr:g}" for s, lr in info["finetune_lr"].get(t, {}).items())
        lines.append(f"| {t} ({d['source']}) | {d['classes']} | {d['train']} / {d['val']} / {d['test']} | {info['probes'][t]:.1f} | {lrs} |")
    lines += [
        "",
        f"### Chosen on validation ({config['tune_shots']}-shot, seed 0, mean over all targets), before any test split was read",
        "",
        "| variant | merge parameters | validation of the merged features' probe (%) | Stage-2 lr | validation after Stage 2 (%) |",
        "|---|---|---:|---:|---:|",
    ]
    for v, c in info["choices"].items():
        params = ", ".join(f"{k} = {x:.3g}" for k, x in c["params"].items()) or "—"
        chosen = c["merge_scores"][json.dumps(c["params"], sort_keys=True)]
        tried = "; ".join(f"{k}: {s:.1f}" for k, s in c["merge_scores"].items()) if len(c["merge_scores"]) > 1 else ""
        lr_tried = "; ".join(f"{k}: {s:.1f}" for k, s in c["lr_scores"].items())
        lines.append(f"| {labels[v]} | {params}{f' (tried {tried})' if tried else ''} | {chosen:.2f} | {c['lr']:g} (tried {lr_tried}) | {c['lr_scores'][str(c['lr'])]:.2f} |")
    lines += [
        "",
        "### Mean test accuracy (%) over targets and seeds, with 95% bootstrap intervals",
        "",
        "| variant | " + " | ".join(f"{s}-shot" for s in config["shots"]) + " | trainable (σ / coefficients) |",
        "|---|" + "---:|" * (len(config["shots"]) + 1),
    ]
    for v, label in labels.items():
        cells = []
        for shots in config["shots"]:
            acc = _accuracy(runs, modality, targets, shots, v, config["resamples"])
            cells.append("—" if acc is None else f"{acc.mean:.1f} [{acc.lo:.1f}, {acc.hi:.1f}]")
        trainable = next((r["trainable"] for r in runs if r["modality"] == modality and r["variant"] == v), None)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {trainable if trainable is not None else '—'} |")
    lines.append("")
    held = []
    for axis in AXIS_VARIANTS:
        for shots in config["shots"]:
            diffs = _differences(results, modality, axis, shots)
            if not diffs:
                continue
            lines += [
                f"### {labels[axis]} − baseline, {shots}-shot: test points, mean [95% interval], > or < where the interval excludes 0, ≈ where not",
                "",
                "| baseline | " + " | ".join(targets) + " | all targets |",
                "|---|" + "---:|" * (len(targets) + 1),
            ]
            for baseline, cells in diffs.items():
                lines.append(f"| {labels[baseline]} | " + " | ".join(_cell(cells[t]) for t in (*targets, "all")) + " |")
                if verdict(cells["all"]) != "≈":
                    held.append(f"- {shots}-shot: {labels[axis]} {verdict(cells['all'])} {labels[baseline]} ({_cell(cells['all'])}, all targets)")
            lines.append("")
    lines += ["### Orderings that hold with confidence (over all targets; per-target cells above)", ""]
    lines += held or ["- none: every interval over all targets holds 0"]
    lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole report as markdown."""
    m, config = results["machine"], results["config"]
    lines = [
        "# svdfuse transfer study: leave-one-out, few-shot targets, every method tuned alike on validation",
        "",
        f"Machine: {m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['platform']}; torch {m['torch']}, Python {m['python']}. "
        f"Commit {m['commit']}{' (with uncommitted changes)' if m['dirty'] else ''}; run {m['date']}, {results.get('seconds', 0) / 60:.1f} min.",
        "",
        f"Protocol: sources fine-tuned on each task's whole training pool; targets at {', '.join(map(str, config['shots']))} examples per class, "
        f"{config['val']} validation and {config['test']} test examples each. Every variant's head starts from a probe refitted on its own merged "
        f"features and trains jointly with its Stage-2 parameters (AdamW, cosine, at most {config['schedule']['epochs']} epochs, head lr "
        f"{config['schedule']['head_lr']:g}, the epoch with the best validation accuracy kept). Intervals: {config['resamples']} bootstrap "
        "resamples of seeds and test examples, paired.",
        "",
    ]
    for modality in results["modalities"]:
        lines += _modality_md(results, modality)
    return "\n".join(lines)


def _plots(results: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    config, runs = results["config"], results["runs"]
    mods = list(results["modalities"])
    fig, axes = plt.subplots(2, len(mods), figsize=(7 * len(mods), 9), squeeze=False)
    for col, modality in enumerate(mods):
        info = results["modalities"][modality]
        targets = list(info["tasks"])
        ax = axes[0][col]
        for i, (v, label) in enumerate(info["variants"].items()):
            accs = [_accuracy(runs, modality, targets, s, v, config["resamples"]) for s in config["shots"]]
            if None in accs:
                continue
            ys = [a.mean for a in accs]
            err = [[a.mean - a.lo for a in accs], [a.hi - a.mean for a in accs]]
            ax.errorbar(
                [s * (1 + 0.02 * i) for s in config["shots"]], ys, yerr=err, capsize=2, marker="o", color=plt.cm.tab20(i % 20), label=label,
                linewidth=2.5 if v.startswith("axis") else 1.0,
            )
        ax.set_xscale("log")
        ax.set_xticks(config["shots"], [str(s) for s in config["shots"]])
        ax.set(title=f"{modality}: mean test accuracy, 95% intervals", xlabel="examples per class", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax = axes[1][col]
        diffs = {s: _differences(results, modality, "axis/weight", s) for s in config["shots"]}
        baselines = [b for b in info["variants"] if all(b in diffs[s] for s in config["shots"])]
        width = 0.8 / max(1, len(config["shots"]))
        for j, s in enumerate(config["shots"]):
            cells = [diffs[s][b]["all"] for b in baselines]
            ax.bar(
                [i + j * width for i in range(len(baselines))], [c.mean for c in cells], width,
                yerr=[[c.mean - c.lo for c in cells], [c.hi - c.mean for c in cells]], capsize=2, label=f"{s}-shot",
            )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(baselines))], [info["variants"][b] for b in baselines], rotation=45, ha="right", fontsize=7)
        ax.set(title=f"{modality}: AXIS (weight) − baseline, all targets, 95% intervals", ylabel="test points")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "study.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write `out/results.md` and the plot (when matplotlib is installed) into `out`, a staging
    folder that `run_study` publishes from."""
    (out / "results.md").write_text(markdown(results) + "\n")
    _plots(results, out)
