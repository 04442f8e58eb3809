"""The dense SVD every path runs, made to survive any finite input.

`torch.linalg.svd` calls LAPACK's divide-and-conquer `gesdd` on the CPU (cuSOLVER on CUDA), which
can fail to converge on ill-conditioned inputs, clusters of repeated singular values or rank
deficiency ("linalg.svd: The algorithm failed to converge"). A merge must never die there after
minutes of work, so `svd` retries such a batch element in float64, then with LAPACK's QR-iteration
`gesvd` (slower, and converges on every finite matrix), and returns in the input's dtype. Inputs
that are not finite are still refused: that is the caller's error to name.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["svd", "factored_svd"]


def svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD of A (..., m, n): U (..., m, r), S (..., r) descending, Vh (..., r, n), r = min(m, n),
    as `torch.linalg.svd(A, full_matrices=False)`, with fallbacks where it fails to converge."""
    try:
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        if bool(torch.isfinite(S).all()) or not bool(torch.isfinite(A).all()):
            return U, S, Vh
    except torch.linalg.LinAlgError:
        if not bool(torch.isfinite(A).all()):
            raise
    return _svd_each(A)


def _svd_each(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The batch element by element, each by the first of float64 `gesdd` and `gesvd` that converges."""
    m, n = A.shape[-2:]
    flat = A.reshape(-1, m, n)
    parts = [_robust_one(a) for a in flat]
    U, S, Vh = (torch.stack([p[i] for p in parts]).to(A.dtype) for i in range(3))
    r = min(m, n)
    return U.reshape(*A.shape[:-2], m, r), S.reshape(*A.shape[:-2], r), Vh.reshape(*A.shape[:-2], r, n)


def _robust_one(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    wide = a.to(torch.float64)
    try:
        U, S, Vh = torch.linalg.svd(wide, full_matrices=False)
        if bool(torch.isfinite(S).all()):
            return U, S, Vh
    except torch.linalg.LinAlgError:
        pass
    U, S, Vh = scipy.linalg.svd(wide.cpu().numpy(), full_matrices=False, lapack_driver="gesvd", check_finite=False)
    return tuple(torch.from_numpy(np.ascontiguousarray(x)).to(a.device) for x in (U, S, Vh))  # type: ignore[return-value]


def factored_svd(L: Tensor, R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact SVD of the product `L @ R` without forming it: L (..., m, r), R (..., r, n) ->
    U (..., m, r), S (..., r) descending, V (..., n, r), in O((m + n) r²).

    `L = Q_l R_l`, `Rᵀ = Q_r R_r`, `R_l R_rᵀ = u σ vᵀ` (an r × r SVD) ⇒ `L R = (Q_l u) σ (Q_r v)ᵀ`.
    Zero columns of L (a rank padded to a common width) give zero singular values."""
    Q_l, R_l = torch.linalg.qr(L)
    Q_r, R_r = torch.linalg.qr(R.mT)
    u, S, vh = svd(R_l @ R_r.mT)
    return Q_l @ u, S, Q_r @ vh.mT
