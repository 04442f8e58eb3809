"""The dense SVD under every path (`svdfuse.linalg.svd`) survives any finite input: ill-conditioned,
rank-deficient and repeated-singular-value matrices, and LAPACK's convergence failures, by falling
back to float64 and then to QR-iteration `gesvd`. Tolerances are backward-error bounds in the
dtype's eps and the size, against float64 truth."""

from __future__ import annotations

import subprocess
import sys

import pytest
import scipy.linalg
import torch

import svdfuse
from svdfuse import linalg


def with_spectrum(sigma: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    """A float64 m×n matrix with the given singular values (min(m, n) of them) and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    return (U * sigma.to(torch.float64)) @ V.T


def hard_matrices(m: int, n: int) -> dict[str, torch.Tensor]:
    r = min(m, n)
    spectra = {
        "condition 1e30": torch.logspace(0, -30, r, dtype=torch.float64),
        "rank one": torch.cat([torch.ones(1), torch.zeros(r - 1)]).double(),
        "all equal": torch.ones(r, dtype=torch.float64),
        "two clusters": torch.cat([torch.ones(r // 2), torch.full((r - r // 2,), 1e-3)]).double(),
        "half rank": torch.cat([torch.linspace(2, 1, r // 2), torch.zeros(r - r // 2)]).double(),
    }
    out = {name: with_spectrum(s, m, n, seed=i) for i, (name, s) in enumerate(spectra.items())}
    out["zero"] = torch.zeros(m, n, dtype=torch.float64)
    out["identity-like"] = torch.eye(m, n, dtype=torch.float64)
    out["tiny scale"] = 1e-30 * with_spectrum(torch.linspace(1, 0.5, r), m, n, seed=7)
    out["huge scale"] = 1e30 * with_spectrum(torch.linspace(1, 0.5, r), m, n, seed=8)
    return out


def check_svd(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
    """Backward-stable SVD: the factors reproduce A, are orthonormal where S > 0, and S is A's
    spectrum (Weyl), each within c · max(m, n) · eps of the dtype, A's norm as the scale."""
    m, n = A.shape[-2:]
    eps = torch.finfo(A.dtype).eps
    bound = 10 * max(m, n) * eps
    truth = torch.linalg.svdvals(A.double())
    scale = truth.amax(-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    assert U.dtype == S.dtype == Vh.dtype == A.dtype
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert (S[..., :-1] >= S[..., 1:]).all()
    rebuilt = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    assert ((rebuilt - A.double()).abs().amax((-2, -1)) <= bound * scale.squeeze(-1)).all()
    assert ((S.double() - truth).abs() <= bound * scale).all()
    live = (S > bound * scale).double()  # singular vectors of a zero singular value are arbitrary
    eye = torch.eye(S.shape[-1], dtype=torch.float64)
    for Q in (U.double(), Vh.double().mT):
        gram = Q.mT @ Q
        assert ((gram - eye).abs() * live.unsqueeze(-1) * live.unsqueeze(-2)).amax() <= bound


SHAPES = [(48, 48), (64, 24), (24, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, n", SHAPES)
def test_hard_matrices(m, n, dtype):
    for name, A in hard_matrices(m, n).items():
        A = A.to(dtype)
        if not torch.isfinite(A).all():
            continue
        check_svd(A, *linalg.svd(A))


@pytest.fixture(params=["raises", "nan"])
def gesdd_fails(request, monkeypatch):
    """torch.linalg.svd failing on every float32 input (raising as LAPACK does, or returning NaN as
    a GPU solver may), or on every input (`fails["all"] = True`), where scipy's divide-and-conquer
    `gesdd` fails too (the same LAPACK routine); counts torch's calls and records scipy's drivers."""
    real, real_scipy = torch.linalg.svd, scipy.linalg.svd
    fails = {"all": False, "calls": 0, "drivers": []}

    def svd(A, *args, **kwargs):
        fails["calls"] += 1
        if A.dtype == torch.float32 or fails["all"]:
            if request.param == "raises":
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned")
            U, S, Vh = real(A, *args, **kwargs)
            return U, torch.full_like(S, float("nan")), Vh
        return real(A, *args, **kwargs)

    def scipy_svd(a, *args, lapack_driver="gesdd", **kwargs):
        fails["drivers"].append(lapack_driver)
        if lapack_driver == "gesdd" and fails["all"]:
            raise scipy.linalg.LinAlgError("SVD did not converge")
        return real_scipy(a, *args, lapack_driver=lapack_driver, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(scipy.linalg, "svd", scipy_svd)
    return fails


@pytest.mark.parametrize("everywhere", [False, True], ids=["float64 retry", "gesvd"])
def test_a_convergence_failure_falls_back_and_is_still_right(everywhere, gesdd_fails):
    gesdd_fails["all"] = everywhere
    batch = torch.stack([hard_matrices(40, 24)[name] for name in ("condition 1e30", "two clusters", "rank one")]).float()
    U, S, Vh = linalg.svd(batch)
    assert U.shape == (3, 40, 24) and S.shape == (3, 24) and Vh.shape == (3, 24, 24)
    check_svd(batch, U, S, Vh)
    assert gesdd_fails["calls"] >= 2  # the failing call, then the retries
    # The last resort is QR iteration, once per matrix, never the divide-and-conquer that just failed.
    assert gesdd_fails["drivers"] == (["gesvd"] * 3 if everywhere else [])


def test_non_finite_input_is_still_an_error():
    A = torch.randn(8, 6)
    A[2, 3] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        linalg.svd(A)


@pytest.mark.parametrize("method, k", [("iso_cts", None), ("tsv_m", None), ("iso_c", None), ("axis", 4)])
def test_merges_survive_svd_failures_with_the_same_result(method, k, gesdd_fails):
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(24, 16, generator=gen), "b.weight": torch.randn(24, 16, generator=gen), "a.bias": torch.randn(24, generator=gen)}
    sources = [{key: v + 0.05 * torch.randn(v.shape, generator=gen) for key, v in base.items()} for _ in range(3)]
    kwargs = dict(k=k, base=base, method=method, svd="exact", device="cpu")
    gesdd_fails["all"] = False
    failing = svdfuse.merge(sources, **kwargs).state_dict()
    assert gesdd_fails["calls"] > 0
    eps = torch.finfo(torch.float32).eps
    for key, value in failing.items():
        expected = svdfuse.merge(sources, **{**kwargs, "dtype": torch.float64}).state_dict()[key]
        scale = expected.abs().amax().item()
        assert (value.double() - expected).abs().amax().item() <= 10 * 24 * eps * max(scale, 1.0), key


@pytest.mark.parametrize("shapes", [((), ()), ((3,), ()), ((2, 1), (1, 4)), ((5, 1, 3), (4, 1)), ((0,), (1,)), ((1, 0), (3, 1)), ((2, 3), (2, 3), (1, 3)), ((7,),)])
def test_broadcast_shapes_is_torchs(shapes):
    assert linalg.broadcast_shapes(*shapes) == torch.broadcast_shapes(*shapes)


@pytest.mark.parametrize("shapes", [((2,), (3,)), ((0,), (2,)), ((2, 3), (4, 3)), ((4, 1), (1, 3), (2, 3))])
def test_shapes_that_do_not_broadcast_are_refused_as_by_torch(shapes):
    with pytest.raises(RuntimeError):
        torch.broadcast_shapes(*shapes)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        linalg.broadcast_shapes(*shapes)


def test_a_merge_by_randomized_svd_imports_no_sympy(tmp_path):
    # torch.broadcast_shapes imports torch._refs and sympy at its first call: 0.27 s of every
    # process that merges; svdfuse's own broadcast keeps them out (a fresh process, as the CLI's)
    code = (
        "import sys, torch, svdfuse\n"
        "g = torch.Generator().manual_seed(0)\n"
        "base = {'layer.weight': torch.randn(64, 48, generator=g)}\n"
        "sources = [{'layer.weight': base['layer.weight'] + 0.1 * torch.randn(64, 48, generator=g)} for _ in range(3)]\n"
        "svdfuse.merge(sources, 4, base=base, method='axis', device='cpu', svd='randomized')\n"
        "svdfuse.merge(sources, 4, base=base, method='axis', device='cpu', svd='exact')\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
