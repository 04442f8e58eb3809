"""The exact SVD of a product from its factors (`factored.exact_factored_svd`), and the adapter merge
built on it: float64 Gram matrices, balanced rank directions, vectors formed only where a method
keeps them, and a LoRA output that never reads the base's merged matrices.

Truth is float64 `torch.linalg.svd` of the formed product; tolerances come from the inputs' dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse import factored
from svdfuse.methods import Components

F64 = torch.float64


def _factors(batch: int, m: int, n: int, r: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L (batch, m, r), R (batch, r, n) whose singular values span 10^-spread each, rotated."""
    gen = torch.Generator().manual_seed(seed)

    def one(rows: int) -> torch.Tensor:
        Q = torch.linalg.qr(torch.randn(batch, rows, r, generator=gen, dtype=F64))[0]
        W = torch.linalg.qr(torch.randn(batch, r, r, generator=gen, dtype=F64))[0]
        return Q * torch.logspace(0, -spread, r, dtype=F64) @ W.mT

    return one(m), one(n).mT


def _truth(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(L.to(F64) @ R.to(F64))[..., : L.shape[-1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [0, 3])
def test_exact_factored_svd_against_float64_truth(dtype, spread):
    L, R = (t.to(dtype) for t in _factors(4, 96, 70, 12, spread))
    found = factored.exact_factored_svd(L, R)
    U, S, V = found
    assert U.dtype == S.dtype == V.dtype == dtype
    W, truth = L.to(F64) @ R.to(F64), _truth(L, R)
    eps = torch.finfo(dtype).eps
    # Precision of the float64 Grams: ~ε64·κ² relative to the largest; the output's rounding: its ε.
    kappa2 = 10.0 ** (4 * spread)  # κ(L)² · κ(R)²: the product's smallest against its largest
    tol = 16 * max(eps, torch.finfo(F64).eps * kappa2)
    assert ((S.to(F64) - truth).abs() <= tol * truth[..., :1]).all()
    err = (U.to(F64) * S.to(F64)[..., None, :] @ V.to(F64).mT - W).abs().amax().item()
    assert err <= 16 * eps * (L.to(F64).abs() @ R.to(F64).abs()).amax().item()  # the product's own rounding scale
    live = truth > 1e-3 * truth[..., :1]  # directions far above the Grams' precision: orthonormal
    orth = 64 * max(eps, torch.finfo(F64).eps * 10.0 ** (2 * spread))  # ε64·κ² of one factor
    for Q in (U.to(F64), V.to(F64)):
        gram = Q.mT @ Q
        eye = torch.eye(gram.shape[-1], dtype=F64).expand_as(gram)
        mask = live[..., :, None] & live[..., None, :]
        assert ((gram - eye).abs()[mask] <= orth).all()


def test_a_direction_small_in_one_factor_and_large_in_the_other_is_kept():
    """ΔW = L R with one rank direction 1e-7 in L and 1e7 in R: as large in the product as the
    others, far below the Gram's resolution in L alone. Without balancing it is taken for noise."""
    L, R = _factors(2, 64, 48, 8, 0)
    L[..., 3] *= 1e-7
    R[..., 3, :] *= 1e7
    U, S, V = factored.exact_factored_svd(L, R)
    W = L @ R
    torch.testing.assert_close(S, _truth(L, R), rtol=1e-12, atol=0)
    assert (U * S[..., None, :] @ V.mT - W).abs().amax() <= 1e-13 * W.abs().amax()


def test_zero_columns_and_scale():
    """A rank padded with zero columns gives zero singular values; `scale` (negative too) multiplies
    the product, the singular values staying ≥ 0."""
    L, R = _factors(3, 40, 30, 8, 1)
    L[..., 5:], R[..., 5:, :] = 0, 0
    scale = torch.tensor([2.0, -0.5, 0.0], dtype=F64)
    U, S, V = factored.exact_factored_svd(L, R, scale=scale)
    W = scale[:, None, None] * (L @ R)
    assert (S[:, 5:] == 0).all() and (S[2] == 0).all() and (S >= 0).all()
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[..., :8], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(U * S[..., None, :] @ V.mT, W, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dependent", ["none", "L", "R"])
def test_singular_values_from_the_grams_alone(dependent):
    """`factored.singular_values` (what AXIS ranks every component by) against float64 truth: the
    top ones to float64's rounding; a direction a factor repeats (columns of L or rows of R
    dependent) at the truth's ~ε·σ₁, not the √ε·σ₁ that σ² from a near-singular Cholesky leaves."""
    L, R = _factors(5, 40, 30, 6, 1, seed=3)
    L[1, :, 2] = 0  # a direction L lacks and R has (peft starts B at zero): σ = 0 exactly
    if dependent == "L":
        L[..., 4:] = L[..., :2] * torch.tensor([2.0, -0.5], dtype=F64)
    if dependent == "R":
        R[..., 4:, :] = R[..., :2, :] * 3.0
    scale = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=F64)
    S = factored.singular_values(L.mT @ L, R @ R.mT, 40, 30, scale)
    truth = _truth(scale[:, None, None] * L, R)
    live = 4 if dependent != "none" else 6
    torch.testing.assert_close(S[:, :live], truth[:, :live], rtol=1e-12, atol=1e-14 * truth[:, :1].amax().item())
    assert (S[:, live:] <= 64 * torch.finfo(F64).eps * truth[:, :1]).all()
    assert (S[3] == 0).all()
    if dependent == "none":  # by the route from the Grams alone; the fallback's is ~ε·σ₁
        assert S[1, -1] == 0


def test_a_large_batch_of_products_split_over_threads_gives_every_products_values(monkeypatch):
    """More products than a thread takes at once (`factored._PART`, made small here): the parts
    on torch's threads give what one call on the whole batch gives, every product its own."""
    monkeypatch.setattr(factored, "_PART", 7)
    L, R = _factors(60, 30, 20, 5, 1, seed=4)
    scale = torch.linspace(-1, 2, 60, dtype=F64)
    grams = (L.mT @ L).reshape(3, 20, 5, 5), (R @ R.mT).reshape(3, 20, 5, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        S = factored._singular_values_on_threads(*grams, 30, 20, scale.reshape(3, 20))
    finally:
        torch.set_num_threads(threads)
    assert S.shape == (3, 20, 5)
    whole = factored.singular_values(L.mT @ L, R @ R.mT, 30, 20, scale)
    torch.testing.assert_close(S.reshape(60, 5), whole, rtol=1e-13, atol=0)
    torch.testing.assert_close(S.reshape(60, 5), _truth(scale[:, None, None] * L, R), rtol=1e-12, atol=1e-14)


def test_vectors_are_the_chosen_columns_and_resized_pads_with_zero_components():
    L, R = (t.float() for t in _factors(6, 32, 24, 4, 1))
    L, R = L.reshape(2, 3, 32, 4), R.reshape(2, 3, 4, 24)
    found = factored.exact_factored_svd(L, R, torch.float32)
    U, S, V = found
    layer, source, comp = torch.arange(2)[:, None], torch.tensor([[2, 0, 1], [1, 1, 0]]), torch.tensor([[0, 3, 1], [2, 0, 3]])
    for chunk in (found, Components(U, S, V)):
        u, v = chunk.vectors(layer, source, comp)
        torch.testing.assert_close(u, U[layer, source, :, comp], rtol=0, atol=0)
        torch.testing.assert_close(v, V[layer, source, :, comp], rtol=0, atol=0)
    wide = found.resized(6)
    assert wide.S.shape[-1] == 6 and (wide.S[..., 4:] == 0).all() and (wide.U[..., 4:] == 0).all() and (wide.V[..., 4:] == 0).all()
    torch.testing.assert_close(wide.U[..., :4], U, rtol=0, atol=0)
    assert found.resized(2).S.shape[-1] == 2


# -- the adapter merge built on it ---------------------------------------------------------------


def _base_and_adapters(root: Path, dtypes: list[torch.dtype], ranks: list[int] | None = None) -> tuple[Path, list[Path]]:
    """A tiny two-layer base (weights and biases) and adapters in peft's layout, factors stored in
    `dtypes` (one adapter each), of `ranks` (default 4 each)."""
    gen = torch.Generator().manual_seed(1)
    shapes = {"layer.0.proj": (24, 16), "layer.1.proj": (24, 16), "layer.1.out": (16, 24)}
    base = {f"{k}.weight": torch.randn(m, n, generator=gen) for k, (m, n) in shapes.items()}
    base.update({f"{k}.bias": torch.randn(m, generator=gen) for k, (m, n) in shapes.items()})
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    adapters = []
    for i, (dtype, r) in enumerate(zip(dtypes, ranks or [4] * len(dtypes))):
        tensors = {}
        for k, (m, n) in shapes.items():
            # Values bf16 cannot hold where the factors are float32: rounding them would show.
            tensors[f"base_model.model.{k}.lora_A.weight"] = (torch.randn(r, n, generator=gen) / 3).to(dtype)
            tensors[f"base_model.model.{k}.lora_B.weight"] = (torch.randn(m, r, generator=gen) / 5).to(dtype)
        path = root / f"adapter{i}"
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["proj", "out"], "fan_in_fan_out": False, "use_rslora": False}
        (path / "adapter_config.json").write_text(json.dumps(config))
        adapters.append(path)
    return root / "base.safetensors", adapters


def _summed(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    """Σ_i 2·B_i A_i per weight in float64 (lora_alpha = 2r: scale 2)."""
    out: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        f = load_file(str(adapter / "adapter_model.safetensors"))
        for key, A in f.items():
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                out[name] = out.get(name, 0) + 2 * f[key.replace("lora_A", "lora_B")].to(F64) @ A.to(F64)
    return out


def test_atlas_takes_adapters_as_sources_their_task_vectors_the_adapters_updates(tmp_path):
    """aTLAS over peft adapters: each coefficient scales an adapter's s·B·A, read against the base
    (`svdfuse.atlas` opened them without the base, and refused every adapter)."""
    base_path, adapters = _base_and_adapters(tmp_path, [torch.float32, torch.float32])
    base = load_file(str(base_path))
    module = torch.nn.Module()
    module.layer = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": torch.nn.Linear(16, 24)}),
                                        torch.nn.ModuleDict({"proj": torch.nn.Linear(16, 24), "out": torch.nn.Linear(24, 16)})])  # fmt: skip
    module.load_state_dict(base)
    model = svdfuse.atlas(adapters, base=base_path, module=module, init=1.0, device="cpu")
    summed = _summed(base_path, adapters)
    weights = {"layer.0.proj.weight": model.layer[0].proj.weight, "layer.1.proj.weight": model.layer[1].proj.weight, "layer.1.out.weight": model.layer[1].out.weight}
    for key, weight in weights.items():
        torch.testing.assert_close(weight.to(F64), base[key].to(F64) + summed[key], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.layer[1].out.bias, base["layer.1.out.bias"], rtol=0, atol=0)


def test_tsv_m_of_adapters_of_lower_rank_than_its_budget_keeps_all_their_components(tmp_path):
    """TSV-M's budget floor(min(m, n) / T) = 8 components a task, adapters of rank 4: each task
    gives its 4 (the rest are zero), polar-orthogonalized together, against float64 truth."""
    base_path, adapters = _base_and_adapters(tmp_path, [torch.float32, torch.float32])
    base = load_file(str(base_path))
    merged = svdfuse.merge(adapters, base=base_path, method="tsv_m", device="cpu", progress=False).state_dict()
    polar = lambda X: (lambda U, S, Vh: U @ Vh)(*torch.linalg.svd(X, full_matrices=False))  # noqa: E731
    for key in ("layer.0.proj.weight", "layer.1.proj.weight", "layer.1.out.weight"):
        parts = []
        for adapter in adapters:
            f = load_file(str(adapter / "adapter_model.safetensors"))
            name = key.removesuffix(".weight")
            delta = 2 * f[f"base_model.model.{name}.lora_B.weight"].to(F64) @ f[f"base_model.model.{name}.lora_A.weight"].to(F64)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            parts.append((U[:, :4], S[:4], Vh[:4].mT))
        U, S, V = (torch.cat([p[i] for p in parts], -1 if i != 1 else 0) for i in range(3))
        truth = polar(U) @ torch.diag(S) @ polar(V).mT
        torch.testing.assert_close(merged[key].to(F64) - base[key].to(F64), truth, rtol=0, atol=1e-5)


def test_adapters_stored_in_different_dtypes_are_read_each_in_its_own(tmp_path):
    """AXIS keeping every component of a bf16 adapter and a float32 one is their exact sum: a
    float32 adapter read through a bf16 buffer would be off by bf16's rounding (~4e-3)."""
    base, adapters = _base_and_adapters(tmp_path, [torch.bfloat16, torch.float32])
    merged = svdfuse.merge([str(a) for a in adapters], 8, base=str(base), device="cpu", dtype=F64).state_dict()
    W0 = load_file(str(base))
    for key, delta in _summed(base, adapters).items():
        torch.testing.assert_close(merged[key] - W0[key].to(F64), delta, rtol=0, atol=1e-12)


def test_an_adapter_whose_two_factors_differ_in_dtype_is_read_in_the_wider(tmp_path):
    """lora_A in float32 and lora_B in bf16 of one adapter: A is not rounded to B's dtype."""
    base, adapters = _base_and_adapters(tmp_path, [torch.float32])
    weights = tmp_path / "adapter0" / "adapter_model.safetensors"
    save_file({k: t.bfloat16() if ".lora_B." in k else t for k, t in load_file(str(weights)).items()}, str(weights))
    merged = svdfuse.merge([str(adapters[0])], 4, base=str(base), device="cpu", dtype=F64).state_dict()
    W0 = load_file(str(base))
    for key, delta in _summed(base, adapters).items():
        torch.testing.assert_close(merged[key] - W0[key].to(F64), delta, rtol=0, atol=1e-12)


def test_axis_forms_only_the_vectors_it_keeps(tmp_path, monkeypatch):
    """Over adapters, AXIS asks each chunk for its kept components alone: forming every vector
    (`FactoredSVD.U` / `.V`) fails here. TSV-M, which keeps a share of each source, still may."""
    base, adapters = _base_and_adapters(tmp_path, [torch.float32] * 3)
    sources = [str(a) for a in adapters]
    tsv = svdfuse.merge(sources, base=str(base), device="cpu", method="tsv_m", budget=2).state_dict()

    def refuse(self):
        raise AssertionError("every singular vector formed")

    monkeypatch.setattr(factored.FactoredSVD, "U", property(refuse))
    monkeypatch.setattr(factored.FactoredSVD, "V", property(refuse))
    merged = svdfuse.merge(sources, 12, base=str(base), device="cpu", dtype=F64).state_dict()
    W0 = load_file(str(base))
    for key, delta in _summed(base, adapters).items():  # k = 12 = Σ r: every component, their sum
        torch.testing.assert_close(merged[key] - W0[key].to(F64), delta, rtol=0, atol=1e-12)
    with pytest.raises(AssertionError, match="every singular vector"):
        svdfuse.merge(sources, base=str(base), device="cpu", method="tsv_m", budget=2)
    assert tsv  # ran before the patch


def test_a_lora_output_of_adapters_never_reads_the_bases_merged_matrices(tmp_path, monkeypatch):
    """AXIS of adapters to a LoRA needs only their factors: the base's weights of the targeted
    modules are not read (each is as large as all the adapters' factors of it, many times over)."""
    from svdfuse.sources import Reader

    base, adapters = _base_and_adapters(tmp_path, [torch.float32] * 2)
    read: list[str] = []
    real = Reader.read_rows

    def read_rows(self, key, start, stop, outs):
        if any(i == 0 for i, _ in outs):  # the base's rows
            read.append(key)
        real(self, key, start, stop, outs)

    monkeypatch.setattr(Reader, "read_rows", read_rows)
    svdfuse.merge([str(a) for a in adapters], 8, base=str(base), device="cpu", output=tmp_path / "out", save_format="lora", progress=False)
    targeted = [key for key in _summed(base, adapters)]
    assert not set(read) & set(targeted), sorted(set(read) & set(targeted))
    assert read, "the other tensors (biases) are still read and compared with the base"
    # The adapter written holds the exact sum (k = 8 = Σ r).
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for key, delta in _summed(base, adapters).items():
        module = f"base_model.model.{key.removesuffix('.weight')}"
        got = out[f"{module}.lora_B.weight"].to(F64) @ out[f"{module}.lora_A.weight"].to(F64)
        torch.testing.assert_close(got, delta, rtol=0, atol=64 * torch.finfo(torch.float32).eps * delta.abs().max().item())


def test_chunks_of_adapters_reuse_their_buffers_without_leaking_into_padding(tmp_path):
    """Under a small budget the adapters stream through in chunks that share one buffer; a rank-1
    adapter beside rank-3 ones is padded with zeros, not with the previous chunk's factors."""
    base, adapters = _base_and_adapters(tmp_path, [torch.float32] * 5, ranks=[3, 3, 3, 1, 3])
    sources = [str(a) for a in adapters]
    small = svdfuse.merge(sources, 13, base=str(base), device="cpu", dtype=F64, max_memory="150KB")
    assert small.report.budget <= 150_000
    W0 = load_file(str(base))
    merged = small.state_dict()
    for key, delta in _summed(base, adapters).items():  # k = 13 = Σ r: their exact sum
        torch.testing.assert_close(merged[key] - W0[key].to(F64), delta, rtol=0, atol=1e-12)


def test_a_group_read_whole_after_a_group_of_adapters_finds_their_buffers_freed(tmp_path, monkeypatch):
    """The stacked factors' buffers are kept from one group of adapters to the next, and freed
    before a group whose sources are read whole (an adapter replacing `layer.1.out` entirely):
    that group's pieces fill the budget by themselves."""
    from svdfuse.pipeline import Compute

    base, adapters = _base_and_adapters(tmp_path, [torch.float32] * 2)
    weights = adapters[1] / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if ".out." not in k}
    tensors["base_model.model.layer.1.out.weight"] = load_file(str(base))["layer.1.out.weight"] + 0.5
    save_file(tensors, str(weights))
    seen: list[tuple[str, bool]] = []
    lora, read_whole = Compute._lora, Compute._sources

    def traced_lora(self, *args, **kwargs):
        seen.append(("adapters", bool(self._factor_buffers._held)))
        return lora(self, *args, **kwargs)

    def traced_sources(self, *args, **kwargs):
        seen.append(("whole", bool(self._factor_buffers._held)))
        return read_whole(self, *args, **kwargs)

    monkeypatch.setattr(Compute, "_lora", traced_lora)
    monkeypatch.setattr(Compute, "_sources", traced_sources)
    svdfuse.merge([str(a) for a in adapters], 4, base=str(base), device="cpu", dtype=F64)
    assert ("whole", False) in seen and ("whole", True) not in seen, seen
    assert [kind for kind, _ in seen].index("adapters") < [kind for kind, _ in seen].index("whole"), seen  # the case at stake


def _replaced_whole(base: Path, adapter: Path, modules: list[str]) -> None:
    """Make `adapter` replace `modules` whole (as modules_to_save does) instead of updating them."""
    weights = adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if not any(f".{m}." in f".{k}" for m in modules)}
    for module in modules:
        tensors[f"base_model.model.{module}.weight"] = load_file(str(base))[f"{module}.weight"] + 0.5
    save_file(tensors, str(weights))


def _trace_buffers(monkeypatch, method: str) -> list[tuple[bool, bool]]:
    """(source buffers held, factor buffers held) at each call of `Compute.<method>`, from here on."""
    from svdfuse.pipeline import Compute

    seen: list[tuple[bool, bool]] = []
    real = getattr(Compute, method)

    def traced(self, *args, **kwargs):
        seen.append((bool(self._source_buffers._held), bool(self._factor_buffers._held)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Compute, method, traced)
    return seen


def test_groups_read_whole_share_one_buffer_which_a_group_of_adapters_after_them_frees(tmp_path, monkeypatch):
    """Successive groups read whole reuse one buffer for their sources (fresh memory costs a page
    fault per 4 KB: a second of 4 GB of sources); a group of adapters alone frees it first."""
    base, adapters = _base_and_adapters(tmp_path / "both", [torch.float32] * 2)
    _replaced_whole(base, adapters[1], ["layer.0.proj", "layer.1.out"])  # both groups read whole
    groups = _trace_buffers(monkeypatch, "source_factors")
    svdfuse.merge([str(a) for a in adapters], 4, base=str(base), device="cpu", dtype=F64)
    assert groups == [(False, False), (True, False)], f"the second group read whole took fresh memory for its sources: {groups}"
    base, adapters = _base_and_adapters(tmp_path / "then", [torch.float32] * 2)
    _replaced_whole(base, adapters[1], ["layer.0.proj"])  # the proj group read whole, then the out group from adapters alone
    groups.clear()
    factored = _trace_buffers(monkeypatch, "_lora")  # also the proj group's adapter 0, beside adapter 1 read whole
    svdfuse.merge([str(a) for a in adapters], 4, base=str(base), device="cpu", dtype=F64)
    assert len(groups) == 2 and groups[1][0], groups  # the case at stake: the sources' buffer held when the adapters' group begins
    assert not factored[-1][0], f"the group of adapters kept the sources' buffer of the group before it: {factored}"


def test_decompose_an_adapter_of_lower_rank_that_leaves_a_matrix_alone(tmp_path):
    """A cache holds `rank` components per matrix: an adapter's rank-2 update gives two and zeros,
    a matrix it leaves alone all zeros; merging from the cache equals merging from the adapter."""
    base, adapters = _base_and_adapters(tmp_path, [torch.float32, torch.float32], ranks=[2, 3])
    factors = load_file(str(adapters[0] / "adapter_model.safetensors"))
    save_file({k: v for k, v in factors.items() if ".out." not in k}, str(adapters[0] / "adapter_model.safetensors"))
    cache = svdfuse.decompose(str(adapters[0]), base=str(base), rank=4, output=tmp_path / "a.svd.safetensors", svd="exact")
    stored = load_file(str(tmp_path / "a.svd.safetensors"))
    assert stored["layer.1.out.weight.S"].shape == (4,) and (stored["layer.1.out.weight.S"] == 0).all()
    assert (stored["layer.0.proj.weight.S"][2:] == 0).all() and (stored["layer.0.proj.weight.S"][:2] > 0).all()
    direct = svdfuse.merge([str(a) for a in adapters], 4, base=str(base), device="cpu", dtype=F64, svd="exact").state_dict()
    cached = svdfuse.merge([cache, str(adapters[1])], 4, base=str(base), device="cpu", dtype=F64, svd="exact").state_dict()
    for key, want in direct.items():
        torch.testing.assert_close(cached[key], want, rtol=0, atol=1e-6 * max(want.abs().max().item(), 1.0))


def test_task_arithmetic_to_a_lora_holds_a_modules_factors_within_the_budget(tmp_path):
    """Task Arithmetic of adapters to a LoRA lays every adapter's factors of a module side by side:
    above the budget it is refused before anything is read or written, naming the module."""
    base, adapters = _base_and_adapters(tmp_path, [torch.float32] * 2)
    sources = [str(a) for a in adapters]
    # layer.0.proj: Σ r = 8 columns of 24 + 16 rows, float32 stored and twice converted: 3840 bytes
    with pytest.raises(ValueError, match=r"'layer.0.proj.weight' \(24, 16\): the 2 adapters' factors of it take .* above the memory budget"):
        svdfuse.merge(sources, base=str(base), method="task_arithmetic", scaling=1.0, output=tmp_path / "small", save_format="lora", max_memory="3000B")
    assert not (tmp_path / "small").exists()
    svdfuse.merge(sources, base=str(base), method="task_arithmetic", scaling=1.0, output=tmp_path / "fits", save_format="lora", max_memory="4000B")
    out = load_file(str(tmp_path / "fits" / "adapter_model.safetensors"))
    got = out["base_model.model.layer.0.proj.lora_B.weight"].to(F64) @ out["base_model.model.layer.0.proj.lora_A.weight"].to(F64)
    want = _summed(base, adapters)["layer.0.proj.weight"]
    torch.testing.assert_close(got, want, rtol=0, atol=64 * torch.finfo(torch.float32).eps * want.abs().max().item())


def test_adapters_of_one_layout_are_parsed_and_placed_on_the_base_once(tmp_path, monkeypatch):
    """Five adapters with equal configs and headers are parsed once and placed on the base once
    (a thousand community adapters are one layout); one with another lora_alpha is parsed on its
    own, with its own scale; another base places them again; a merge of them all is their sum."""
    import shutil

    import svdfuse.adapters as adapters_module
    from svdfuse.sources import open_source

    base, adapters = _base_and_adapters(tmp_path, [torch.float32] * 5)
    other = tmp_path / "alpha16"
    shutil.copytree(adapters[0], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    monkeypatch.setattr(adapters_module, "_PARSED", adapters_module._Layouts())
    monkeypatch.setattr(adapters_module, "_PLACED", adapters_module._Layouts())
    calls = []
    for cls, name in ((adapters_module.LoraAdapter, "_parse"), (adapters_module.LoraSource, "_place")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, real=real, name=name: calls.append(name) or real(self, *a))
    base_source = open_source(str(base), "base")
    opened = [open_source(str(a), f"source {i}", base_source) for i, a in enumerate([*adapters, other])]
    assert calls == ["_parse", "_place", "_parse", "_place"], calls
    key = "layer.0.proj.weight"
    assert [s.modules[key].scale for s in opened] == [2.0] * 5 + [4.0]
    assert [s.modules[key].a for s in opened] == [opened[0].modules[key].a] * 6
    again = open_source(str(adapters[0]), "source 0", open_source(str(base), "the base again"))
    assert calls[4:] == ["_place"] and again.modules[key].scale == 2.0
    merged = svdfuse.merge([str(a) for a in adapters], base=str(base), method="task_arithmetic", scaling=1.0, device="cpu", dtype=F64).state_dict()
    W0 = load_file(str(base))
    for key, delta in _summed(base, adapters).items():
        torch.testing.assert_close(merged[key] - W0[key].to(F64), delta, rtol=0, atol=1e-12)
