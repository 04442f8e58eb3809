"""svdfuse.ops on the reference backend: SVD against physics (Eckart–Young), selection exact."""

import pytest
import torch

from svdfuse import ops

SVD_METHODS = ["exact", "randomized"]


def _planted(batch, m, n, ranks, dtype=torch.float64, seed=0):
    """Matrices of exact rank `ranks[i]` with well separated singular values, and their truth."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(batch, m, n, dtype=torch.float64)
    for b, r in enumerate(ranks):
        U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
        S = torch.linspace(10.0, 1.0, r, dtype=torch.float64) * (b + 1)
        out[b] = (U * S) @ V.T
    return out.to(dtype)


def _reconstruction(U, S, V):
    return (U * S.unsqueeze(-2)) @ V.mT


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("m,n", [(64, 48), (37, 53)])
def test_truncated_svd_matches_eckart_young(method, m, n):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(m, n, generator=gen, dtype=torch.float64)
    # A decaying spectrum like a task matrix's; the error is judged against the optimum.
    decay = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -1.5
    Q1 = torch.linalg.qr(torch.randn(3, m, min(m, n), generator=gen, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(3, n, min(m, n), generator=gen, dtype=torch.float64)).Q
    delta = (Q1 * decay) @ Q2.mT
    rank = 8
    U, S, V = ops.truncated_svd(base + delta, rank, base=base, method=method, oversample=8, power_iters=3)
    assert U.shape == (3, m, rank) and S.shape == (3, rank) and V.shape == (3, n, rank)
    exact = torch.linalg.svdvals(delta)
    optimum = exact[:, rank:].square().sum(-1).sqrt()
    error = (delta - _reconstruction(U, S, V)).flatten(1).norm(dim=1)
    assert torch.all(error <= 1.02 * optimum), (error / optimum)
    torch.testing.assert_close(S, exact[:, :rank], rtol=1e-3, atol=0)
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(U.mT @ U, eye.expand(3, -1, -1), atol=1e-10, rtol=0)
    torch.testing.assert_close(V.mT @ V, eye.expand(3, -1, -1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_truncated_svd_rank_deficient_zero_and_repeated(method):
    m, n, rank = 40, 30, 6
    A = _planted(3, m, n, ranks=[3, 1, 6])
    A[1] = 0.0  # a zero task matrix
    # Repeated singular values: 4 equal components.
    gen = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(m, 4, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 4, generator=gen, dtype=torch.float64)).Q
    A[2] = 2.0 * U @ V.T
    Uo, So, Vo = ops.truncated_svd(A, rank, method=method)
    assert torch.isfinite(Uo).all() and torch.isfinite(So).all() and torch.isfinite(Vo).all()
    torch.testing.assert_close(_reconstruction(Uo, So, Vo), A, atol=1e-10, rtol=0)
    torch.testing.assert_close(So[1], torch.zeros(rank, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(So[2, :4], torch.full((4,), 2.0, dtype=torch.float64))
    assert So[0, 3:].abs().max() < 1e-10


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_truncated_svd_low_precision_storage_accumulates_in_fp32(dtype, rtol):
    base = torch.randn(48, 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    delta = _planted(2, 48, 40, ranks=[4, 4], dtype=torch.float32)
    A = (base.float() + delta).to(dtype)
    U, S, V = ops.truncated_svd(A, 4, base=base, method="randomized")
    assert S.dtype == torch.float32
    truth = torch.linalg.svdvals(A.double() - base.double())[:, :4]
    # The storage dtype's rounding of A is the only error source: ~eps(dtype) * ||A|| / sigma.
    torch.testing.assert_close(S.double(), truth, rtol=rtol, atol=torch.finfo(dtype).eps * A.double().abs().max().item() * 50)


def test_truncated_svd_is_deterministic_and_seeded():
    A = torch.randn(2, 50, 50, generator=torch.Generator().manual_seed(4))
    first = ops.truncated_svd(A, 5, method="randomized", power_iters=0, seed=7)
    again = ops.truncated_svd(A, 5, method="randomized", power_iters=0, seed=7)
    other = ops.truncated_svd(A, 5, method="randomized", power_iters=0, seed=8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[1], other[1])


def test_truncated_svd_rejects_bad_input():
    A = torch.randn(2, 8, 6)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 6\].*found 7"):
        ops.truncated_svd(A, 7)
    with pytest.raises(ValueError, match=r"base has shape \(6, 8\)"):
        ops.truncated_svd(A, 2, base=torch.randn(6, 8))
    with pytest.raises(TypeError, match="floating point"):
        ops.truncated_svd(torch.ones(2, 8, 6, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="'fast'"):
        ops.truncated_svd(A, 2, method="fast")


def test_topk_components_equals_torch_topk_and_breaks_ties_by_index():
    S = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(5))
    values, source, comp = ops.topk_components(S, 9)
    ref_values, ref_flat = torch.topk(S.flatten(1), 9)
    assert torch.equal(values, ref_values)
    assert torch.equal(source * 5 + comp, ref_flat)
    assert torch.equal(S[torch.arange(3)[:, None], source, comp], values)
    ties = torch.tensor([[1.0, 3.0, 3.0], [3.0, 2.0, 3.0]])
    values, source, comp = ops.topk_components(ties, 3)
    assert values.tolist() == [3.0, 3.0, 3.0]
    assert list(zip(source.tolist(), comp.tolist())) == [(0, 1), (0, 2), (1, 0)]


def test_topk_components_rejects_bad_input():
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        ops.topk_components(torch.rand(2, 3), 7)
    S = torch.rand(2, 2, 3)
    S[0, 1, 2] = S[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"S must hold no NaN, found 2 in S of shape \(2, 2, 3\), the first at index \(0, 1, 2\)"):
        ops.topk_components(S, 1)


def test_reorthogonalize_reproduces_the_merged_matrix():
    gen = torch.Generator().manual_seed(6)
    U_s = torch.randn(2, 30, 6, generator=gen, dtype=torch.float64)
    V_s = torch.randn(2, 20, 6, generator=gen, dtype=torch.float64)
    S_s = torch.rand(2, 6, generator=gen, dtype=torch.float64) + 0.5
    U_t, S_t, V_t = ops.reorthogonalize(U_s, S_s, V_s)
    merged = (U_s * S_s.unsqueeze(-2)) @ V_s.mT
    torch.testing.assert_close(_reconstruction(U_t, S_t, V_t), merged, atol=1e-12, rtol=0)
    torch.testing.assert_close(S_t, torch.linalg.svdvals(merged)[:, :6])
    eye = torch.eye(6, dtype=torch.float64).expand(2, -1, -1)
    torch.testing.assert_close(U_t.mT @ U_t, eye)
    torch.testing.assert_close(V_t.mT @ V_t, eye)


@pytest.mark.parametrize(
    "b_shape,x_shape",
    [((5, 4), (3, 7, 4, 2)), ((3, 1, 5, 4), (3, 7, 4, 2)), ((1, 5, 4), (6, 4, 3)), ((2, 1, 1, 5, 4), (2, 3, 2, 4, 1)), ((3, 5, 4), (3, 4, 2))],
)
def test_broadcast_base_product_equals_matmul_without_expanding(b_shape, x_shape):
    from svdfuse.reference import _broadcast_matmul

    gen = torch.Generator().manual_seed(9)
    B = torch.randn(b_shape, generator=gen, dtype=torch.float64)
    X = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_broadcast_matmul(B, X), B @ X, atol=1e-12, rtol=0)
