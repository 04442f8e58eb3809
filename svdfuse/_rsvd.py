"""The production randomized SVD (Halko–Martinsson–Tropp): one driver for every backend.

A backend supplies the products with `A - base` (`project`: the Triton kernel on CUDA, torch's
GEMM on a working fp32 copy on the CPU); this module does the rest: the Gaussian test matrix,
the orthonormalizations and the SVD of the projected matrix. `svdfuse.reference.randomized_svd`
is its oracle and shares no code with it: the same Ω from the same seed, so the two agree up to
rounding, and a bug here shows against it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from svdfuse import linalg

Project = Callable[..., Tensor]  # project(X, transpose=False) -> (A - base) X, or (A - base)ᵀ X


def gaussian(n: int, width: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    """The test matrix Ω (n, width): drawn on the CPU, so a seed gives the same Ω on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, width), generator=gen, dtype=dtype).to(device)


def householder(Y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of Y (..., m, w) by Householder QR: exact for rank-deficient
    and zero Y (the basis is completed with orthonormal columns)."""
    return linalg.qr(Y)[0]


def lu_basis(Y: Tensor) -> Tensor:
    """A basis of the columns of Y (..., m, w), w <= m, for a sketch whose span is all that
    matters: P L of Y = P L U (partial pivoting), column-major. L is unit lower trapezoidal with
    entries of at most 1, so the basis is well conditioned and of full rank for any Y (a zero or
    rank-deficient Y gets coordinate directions, as Householder completes its basis), and spans
    what Y spans where Y has full rank; a quarter of the flops of a Householder QR with its Q
    formed (the power iterations of fbpca and scikit-learn's randomized SVD normalize so). The
    pivots are read back to the host: a CPU tool."""
    m, w = Y.shape[-2:]
    LU, pivots = linalg.lu_factor(Y.reshape(-1, m, w))
    # LAPACK's swaps applied in turn to the row order (on lists: a few dozen swaps a matrix cost
    # less there than one tensor op): row r of L U is row order[r] of Y.
    orders = []
    for swaps in pivots.tolist():
        order = list(range(m))
        for i, j in enumerate(swaps):
            order[i], order[j - 1] = order[j - 1], order[i]
        orders.append(order)
    L = LU.tril_(-1)
    L.diagonal(dim1=-2, dim2=-1).fill_(1)
    Lt = L.mT  # (c, w, m), contiguous: LAPACK's factors are column-major
    index = torch.from_numpy(np.array(orders, dtype=np.int64).reshape(-1, m)).unsqueeze(1).expand_as(Lt)
    basis = torch.empty_like(Lt).scatter_(-1, index, Lt).mT
    return basis.reshape(Y.shape)


def _cholesky_qr(Y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One CholeskyQR pass in fp64: Q = Y R⁻¹ with RᵀR = YᵀY; also returns the Gram and Cholesky's info.

    fp64 squares the condition number into a range it can hold: every fp32 sketch that is
    numerically full-rank (κ up to ~1/eps_fp32) factors, where fp32 Grams fail from κ ≈ 1e5.
    """
    Yd = Y.double()
    gram = Yd.mT @ Yd
    R, info = torch.linalg.cholesky_ex(gram, upper=True)
    return torch.linalg.solve_triangular(R, Yd, upper=True, left=False).to(Y.dtype), gram, info


def cholesky_qr2(Y: Tensor) -> Tensor:
    """Orthonormal basis Q (..., m, w) of the columns of Y (..., m, w), w <= m, by CholeskyQR2 with
    fp64 Grams: GEMMs and a w×w Cholesky instead of a Householder QR.

    Certified per matrix: one is accepted when the Gram of the second pass certifies the first
    (‖Q₁ᵀQ₁ - I‖₂ ≤ w·max|G - I| < 1/2 bounds κ(Q₁)² ≤ 3, so the second pass is orthonormal to
    rounding). The others, rank-deficient, zero or too ill-conditioned sketches, where no Cholesky
    route can complete the basis, take `householder`.
    """
    w = Y.shape[-1]
    Q, _, info1 = _cholesky_qr(Y)
    Q, gram, info2 = _cholesky_qr(Q)
    defect = (gram - torch.eye(w, dtype=gram.dtype, device=Y.device)).abs().amax((-2, -1)) * w
    ok = (info1 == 0) & (info2 == 0) & (defect < 0.5)  # NaN fails the comparison
    if not bool(ok.all()):
        bad = ~ok
        Q[bad] = householder(Y[bad])
    return Q


def tall_svd(B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of tall matrices by `svdfuse.linalg.svd`: B (..., n, w), w <= n -> left (..., n, w),
    S (..., w) descending, right (..., w, w) with B = left diag(S) rightᵀ."""
    left, S, right_h = linalg.svd(B)
    return left, S, right_h.mT


def randomized_svd(
    project: Project,
    omega: Tensor,
    rank: int,
    power_iters: int,
    *,
    orthonormalize: Callable[[Tensor], Tensor] = cholesky_qr2,
    normalize: Callable[[Tensor], Tensor] | None = None,
    projected_svd: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] = tall_svd,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-`rank` SVD of the `A - base` that `project` multiplies by, from the sketch (A - base) Ω.

    omega: (n, w) with rank <= w <= min(m, n). Every power iteration takes a basis of both sides'
    sketches by `normalize` (only their spans matter there; None: `orthonormalize`), and the last
    sketch is orthonormalized; 2 + 2·power_iters products in all. Returns U (..., m, rank),
    S (..., rank), V (..., n, rank).
    """
    normalize = normalize or orthonormalize
    Q = project(omega)
    for _ in range(power_iters):
        Q = normalize(project(normalize(Q), transpose=True))
        Q = project(Q)
    Q = orthonormalize(Q)
    Vb, S, Ub = projected_svd(project(Q, transpose=True))  # (A - base)ᵀ Q = Bᵀ = Vb S Ubᵀ
    return Q @ Ub[..., :rank], S[..., :rank], Vb[..., :rank]
