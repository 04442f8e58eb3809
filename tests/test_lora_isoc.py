"""Iso-C and Iso-CTS of LoRA adapters from their factors: the sum's SVD from the stacked factors
[s_1 B_1 … s_T B_T][A_1; …; A_T], never an m×n matrix per adapter.

Judged against float64 truth computed here from the adapters' files (peft's scale from the config
by peft's documented rule) with tolerances from the merge's dtype and the truth's own spectrum,
and against the dense route (the adapted models written whole, W0 + s·B·A) where the summed
update has full rank, which is where the dense rule is defined by the data alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse.adapters import LoraSource

from _adapters import peft_deltas

M, N = 40, 24  # an odd, non-square shape; the wide one is its transpose
# (r, lora_alpha, use_rslora) per adapter: Σr = 24 = min(m, n), so the summed update has full
# rank; no scale is 1, so a dropped scale shows.
RANDOM = [(8, 16, False), (4, 8, True), (12, 6, False)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base of two 40×24 and two 24×40 matrices (one no adapter touches), a bias and a norm;
    three random adapters in peft's layout targeting `proj` and `layers.0.out`."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base = {
        "layers.0.proj.weight": torch.randn(M, N), "layers.1.proj.weight": torch.randn(M, N), "layers.0.proj.bias": torch.randn(M),
        "layers.0.out.weight": torch.randn(N, M), "layers.1.out.weight": torch.randn(N, M), "norm.weight": torch.randn(N),
    }  # fmt: skip
    save_file(base, str(root / "base.safetensors"))
    modules = ("layers.0.proj", "layers.1.proj", "layers.0.out")
    adapters = [_write_adapter(root / f"lora-{t}", base, modules, r, alpha, rslora) for t, (r, alpha, rslora) in enumerate(RANDOM)]
    return root / "base.safetensors", adapters


def _write_adapter(d: Path, base: dict, modules: tuple[str, ...], r: int, alpha: float, rslora: bool = False) -> Path:
    """A random peft LoRA adapter of `modules` of `base`, in peft's layout."""
    d.mkdir()
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": list(modules)}
    (d / "adapter_config.json").write_text(json.dumps(config))
    weights = {}
    for module in modules:
        m, n = base[f"{module}.weight"].shape
        weights[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n) / math.sqrt(n)
        weights[f"base_model.model.{module}.lora_B.weight"] = torch.randn(m, r) / math.sqrt(r)
    save_file(weights, str(d / "adapter_model.safetensors"))
    return d


def _dense_sources(base: dict[str, torch.Tensor], adapters: list[Path], directory: Path, dtype: torch.dtype) -> list[Path]:
    """Each adapted model written whole, W0 + s·B·A in `dtype`."""
    out = []
    for i, adapter in enumerate(adapters):
        model = {k: v.double() for k, v in base.items()}
        for key, delta in peft_deltas(adapter).items():
            model[key] += delta
        out.append(directory / f"dense-{i}.safetensors")
        save_file({k: v.to(dtype).contiguous() for k, v in model.items()}, str(out[-1]))
    return out


def _polar(A: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def _truth(deltas: list[torch.Tensor], method: str, common: float = 0.8, common_size: int | None = None, fill_rank: bool = False,
           scaling: float = 1.0) -> tuple[torch.Tensor, float]:  # fmt: skip
    """The merged update of one matrix by the definition, in float64: (update, its sensitivity).

    The summed update's spectrum is its q singular values above σ_1 · max(m, n) · eps; Iso-C sets
    them to their mean; Iso-CTS takes k_c common directions of q and each task's top s off them.
    The sensitivity is mean σ · σ_1 / (the smallest gap or singular value the result depends on):
    times a dtype's eps and max(m, n) (a backward-stable SVD's error), the error a correct
    computation can make."""
    total = sum(deltas)
    m, n = total.shape
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    floor = S[0] * max(m, n) * torch.finfo(torch.float64).eps
    q = int((S > floor).sum())
    if q == 0:
        return torch.zeros_like(total), 0.0
    if method == "iso_c":
        mean = S[:q].mean()
        return scaling * mean * U[:, :q] @ Vh[:q], float(mean * S[0] / S[q - 1])
    k_c = math.floor(common * q) if common_size is None else common_size
    if fill_rank:
        k_c = q - round((q - k_c) / len(deltas)) * len(deltas)
    s = (q - k_c) // len(deltas)
    us, ss, vs, gaps = [U[:, :k_c]], [S[:k_c]], [Vh[:k_c].T], [S[k_c - 1] - S[k_c]]
    P = torch.eye(m, dtype=torch.float64) - U[:, :k_c] @ U[:, :k_c].T
    for delta in deltas:
        u, sigma, vh = torch.linalg.svd(P @ delta, full_matrices=False)
        kept = sigma[:s] > floor
        us.append(u[:, :s][:, kept])
        ss.append(sigma[:s][kept])
        vs.append(vh[:s].T[:, kept])
        if kept.all() and s:  # the top s of this task: separated from its next
            gaps.append(sigma[s - 1] - sigma[s])
        elif kept.any():  # fewer than s above the floor: separated from zero
            gaps.append(sigma[int(kept.sum()) - 1])
    cat_u, cat_v, sigma = torch.cat(us, 1), torch.cat(vs, 1), torch.cat(ss)
    gaps += [torch.linalg.svdvals(cat_u)[-1] * S[0], torch.linalg.svdvals(cat_v)[-1] * S[0]]
    mean = sigma.mean()
    return scaling * mean * _polar(cat_u) @ _polar(cat_v).T, float(mean * S[0] / min(gaps))


def _check(merged: dict, base: dict, adapters: list[Path], dtype: torch.dtype, method: str, **params) -> None:
    """Every matrix of `merged` is the base plus the truth's update within `dtype`'s rounding of
    the truth's sensitivity; everything no adapter touches is the base's, bit for bit."""
    eps = torch.finfo(dtype).eps
    deltas = [peft_deltas(a) for a in adapters]
    for key, W0 in base.items():
        changes = [d[key] for d in deltas if key in d]
        if not changes:
            if W0.dim() == 2:
                assert torch.equal(merged[key].to(W0.dtype), W0), f"{key}: no adapter touches it, yet it changed"
            continue
        want, sensitivity = _truth(changes + [torch.zeros_like(changes[0])] * (len(deltas) - len(changes)), method, **params)
        assert want.abs().max() > 0
        got = merged[key].double() - W0.double()
        tol = 4 * max(W0.shape) * eps * sensitivity
        assert math.isfinite(tol), f"{key}: the truth is ill-posed here, a test of nothing"
        err = (got - want).abs().max().item()
        assert err <= tol, f"{key}: max error {err:.3g} > {tol:.3g} ({dtype})"


CTS = [{}, {"fill_rank": True}, {"common_size": 12, "scaling": 1.5}]
CASES = [("iso_c", {}), ("iso_c", {"scaling": 0.5})] + [("iso_cts", p) for p in CTS]


@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_adapters_equal_the_dense_route_and_the_truth(tiny, tmp_path, method, params):
    """float64: the factored route, the dense route over the adapted models, and the truth agree."""
    base_path, adapters = tiny
    base = load_file(str(base_path))
    options = dict(base=base_path, method=method, device="cpu", dtype=torch.float64, svd="exact", progress=False, **params)
    factored = svdfuse.merge(adapters, **options).state_dict()
    dense = svdfuse.merge(_dense_sources(base, adapters, tmp_path, torch.float64), **options).state_dict()
    _check(factored, base, adapters, torch.float64, method, **params)
    _check(dense, base, adapters, torch.float64, method, **params)
    for key in ("layers.0.proj.bias", "norm.weight"):  # not matrices: the mean task vector, from the adapted model's tensors
        assert torch.equal(factored[key], dense[key])


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_float32_against_float64_truth(tiny, method):
    base_path, adapters = tiny
    merged = svdfuse.merge(adapters, base=base_path, method=method, device="cpu", svd="exact", progress=False).state_dict()
    _check(merged, load_file(str(base_path)), adapters, torch.float32, method)


def _no_dense_reads(monkeypatch) -> None:
    """A dense read of an adapted matrix, or the dense rule itself, fails the test."""
    from svdfuse.methods import METHODS

    real = LoraSource.read

    def read(self, key, start, stop, out):
        assert key not in self.modules, f"{self.label}: dense read of {key!r}"
        real(self, key, start, stop, out)

    monkeypatch.setattr(LoraSource, "read", read)
    for name in ("iso_c", "iso_cts"):

        def dense(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name}: the dense rule ran over adapters")

        monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], merge=dense))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_no_matrix_per_adapter_is_formed(tiny, monkeypatch, method):
    base_path, adapters = tiny
    _no_dense_reads(monkeypatch)
    svdfuse.merge(adapters, base=base_path, method=method, device="cpu", progress=False)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_chunks_of_adapters_under_a_small_budget(tiny, monkeypatch, method):
    """A budget that holds one adapter's factors at a time streams them one by one; same merge."""
    import svdfuse.pipeline as pipeline

    base_path, adapters = tiny
    seen = []
    real = pipeline.stack_factors
    monkeypatch.setattr(pipeline, "stack_factors", lambda group, key, dtype: seen.append(len(group)) or real(group, key, dtype))
    options = dict(base=base_path, method=method, device="cpu", dtype=torch.float64, svd="exact", progress=False)
    whole = svdfuse.merge(adapters, **options).state_dict()
    assert set(seen) == {len(adapters)}
    seen.clear()
    chunked = svdfuse.merge(adapters, max_memory="150KB", **options).state_dict()
    assert set(seen) == {1}, "the small budget did not stream the adapters one at a time"
    _check(chunked, load_file(str(base_path)), adapters, torch.float64, method)
    for key, want in whole.items():
        torch.testing.assert_close(chunked[key], want, rtol=0, atol=1e-12 * max(want.abs().max().item(), 1.0))


def test_the_plan_sizes_adapters_by_their_factors(tmp_path):
    """12 rank-2 adapters of one 512×512 matrix: a 4 MB budget holds the factored piece (the base,
    the output, the sum's factors, an adapter's), not the dense one (13 matrices of 1 MiB)."""
    torch.manual_seed(3)
    base = {"proj.weight": torch.randn(512, 512)}
    save_file(base, str(tmp_path / "base.safetensors"))
    adapters = [_write_adapter(tmp_path / f"lora-{t}", base, ("proj",), 2, 3.0) for t in range(12)]
    options = dict(base=tmp_path / "base.safetensors", device="cpu", max_memory="4MB", progress=False)
    merged = svdfuse.merge(adapters, method="iso_c", **options)
    _check(merged.state_dict(), base, adapters, torch.float32, "iso_c")
    dense = _dense_sources(base, adapters[:1], tmp_path, torch.float32)
    with pytest.raises(ValueError, match=r"smallest piece this merge can compute: iso_c over 12 sources of one 512x512 matrix"):
        svdfuse.merge(dense + adapters[1:], method="iso_c", **options)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_rank_k(tiny, tmp_path, method):
    """k splits the merged update into k factors (Stage 2's) and a frozen rest, on both routes."""
    base_path, adapters = tiny
    base = load_file(str(base_path))
    options = dict(base=base_path, method=method, device="cpu", dtype=torch.float64, svd="exact", progress=False)
    factored = svdfuse.merge(adapters, 5, **options)
    dense = svdfuse.merge(_dense_sources(base, adapters, tmp_path, torch.float64), 5, **options)
    assert all(U.shape[-1] == S.shape[-1] == V.shape[-1] == 5 for U, S, V in factored.components.values())
    assert factored.components.keys() == dense.components.keys()
    _check(factored.state_dict(), base, adapters, torch.float64, method)
    for key, want in dense.state_dict().items():
        torch.testing.assert_close(factored.state_dict()[key], want, rtol=0, atol=1e-10 * max(want.abs().max().item(), 1.0))


def test_rank_deficient_sum_flattens_its_own_spectrum(tiny, tmp_path):
    """Two adapters (Σr = 12 < 24): Iso-C flattens the sum's 12 values, Iso-CTS splits those 12."""
    base_path, adapters = tiny
    base = load_file(str(base_path))
    two = adapters[:2]
    for method in ("iso_c", "iso_cts"):
        merged = svdfuse.merge(two, base=base_path, method=method, device="cpu", dtype=torch.float64, svd="exact", progress=False)
        _check(merged.state_dict(), base, two, torch.float64, method)
        assert all(int((S > 0).sum()) <= 12 for S in (s for _, s, _ in merged.components.values()))


def test_iso_cts_refuses_too_many_tasks_for_the_sums_rank(tiny):
    """The adapters' sum has rank 24 in each 40×24 or 24×40 matrix: common=0.95 leaves 2
    directions for 3 tasks, none each. The error names the matrix and the way out, as the dense
    route's."""
    base_path, adapters = tiny
    expected = r"iso_cts: 3 sources leave no task-specific direction in a (24x40|40x24) matrix with common=0.95 \(2 directions for 3 tasks\)"
    with pytest.raises(ValueError, match=expected):
        svdfuse.merge(adapters, base=base_path, method="iso_cts", common=0.95, device="cpu", progress=False)


def test_mixed_with_a_full_checkpoint_takes_the_dense_route(tiny, tmp_path):
    base_path, adapters = tiny
    base = load_file(str(base_path))
    dense = _dense_sources(base, adapters, tmp_path, torch.float64)
    options = dict(base=base_path, method="iso_cts", device="cpu", dtype=torch.float64, svd="exact", progress=False)
    mixed = svdfuse.merge([adapters[0], dense[1], adapters[2]], **options).state_dict()
    _check(mixed, base, adapters, torch.float64, "iso_cts")


def test_a_matrix_saved_whole_falls_back_for_its_group(tiny, tmp_path):
    """An adapter that replaces `layers.1.proj.weight` whole (modules_to_save): its group is read
    dense, the other group still from factors."""
    base_path, adapters = tiny
    base = load_file(str(base_path))
    replaced = tmp_path / "replaced"
    replaced.mkdir()
    weights = {k: v for k, v in load_file(str(adapters[0] / "adapter_model.safetensors")).items() if ".layers.1.proj." not in k}
    torch.manual_seed(1)
    whole = base["layers.1.proj.weight"] + torch.randn(M, N)
    weights["base_model.model.layers.1.proj.weight"] = whole
    save_file(weights, str(replaced / "adapter_model.safetensors"))
    (replaced / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    reads = []
    real = LoraSource.read

    def read(self, key, start, stop, out):
        reads.append(key)
        real(self, key, start, stop, out)

    options = dict(base=base_path, method="iso_c", device="cpu", dtype=torch.float64, svd="exact", progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LoraSource, "read", read)
        merged = svdfuse.merge([replaced, *adapters[1:]], **options).state_dict()
    assert "layers.1.proj.weight" in reads and "layers.0.out.weight" not in reads
    deltas = [peft_deltas(a) for a in adapters[1:]]
    key = "layers.1.proj.weight"
    want, sensitivity = _truth([whole.double() - base[key].double()] + [d[key] for d in deltas], "iso_c")
    err = (merged[key].double() - base[key].double() - want).abs().max().item()
    assert err <= 4 * M * torch.finfo(torch.float64).eps * sensitivity


# -- real adapters of all-MiniLM-L6-v2 -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(minilm_dir, tmp_path_factory) -> list[Path]:
    """Three peft LoRAs trained a few steps (rank-deficient sums: Σr ≤ 20 of 384)."""
    pytest.importorskip("peft")
    from _adapters import _adapter

    root = tmp_path_factory.mktemp("trained")
    return [
        _adapter(minilm_dir, root / "plain", 0, r=4, lora_alpha=8, target_modules=["query", "value"]),
        _adapter(minilm_dir, root / "rslora", 1, r=8, lora_alpha=4, use_rslora=True, target_modules=["query", "value"]),
        _adapter(minilm_dir, root / "alpha", 2, r=8, lora_alpha=16, target_modules=["query"], alpha_pattern={"layer.0.attention.self.query": 3}),
    ]


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_trained_minilm_adapters_against_float64_truth(minilm_dir, trained, monkeypatch, method):
    _no_dense_reads(monkeypatch)
    merged = svdfuse.merge(trained, base=minilm_dir, method=method, device="cpu", dtype=torch.float64, progress=False).state_dict()
    _check(merged, load_file(str(minilm_dir / "model.safetensors")), trained, torch.float64, method)


@pytest.fixture(scope="module")
def full_rank(minilm_dir, tmp_path_factory) -> list[Path]:
    """Two random peft LoRAs of rank 192 on the queries: their sum has full rank 384."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("full-rank")
    out = []
    for i in range(2):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(r=192, lora_alpha=24 + 8 * i, target_modules=["query"], init_lora_weights=False)
        peft.get_peft_model(transformers.AutoModel.from_pretrained(minilm_dir), config).save_pretrained(root / f"lora-{i}")
        out.append(root / f"lora-{i}")
    return out


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_real_minilm_adapters_equal_the_dense_route(minilm_dir, full_rank, tmp_path, method):
    base = load_file(str(minilm_dir / "model.safetensors"))
    options = dict(base=minilm_dir, method=method, device="cpu", dtype=torch.float64, svd="exact", progress=False)
    factored = svdfuse.merge(full_rank, **options).state_dict()
    dense = svdfuse.merge(_dense_sources(base, full_rank, tmp_path, torch.float64), **options).state_dict()
    _check(factored, base, full_rank, torch.float64, method)
    _check(dense, base, full_rank, torch.float64, method)


def test_axis_over_chunks_of_adapters_asks_the_disk_for_each_next_chunk(tmp_path, monkeypatch):
    """20 rank-2 adapters of one 512×512 matrix, 6 to a chunk under a 7 MB budget: once a chunk is
    read, the next one's factors are asked for (every byte of them, no other), beside the work."""
    import threading

    import svdfuse.pipeline as pipeline

    torch.manual_seed(4)
    base = {"proj.weight": torch.randn(512, 512)}
    save_file(base, str(tmp_path / "base.safetensors"))
    adapters = [_write_adapter(tmp_path / f"lora-{t}", base, ("proj",), 2, 3.0) for t in range(20)]
    options = dict(base=tmp_path / "base.safetensors", method="axis", device="cpu", dtype=torch.float64, progress=False)
    advised, chunks = [], []
    real_read = pipeline.stack_factors
    monkeypatch.setattr(pipeline, "advise", lambda spans: advised.extend(spans))
    monkeypatch.setattr(pipeline, "stack_factors", lambda group, *a, **kw: chunks.append(len(group)) or real_read(group, *a, **kw))
    chunked = svdfuse.merge(adapters, 6, max_memory="7MB", **options).state_dict()
    for thread in threading.enumerate():
        if thread.name == "svdfuse-advise":
            thread.join()
    assert chunks == [6, 6, 6, 2], chunks
    files = {str(next(a.glob("*.safetensors"))): a for a in adapters}
    assert sorted({files[file] for file, _, _ in advised}) == sorted(adapters[6:])
    for path in adapters[6:]:
        weights = path / "adapter_model.safetensors"
        with open(weights, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = 8 + int.from_bytes(open(weights, "rb").read(8), "little")
        want = sorted((str(weights), data + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__")
        assert sorted(s for s in advised if s[0] == str(weights)) == want
    whole = svdfuse.merge(adapters, 6, **options).state_dict()
    for key, want in whole.items():
        torch.testing.assert_close(chunked[key], want, rtol=0, atol=1e-12 * max(want.abs().max().item(), 1.0))
