"""The dense SVD every path runs, made to survive any finite input.

`torch.linalg.svd` calls LAPACK's divide-and-conquer `gesdd` on the CPU (cuSOLVER on CUDA), which
can fail to converge on ill-conditioned inputs, clusters of repeated singular values or rank
deficiency ("linalg.svd: The algorithm failed to converge"). A merge must never die there after
minutes of work, so `svd` retries such a batch element in float64, then with LAPACK's QR-iteration
`gesvd` (slower, and converges on every finite matrix), and returns in the input's dtype. Inputs
that are not finite are still refused: that is the caller's error to name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["svd", "qr", "factored_svd", "all_finite"]


def svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD of A (..., m, n): U (..., m, r), S (..., r) descending, Vh (..., r, n), r = min(m, n),
    as `torch.linalg.svd(A, full_matrices=False)`, with fallbacks where it fails to converge."""
    try:
        with _one_thread(A):
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


def all_finite(t: Tensor) -> bool:
    """Whether every entry of floating `t` is finite, in one reduction: NaN and ±inf reach the min
    or the max (`isfinite(t).all()` writes a bool per entry first: 23× slower on a 45M-entry bf16
    matrix on the 2-core machine, 2026-12-07)."""
    return t.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(t))


@contextlib.contextmanager
def _one_thread(A: Tensor) -> Iterator[None]:
    """LAPACK's threaded factorizations of thin or small matrices (min(m, n) <= 256) spin their
    threads against each other, the more so on a busy machine (measured on the 2-core machine,
    2026-12-07: QR of a (16, 11008, 16) batch 5.5-6.9 s on 2 threads, 0.04-0.06 s on one; SVD of
    one 64 × 64, 0.01-0.23 s against 0.0005 s): run them on one thread on the CPU."""
    if A.device.type != "cpu" or min(A.shape[-2:]) > 256:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of A (..., m, n), as `torch.linalg.qr`, thin ones on one thread (`_one_thread`)."""
    with _one_thread(A):
        return torch.linalg.qr(A)


def factored_svd(L: Tensor, R: Tensor, rank: int | None = None, *, oversample: int = 16, iterations: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the product `L @ R` without forming it: L (..., m, r), R (..., r, n) -> U (..., m, q),
    S (..., q) descending, V (..., n, q).

    Exact (q = min(m, n, r)), in O((m + n) r²): `L = Q_l R_l`, `Rᵀ = Q_r R_r`, `R_l R_rᵀ = u σ vᵀ`
    (an r × r SVD) ⇒ `L R = (Q_l u) σ (Q_r v)ᵀ`. Zero columns of L (a rank padded to a common
    width) give zero singular values. With `rank` well below r (a sum of many adapters), its top
    `rank` (q = rank) by the randomized SVD of the operator x ↦ L (R x) instead, in
    O((m + n) r (rank + oversample)) per pass, with `iterations` power iterations."""
    if rank is None or L.shape[-1] <= 2 * (rank + oversample):
        Q_l, R_l = qr(L)
        Q_r, R_r = qr(R.mT)
        u, S, vh = svd(R_l @ R_r.mT)
        U, S, V = Q_l @ u, S, Q_r @ vh.mT
        return (U, S, V) if rank is None else (U[..., :rank], S[..., :rank], V[..., :rank])
    generator = torch.Generator(device=L.device).manual_seed(seed)
    omega = torch.randn((*R.shape[:-2], R.shape[-1], rank + oversample), generator=generator, dtype=L.dtype, device=L.device)
    Q = qr(L @ (R @ omega))[0]
    for _ in range(iterations):
        Q = qr(L @ (R @ qr(R.mT @ (L.mT @ Q))[0]))[0]
    u, S, vh = svd((Q.mT @ L) @ R)
    return (Q @ u)[..., :rank], S[..., :rank], vh.mT[..., :rank]
