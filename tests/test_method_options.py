"""The options that reproduce another implementation's numbers on purpose, each against its published
formula written here in float64 (TIES's trimming scope and keep rule, Iso-CTS's common-subspace size,
the scaled non-matrix mean of TSV-M/Iso-C/Iso-CTS), and which paper or tool each default follows."""

import math

import pytest
import torch

import svdfuse
from svdfuse.cli import main, methods_table
from svdfuse.methods import METHODS
from svdfuse.methods.spectral import common_subspace

# Three tensors whose task vectors differ in scale, so that one threshold over the whole model
# trims them very differently from one threshold per tensor.
SHAPES = {"a.weight": (12, 9), "b.weight": (7, 10), "a.bias": (12,)}
SCALES = {"a.weight": 1.0, "b.weight": 0.2, "a.bias": 3.0}


def _problem(dtype, values, T=3, seed=0):
    """Base and T sources as state dicts. values="few": base and task vectors on a grid of 1/4, exact
    in any float dtype, so that many magnitudes tie at every threshold."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    base = {key: draw(shape) for key, shape in SHAPES.items()}
    if values == "few":
        base = {key: torch.round(v * 4) / 4 for key, v in base.items()}
    sources = []
    for _ in range(T):
        tau = {key: SCALES[key] * draw(v.shape) for key, v in base.items()}
        if values == "few":
            tau = {key: torch.round(t * 2) / 4 for key, t in tau.items()}
        sources.append({key: (base[key] + tau[key]).to(dtype) for key in base})
    return {key: v.to(dtype) for key, v in base.items()}, sources


def _trim_ref(flat, density, keep):
    """Keep-mask of each row of flat (T, N): the TIES paper's top `density` (exactly floor(d·N), ties
    to the lower index), or the authors' code: |τ| >= kthvalue(N - int(N·d)) (keep="inclusive")."""
    a = flat.abs()
    N = a.shape[1]
    if keep == "inclusive":
        k = N - int(N * density)
        if k == 0:  # density 1: every entry
            return torch.ones_like(a, dtype=torch.bool)
        return a >= a.kthvalue(k, dim=1, keepdim=True).values
    order = torch.sort(a, dim=1, descending=True, stable=True).indices[:, : math.floor(density * N)]
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, order, True)


def _ties_ref(base, sources, density, scaling, scope, keep, disjoint="mean"):
    """TIES (arXiv 2306.01708, eqs. of §3): trim, elect γ = sgn(Σ τ̂), disjoint mean of the entries
    whose sign is γ (or their sum, FusionBench's merge_func="sum"); the trim over each tensor or over
    the model's task vector flattened in model order."""
    keys = list(base)
    taus = {key: torch.stack([(s[key] - base[key]).double().flatten() for s in sources]) for key in keys}  # τ in the model's dtype
    if scope == "model":
        flat = torch.cat([taus[key] for key in keys], 1)
        mask = _trim_ref(flat, density, keep)
        sizes = [taus[key].shape[1] for key in keys]
        masks = dict(zip(keys, mask.split(sizes, 1)))
    else:
        masks = {key: _trim_ref(taus[key], density, keep) for key in keys}
    out = {}
    for key in keys:
        trimmed = taus[key] * masks[key]
        elected = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / (agree.sum(0).clamp(min=1) if disjoint == "mean" else 1)
        out[key] = base[key].double() + scaling * merged.reshape(base[key].shape)
    return out


def _assert_state_close(got, expected, dtype):
    for key, value in expected.items():
        # fp64 arithmetic in another order, or fp32's rounding of W0 + Δ and of the disjoint mean
        atol = 8 * torch.finfo(dtype).eps * value.abs().max().item()
        torch.testing.assert_close(got[key].double(), value, atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("values", ["continuous", "few"])
@pytest.mark.parametrize("keep", ["count", "inclusive"])
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_trim_scope_and_keep_rule_match_the_formula(dtype, values, keep, scope):
    base, sources = _problem(dtype, values)
    density, scaling = 0.3, 1.1
    expected = _ties_ref(base, sources, density, scaling, scope, keep)
    # One piece per tensor, then row blocks of 3 rows with the bracket's values limited to a few
    # hundred (fp32 takes the radix select there): the same exact trim.
    for budget in ("1GB", "4KiB"):
        got = svdfuse.merge(
            sources, base=base, method="ties", density=density, scaling=scaling, trim_scope=scope, trim_keep=keep,
            max_memory=budget, device="cpu",
        ).state_dict()  # fmt: skip
        _assert_state_close(got, expected, dtype)
    # The options matter on these inputs: the other scope or keep rule is another merge.
    other = _ties_ref(base, sources, density, scaling, "tensor" if scope == "model" else "model", keep)
    assert any(not torch.allclose(other[k], expected[k]) for k in expected)
    if values == "continuous":
        other = _ties_ref(base, sources, density, scaling, scope, "count" if keep == "inclusive" else "inclusive")
        assert any(not torch.allclose(other[k], expected[k]) for k in expected)


def test_ties_disjoint_sum_matches_the_formula():
    base, sources = _problem(torch.float64, "continuous")
    got = svdfuse.merge(sources, base=base, method="ties", density=0.3, scaling=0.3, trim_scope="model", trim_keep="inclusive", disjoint="sum", device="cpu")
    expected = _ties_ref(base, sources, 0.3, 0.3, "model", "inclusive", disjoint="sum")
    _assert_state_close(got.state_dict(), expected, torch.float64)
    mean = _ties_ref(base, sources, 0.3, 0.3, "model", "inclusive")
    assert not torch.allclose(mean["a.weight"], expected["a.weight"])


def test_ties_whole_model_trim_keeps_its_count_across_tensors():
    """Exactly floor(d·N) or floor(d·N)+1 survivors per source over the model, however they fall across tensors."""
    base, sources = _problem(torch.float32, "continuous", T=1)
    N = sum(math.prod(s) for s in SHAPES.values())
    for keep, extra in (("count", 0), ("inclusive", 1)):
        for density in (0.0, 0.1, 0.5):
            got = svdfuse.merge(sources, base=base, method="ties", density=density, trim_scope="model", trim_keep=keep, device="cpu").state_dict()
            kept = sum(int((got[key] != base[key]).sum()) for key in SHAPES)
            assert kept == math.floor(density * N) + extra, (keep, density, kept)


def test_ties_whole_model_trim_refuses_tensors_of_two_accumulation_dtypes():
    base, sources = _problem(torch.float32, "continuous")
    base["a.bias"] = base["a.bias"].double()
    for s in sources:
        s["a.bias"] = s["a.bias"].double()
    with pytest.raises(ValueError, match=r"trim_scope='model' .* torch.float32 \('a.weight'\), torch.float64 \('a.bias'\): pass dtype="):
        svdfuse.merge(sources, base=base, method="ties", trim_scope="model", device="cpu")
    # Cast to one dtype, it runs; per tensor, mixed dtypes are fine.
    svdfuse.merge(sources, base=base, method="ties", trim_scope="model", dtype=torch.float64, device="cpu")
    svdfuse.merge(sources, base=base, method="ties", device="cpu")


@pytest.mark.parametrize(
    "params,pattern",
    [
        ({"trim_scope": "global"}, r"ties: trim_scope must be one of 'tensor', 'model', found 'global'"),
        ({"trim_keep": "floor"}, r"ties: trim_keep must be one of 'count', 'inclusive', found 'floor'"),
        ({"density": 1.5, "trim_scope": "model"}, r"ties: density must be in \[0, 1\], found 1.5"),
        ({"disjoint": "max"}, r"ties: disjoint must be one of 'mean', 'sum', found 'max'"),
    ],
)
def test_bad_trim_options_are_refused_before_any_work(params, pattern, monkeypatch):
    base, sources = _problem(torch.float64, "continuous")
    monkeypatch.setattr(svdfuse.pipeline.Compute, "run", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=pattern):
        svdfuse.merge(sources, base=base, method="ties", device="cpu", **params)


@pytest.mark.parametrize(
    "name,params,pattern",
    [
        ("iso_c", {"scale_nonmatrix": "yes"}, r"iso_c: scale_nonmatrix must be True or False, found str 'yes'"),
        ("iso_cts", {"common_size": "4"}, r"iso_cts: common_size must be None or int, found str '4'"),
        ("iso_cts", {"fill_rank": 1}, r"iso_cts: fill_rank must be True or False, found int 1"),
    ],
)
def test_option_types_are_checked_before_any_work(name, params, pattern, monkeypatch):
    base, sources = _problem(torch.float64, "continuous")
    monkeypatch.setattr(svdfuse.pipeline.Compute, "run", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(TypeError, match=pattern):
        svdfuse.merge(sources, base=base, method=name, device="cpu", **params)


def _common_subspace_ref(r, T, f, fill):
    """The Iso-CTS paper: k_c = floor(f·r), s = floor((r - k_c)/T). The official iso-merging code
    (and FusionBench): k_c = int(r·f), then k_c = r - round((r - k_c)/T)·T, s = (r - k_c)/T."""
    k_c = int(r * f)
    if fill:
        k_c = r - round((r - k_c) / T) * T
    return k_c, (r - k_c) // T


def test_iso_cts_common_subspace_sizes_follow_the_paper_or_the_official_code():
    for r in (2, 7, 9, 64, 384, 768):
        for T in (1, 2, 3, 8, 20):
            for f in (0.0, 0.5, 0.8, 1.0):
                for fill in (False, True):
                    expected = _common_subspace_ref(r, T, f, fill)
                    if expected[0] < 0:
                        with pytest.raises(ValueError, match="negative common size"):
                            common_subspace(r, T, common=f, fill_rank=fill)
                        continue
                    assert common_subspace(r, T, common=f, fill_rank=fill) == expected, (r, T, f, fill)
    # The paper leaves 768 - 614 - 20·7 = 14 directions unused at T = 20; the official code none.
    assert common_subspace(768, 20) == (614, 7) and common_subspace(768, 20, fill_rank=True) == (608, 8)
    # Half-way cases round to even as Python's round does: (7 - 2) / 2 = 2.5 -> 2.
    assert common_subspace(7, 2, common=2 / 7 + 1e-9, fill_rank=True) == (3, 2)
    assert common_subspace(768, 20, common_size=600) == (600, 8)
    assert common_subspace(7, 2, common_size=7) == (7, 0)  # the whole rank common: Iso-C's directions
    with pytest.raises(ValueError, match=r"common_size must be an int in \[0, r\] = \[0, 7\]"):
        common_subspace(7, 2, common_size=8)
    with pytest.raises(ValueError, match="common_size gives k_c itself and fill_rank shifts the k_c of common; give one of them"):
        common_subspace(7, 2, common_size=3, fill_rank=True)


def _polar_ref(A):
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def _iso_cts_ref(taus, k_c, s, scaling):
    """Iso-CTS (arXiv 2502.04959, Alg. 2): top-k_c of Σ τ_i, then the top-s of each τ_i off that subspace;
    U and V orthonormalized by their polar factors, every σ replaced by the mean of the kept ones."""
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    Uc = U[:, :k_c]
    us, ss, vs = [Uc], [S[:k_c]], [Vh[:k_c].T]
    for tau in taus:
        Ut, St, Vth = torch.linalg.svd(tau - Uc @ Uc.T @ tau, full_matrices=False)
        us.append(Ut[:, :s]), ss.append(St[:s]), vs.append(Vth[:s].T)
    return scaling * torch.cat(ss).mean() * _polar_ref(torch.cat(us, 1)) @ _polar_ref(torch.cat(vs, 1)).T


# common_size=7 is the whole rank of b.weight (7x10): every direction common, none per task.
@pytest.mark.parametrize(
    "params", [{"fill_rank": True}, {"common_size": 4}, {"common_size": 3}, {"common_size": 7}, {"common": 0.7, "fill_rank": True}], ids=str
)
def test_iso_cts_common_size_options_match_the_formula(params):
    base, sources = _problem(torch.float64, "continuous", T=2)
    params = {"common": 0.5, **params}
    options = svdfuse.SVDOptions(method="exact")
    got = svdfuse.merge(sources, base=base, method="iso_cts", scaling=0.9, svd=options, device="cpu", **params).state_dict()
    paper = svdfuse.merge(sources, base=base, method="iso_cts", scaling=0.9, svd=options, device="cpu", common=params["common"]).state_dict()
    differ = []
    for key in ("a.weight", "b.weight"):
        r = min(base[key].shape)
        k_c, s = common_subspace(r, 2, **params)
        assert k_c == params.get("common_size", k_c) and (k_c + 2 * s == r or not params.get("fill_rank"))
        taus = [src[key] - base[key] for src in sources]
        torch.testing.assert_close(got[key], base[key] + _iso_cts_ref(taus, k_c, s, 0.9), atol=1e-10, rtol=0)
        if (k_c, s) != common_subspace(r, 2, common=params["common"]):
            differ.append(key)
    # Where the option gives other sizes than the paper's, it is another merge.
    assert differ and all(not torch.allclose(paper[key], got[key]) for key in differ)


@pytest.mark.parametrize("name,params", [("tsv_m", {}), ("iso_c", {}), ("iso_cts", {"common": 0.5})])
def test_scale_nonmatrix_scales_the_mean_task_vector_of_the_other_tensors(name, params):
    base, sources = _problem(torch.float64, "continuous")
    mean = sum(s["a.bias"] - base["a.bias"] for s in sources) / len(sources)
    plain = svdfuse.merge(sources, base=base, method=name, scaling=0.4, device="cpu", **params).state_dict()
    scaled = svdfuse.merge(sources, base=base, method=name, scaling=0.4, scale_nonmatrix=True, device="cpu", **params).state_dict()
    torch.testing.assert_close(plain["a.bias"], base["a.bias"] + mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(scaled["a.bias"], base["a.bias"] + 0.4 * mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(scaled["a.weight"], plain["a.weight"], atol=0, rtol=0)  # matrices as before


def test_embedding_tables_merge_as_matrices_with_an_empty_exclude():
    """FusionBench merges every 2-D tensor as a matrix in TSV-M/Iso-C, embedding tables included:
    `exclude=()`; svdfuse's default exclude ("*embed*") averages them."""
    base, sources = _problem(torch.float64, "continuous")
    base = {"tok_embeddings.weight" if k == "a.weight" else k: v for k, v in base.items()}
    sources = [{"tok_embeddings.weight" if k == "a.weight" else k: v for k, v in s.items()} for s in sources]
    taus = [s["tok_embeddings.weight"] - base["tok_embeddings.weight"] for s in sources]
    default = svdfuse.merge(sources, base=base, method="iso_c", device="cpu")
    torch.testing.assert_close(default.state_dict()["tok_embeddings.weight"], base["tok_embeddings.weight"] + sum(taus) / 3, atol=1e-12, rtol=0)
    everything = svdfuse.merge(sources, base=base, method="iso_c", exclude=(), device="cpu")
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    torch.testing.assert_close(everything.state_dict()["tok_embeddings.weight"], base["tok_embeddings.weight"] + S.mean() * U @ Vh, atol=1e-10, rtol=0)
    assert [layer.key for layer in everything.report.layers] == ["tok_embeddings.weight", "b.weight"]


def test_include_merges_a_2d_tensor_whatever_its_name():
    """A 2-D tensor not named "...weight" (open_clip's `proj`) is a matrix when include names it,
    and stays averaged by default."""
    base, sources = _problem(torch.float64, "continuous")
    rename = lambda d: {"proj" if k == "b.weight" else k: v for k, v in d.items()}  # noqa: E731
    base, sources = rename(base), [rename(s) for s in sources]
    taus = [s["proj"] - base["proj"] for s in sources]
    default = svdfuse.merge(sources, base=base, method="iso_c", device="cpu")
    assert [layer.key for layer in default.report.layers] == ["a.weight"]
    torch.testing.assert_close(default.state_dict()["proj"], base["proj"] + sum(taus) / 3, atol=1e-12, rtol=0)
    named = svdfuse.merge(sources, base=base, method="iso_c", include=["proj", "a.*"], device="cpu")
    assert [layer.key for layer in named.report.layers] == ["a.weight", "proj"]
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    torch.testing.assert_close(named.state_dict()["proj"], base["proj"] + S.mean() * U @ Vh, atol=1e-10, rtol=0)
    torch.testing.assert_close(named.state_dict()["a.bias"], base["a.bias"] + sum(s["a.bias"] - base["a.bias"] for s in sources) / 3)


def test_every_method_says_which_paper_or_tool_its_defaults_follow(capsys):
    for name, method in METHODS.items():
        assert len(method.follows) > 20, name
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert listed == methods_table() + "\n"
    for name, method in METHODS.items():
        assert f"{name} ({method.kind.value}, {method.reference_url})" in listed
    assert "trim_scope='tensor', trim_keep='count'" in listed and "common_size=None, fill_rank=False" in listed
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "defaults follow: mergekit for the trim" in capsys.readouterr().out


def test_cli_takes_the_trim_options(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base, sources = _problem(torch.float32, "continuous")
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, s in enumerate(sources):
        save_file(s, tmp_path / f"ft{i}.safetensors")
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
    out = tmp_path / "ties.safetensors"
    args = ["merge", "--base", str(tmp_path / "base.safetensors"), "--method", "ties", "--trim-scope", "model", "--trim-keep", "inclusive"]
    assert main([*args, "-o", str(out), "--quiet", *paths]) == 0
    expected = svdfuse.merge(paths, base=tmp_path / "base.safetensors", method="ties", trim_scope="model", trim_keep="inclusive").state_dict()
    written = load_file(out)
    assert all(torch.equal(written[key], expected[key]) for key in expected)
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main([*args[:-1], "sometimes", "-o", str(tmp_path / "x.safetensors"), *paths])
    assert "invalid choice: 'sometimes' (choose from" in capsys.readouterr().err
