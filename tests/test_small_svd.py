"""The batched one-sided Jacobi SVD (`svdfuse.kernels.small_svd`) against float64 truth, and the
randomized SVD with it as the projected SVD."""

import pytest
import torch

small_svd_module = pytest.importorskip("svdfuse.kernels.small_svd", reason="needs triton")
rsvd = pytest.importorskip("svdfuse.kernels.rsvd", reason="needs triton")


def _square(batch, w, seed):
    """Random, graded (κ = 1e4), zero, rank-deficient and repeated-σ matrices, fp32."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(batch, w, w, generator=gen, dtype=torch.float64)
    P, _ = torch.linalg.qr(torch.randn(w, w, generator=gen, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(w, w, generator=gen, dtype=torch.float64))
    out[1] = (P * torch.logspace(0, -4, w, dtype=torch.float64)) @ Q.T
    out[2] = 0.0
    out[3] = P[:, :2] @ torch.randn(2, w, generator=gen, dtype=torch.float64)
    out[4] = (P * torch.tensor([2.0] * (w // 2) + [1.0] * (w - w // 2), dtype=torch.float64)) @ Q.T
    return out.float()


@pytest.mark.parametrize("w", [2, 5, 8, 13])
def test_small_svd_against_float64_truth(triton_device, w):
    M = _square(6, w, seed=w)
    U, S, V = (t.double().cpu() for t in small_svd_module.small_svd(M.to(triton_device)))
    truth = torch.linalg.svdvals(M.double())
    eps = torch.finfo(torch.float32).eps
    scale = truth[:, :1]
    # Jacobi's σ are accurate to rounding relative to the largest, like LAPACK's in fp32.
    assert ((S - truth).abs() <= 8 * w * eps * scale).all(), (S - truth).abs().max()
    assert (S[:, :-1] >= S[:, 1:]).all()
    eye = torch.eye(w, dtype=torch.float64)
    for name, F in (("U", U), ("V", V)):  # orthonormal, also where σ = 0 (completed)
        defect = (F.mT @ F - eye).abs().amax((-2, -1))
        assert (defect <= 8 * w * eps).all(), (name, defect)
    residual = ((U * S.unsqueeze(-2)) @ V.mT - M.double()).abs().amax((-2, -1))
    assert (residual <= 8 * w * eps * scale.squeeze(-1)).all(), residual


def test_small_svd_keeps_leading_shape_and_empty_batch(triton_device):
    M = _square(6, 4, seed=1).reshape(2, 3, 4, 4).to(triton_device)
    U, S, V = small_svd_module.small_svd(M)
    assert U.shape == V.shape == (2, 3, 4, 4) and S.shape == (2, 3, 4)
    U, S, V = small_svd_module.small_svd(torch.zeros(0, 4, 4, device=triton_device))
    assert U.shape == (0, 4, 4) and S.shape == (0, 4)


def _assert_tall_svd(option, device):
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(3, 30, 7, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 7, dtype=torch.float64)
    B[1] = 0.0
    left, S, right = (t.double().cpu() for t in rsvd.PROJECTED_SVDS[option](B.float().to(device)))
    assert left.shape == B.shape and S.shape == (3, 7) and right.shape == (3, 7, 7)
    ref_S = torch.linalg.svdvals(B)
    torch.testing.assert_close(S, ref_S, rtol=0, atol=1e-5)
    torch.testing.assert_close((left * S.unsqueeze(-2)) @ right.mT, B, rtol=0, atol=1e-5)
    eye = torch.eye(7, dtype=torch.float64).expand(3, -1, -1)
    torch.testing.assert_close(left.mT @ left, eye, rtol=0, atol=1e-5)


@pytest.mark.parametrize("option", ["library", "loop", "jacobi"])
def test_every_projected_svd_option_is_the_svd(triton_device, option):
    # The options the GPU session times against each other (rsvd.PROJECTED_SVD) compute one thing.
    _assert_tall_svd(option, triton_device)


@pytest.mark.gpu
@pytest.mark.parametrize("option", ["gesvdj", "gesvda"])
def test_cusolver_projected_svd_options_are_the_svd(cuda, option):
    _assert_tall_svd(option, cuda)


def test_the_switch_names_an_option():
    assert rsvd.PROJECTED_SVD in rsvd.PROJECTED_SVDS and rsvd.SKETCH_TILING in rsvd.SKETCH_TILINGS


def test_randomized_svd_with_the_jacobi_projected_svd(triton_device):
    gen = torch.Generator().manual_seed(4)
    decay = torch.arange(1, 31, dtype=torch.float64) ** -1.5
    P = torch.linalg.qr(torch.randn(2, 40, 30, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(2, 30, 30, generator=gen, dtype=torch.float64)).Q
    delta = (P * decay) @ Q.mT
    options = dict(oversample=6, power_iters=3, seed=0, projected_svd=rsvd.tall_svd_jacobi)
    U, S, V = (t.double().cpu() for t in rsvd.randomized_svd(delta.float().to(triton_device), 5, **options))
    exact = torch.linalg.svdvals(delta)
    optimum = exact[:, 5:].square().sum(-1).sqrt()
    error = (delta - (U * S.unsqueeze(-2)) @ V.mT).flatten(1).norm(dim=1)
    assert torch.all(error <= 1.02 * optimum), error / optimum
    torch.testing.assert_close(S, exact[:, :5], rtol=1e-3, atol=0)
