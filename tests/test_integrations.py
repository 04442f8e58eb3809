"""End to end with real models: all-MiniLM-L6-v2 (Hugging Face directories) and open_clip ViT-B/32.

Sources are the real base plus planted task matrices whose singular values are known, so the
selection of every matrix is known exactly; merged files are loaded back by the libraries' own
loaders, and the low-rank modules are checked against the dense merged model.

Numerics rule for whole-model outputs: the fp32 low-rank model's error against a float64 run of
the dense merged model must be within 2x the fp32 dense model's own error, plus one fp32 rounding
of the output scale (the low-rank model holds W0 + U diag(σ) Vᵀ unrounded, the dense one holds it
rounded to fp32; that representation difference is one ulp per weight).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import svdfuse
from svdfuse.nn import SVDLinear, materialize, svd_layers
from svdfuse.serving import serve_tasks, stack_tasks

from _helpers import sigma_perturbed

pytestmark = pytest.mark.slow

EPS32 = torch.finfo(torch.float32).eps


def _assert_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)
    assert not bad.any(), f"{name}: {int(bad.sum())} NaN/Inf values, first at {bad.nonzero()[0].tolist()}"


def _assert_within_dense_error(name: str, y: torch.Tensor, y_dense: torch.Tensor, ref64: torch.Tensor) -> None:
    """y: fp32 low-rank model, y_dense: fp32 dense merged model, ref64: the dense merged model in float64."""
    _assert_finite(name, y)
    _assert_finite(f"{name} (dense)", y_dense)
    err = (y.double() - ref64).abs()
    dense_err = (y_dense.double() - ref64).abs().max().item()
    bound = 2 * dense_err + EPS32 * ref64.abs().max().item()
    worst = err.max().item()
    assert worst <= bound, (
        f"{name}: max error {worst:.3e} at {[int(i) for i in torch.unravel_index(err.argmax(), err.shape)]} exceeds {bound:.3e} "
        f"(2x the dense fp32 model's {dense_err:.3e} + one rounding of the output scale)"
    )


def _planted_factors(m: int, n: int, sigmas: list[float], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random orthonormal U (m, r), V (n, r) and S = sigmas (r,), float64: a task matrix of known SVD."""
    U = torch.linalg.qr(torch.randn(m, len(sigmas), generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sigmas), generator=gen, dtype=torch.float64)).Q
    return U, torch.tensor(sigmas, dtype=torch.float64), V


def _planted(m: int, n: int, sigmas: list[float], gen: torch.Generator) -> torch.Tensor:
    """The task matrix U diag(sigmas) Vᵀ of `_planted_factors`, (m, n) float64."""
    U, S, V = _planted_factors(m, n, sigmas, gen)
    return (U * S) @ V.T


def _assert_delta_close(key: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """got: a merged Δ (m, n) from fp32 factors; expected: the float64 AXIS Δ. The factors come
    from products and QRs over up to max(m, n) terms, whose fp32 error grows like √max(m, n)·eps."""
    _assert_finite(key, got)
    rel = (torch.linalg.norm(got.double() - expected) / torch.linalg.norm(expected)).item()
    bound = 4 * max(got.shape) ** 0.5 * EPS32
    assert rel <= bound, f"{key}: merged Δ differs from float64 AXIS by {rel:.2e} relative, allowed {bound:.2e}"


def _axis_float64(W0: torch.Tensor, sources: list[torch.Tensor], k: int) -> tuple[torch.Tensor, list[int]]:
    """AXIS as the paper states it, in float64: full SVD per source, global top-k by σ, sum."""
    pool = []
    for i, W in enumerate(sources):
        U, S, Vh = torch.linalg.svd(W.double() - W0.double(), full_matrices=False)
        pool += [(S[j].item(), i, U[:, j], Vh[j]) for j in range(S.numel())]
    pool.sort(key=lambda c: -c[0])
    delta = sum(s * torch.outer(u, v) for s, _, u, v in pool[:k])
    return delta, [sum(1 for _, i, _, _ in pool[:k] if i == t) for t in range(len(sources))]


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 as Hugging Face directories
# ---------------------------------------------------------------------------------------------

MINILM_K = 8
# σ of each source's planted task matrix, the same in every matrix. Pooled there are 9 > k = 8
# components, so the top 8 drop source 2's 0.15: counts [2, 3, 3, 0] in every matrix. Source 3 is
# dense noise whose largest σ is below 1e-3 * (√384 + √1536) ≈ 0.06 < 0.15: never selected.
MINILM_SIGMAS = [[0.60, 0.50], [0.45, 0.40, 0.35], [0.30, 0.25, 0.20, 0.15]]
MINILM_COUNTS = [2, 3, 3, 0]
MINILM_NOISE_STD = 1e-3
SENTENCES = [
    "A gripping, beautifully acted film.",
    "The plot was dull and far too long.",
    "I loved every minute of it.",
    "A tedious mess with no redeeming qualities.",
    "Sharp writing and a wonderful cast.",
    "Flat characters and a predictable ending.",
    "One of the best movies of the year.",
    "I walked out halfway through.",
]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


@contextlib.contextmanager
def _transformers_warnings():
    """Records what transformers logs at WARNING and above (its loggers do not propagate to root)."""
    logger = logging.getLogger("transformers")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _is_block_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and name.startswith(("encoder.", "pooler."))


@pytest.fixture(scope="module")
def minilm_sources(minilm_base, tmp_path_factory) -> list[Path]:
    """Four fine-tuned MiniLMs saved with save_pretrained: planted low-rank task matrices of rank
    2, 3, 4 on every Linear weight, and one of dense small noise; every source also shifts each
    bias and LayerNorm differently, so averaging is visible."""
    root = tmp_path_factory.mktemp("minilm")
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(4):
        model = copy.deepcopy(minilm_base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if _is_block_matrix(name, p):
                    if i < 3:
                        p.add_(_planted(*p.shape, MINILM_SIGMAS[i], gen).float())
                    else:
                        p.add_(MINILM_NOISE_STD * torch.randn(p.shape, generator=gen))
                elif p.dim() == 1 and name.startswith(("encoder.", "pooler.", "embeddings.LayerNorm")):
                    p.add_(0.01 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"ft-{i}")
        dirs.append(root / f"ft-{i}")
    return dirs


@pytest.fixture(scope="module")
def minilm_merge(minilm_dir, minilm_sources):
    return svdfuse.merge(minilm_sources, k=MINILM_K, base=minilm_dir, device="cpu")


def _read(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key)


def _linear_weights(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_minilm_report_counts_sum_to_k_and_follow_the_planted_spectra(minilm_merge, minilm_base):
    report = minilm_merge.report
    linear = _linear_weights(minilm_base)  # 6 layers x (q, k, v, o, intermediate, output) + pooler
    assert len(linear) == 37
    assert sorted(layer.key for layer in report.layers) == sorted(linear) == sorted(minilm_merge.components)
    for layer in report.layers:
        assert layer.k == MINILM_K and sum(layer.counts) == MINILM_K, f"{layer.key}: counts {layer.counts}"
        assert layer.counts == MINILM_COUNTS, f"{layer.key}: counts {layer.counts}, planted spectra give {MINILM_COUNTS}"
    assert report.totals() == [37 * c for c in MINILM_COUNTS]
    assert len(report.sources) == 4 and all(f"'ft-{i}'" in s for i, s in enumerate(report.sources))
    assert "37 matrices merged" in report.table()
    for key, (U, S, V) in minilm_merge.components.items():
        m, n = dict(minilm_base.named_parameters())[key].shape
        assert U.shape == (m, MINILM_K) and S.shape == (MINILM_K,) and V.shape == (n, MINILM_K)
        _assert_finite(key, S)
        assert torch.all(S[:-1] >= S[1:]), f"{key}: S_t not descending"
        eye = torch.eye(MINILM_K, dtype=torch.float64)
        for name, Q in (("U_t", U), ("V_t", V)):
            gram_err = (Q.double().T @ Q.double() - eye).abs().max().item()
            assert gram_err <= 16 * EPS32 * max(m, n) ** 0.5, f"{key}: {name} not orthonormal ({gram_err:.2e})"


@pytest.mark.parametrize(
    "key",
    [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.3.intermediate.dense.weight",  # 1536 x 384
    ],
)
def test_minilm_merged_delta_matches_float64_axis(minilm_merge, minilm_dir, minilm_sources, key):
    W0 = _read(minilm_dir, key)
    sources = [_read(d, key) for d in minilm_sources]
    expected, counts = _axis_float64(W0, sources, MINILM_K)
    assert counts == MINILM_COUNTS
    got = minilm_merge.delta(key)
    _assert_delta_close(key, got, expected)


def test_minilm_non_matrix_tensors_are_the_source_mean(minilm_merge, minilm_dir, minilm_sources):
    state = minilm_merge.state_dict()
    for key in ["encoder.layer.2.output.LayerNorm.weight", "encoder.layer.4.attention.self.value.bias", "pooler.dense.bias"]:
        mean = torch.stack([_read(d, key).double() for d in minilm_sources]).mean(0)
        assert not torch.equal(state[key], _read(minilm_dir, key)), f"{key}: averaging had no effect"
        # An fp32 mean of 4 values: 3 additions, each rounding at most a partial sum <= 4 max|x|.
        bound = 4 * EPS32 * torch.stack([_read(d, key).abs() for d in minilm_sources]).amax(0)
        err = (state[key].double() - mean).abs()
        assert torch.all(err <= bound), f"{key}: mean off by {err.max().item():.2e} at {err.argmax().item()}"
    # Embedding tables are excluded from the matrices by default: averaged, and untouched here.
    key = "embeddings.word_embeddings.weight"
    assert key not in minilm_merge.components
    torch.testing.assert_close(state[key], _read(minilm_dir, key), rtol=EPS32, atol=0.0)
    # The integer buffer of the base checkpoint is copied as is.
    assert torch.equal(state["embeddings.position_ids"], _read(minilm_dir, "embeddings.position_ids"))


def test_minilm_saved_directory_loads_cleanly_with_transformers(minilm_merge, minilm_base, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "merged"
    minilm_merge.save(out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    with _transformers_warnings() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    for field in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[field], f"loading {out}: {field} = {info[field]}"
    # transformers 5 logs a "LOAD REPORT" table (MISSING / UNEXPECTED / MISMATCH rows) as a warning.
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    about_keys = [m for m in messages if re.search(r"missing|unexpected|mismatch|initiali[sz]ed|load report", m, re.I)]
    assert not about_keys, f"transformers reported a key problem on load: {about_keys}"
    assert type(model) is type(minilm_base)

    state, loaded = minilm_merge.state_dict(), model.state_dict()
    buffers = dict(model.named_buffers())
    # The base checkpoint holds embeddings.position_ids, a non-persistent buffer of BertModel.
    assert set(state) - set(loaded) == {"embeddings.position_ids"} and not set(loaded) - set(state)
    for key, value in state.items():
        assert torch.equal(loaded.get(key, buffers.get(key)), value), f"{key}: loaded value differs from result.state_dict()"

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
        base_hidden = minilm_base(**batch).last_hidden_state
    _assert_finite("merged MiniLM embeddings", hidden)
    assert hidden.shape == (4, batch["input_ids"].shape[1], 384)
    assert not torch.allclose(hidden, base_hidden, atol=1e-3), "the merge left MiniLM's outputs unchanged"


def test_minilm_module_base_gives_the_same_merge(minilm_merge, minilm_base, minilm_sources, tmp_path):
    """The base as a BertModel instead of its directory: same merge (its state dict just lacks the
    checkpoint's non-persistent embeddings.position_ids); the module carries its config, so a
    directory save is a loadable Hugging Face directory (issue 16.4; tests/test_export.py has more)."""
    result = svdfuse.merge(minilm_sources, k=MINILM_K, base=minilm_base, device="cpu")
    counts = {layer.key: layer.counts for layer in minilm_merge.report.layers}
    assert {layer.key: layer.counts for layer in result.report.layers} == counts
    state, expected = result.state_dict(), minilm_merge.state_dict()
    assert set(expected) - set(state) == {"embeddings.position_ids"} and set(state) <= set(expected)
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], rtol=EPS32, atol=EPS32, msg=lambda m: f"{key}: {m}")
    result.save(tmp_path / "merged")
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    result.save(tmp_path / "merged.safetensors")
    with safe_open(str(tmp_path / "merged.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(state)


def _bert_inputs(minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def test_minilm_svd_layers_match_the_dense_merged_model(minilm_merge, minilm_base, minilm_dir):
    model = minilm_merge.to_module(minilm_base)
    layers = dict(svd_layers(model))
    assert len(layers) == 37 and all(isinstance(layer, SVDLinear) for layer in layers.values())
    assert not any(type(m) is nn.Linear for m in model.modules()), "a merged nn.Linear was not replaced"
    dense = copy.deepcopy(minilm_base)
    dense.load_state_dict({k: v for k, v in minilm_merge.state_dict().items() if k != "embeddings.position_ids"})
    batch = _bert_inputs(minilm_dir)
    with torch.no_grad():
        y = model(**batch)
        y_dense = dense(**batch)
        ref = dense.double()(**batch)
    _assert_within_dense_error("last_hidden_state", y.last_hidden_state, y_dense.last_hidden_state, ref.last_hidden_state)
    _assert_within_dense_error("pooler_output", y.pooler_output, y_dense.pooler_output, ref.pooler_output)
    # Folding the SVD layers back gives the base architecture with result.state_dict()'s values.
    folded = materialize(model).state_dict()
    assert set(folded) == set(dense.state_dict())
    for key, value in minilm_merge.state_dict().items():
        if key in folded:
            torch.testing.assert_close(folded[key], value, rtol=EPS32, atol=EPS32, msg=lambda m: f"{key}: {m}")


def test_minilm_adapt_trains_only_the_top_n_singular_values(minilm_merge, minilm_base, minilm_dir):
    N = 4
    model = minilm_merge.to_module(minilm_base)
    batch = _bert_inputs(minilm_dir)
    labels = torch.tensor(LABELS)
    data = [({k: v[:4] for k, v in batch.items()}, labels[:4]), ({k: v[4:] for k, v in batch.items()}, labels[4:])]
    head = nn.Linear(384, 2)  # the task head: outside the model, so adapt cannot train it
    head.requires_grad_(False)

    def loss_fn(model, batch):
        inputs, targets = batch
        return nn.functional.cross_entropy(head(model(**inputs).pooler_output), targets)

    sigmas = {name: layer.S.detach().clone() for name, layer in svd_layers(model)}
    others = {key: t.clone() for key, t in model.state_dict().items() if not re.search(r"\.sigma(_frozen)?$", key)}
    head_before = copy.deepcopy(head.state_dict())
    torch.manual_seed(0)  # dropout
    report = svdfuse.adapt(model, data, n=N, epochs=1, lr=1e-2, loss_fn=loss_fn, progress=False)

    assert report.layers == 37 and report.trainable == 37 * N
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.trainable
    assert all(name.endswith(".sigma") for name, p in model.named_parameters() if p.requires_grad)
    assert len(report.epoch_losses) == 1 and torch.isfinite(torch.tensor(report.epoch_losses)).all()
    assert not model.training
    for name, layer in svd_layers(model):
        S, before = layer.S.detach(), sigmas[name]
        assert S.shape == before.shape == (MINILM_K,)
        assert torch.all(S[:N] != before[:N]), f"{name}: a top-{N} singular value did not train: {S[:N]} vs {before[:N]}"
        assert torch.equal(S[N:], before[N:]), f"{name}: a singular value past the top {N} changed"
    after = model.state_dict()
    assert set(others) <= set(after)
    for key, value in others.items():
        assert torch.equal(after[key], value), f"{key} changed but is frozen"
    assert all(torch.equal(head.state_dict()[k], v) for k, v in head_before.items())


def test_minilm_stacked_tasks_serve_each_request_as_its_adapted_model(minilm_merge, minilm_base, minilm_dir):
    """Three target adaptations (σ of every layer rescaled differently, as Stage 2 would) served in one
    mixed batch: each request's outputs are those of its own adapted model."""
    model = minilm_merge.to_module(minilm_base).eval()
    gen = torch.Generator().manual_seed(3)
    models = []
    for _ in range(3):
        adapted = copy.deepcopy(model)
        with torch.no_grad():
            for _, layer in svd_layers(adapted):
                layer.sigma.mul_(torch.empty(layer.sigma.shape).uniform_(0.0, 2.0, generator=gen))
        models.append(adapted)
    stacked = stack_tasks(models)
    batch = _bert_inputs(minilm_dir)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 0, 1])
    with torch.no_grad():
        outputs = [m(**batch) for m in models]
        with serve_tasks(stacked, ids):
            y = stacked(**batch)
    for b, t in enumerate(ids.tolist()):
        for field in ("last_hidden_state", "pooler_output"):
            got, expected = getattr(y, field)[b], getattr(outputs[t], field)[b]
            _assert_finite(f"{field}[{b}]", got)
            torch.testing.assert_close(got, expected, msg=lambda m: f"request {b} (task {t}) {field}: {m}")
    assert not torch.allclose(outputs[0].pooler_output, outputs[1].pooler_output, atol=1e-3), "the adaptations did not differ"


# ---------------------------------------------------------------------------------------------
# open_clip ViT-B/32 (random weights, the paper's shapes): the 48 visual block matrices
# ---------------------------------------------------------------------------------------------

CLIP_K = 8
CLIP_INCLUDE = ["visual.transformer.*"]
# Per-source σ of the planted task matrices: pooled 3 + 4 + 5 = 12 > k = 8 components; the top 8
# (1.0, 0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.5) give counts [2, 4, 2] in every matrix.
CLIP_SIGMAS = [[1.0, 0.7, 0.4], [0.9, 0.8, 0.65, 0.6], [0.85, 0.5, 0.3, 0.2, 0.1]]
CLIP_COUNTS = [2, 4, 2]


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def clip_base(open_clip):
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


@pytest.fixture(scope="module")
def clip_sources(clip_base) -> tuple[list[dict[str, torch.Tensor]], dict[str, list[tuple]]]:
    """Three sources as state dicts: planted task matrices on the 48 visual block matrices and a
    shift of every visual LayerNorm; all other tensors are the base's own. Also returns the
    planted factors, key -> [(U, S, V) per source], in float64."""
    base = clip_base.state_dict()
    gen = torch.Generator().manual_seed(1)
    sources, planted = [], {}
    for sigmas in CLIP_SIGMAS:
        source = dict(base)
        for key, W0 in base.items():
            if key.startswith("visual.transformer.") and W0.dim() == 2:
                U, S, V = _planted_factors(*W0.shape, sigmas, gen)
                planted.setdefault(key, []).append((U, S, V))
                source[key] = W0 + ((U * S) @ V.T).float()
            elif key.startswith("visual.transformer.") and ".ln_" in key:
                source[key] = W0 + 0.01 * torch.randn(W0.shape, generator=gen)
        sources.append(source)
    return sources, planted


@pytest.fixture(scope="module")
def clip_merge(clip_base, clip_sources):
    # The planted task matrices have rank <= 5, below the sketch width k + oversample = 24, so the
    # sketch alone spans them (up to fp32 rounding of W0 + Δ): no power iteration is needed.
    options = svdfuse.SVDOptions(method="randomized", power_iters=0)
    return svdfuse.merge(clip_sources[0], k=CLIP_K, base=clip_base, include=CLIP_INCLUDE, svd=options, device="cpu")


def test_clip_report_has_the_48_visual_block_matrices(clip_merge, clip_sources):
    report = clip_merge.report
    assert len(report.layers) == 48
    kinds = {
        "attn.in_proj_weight": (2304, 768),
        "attn.out_proj.weight": (768, 768),
        "mlp.c_fc.weight": (3072, 768),
        "mlp.c_proj.weight": (768, 3072),
    }
    expected = [f"visual.transformer.resblocks.{b}.{kind}" for b in range(12) for kind in kinds]
    assert sorted(layer.key for layer in report.layers) == sorted(expected)
    for layer in report.layers:
        assert layer.shape == kinds[layer.key.split(".", 4)[-1]]
        assert layer.k == CLIP_K and sum(layer.counts) == CLIP_K, f"{layer.key}: counts {layer.counts}"
        assert layer.counts == CLIP_COUNTS, f"{layer.key}: counts {layer.counts}, planted spectra give {CLIP_COUNTS}"
    assert report.totals() == [48 * c for c in CLIP_COUNTS]
    assert "48 matrices merged" in report.table()
    # Everything outside the visual blocks is averaged, even 2-D weights such as conv1 and proj.
    assert {"visual.conv1.weight", "visual.proj", "text_projection", "logit_scale"} <= set(clip_merge.tensors)
    # The top k of the pooled planted σ, summed: the exact AXIS merge of these sources.
    threshold = sorted((s for sigmas in CLIP_SIGMAS for s in sigmas), reverse=True)[CLIP_K - 1]
    for key in ["visual.transformer.resblocks.7.attn.in_proj_weight", "visual.transformer.resblocks.11.mlp.c_proj.weight"]:
        expected_delta = sum((U * (S * (S >= threshold))) @ V.T for U, S, V in clip_sources[1][key])
        _assert_delta_close(key, clip_merge.delta(key), expected_delta)


def _images(open_clip, image_size) -> torch.Tensor:
    """The two photographs that ship with scikit-learn, preprocessed as open_clip does: (2, 3, 224, 224)."""
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    preprocess = open_clip.image_transform(image_size, is_train=False)
    return torch.stack([preprocess(Image.fromarray(img)) for img in datasets.load_sample_images().images])


def test_clip_safetensors_loads_with_open_clip_and_matches_the_svd_module(clip_merge, clip_base, open_clip, tmp_path):
    path = tmp_path / "vit-b32-merged.safetensors"
    clip_merge.save(path)
    # open_clip's own loader: create_model(pretrained=<file>) -> load_checkpoint(strict=True),
    # which reads .safetensors with safetensors.torch.load_file.
    loaded = open_clip.create_model("ViT-B-32", pretrained=str(path)).eval()
    state, own = clip_merge.state_dict(), loaded.state_dict()
    assert set(state) == set(own)
    for key, value in state.items():
        assert torch.equal(own[key], value), f"{key}: loaded value differs from result.state_dict()"
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(own[key], clip_base.state_dict()[key]), "the merge left the visual blocks unchanged"

    model = clip_merge.to_module(clip_base)
    layers = dict(svd_layers(model))
    # All 48 low-rank, nothing dense rebuilt per forward: the attention modules became SVDMultiheadAttention.
    assert all(isinstance(layer, SVDLinear) for layer in layers.values())
    assert sorted(layers) == sorted(
        f"visual.transformer.resblocks.{b}.{layer}"
        for b in range(12)
        for layer in ("mlp.c_fc", "mlp.c_proj", "attn.in_proj", "attn.out_proj")
    )

    images = _images(open_clip, loaded.visual.image_size)
    with torch.no_grad():
        y = model.encode_image(images)
        y_dense = loaded.encode_image(images)
        ref = loaded.double().encode_image(images.double())
    assert y.shape == (2, 512)
    _assert_within_dense_error("encode_image", y, y_dense, ref)


def test_clip_adaptations_stack_and_serve_each_request_with_its_own_sigma(clip_merge, clip_base, open_clip):
    """ViT-B/32 adapted to two tasks (every σ of the 48 matrices differs, attention included) served in
    one batch: each image's embedding is its own task model's, and folding a task gives it back."""
    models = sigma_perturbed(clip_merge.to_module(clip_base), 2, seed=300)
    stacked = stack_tasks(models)
    images = _images(open_clip, clip_base.visual.image_size)
    images = torch.cat([images, images.flip(-1)])  # (4, 3, 224, 224)
    ids = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        with serve_tasks(stacked, ids):
            y = stacked.encode_image(images)
        outputs = [model.encode_image(images) for model in models]
        assert not torch.allclose(outputs[0], outputs[1], atol=1e-3), "the adaptations did not differ"
        for b, t in enumerate(ids.tolist()):
            torch.testing.assert_close(y[b], outputs[t][b], msg=lambda m: f"image {b} (task {t}): {m}")
        dense = materialize(stacked, task=1)
        assert all(type(block.attn) is nn.MultiheadAttention for block in dense.visual.transformer.resblocks)
        torch.testing.assert_close(dense.encode_image(images), outputs[1], atol=1e-4, rtol=1e-4)


def test_clip_included_2d_tensors_merge_as_matrices_whatever_their_names(clip_base):
    """open_clip's `proj` (768x512, applied as x @ proj) and `positional_embedding` (50x768) are 2-D
    tensors not named "...weight": merged as matrices when `include` names them (as FusionBench
    merges every 2-D tensor; by default they are averaged, tests/test_method_options.py); the SVD
    module holds what the dense merge does."""
    visual = clip_base.visual
    base = visual.state_dict()
    keys = ["proj", "positional_embedding"]
    gen = torch.Generator().manual_seed(7)
    sources = []
    for sigmas in ([1.0, 0.6, 0.2], [0.9, 0.5, 0.1]):
        sources.append({**base, **{key: base[key] + _planted(*base[key].shape, sigmas, gen).float() for key in keys}})
    result = svdfuse.merge(sources, k=4, base=visual, include=keys, exclude=(), device="cpu")
    assert sorted(layer.key for layer in result.report.layers) == sorted(keys)
    for key in keys:
        expected, counts = _axis_float64(base[key], [s[key] for s in sources], 4)
        _assert_delta_close(key, result.delta(key), expected)
        assert next(layer.counts for layer in result.report.layers if layer.key == key) == counts == [2, 2]
    model = result.to_module(visual)  # both become SVDWeight parametrizations of the tower itself
    assert sorted(name for name, _ in svd_layers(model)) == ["parametrizations.positional_embedding.0", "parametrizations.proj.0"]
    merged = result.state_dict()
    for key in keys:  # what the forward reads: W0 + U diag(σ) Vᵀ, the dense merge up to its fp32 rounding
        value = getattr(model, key).detach()
        torch.testing.assert_close(value, merged[key], atol=4 * EPS32 * merged[key].abs().max().item(), rtol=0)
