"""Component caches: decomposed once, merged as sources, the same merge as decomposing on the fly."""

from __future__ import annotations

import re

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


# ---------------------------------------------------------------------------------------------
# A cache is checked against what it was made from: its base, its source, its own metadata


def _rewrite(file, tmp_path, *, name="tampered.svd.safetensors", metadata=None, tensors=None):
    """A copy of cache `file` with some metadata entries and tensors replaced (None: dropped)."""
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as f:
        meta, stored = dict(f.metadata()), {key: f.get_tensor(key) for key in f.keys()}
    for target, changes in ((meta, metadata or {}), (stored, tensors or {})):
        for key, value in changes.items():
            target.pop(key) if value is None else target.__setitem__(key, value)
    save_file(stored, str(tmp_path / name), metadata=meta)
    return tmp_path / name


def test_a_cache_is_refused_on_another_base_before_any_work(problem, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, output=file, device="cpu")
    # the same base in another form (a file, a copy of the dict), or with other non-matrix tensors: the cache fits
    save_file(base, str(tmp_path / "base.safetensors"))
    reference = svdfuse.merge([file, sources[1]], k=4, base=base, svd=SVD, device="cpu")
    for same in (tmp_path / "base.safetensors", {k: v.clone() for k, v in base.items()}, {**base, "l0.bias": base["l0.bias"] + 1}):
        svdfuse.merge([file, sources[1]], k=4, base=same, svd=SVD, device="cpu")
    # one entry of one matrix off by one ulp: another base
    other = {k: v.clone() for k, v in base.items()}
    other["l1.weight"][7, 3] = torch.nextafter(other["l1.weight"][7, 3], torch.tensor(float("inf")))
    monkeypatch.setattr(svdfuse.merging, "Compute", None)  # any work would fail on this instead
    out = tmp_path / "out"
    pattern = (r"^source 1 \('s0\.svd\.safetensors'\): was decomposed against another base \(recorded as base\): base differs "
               r"in the 3 matrices it was decomposed against; decompose the source against this base$")
    with pytest.raises(svdfuse.SourceError, match=pattern):
        svdfuse.merge([sources[1], file], k=4, base=other, svd=SVD, device="cpu", output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "s0.svd.safetensors"]
    missing = {k: v for k, v in base.items() if k != "head.weight"}
    with pytest.raises(svdfuse.SourceError, match=r"base has no"):
        svdfuse.sources.open_source(file, "source 0").check_base(svdfuse.sources.open_source(missing, "base"))
    assert reference.components


def test_a_cache_of_an_older_format_is_refused_with_what_to_do(problem, tmp_path):
    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, output=file, device="cpu")
    old = _rewrite(file, tmp_path, metadata={"svdfuse": "svdfuse.components/1", "base_sha256": None, "source_sha256": None, "source_sample_sha256": None})
    with pytest.raises(svdfuse.SourceError, match=r"^source 0 \('tampered\.svd\.safetensors'\): is a component cache in format 'svdfuse\.components/1', this svdfuse reads 'svdfuse\.components/2' .*; decompose the source again$"):
        svdfuse.merge([old, sources[1]], k=4, base=base, svd=SVD, device="cpu")


def test_duplicate_checks_read_each_source_once(problem, tmp_path, monkeypatch):
    # Caches among sources: each raw source's quick fingerprint is read once, not once per cache.
    base, sources = problem
    files = [tmp_path / f"s{i}.svd.safetensors" for i in range(2)]
    for source, file in zip(sources, files):
        svdfuse.decompose(source, base=base, rank=4, svd=SVD, output=file, device="cpu")
    read = []
    fingerprint = svdfuse.sources.Source.fingerprint
    monkeypatch.setattr(svdfuse.sources.Source, "fingerprint", lambda self, quick=False: read.append(quick) or fingerprint(self, quick=quick))
    svdfuse.sources.open_sources([*files, *sources[2:]], base)
    assert read.count(True) == len(sources) - 2  # the raw ones; a cache answers from its record


def test_a_source_beside_its_own_cache_is_the_same_source_twice(problem, tmp_path):
    from safetensors.torch import save_file

    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, output=file, device="cpu")
    save_file(sources[0], str(tmp_path / "s0.safetensors"))
    copy = tmp_path / "copy.svd.safetensors"
    copy.write_bytes(file.read_bytes())
    in_memory = svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, device="cpu")
    twice = [
        ([sources[1], sources[0], file], r"^source 2 \('s0\.svd\.safetensors'\) is the same model as source 1 "),
        ([file, tmp_path / "s0.safetensors"], r"^source 1 \('s0\.safetensors'\) is the same model as source 0 \('s0\.svd\.safetensors'\) "),
        ([file, copy], r"^source 1 \('copy\.svd\.safetensors'\) is the same model as source 0 \('s0\.svd\.safetensors'\) "),
        ([in_memory, file], r"^source 1 \('s0\.svd\.safetensors'\) is the same model as source 0 .*"),
    ]
    for models, pattern in twice:
        with pytest.raises(svdfuse.SourceError, match=pattern + r"\(a component cache stands for the source it was decomposed from\); give each source once"):
            svdfuse.merge(models, k=4, base=base, svd=SVD, device="cpu")
    # a source that differs from the cache's in one entry past its first and last rows is another source
    near = {k: v.clone() for k, v in sources[0].items()}
    near["l0.weight"][20, 5] += 1
    svdfuse.merge([file, near], k=4, base=base, svd=SVD, device="cpu")


@pytest.mark.parametrize(
    "metadata, tensors, message",
    [
        ({"tensors": "{not json"}, {}, r"its component-cache metadata is damaged \(JSONDecodeError: .*\); decompose the source again"),
        ({"matrices": None}, {}, r"its component-cache metadata is damaged \(KeyError: 'matrices'\)"),
        ({"svd": "[1, 2]"}, {}, r"its component-cache metadata is damaged \(TypeError: 'svd' holds a list, expected a dict\)"),
        ({"tensors": '{"l0.weight": [[40, 30], "F99"]}'}, {}, r"its component-cache metadata is damaged \(KeyError: 'F99'\)"),
        ({"matrices": '["l0.weight", "l1.weight", "head.weight", "l0.bias"]'}, {}, r"its metadata lists 'l0\.bias' \(40,\) as a matrix"),
        ({}, {"l0.weight.U": torch.zeros(40, 3)}, r"'l0\.weight\.U' is \(40, 3\) torch\.float32, its metadata says \(40, 4\); the cache is damaged"),
        ({}, {"l1.weight.S": torch.zeros(5)}, r"'l1\.weight\.U' is \(40, 4\) torch\.float32, its metadata says \(40, 5\)"),
        ({}, {"head.weight.V": None}, r"holds no 'head\.weight\.V', which its metadata lists; the cache is damaged"),
        ({}, {"l0.weight.S": None}, r"holds no 'l0\.weight\.S', which its metadata lists"),
        ({}, {"l0.bias": torch.zeros(40, dtype=torch.int32)}, r"'l0\.bias' is \(40,\) torch\.int32, its metadata says \(40,\) torch\.float32"),
    ],
)
def test_a_cache_with_tampered_metadata_is_named(metadata, tensors, message, problem, tmp_path):
    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, output=file, device="cpu")
    bad = _rewrite(file, tmp_path, metadata=metadata, tensors=tensors)
    with pytest.raises(svdfuse.SourceError, match=r"^source 1 \('tampered\.svd\.safetensors'\): " + message):
        svdfuse.merge([sources[1], bad], k=4, base=base, svd=SVD, device="cpu")
    assert main(["inspect", str(bad)]) == 2


def test_nan_in_a_cached_spectrum_names_the_cache(problem, tmp_path):
    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, output=file, device="cpu")
    with safe_open(str(file), "pt") as f:
        S = f.get_tensor("l1.weight.S")
    S[2] = float("nan")
    bad = _rewrite(file, tmp_path, tensors={"l1.weight.S": S})
    out = tmp_path / "merged.safetensors"
    with pytest.raises(svdfuse.SourceError, match=r"^source 1 \('tampered\.svd\.safetensors'\): the cached l1\.weight\.S \(4,\) holds 1 NaN and 0 Inf values; expected finite factors"):
        svdfuse.merge([sources[1], bad], k=4, base=base, svd=SVD, device="cpu", output=out)
    assert not out.exists()


@pytest.mark.parametrize("change", ["negative", "increasing"])
def test_a_cached_spectrum_out_of_order_or_negative_names_the_cache(change, problem, tmp_path):
    # The merge takes a cache's first k components as its top k: only a spectrum makes them so.
    base, sources = problem
    file = tmp_path / "s0.svd.safetensors"
    svdfuse.decompose(sources[0], base=base, rank=4, svd=SVD, output=file, device="cpu")
    with safe_open(str(file), "pt") as f:
        S = f.get_tensor("l1.weight.S")
    S = S.flip(0) if change == "increasing" else torch.cat([S[:3], -S[3:]])
    bad = _rewrite(file, tmp_path, tensors={"l1.weight.S": S})
    out = tmp_path / "merged.safetensors"
    with pytest.raises(svdfuse.SourceError, match=r"^source 1 \('tampered\.svd\.safetensors'\): the cached l1\.weight\.S \(4,\) is no spectrum, found \[.*\]; expected non-negative values in non-increasing order"):
        svdfuse.merge([sources[1], bad], k=2, base=base, svd=SVD, device="cpu", output=out)
    assert not out.exists()


@pytest.mark.parametrize("rank, message", [("0", "rank must be positive, found 0"), ("1000", r"rank=1000 is larger than min\(m, n\) of 3 matrices"), ("1.5", r"rank as a fraction of min\(m, n\) must be in \(0, 1\], found 1\.5")])
def test_cli_decompose_speaks_of_the_rank(rank, message, problem, tmp_path, capsys):
    from safetensors.torch import save_file

    base, sources = problem
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(sources[0], str(tmp_path / "ft.safetensors"))
    out = tmp_path / "ft.svd.safetensors"
    assert main(["decompose", str(tmp_path / "ft.safetensors"), "--base", str(tmp_path / "base.safetensors"), "-r", rank, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "k" not in re.findall(r"\b\w+\b", err.split("error: ", 1)[1].split(";")[0]), err
    assert not out.exists()


def test_decompose_copies_the_last_row_block_of_an_uneven_split(tmp_path):
    # `embed.weight` is not decomposed (excluded by default) but copied in row blocks: a small
    # budget cuts its 37 rows into blocks that do not divide them
    from svdfuse.methods import get_method
    from svdfuse.plan import DEFAULT_EXCLUDE, make_plan
    from svdfuse.sources import open_source

    gen = torch.Generator().manual_seed(0)
    base = {"l0.weight": torch.randn(16, 12, generator=gen), "embed.weight": torch.randn(37, 64, generator=gen), "l0.bias": torch.randn(16, generator=gen)}
    source = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    budget = 12000
    plan = make_plan(open_source(base, "base"), [open_source(source, "s")], get_method("axis"), 4, include=None, exclude=DEFAULT_EXCLUDE,
                     dtype=None, budget=budget, svd=SVD, params={})
    block = next(task.block for task in plan.tasks if task.specs[0].key == "embed.weight")
    assert 1 < block < 37 and 37 % block != 0
    whole = svdfuse.decompose(source, base=base, rank=4, svd=SVD, device="cpu")
    for output in (None, tmp_path / "split.svd.safetensors"):
        split = svdfuse.decompose(source, base=base, rank=4, svd=SVD, device="cpu", max_memory=budget, output=output)
        assert torch.equal(split.get("embed.weight"), source["embed.weight"]) and torch.equal(split.get("l0.bias"), source["l0.bias"])
        for part, a, b in zip("USV", whole.factors("l0.weight", 4), split.factors("l0.weight", 4)):
            assert torch.equal(a, b), part
