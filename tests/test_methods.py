"""Every merge method against a plain float64 implementation of its published formula."""

import math

import pytest
import torch
from torch import nn

import svdfuse
from svdfuse.methods import METHODS, get_method

SHAPES = {"a.weight": (12, 9), "b.weight": (7, 10), "a.bias": (12,)}


def _problem(T=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=gen, dtype=torch.float64) for key, shape in SHAPES.items()}
    sources = [{key: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) for key, v in base.items()} for _ in range(T)]
    return base, sources


def _taus(base, sources, key):
    return [s[key] - base[key] for s in sources]


def _ties_ref(taus, density, scaling):
    trimmed = []
    for tau in taus:
        flat = tau.flatten()
        keep = math.floor(density * flat.numel())
        out = torch.zeros_like(flat)
        order = flat.abs().argsort(descending=True)[:keep]
        out[order] = flat[order]
        trimmed.append(out.reshape(tau.shape))
    elected = torch.sign(sum(trimmed))
    merged = torch.zeros_like(taus[0])
    for idx in range(merged.numel()):
        agreeing = [t.flatten()[idx] for t in trimmed if t.flatten()[idx] != 0 and torch.sign(t.flatten()[idx]) == elected.flatten()[idx]]
        merged.view(-1)[idx] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return scaling * merged


def _polar_ref(A):
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def _tsv_ref(taus, budget, scaling):
    Us, Ss, Vs = [], [], []
    for tau in taus:
        U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
        Us.append(U[:, :budget]), Ss.append(S[:budget]), Vs.append(Vh[:budget].T)
    U, S, V = _polar_ref(torch.cat(Us, 1)), torch.cat(Ss), _polar_ref(torch.cat(Vs, 1))
    return scaling * (U * S) @ V.T


def _iso_c_ref(taus, scaling):
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return scaling * S.mean() * U @ Vh


def _iso_cts_ref(taus, common, scaling):
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    r = S.numel()
    k_c = math.floor(common * r)
    s = (r - k_c) // len(taus)
    Uc, Vc = U[:, :k_c], Vh[:k_c].T
    us, ss, vs = [Uc], [S[:k_c]], [Vc]
    for tau in taus:
        Ut, St, Vth = torch.linalg.svd(tau - Uc @ Uc.T @ tau, full_matrices=False)
        us.append(Ut[:, :s]), ss.append(St[:s]), vs.append(Vth[:s].T)
    sigma = torch.cat(ss).mean()
    return scaling * sigma * _polar_ref(torch.cat(us, 1)) @ _polar_ref(torch.cat(vs, 1)).T


CASES = [
    ("average", {}, lambda taus: sum(taus) / len(taus), "mean"),
    ("task_arithmetic", {"scaling": 0.4}, lambda taus: 0.4 * sum(taus), "same"),
    ("ties", {"density": 0.3, "scaling": 1.2}, lambda taus: _ties_ref(taus, 0.3, 1.2), "same"),
    ("ties", {"density": 1.0}, lambda taus: _ties_ref(taus, 1.0, 1.0), "same"),
    ("dare", {"drop_rate": 0.0, "scaling": 0.5}, lambda taus: 0.5 * sum(taus), "same"),
    ("tsv_m", {"scaling": 0.7}, None, "mean"),
    ("iso_c", {"scaling": 1.3}, lambda taus: _iso_c_ref(taus, 1.3), "mean"),
    ("iso_cts", {"common": 0.5, "scaling": 0.9}, lambda taus: _iso_cts_ref(taus, 0.5, 0.9), "mean"),
]


@pytest.mark.parametrize("name,params,formula,tensors", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_method_matches_its_published_formula(name, params, formula, tensors):
    base, sources = _problem()
    result = svdfuse.merge(sources, base=base, method=name, device="cpu", **params)
    state = result.state_dict()
    for key in ("a.weight", "b.weight"):
        taus = _taus(base, sources, key)
        if name == "tsv_m":
            expected = _tsv_ref(taus, min(base[key].shape) // len(taus), params["scaling"])
        else:
            expected = formula(taus)
        torch.testing.assert_close(state[key], base[key] + expected, atol=1e-10, rtol=0)
    bias_taus = _taus(base, sources, "a.bias")
    bias = sum(bias_taus) / len(bias_taus) if tensors == "mean" else formula(bias_taus)
    torch.testing.assert_close(state["a.bias"], base["a.bias"] + bias, atol=1e-12, rtol=0)
    assert result.report.method == name


def test_every_registered_method_has_a_paper_and_is_tested():
    get_method("axis")
    assert set(METHODS) == {"axis", "average", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c", "iso_cts"}
    assert all(m.reference_url.startswith("https://arxiv.org/abs/") for m in METHODS.values())
    tested = {c[0] for c in CASES} | {"axis"}
    assert tested == set(METHODS)


def test_ties_density_zero_keeps_the_base_and_one_source_is_task_arithmetic():
    base, sources = _problem(T=1, seed=1)
    zero = svdfuse.merge(sources, base=base, method="ties", density=0.0, device="cpu").state_dict()
    torch.testing.assert_close(zero["a.weight"], base["a.weight"], atol=0, rtol=0)
    one = svdfuse.merge(sources, base=base, method="ties", density=1.0, scaling=0.5, device="cpu").state_dict()
    torch.testing.assert_close(one["a.weight"], base["a.weight"] + 0.5 * (sources[0]["a.weight"] - base["a.weight"]))


def test_dare_drops_at_the_rate_rescales_and_is_seeded():
    gen = torch.Generator().manual_seed(2)
    base = {"w.weight": torch.randn(200, 150, generator=gen, dtype=torch.float64)}
    source = {"w.weight": base["w.weight"] + torch.randn(200, 150, generator=gen, dtype=torch.float64)}
    tau = source["w.weight"] - base["w.weight"]
    p = 0.7
    merged = svdfuse.merge([source], base=base, method="dare", drop_rate=p, device="cpu").state_dict()["w.weight"] - base["w.weight"]
    kept = merged != 0
    # Survivors are rescaled by 1 / (1 - p), the rest dropped: each entry is 0 or tau / (1 - p).
    torch.testing.assert_close(merged[kept], tau[kept] / (1 - p), atol=1e-12, rtol=0)
    n = kept.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    again = svdfuse.merge([source], base=base, method="dare", drop_rate=p, device="cpu").state_dict()["w.weight"]
    other = svdfuse.merge([source], base=base, method="dare", drop_rate=p, svd=svdfuse.SVDOptions(seed=1), device="cpu")
    assert torch.equal(again, merged + base["w.weight"])
    assert not torch.equal(other.state_dict()["w.weight"], again)
    plain = svdfuse.merge([source], base=base, method="dare", drop_rate=p, rescale=False, device="cpu").state_dict()["w.weight"]
    torch.testing.assert_close(plain - base["w.weight"], merged * (1 - p), atol=1e-12, rtol=0)


def test_dare_draws_each_source_its_own_mask():
    # Two sources with the same task vector: (merged - base) · (1 - p) / tau counts the sources that
    # kept each entry. Masks drawn independently per source drop an entry from both with probability
    # p², one mask shared by the sources with probability p.
    gen = torch.Generator().manual_seed(5)
    base = {"w.weight": torch.randn(200, 150, generator=gen, dtype=torch.float64)}
    tau = torch.randn(200, 150, generator=gen, dtype=torch.float64)
    p = 0.5
    sources = [{"w.weight": base["w.weight"] + tau} for _ in range(2)]  # two models with equal values
    merged = svdfuse.merge(sources, base=base, method="dare", drop_rate=p, device="cpu")
    kept = (merged.state_dict()["w.weight"] - base["w.weight"]) * (1 - p) / tau
    count = kept.round()
    torch.testing.assert_close(kept, count, atol=1e-9, rtol=0)
    n = count.numel()
    for sources, chance in ((0, p * p), (1, 2 * p * (1 - p)), (2, (1 - p) ** 2)):
        seen = (count == sources).double().mean().item()
        assert abs(seen - chance) < 5 * math.sqrt(chance * (1 - chance) / n), (sources, seen, chance)


def test_more_sources_than_the_rank_allows_is_explicit():
    base, sources = _problem(T=8, seed=3)  # min(m, n) of b.weight is 7 < 8 sources
    with pytest.raises(ValueError, match=r"tsv_m: 8 sources x 0 components per source do not fit the rank 7 of a 7x10"):
        svdfuse.merge(sources, base=base, method="tsv_m", device="cpu")
    with pytest.raises(ValueError, match=r"tsv_m: 8 sources x 2 components .* need 1 <= budget <= 1"):
        svdfuse.merge(sources, base=base, method="tsv_m", budget=2, device="cpu")
    with pytest.raises(ValueError, match=r"iso_cts: 8 sources leave no task-specific direction in a 12x9 matrix with common=0.5"):
        svdfuse.merge(sources, base=base, method="iso_cts", common=0.5, device="cpu")
    # Only the common subspace: Iso-C's direction set.
    only_common = svdfuse.merge(sources, base=base, method="iso_cts", common=1.0, device="cpu").state_dict()
    iso_c = svdfuse.merge(sources, base=base, method="iso_c", device="cpu").state_dict()
    torch.testing.assert_close(only_common["a.weight"], iso_c["a.weight"])


@pytest.mark.parametrize(
    "name,params,error,pattern",
    [
        ("ties", {"density": 1.5}, ValueError, r"ties: density must be in \[0, 1\], found 1.5"),
        ("dare", {"drop_rate": 1.0}, ValueError, r"dare: drop_rate must be in \[0, 1\), found 1.0"),
        ("task_arithmetic", {"scaling": float("nan")}, ValueError, "scaling must be a finite number, found nan"),
        ("iso_cts", {"common": -0.1}, ValueError, r"iso_cts: common must be in \[0, 1\]"),
        ("ties", {"dropout": 0.1}, TypeError, r"method 'ties' has no parameter 'dropout'; its parameters: density=0.2, scaling=1.0"),
        ("slerp", {}, ValueError, r"unknown merge method 'slerp'; known: average, axis, dare"),
    ],
)
def test_bad_method_parameters_are_rejected(name, params, error, pattern):
    base, sources = _problem()
    with pytest.raises(error, match=pattern):
        svdfuse.merge(sources, base=base, method=name, device="cpu", **params)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(9, 12), nn.Linear(12, 7)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"axis"}))
def test_stage2_works_for_every_method(name):
    torch.manual_seed(0)
    base = _Net().double()
    sources = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(3)]
    params = {"iso_cts": {"common": 0.5}}.get(name, {})  # the default 0.8 leaves no room for 3 tasks at rank 7
    result = svdfuse.merge(sources, base=base, method=name, k=3, device="cpu", **params)
    dense = _Net().double()
    dense.load_state_dict(result.state_dict())
    model = result.to_module(base)
    x = torch.randn(4, 9, dtype=torch.float64)
    # Top-3 components trainable, the rest of the merge frozen in the dense weight: same function.
    torch.testing.assert_close(model(x), dense(x), atol=1e-10, rtol=0)
    sigmas = {n: layer.S.detach().clone() for n, layer in svdfuse.nn.svd_layers(model)}
    loss = lambda m, batch: m(batch).square().mean()  # noqa: E731
    report = svdfuse.adapt(model, [x, x], n=2, epochs=1, loss_fn=loss, progress=False)
    assert report.trainable == 2 * 2
    for n, layer in svdfuse.nn.svd_layers(model):
        assert not torch.equal(layer.S[:2], sigmas[n][:2]) and torch.equal(layer.S[2:], sigmas[n][2:])


def test_a_dense_method_without_k_has_nothing_to_adapt():
    base = _Net()
    sources = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(2)]
    result = svdfuse.merge(sources, base=base, method="task_arithmetic", device="cpu")
    assert result.components == {} and result.frozen == {} and {"a.weight", "b.weight"} <= set(result.tensors)
    with pytest.raises(ValueError, match="task_arithmetic merge has no components to adapt: pass k"):
        result.to_module(base)


def test_atlas_learns_one_coefficient_per_source_and_tensor_and_nothing_else():
    torch.manual_seed(1)
    base = _Net().double()
    sources = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(3)]
    model = svdfuse.atlas(sources, base=base, module=base, exclude=["b.*"])
    # Starts at the average of the sources (λ = 1/T) on the included tensors, the base elsewhere.
    average = svdfuse.merge(sources, base=base, method="average", device="cpu").state_dict()
    torch.testing.assert_close(model.a.weight, average["a.weight"])
    torch.testing.assert_close(model.b.weight, base.b.weight)
    x = torch.randn(5, 9, dtype=torch.float64)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("coefficients")}
    report = svdfuse.adapt(model, [x, x], epochs=2, loss_fn=lambda m, b: m(b).square().mean(), progress=False)
    assert report.trainable == 2 * 3 and report.layers == 2  # a.weight and a.bias, 3 sources each
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if not k.endswith("coefficients"))
    lam = model.a.parametrizations.weight[0].coefficients.detach()
    assert not torch.allclose(lam, torch.full_like(lam, 1 / 3))
    taus = torch.stack([s["a.weight"] - base.a.weight.detach() for s in sources])
    torch.testing.assert_close(model.a.weight, base.a.weight + torch.tensordot(lam, taus, dims=1))


def test_axis_scaling_multiplies_the_merged_task_matrix_and_defaults_to_the_paper():
    base, sources = _problem()
    plain = svdfuse.merge(sources, base=base, method="axis", k=3, device="cpu").state_dict()
    unit = svdfuse.merge(sources, base=base, method="axis", k=3, scaling=1.0, device="cpu").state_dict()
    third = svdfuse.merge(sources, base=base, method="axis", k=3, scaling=1 / 3, device="cpu").state_dict()
    for key in ("a.weight", "b.weight"):
        torch.testing.assert_close(unit[key], plain[key], atol=0, rtol=0)
        torch.testing.assert_close(third[key] - base[key], (plain[key] - base[key]) / 3, atol=1e-12, rtol=0)
    torch.testing.assert_close(third["a.bias"], plain["a.bias"], atol=0, rtol=0)  # non-matrix tensors: averaged, unscaled
    with pytest.raises(ValueError, match="axis: scaling must be a finite number"):
        svdfuse.merge(sources, base=base, method="axis", k=3, scaling=float("nan"), device="cpu")
