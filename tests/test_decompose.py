"""Component caches: decomposed once, merged as sources, the same merge as decomposing on the fly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import svdfuse
from svdfuse.cli import main

SVD = svdfuse.SVDOptions(method="randomized")


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    base = {
        "l0.weight": torch.randn(40, 30, generator=gen), "l1.weight": torch.randn(40, 30, generator=gen),
        "head.weight": torch.randn(12, 40, generator=gen), "l0.bias": torch.randn(40, generator=gen),
    }
    sources = []
    for _ in range(5):
        src = {}
        for key, W0 in base.items():
            if W0.dim() == 2:
                planted = torch.randn(W0.shape[0], 6, generator=gen) @ torch.diag(torch.rand(6, generator=gen) * 3 + 0.5) @ torch.randn(6, W0.shape[1], generator=gen)
                src[key] = W0 + 0.1 * planted + 1e-3 * torch.randn(W0.shape, generator=gen)
            else:
                src[key] = W0 + 0.1 * torch.randn(W0.shape, generator=gen)
        sources.append(src)
    return base, sources


# The on-the-fly merge decomposes c sources per batched GEMM, a cache one: the CPU BLAS rounds a
# batched product and a single one differently, so the two agree to fp32 rounding, not bit for bit.
# σ within 1e-6 relative (the contract); the merged matrices within 16 fp32 ulps of their norm.
MERGED_RTOL = 16 * torch.finfo(torch.float32).eps


def _assert_same_merge(a, b):
    assert [layer.counts for layer in a.report.layers] == [layer.counts for layer in b.report.layers]
    for key, (U, S, V) in a.components.items():
        U2, S2, V2 = b.components[key]
        torch.testing.assert_close(S2, S, rtol=1e-6, atol=0)
        dense, dense2 = (U * S) @ V.T, (U2 * S2) @ V2.T
        assert (dense2 - dense).norm() <= MERGED_RTOL * dense.norm(), key
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=MERGED_RTOL, atol=MERGED_RTOL * value.abs().max().item())


@pytest.mark.parametrize("method,params", [("axis", {"k": 5}), ("tsv_m", {"budget": 2})])
def test_caches_give_the_merge_of_decomposing_on_the_fly(method, params, problem, tmp_path):
    base, sources = problem
    rank = params.get("k", params.get("budget"))
    files = [tmp_path / f"s{i}.svd.safetensors" for i in range(len(sources))]
    for source, file in zip(sources, files):
        svdfuse.decompose(source, base=base, rank=rank, svd=SVD, output=file, device="cpu")
    fly = svdfuse.merge(sources, base=base, method=method, svd=SVD, device="cpu", **params)
    cached = svdfuse.merge(files, base=base, method=method, svd=SVD, device="cpu", **params)
    _assert_same_merge(fly, cached)
    # Caches and raw sources mix, in memory or on disk; the non-matrix tensors come from the cache.
    mixed = [sources[0], files[1], sources[2], svdfuse.decompose(sources[3], base=base, rank=rank, svd=SVD, device="cpu"), files[4]]
    _assert_same_merge(fly, svdfuse.merge(mixed, base=base, method=method, svd=SVD, device="cpu", **params))


def test_a_cache_records_its_options_and_a_higher_rank_serves_any_smaller_k(problem, tmp_path):
    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=12, svd=SVD, output=file, device="cpu")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
        assert meta["svdfuse"] == "svdfuse.components/2" and meta["rank"] == "12"
        assert f.get_tensor("l0.weight.U").shape == (40, 12) and f.get_tensor("l0.weight.S").shape == (12,)
        assert "l0.bias" in f.keys() and "l0.weight" not in f.keys()
    exact = svdfuse.merge([sources[0], sources[1]], k=4, base=base, svd=svdfuse.SVDOptions(method="exact"), device="cpu")
    cached = svdfuse.merge([file, sources[1]], k=4, base=base, svd=SVD, device="cpu")
    # rank-12 sketches of a rank-6 planted spectrum: the top 4 are exact to fp32 rounding
    assert [layer.counts for layer in cached.report.layers] == [layer.counts for layer in exact.report.layers]
    for key in exact.components:
        torch.testing.assert_close(cached.components[key][1], exact.components[key][1], rtol=1e-4, atol=0)


def test_caches_that_do_not_fit_the_merge_are_refused_before_any_work(problem, tmp_path):
    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, output=file, device="cpu")
    with pytest.raises(svdfuse.SourceError, match=r"is a component cache \(rank 4\); method 'ties' needs the full weights"):
        svdfuse.merge([file, sources[1]], base=base, method="ties", device="cpu")
    with pytest.raises(svdfuse.SourceError, match=r"'l0.weight' is cached at rank 4, axis needs 5 components per source"):
        svdfuse.merge([file, sources[1]], k=5, base=base, svd=SVD, device="cpu")
    with pytest.raises(svdfuse.SourceError, match=r"other SVD options than this merge's: method='randomized' \(merge: 'auto'\)"):
        svdfuse.merge([file, sources[1]], k=4, base=base, device="cpu")
    with pytest.raises(svdfuse.SourceError, match=r"stores factors only of 'head.weight', which this merge does not merge"):
        svdfuse.merge([file, sources[1]], k=4, base=base, svd=SVD, exclude=["head.*"], device="cpu")
    with pytest.raises(svdfuse.SourceError, match="is already a component cache"):
        svdfuse.decompose(file, base=base, rank=4)


def test_cli_decompose_then_merge(problem, tmp_path, capsys):
    from safetensors.torch import save_file

    base, sources = problem
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, src in enumerate(sources[:3]):
        save_file(src, tmp_path / f"ft{i}.safetensors")
        out = tmp_path / f"ft{i}.svd.safetensors"
        assert main(["decompose", str(tmp_path / f"ft{i}.safetensors"), "--base", str(tmp_path / "base.safetensors"), "-r", "5", "--svd", "randomized", "-o", str(out)]) == 0
        paths.append(str(out))
    assert "wrote" in capsys.readouterr().out
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "-k", "5", "--svd", "randomized", "-o", str(merged), "--quiet", *paths]) == 0
    assert merged.is_file()
