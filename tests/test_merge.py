"""svdfuse.merge against an independent float64 AXIS on problems with planted components."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import svdfuse

from _helpers import merge_perturbed, module_from

SHAPES = {"blocks.0.fc.weight": (24, 16), "blocks.1.fc.weight": (24, 16), "head.weight": (10, 24), "blocks.0.fc.bias": (24,)}


def _planted_sources(T, rank, seed=0, dtype=torch.float64):
    """A float64 base and T sources whose task matrices have `rank` planted components with
    distinct singular values (so the global top-k is unique)."""
    gen = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=gen, dtype=torch.float64) for key, shape in SHAPES.items()}
    base["blocks.0.steps"] = torch.tensor(7)
    sources = []
    for _ in range(T):
        src = {}
        for key, W0 in base.items():
            if W0.dim() == 2:
                m, n = W0.shape
                U = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64)).Q
                V = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64)).Q
                S = torch.rand(rank, generator=gen, dtype=torch.float64) * 10 + 0.1
                src[key] = W0 + (U * S) @ V.T
            elif W0.is_floating_point():
                src[key] = W0 + torch.randn(W0.shape, generator=gen, dtype=torch.float64)
            else:
                src[key] = W0.clone()
        sources.append(src)
    cast = lambda sd: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    return cast(base), [cast(s) for s in sources]


def _independent_axis(base, sources, key, k):
    """AXIS straight from the paper: full SVD per source, global top-k by σ, sum of rank-one terms."""
    pool = []
    for i, src in enumerate(sources):
        U, S, Vh = torch.linalg.svd(src[key].double() - base[key].double(), full_matrices=False)
        pool += [(S[j].item(), i, j, U[:, j], Vh[j]) for j in range(S.numel())]
    pool.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen = pool[:k]
    delta = sum(s * torch.outer(u, v) for s, _, _, u, v in chosen)
    counts = [sum(1 for c in chosen if c[1] == i) for i in range(len(sources))]
    return delta, counts


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_merge_selects_the_same_components_as_independent_axis(method):
    base, sources = _planted_sources(T=5, rank=4)
    k = 7
    result = svdfuse.merge(sources, k=k, base=base, svd=svdfuse.SVDOptions(method=method), device="cpu")
    layers = {layer.key: layer for layer in result.report.layers}
    assert sorted(layers) == ["blocks.0.fc.weight", "blocks.1.fc.weight", "head.weight"]
    for key, layer in layers.items():
        delta, counts = _independent_axis(base, sources, key, k)
        assert layer.counts == counts
        assert sum(layer.counts) == k
        torch.testing.assert_close(result.delta(key), delta, atol=1e-11, rtol=0)
        U, S, V = result.components[key]
        assert U.shape == (SHAPES[key][0], k) and S.shape == (k,) and V.shape == (SHAPES[key][1], k)
        eye = torch.eye(k, dtype=torch.float64)
        torch.testing.assert_close(U.T @ U, eye, atol=1e-12, rtol=0)
        torch.testing.assert_close(V.T @ V, eye, atol=1e-12, rtol=0)
        assert torch.all(S[:-1] >= S[1:])


def test_state_dict_is_base_plus_delta_mean_and_base_buffers():
    base, sources = _planted_sources(T=3, rank=2, seed=1)
    result = svdfuse.merge(sources, k=3, base=base, device="cpu")
    state = result.state_dict()
    assert list(state) == list(base)
    torch.testing.assert_close(state["head.weight"], base["head.weight"] + result.delta("head.weight"))
    torch.testing.assert_close(state["blocks.0.fc.bias"], torch.stack([s["blocks.0.fc.bias"] for s in sources]).mean(0))
    assert state["blocks.0.steps"].item() == 7 and state["blocks.0.steps"].dtype == torch.int64
    assert all(state[key].dtype == torch.float64 for key in SHAPES)


def test_k_fraction_is_floor_of_min_dim():
    base, sources = _planted_sources(T=2, rank=4, seed=2, dtype=torch.float32)
    result = svdfuse.merge(sources, k=0.3, base=base, device="cpu")
    # min(24, 16) = 16 -> floor(4.8) = 4; min(10, 24) = 10 -> 3
    assert result.components["blocks.0.fc.weight"][1].numel() == 4
    assert result.components["head.weight"][1].numel() == 3


def test_include_exclude_patterns_choose_the_matrices():
    base, sources = _planted_sources(T=2, rank=2, seed=3)
    result = svdfuse.merge(sources, k=2, base=base, include=["blocks.*"], exclude=["*.1.*"], device="cpu")
    assert list(result.components) == ["blocks.0.fc.weight"]
    # Matrices left out of the decomposition are averaged like any other tensor.
    torch.testing.assert_close(result.state_dict()["head.weight"], torch.stack([s["head.weight"] for s in sources]).mean(0))


@pytest.mark.parametrize("method,k", [("axis", 5), ("tsv_m", None)])
def test_memory_budget_does_not_change_the_result(method, k):
    # 24x16 fp32 matrices, 4 sources: 1 GiB holds every matrix at once; 60 kB one matrix over all
    # sources at a time (a group piece of one matrix is ~52 kB); 20 kB one matrix over one source
    # at a time (~16 kB), streamed through the source chunks. Same arithmetic, same bits.
    base, sources = _planted_sources(T=4, rank=3, seed=4, dtype=torch.float32)
    results = [svdfuse.merge(sources, k=k, base=base, method=method, max_memory=budget, device="cpu") for budget in ("1GiB", 60_000, 20_000)]
    for other in results[1:]:
        assert other.components.keys() == results[0].components.keys()
        for key, factors in results[0].components.items():
            for a, b in zip(factors, other.components[key]):
                assert torch.equal(a, b), key
        assert [layer.counts for layer in other.report.layers] == [layer.counts for layer in results[0].report.layers]
        for key, value in results[0].state_dict().items():
            assert torch.equal(value, other.state_dict()[key]), key


def test_a_budget_below_the_smallest_piece_says_the_minimum():
    base, sources = _planted_sources(T=4, rank=3, seed=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"max_memory=9.8 KiB is smaller than the smallest piece .* needs 16.0 KiB; give at least max_memory=16KiB"):
        svdfuse.merge(sources, k=5, base=base, max_memory=10_000, device="cpu")
    with pytest.raises(ValueError, match=r"iso_c over 4 sources of one 24x16 matrix"):
        svdfuse.merge(sources, base=base, method="iso_c", max_memory=20_000, device="cpu")


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):  # x: (B, 3, 6, 6)
        h = self.conv(x).flatten(2).mT  # (B, 16, 8)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.mean(1))


def _perturbed(model, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_conv_and_attention_weights_are_merged_and_to_module_matches_dense():
    torch.manual_seed(0)
    base = _TinyNet().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    sources = [_perturbed(base, seed) for seed in range(3)]
    result = svdfuse.merge(sources, k=4, base=base, device="cpu")
    assert set(result.components) == {"conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"}
    assert result.components["conv.weight"][0].shape == (8, 4)  # (out, k) of the 8 x 27 matrix
    assert result.components["conv.weight"][2].shape == (27, 4)
    assert result.delta("conv.weight").shape == (8, 3, 3, 3)
    dense = _TinyNet().eval()
    dense.load_state_dict(result.state_dict())
    lowrank = result.to_module(base).eval()
    assert isinstance(lowrank.fc, svdfuse.nn.SVDLinear)
    assert isinstance(lowrank.attn, svdfuse.nn.SVDMultiheadAttention)
    assert isinstance(lowrank.attn.in_proj, svdfuse.nn.SVDLinear) and isinstance(lowrank.attn.out_proj, svdfuse.nn.SVDLinear)
    assert isinstance(lowrank.conv, svdfuse.nn.SVDConv)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(lowrank(x), dense(x), atol=1e-5, rtol=1e-5)
    # The base module itself is untouched.
    assert isinstance(base.fc, nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_attention_with_one_projection_merged_keeps_the_other_dense():
    """in_proj_weight excluded from the merge (averaged instead): a frozen dense in-projection beside a
    low-rank out-projection, and materialize gives back the plain nn.MultiheadAttention."""
    torch.manual_seed(0)
    base = _TinyNet().eval()
    sources = [_perturbed(base, seed) for seed in range(3)]
    result = svdfuse.merge(sources, k=4, base=base, device="cpu", exclude=["*in_proj_weight"])
    assert "attn.in_proj_weight" in result.tensors and "attn.out_proj.weight" in result.components
    dense = _TinyNet().eval()
    dense.load_state_dict(result.state_dict())
    lowrank = result.to_module(base).eval()
    in_proj = lowrank.attn.in_proj
    assert type(in_proj) is nn.Linear and not in_proj.weight.requires_grad
    torch.testing.assert_close(in_proj.weight, result.state_dict()["attn.in_proj_weight"])
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(lowrank(x), dense(x), atol=1e-5, rtol=1e-5)
    folded = svdfuse.nn.materialize(lowrank)
    assert type(folded.attn) is nn.MultiheadAttention
    assert folded.state_dict().keys() == dense.state_dict().keys()
    torch.testing.assert_close(folded(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["module", "state_dict", "safetensors", "hf_dir"])
def test_every_input_kind_gives_the_same_merge(kind, tmp_path):
    base, sources = _planted_sources(T=3, rank=3, seed=5, dtype=torch.float32)

    def as_kind(sd, name):
        if kind == "state_dict":
            return sd
        if kind == "module":
            return module_from(sd)
        if kind == "safetensors":
            save_file(sd, tmp_path / f"{name}.safetensors")
            return tmp_path / f"{name}.safetensors"
        directory = tmp_path / name
        directory.mkdir()
        save_file(sd, directory / "model.safetensors")
        (directory / "config.json").write_text("{}")
        return directory

    expected = svdfuse.merge(sources, k=4, base=base, device="cpu")
    got = svdfuse.merge([as_kind(s, f"s{i}") for i, s in enumerate(sources)], k=4, base=as_kind(base, "base"), device="cpu")
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value, atol=0, rtol=0)


def test_report_table_names_every_source():
    base, sources = _planted_sources(T=3, rank=3, seed=6)
    result = svdfuse.merge(sources, k=5, base=base, device="cpu")
    table = result.report.table()
    assert all(f"source {i}" in table for i in range(3))
    assert sum(result.report.totals()) == 5 * 3
    assert "3 matrices merged" in table


def test_named_sources_label_the_report_and_results_follow_model_order():
    base, sources = _planted_sources(T=2, rank=2, seed=7)
    result = svdfuse.merge({"cars": sources[0], "dtd": sources[1]}, k=2, base=base, device="cpu")
    assert result.report.sources == ["source 0 ('cars')", "source 1 ('dtd')"]
    matrices = [key for key in base if key in result.components]
    assert list(result.components) == matrices == [layer.key for layer in result.report.layers]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_merge_on_cuda_equals_merge_on_cpu(method, cuda):
    base, sources = _planted_sources(T=5, rank=4)
    options = svdfuse.SVDOptions(method=method)
    on_gpu = svdfuse.merge(sources, k=7, base=base, svd=options, device=cuda)
    on_cpu = svdfuse.merge(sources, k=7, base=base, svd=options, device="cpu")
    assert [layer.counts for layer in on_gpu.report.layers] == [layer.counts for layer in on_cpu.report.layers]
    for key in on_cpu.components:
        assert on_gpu.components[key][0].device.type == "cuda"
        torch.testing.assert_close(on_gpu.delta(key).cpu(), on_cpu.delta(key), atol=1e-10, rtol=0)


def test_a_model_that_is_one_linear_layer_carries_the_merge():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    result = merge_perturbed(base, sources=3, scale=0.05, seed=4, k=2)
    model = result.to_module(base)
    assert isinstance(model.parametrizations.weight[0], svdfuse.nn.SVDWeight)
    dense = nn.Linear(6, 5)
    dense.load_state_dict(result.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), dense(x), atol=1e-6, rtol=1e-6)
    assert svdfuse.nn.set_trainable(model, 1) == 1
    torch.testing.assert_close(svdfuse.nn.materialize(model)(x), dense(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method,k", [("task_arithmetic", None), ("axis", 3)])
def test_dtype_casts_every_input_before_merging(method, k, tmp_path):
    # dtype= means "cast every tensor to this dtype first": the merge of fp32 files at bf16 is the
    # merge of the same models stored in bf16, bit for bit (read path and cast included).
    base, sources = _planted_sources(T=3, rank=3, seed=9, dtype=torch.float32)
    save_file(base, tmp_path / "base.safetensors")
    files = []
    for i, src in enumerate(sources):
        save_file(src, tmp_path / f"s{i}.safetensors")
        files.append(tmp_path / f"s{i}.safetensors")
    bf16 = lambda sd: {key: v.bfloat16() if v.is_floating_point() else v for key, v in sd.items()}  # noqa: E731
    cast = svdfuse.merge(files, k=k, base=tmp_path / "base.safetensors", method=method, dtype=torch.bfloat16, device="cpu")
    stored = svdfuse.merge([bf16(s) for s in sources], k=k, base=bf16(base), method=method, device="cpu")
    for key, value in stored.state_dict().items():
        assert torch.equal(cast.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["axis", "iso_c"])
def test_a_groups_checks_name_its_own_matrix_and_source(method):
    """A group's sources are checked together: each refusal names the matrix and source at fault,
    and a matrix all zeros in the base and a source (unused heads, say) is no fault."""
    gen = torch.Generator().manual_seed(3)
    keys = [f"blocks.{i}.fc.weight" for i in range(3)]
    base = {key: torch.randn(12, 8, generator=gen) for key in keys}
    base[keys[0]] = torch.zeros(12, 8)
    sources = [{key: W0 + 0.1 * torch.randn(12, 8, generator=gen) for key, W0 in base.items()} for _ in range(3)]
    sources[1][keys[0]] = torch.zeros(12, 8)
    params = {"k": 2} if method == "axis" else {}
    svdfuse.merge(sources, base=base, method=method, device="cpu", **params)
    zeroed = [dict(s) for s in sources]
    zeroed[2][keys[1]] = torch.zeros(12, 8)
    with pytest.raises(svdfuse.SourceError, match=rf"source 2: tensor '{keys[1]}' \(12, 8\) is all zeros where the base's is not"):
        svdfuse.merge(zeroed, base=base, method=method, device="cpu", **params)
    poisoned = [dict(s) for s in sources]
    poisoned[1][keys[2]] = poisoned[1][keys[2]].clone()
    poisoned[1][keys[2]][4, 5] = float("inf")
    with pytest.raises(svdfuse.SourceError, match=rf"source 1: '{keys[2]}' of shape \(12, 8\) holds 0 NaN and 1 Inf values"):
        svdfuse.merge(poisoned, base=base, method=method, device="cpu", **params)
