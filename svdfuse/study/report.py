"""The study's results as the paper lays them out: markdown tables and PNG plots from results.json."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from svdfuse.study.methods import MERGES, METHOD_LABELS

__all__ = ["write_report", "markdown", "PAPER_ORDER", "ordering"]

# The paper's Table 1 ordering at every N (AXIS > DARE > Average > TIES > TSV-M > aTLAS at N = 20%).
PAPER_ORDER = ("axis", "dare", "average", "ties", "tsv_m", "atlas")
_ROWS = (*MERGES, "pretrained", "atlas", "linear_probe", "finetune")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _select(runs: list[dict], **where: Any) -> list[dict]:
    return [r for r in runs if all(r[k] == v for k, v in where.items())]


def _by_method(runs: list[dict], modality: str, n: float | None, seed: int, condition: str = "clean", key: str = "test") -> dict[str, float]:
    """Mean of `key` per method over the targets that every method present finished (a stopped
    run may miss some), so that the methods of one column are compared on the same targets.
    aTLAS and the references have n None."""
    rows = {}
    for method in _ROWS:
        want_n = None if method in ("atlas", "linear_probe", "finetune") else n
        found = {r["target"]: r[key] for r in _select(runs, modality=modality, method=method, n=want_n, seed=seed, condition=condition) if r[key] is not None}
        if found:
            rows[method] = found
    common = set.intersection(*(set(v) for v in rows.values())) if rows else set()
    return {method: _mean([v[t] for t in common]) for method, v in rows.items() if common}


def _coverage(runs: list[dict], modality: str, n: float | None, seed: int, condition: str = "clean") -> int:
    """How many targets `_by_method` averages over."""
    return len(_targets(runs, modality, n, seed, condition))


def _only(runs: list[dict], targets: set[str]) -> list[dict]:
    return [r for r in runs if r["target"] in targets]


def _targets(runs: list[dict], modality: str, n: float | None, seed: int, condition: str = "clean") -> set[str]:
    """The targets that every method present finished at (n, seed, condition)."""
    sets = []
    for method in _ROWS:
        want_n = None if method in ("atlas", "linear_probe", "finetune") else n
        found = {r["target"] for r in _select(runs, modality=modality, method=method, n=want_n, seed=seed, condition=condition)}
        if found:
            sets.append(found)
    return set.intersection(*sets) if sets else set()


def ordering(scores: dict[str, float]) -> list[tuple[str, str, bool]]:
    """The paper's consecutive pairs (a above b) and whether each holds in `scores`."""
    pairs = [(a, b) for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]) if a in scores and b in scores]
    return [(a, b, scores[a] > scores[b]) for a, b in pairs]


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _trainable(runs: list[dict], modality: str, method: str, n: float | None) -> str:
    rows = _select(runs, modality=modality, method=method, n=n, condition="clean")
    return "—" if not rows else f"{rows[0]['trainable']:,}"


def _modality_md(results: dict[str, Any], modality: str) -> list[str]:
    runs, config = results["runs"], results["config"]
    info = results["modalities"][modality]
    ns, seeds, main_n = config["ns"], config["seeds"], config["main_n"]
    targets = list(info["tasks"])
    done = sorted({r["target"] for r in runs if r["modality"] == modality}, key=targets.index)
    lines = [
        f"## {modality}: {info['backbone']}, {len(done)} of {len(targets)} targets (leave-one-out, {len(targets) - 1} sources each)",
        "",
        f"Merged matrices: `{', '.join(info['include'])}`. K = {config['k']:g} of min(m, n) per matrix; Stage-2 lr "
        f"{info['stage2_lr']:g} (chosen on validation: {', '.join(f'{k}: {v:.2f}%' for k, v in info['selection'].items()) or 'one candidate'}), "
        f"{config['stage2_epochs']} epochs. Sources: fine-tuned at lr {info['finetune_lr']:g}"
        + (f" (chosen on validation: {', '.join(f'{k}: {v:.2f}%' for k, v in info['finetune_selection'].items())})" if info.get("finetune_selection") else " (fixed beforehand)")
        + ". Tasks: " + "; ".join(f"{t} ({d['classes']} classes, {d['train']}/{d['val']}/{d['test']})" for t, d in info["tasks"].items()) + ".",
        "",
        "### Mean test accuracy (%) over targets, seed 0 (the paper's Table 1 layout)",
        "",
        "| method | " + " | ".join(f"N = {n:.0%} ({_coverage(runs, modality, n, seeds[0])} targets)" for n in ns) + f" | merge alone (N = {main_n:.0%}) | trainable scalars (" + "/".join(f"{n:.0%}" for n in ns) + ") |",
        "|---|" + "---:|" * (len(ns) + 2),
    ]
    per_n = {n: _by_method(runs, modality, n, seeds[0]) for n in ns}
    merged = _by_method(runs, modality, main_n, seeds[0], key="merged_test")
    for method in _ROWS:
        if not any(method in per_n[n] for n in ns):
            continue
        counts = "/".join(_trainable(runs, modality, method, None if method in ("atlas", "linear_probe", "finetune") else n) for n in ns)
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(_fmt(per_n[n].get(method)) for n in ns) + f" | {_fmt(merged.get(method))} | {counts} |")
    lines += ["", "aTLAS, the linear probe and the full fine-tune do not depend on N: one value repeated.", ""]
    cover = set.intersection(*(_targets(runs, modality, main_n, s) for s in seeds)) if len(seeds) > 1 else set()
    if len(seeds) > 1 and not cover:
        lines += [f"### N = {main_n:.0%} over seeds {', '.join(map(str, seeds))}: no target finished every seed (not run)", ""]
    elif cover:
        same = _only(runs, cover)
        lines += [
            f"### N = {main_n:.0%}: mean ± std over seeds {', '.join(map(str, seeds))} (std of the per-seed mean over targets; {len(cover)} targets have every seed)",
            "", "| method | test | validation |", "|---|---:|---:|",
        ]
        for method in (*MERGES, "pretrained", "atlas"):
            per_seed = [_by_method(same, modality, main_n, s).get(method) for s in seeds]
            per_seed_val = [_by_method(same, modality, main_n, s, key="val").get(method) for s in seeds]
            if None in per_seed:
                continue
            lines.append(f"| {METHOD_LABELS[method]} | {_mean(per_seed):.2f} ± {statistics.stdev(per_seed):.2f} | {_mean(per_seed_val):.2f} ± {statistics.stdev(per_seed_val):.2f} |")
        lines.append("")
    lines += [f"### Per target, N = {main_n:.0%}, seed 0 (test %)", "", "| method | " + " | ".join(done) + " |", "|---|" + "---:|" * len(done)]
    for method in _ROWS:
        want_n = None if method in ("atlas", "linear_probe", "finetune") else main_n
        cells = []
        for t in done:
            rows = _select(runs, modality=modality, method=method, n=want_n, seed=seeds[0], condition="clean", target=t)
            cells.append(_fmt(rows[0]["test"]) if rows else "—")
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    lines.append("")
    conditions = config["conditions"]
    if conditions:
        lines += [
            f"### Robustness, N = {main_n:.0%}, seed 0: mean test accuracy (%) and change from clean",
            "",
            f"noisy: one source (the first of each target's list) gets Gaussian noise of Frobenius norm {config['noise_scale']:g}·‖Δ‖_F "
            "per tensor; prunedP: every source's task vectors magnitude-pruned, P% of the entries of each tensor zeroed.",
            "",
            f"Over the {len(set.intersection(*(_targets(runs, modality, main_n, seeds[0], c) for c in conditions)))} targets that finished every condition.",
            "",
            "| method | clean | " + " | ".join(conditions) + " |",
            "|---|---:|" + "---:|" * len(conditions),
        ]
        robust = _only(runs, set.intersection(*(_targets(runs, modality, main_n, seeds[0], c) for c in conditions)))
        clean = _by_method(robust, modality, main_n, seeds[0])
        for method in config["robust_methods"]:
            n = None if method == "atlas" else main_n
            cells = []
            for c in conditions:
                value = _by_method(robust, modality, n, seeds[0], condition=c).get(method) if method != "atlas" else _atlas_condition(robust, modality, c, seeds[0])
                cells.append("—" if value is None or method not in clean else f"{value:.2f} ({value - clean[method]:+.2f})")
            lines.append(f"| {METHOD_LABELS[method]} | {_fmt(clean.get(method))} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### The paper's ordering here (consecutive pairs of AXIS > DARE > Average > TIES > TSV-M > aTLAS, mean test %)", ""]
    for n in ns:
        pairs = ordering(per_n[n])
        if not pairs:
            lines.append(f"- N = {n:.0%}: not run")
            continue
        lines.append(f"- N = {n:.0%}: " + ", ".join(f"{METHOD_LABELS[a].split(' ')[0]} {'>' if ok else '≤'} {METHOD_LABELS[b].split(' ')[0]} ({'holds' if ok else 'does not hold'})" for a, b, ok in pairs))
    lines.append("")
    return lines


def _atlas_condition(runs: list[dict], modality: str, condition: str, seed: int) -> float | None:
    rows = _select(runs, modality=modality, method="atlas", seed=seed, condition=condition)
    return _mean([r["test"] for r in rows]) if rows else None


def markdown(results: dict[str, Any]) -> str:
    """The whole report as markdown."""
    m = results["machine"]
    lines = [
        "# svdfuse transfer study (AXIS protocol, leave-one-out, real pretrained models)",
        "",
        f"Machine: {m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['platform']}; torch {m['torch']}, Python {m['python']}. "
        f"Commit {m['commit']}{' (with uncommitted changes)' if m['dirty'] else ''}; run {m['date']}, {results.get('seconds', 0) / 60:.1f} min.",
        "",
    ]
    for modality in results["modalities"]:
        lines += _modality_md(results, modality)
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> Path:
    """Save a figure through a temporary file and a rename: never a partial PNG."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def _plots(results: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs, config = results["runs"], results["config"]
    mods = list(results["modalities"])
    written = []
    fig, axes = plt.subplots(1, len(mods), figsize=(6.5 * len(mods), 4.5), squeeze=False)
    for ax, modality in zip(axes[0], mods):
        per_n = {n: _by_method(runs, modality, n, config["seeds"][0]) for n in config["ns"]}
        for i, method in enumerate(_ROWS):  # 12 lines: tab20's colours, so no two share one
            ys = [per_n[n].get(method) for n in config["ns"]]
            if None in ys:
                continue
            style = "--" if method in ("atlas", "linear_probe", "finetune") else "-"
            ax.plot(
                [100 * n for n in config["ns"]], ys, style, marker="os^v"[i % 4], color=plt.cm.tab20(i), label=METHOD_LABELS[method],
                linewidth=2.5 if method.startswith("axis") else 1.2,
            )
        ax.set_title(f"{modality}: {results['modalities'][modality]['backbone']}")
        ax.set_xlabel("N (% of min(m, n) trained per layer)")
        ax.set_ylabel("mean test accuracy over targets (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    written.append(_save(fig, out / "accuracy_vs_n.png"))
    if config["conditions"]:
        fig, axes = plt.subplots(1, len(mods), figsize=(6.5 * len(mods), 4.5), squeeze=False)
        conditions = ["clean", *config["conditions"]]
        for ax, modality in zip(axes[0], mods):
            methods = list(config["robust_methods"])
            width = 0.8 / len(conditions)
            shown = []
            for i, c in enumerate(conditions):
                vals = []
                for method in methods:
                    v = _atlas_condition(runs, modality, c, config["seeds"][0]) if method == "atlas" else _by_method(runs, modality, config["main_n"], config["seeds"][0], condition=c).get(method)
                    vals.append(v if v is not None else 0.0)
                shown += [v for v in vals if v]
                ax.bar([j + i * width for j in range(len(methods))], vals, width, label=c)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], [METHOD_LABELS[m].replace(" + S2", "") for m in methods], rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(f"mean test accuracy (%), N = {config['main_n']:.0%}")
            ax.set_title(f"robustness, {modality}")
            if shown:  # the differences are a few points: do not start the axis at 0
                ax.set_ylim(min(shown) - 3, max(shown) + 3)
            ax.legend(fontsize=7, ncol=len(conditions), loc="upper center")
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / "robustness.png"))
    return written


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write `out/results.md` and the PNG plots (when matplotlib is installed)."""
    text = markdown(results)
    tmp = out / ".results.md.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out / "results.md")
    _plots(results, out)
