"""The dense SVD every path runs, made to survive any finite input.

`torch.linalg.svd` calls LAPACK's divide-and-conquer `gesdd` on the CPU (cuSOLVER on CUDA), which
can fail to converge on ill-conditioned inputs, clusters of repeated singular values or rank
deficiency ("linalg.svd: The algorithm failed to converge"). A merge must never die there after
minutes of work, so `svd` retries such a batch element in float64, then with LAPACK's QR-iteration
`gesvd` (slower, and converges on every finite matrix), and returns in the input's dtype. Inputs
that are not finite are still refused: that is the caller's error to name.

On the CPU every factorization here (`svd`, `qr`) runs on one thread: LAPACK splits its work by
thread count, so its rounding depends on it, where the GEMMs around it do not (MKL's, at the
thread counts and shapes measured). A merge is then the same bytes whatever torch's thread count,
as a torchrun rank (one thread) and a process of its own compute it. The cost, measured on the
2-core CPU machine (2026-12-07): none at a merge's sizes; LAPACK's threads pay off only on
matrices far wider than a sketch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["svd", "qr", "factored_svd", "exact_factored_svd", "FactoredSVD", "all_finite"]


@contextmanager
def _one_thread(A: Tensor) -> Iterator[None]:
    """torch's CPU ops on one thread inside the block, when `A` is on the CPU. Besides giving the
    same bytes at any thread count, this is faster for the thin and small factorizations a merge
    runs: LAPACK's threads spin against each other there, the more so on a busy machine (2-core
    machine, 2026-12-07: QR of a (16, 11008, 16) batch 5.5-6.9 s on 2 threads, 0.04-0.06 s on one;
    SVD of one 64 × 64, 0.01-0.23 s against 0.0005 s)."""
    threads = torch.get_num_threads()
    if A.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of A (..., m, n): Q (..., m, r), R (..., r, n), r = min(m, n), as `torch.linalg.qr`."""
    with _one_thread(A):
        Q, R = torch.linalg.qr(A)
    return Q, R


def svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD of A (..., m, n): U (..., m, r), S (..., r) descending, Vh (..., r, n), r = min(m, n),
    as `torch.linalg.svd(A, full_matrices=False)`, with fallbacks where it fails to converge."""
    with _one_thread(A):
        return _svd(A)


def _svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def all_finite(t: Tensor) -> bool:
    """Whether every entry of floating `t` is finite, in one reduction: NaN and ±inf reach the min
    or the max (`isfinite(t).all()` writes a bool per entry first: 23× slower on a 45M-entry bf16
    matrix on the 2-core machine, 2026-12-07)."""
    return t.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(t))


@dataclass(frozen=True)
class FactoredSVD:
    """The exact SVD of a product `L @ R` kept beside its factors, its singular vectors not yet
    formed: `U = L @ left`, `V = Rᵀ @ right`, handed out in S's dtype. A method that keeps a few
    components of many (AXIS's global top-k) forms only those (`vectors`): the m×q products are
    the larger cost. The same interface as `methods.Components`.

    L (..., m, r), R (..., r, n); S (..., q) descending; left, right (..., r, q) float64.
    """

    L: Tensor
    R: Tensor
    S: Tensor
    left: Tensor
    right: Tensor

    @property
    def U(self) -> Tensor:
        return (_wide(self.L) @ self.left).to(self.S.dtype)

    @property
    def V(self) -> Tensor:
        return (_wide(self.R).mT @ self.right).to(self.S.dtype)

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.U, self.S, self.V))

    def vectors(self, *index: Tensor) -> tuple[Tensor, Tensor]:
        """Components `index` = (batch indices..., component) index tensors, broadcast to (*idx):
        their U and V as rows, (*idx, m) and (*idx, n)."""
        *batch, comp = index

        def rows(factor: Tensor, maps: Tensor, pattern: str) -> Tensor:
            chosen = maps[tuple(batch)]  # (*idx, r, q)
            column = chosen.gather(-1, comp[..., None, None].expand(*chosen.shape[:-1], 1))[..., 0]
            return torch.einsum(pattern, _wide(factor[tuple(batch)]), column).to(self.S.dtype)

        return rows(self.L, self.left, "...mr,...r->...m"), rows(self.R, self.right, "...rn,...r->...n")

    def resized(self, q: int) -> FactoredSVD:
        """The top q components, with zero ones after the last where q exceeds their number."""
        pad = lambda t: torch.nn.functional.pad(t[..., :q], (0, max(0, q - t.shape[-1])))  # noqa: E731
        return FactoredSVD(self.L, self.R, pad(self.S), pad(self.left), pad(self.right))


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float64)


def _balanced_halves(G_l: Tensor, G_r: Tensor, m: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the Gram matrices `LᵀL`, `R Rᵀ` (..., r, r) float64: `C_l`, `C_r` (..., r, r) and the maps
    `M_l`, `M_r` with `L = (L M_l) C_l`, `Rᵀ = (Rᵀ M_r) C_r`, `L M_l`, `Rᵀ M_r` orthonormal (zero columns
    where a factor has no such direction). Each rank direction is first balanced (`L D`, `D⁻¹ R`,
    the product unchanged) so that a direction small in one factor and large in the other is not
    taken for rounding noise."""
    norm_l, norm_r = G_l.diagonal(dim1=-2, dim2=-1).sqrt(), G_r.diagonal(dim1=-2, dim2=-1).sqrt()
    d = torch.where((norm_l > 0) & (norm_r > 0), (norm_r / norm_l.clamp(min=torch.finfo(torch.float64).tiny)).sqrt(), torch.ones_like(norm_l))
    halves = []
    for G, scale, rows in ((G_l * d[..., :, None] * d[..., None, :], d, m), (G_r / d[..., :, None] / d[..., None, :], 1 / d, n)):
        lam, P = torch.linalg.eigh(G)
        # Below this, an eigenvalue is the Gram's rounding (float64, `rows` products), not a direction.
        keep = lam > lam.amax(-1, keepdim=True) * max(rows, lam.shape[-1]) * torch.finfo(torch.float64).eps
        root = torch.where(keep, lam, 0).sqrt()
        halves += [root[..., :, None] * P.mT, scale[..., :, None] * P * torch.where(keep, 1 / root.clamp(min=torch.finfo(torch.float64).tiny), 0)[..., None, :]]
    C_l, M_l, C_r, M_r = halves
    return C_l, C_r, M_l, M_r


def _gram(X: Tensor, side: str) -> Tensor:
    """`XᵀX` (side "left") or `X Xᵀ` ("right") of X (..., a, b), in float64: one conversion and one
    batched GEMM for all of X (a loop of small ones stalls on a busy machine, each parallel region
    waiting for a core)."""
    x = _wide(X)
    return x.mT @ x if side == "left" else x @ x.mT


def exact_factored_svd(L: Tensor, R: Tensor, dtype: torch.dtype | None = None, *, scale: Tensor | None = None) -> FactoredSVD:
    """The exact SVD of `scale · L @ R` without forming it, L (..., m, r), R (..., r, n), `scale`
    (...) or none, in O((m + n) r²): `L = Q_l C_l`, `Rᵀ = Q_r C_r` from the float64 Gram matrices
    `LᵀL`, `R Rᵀ` (GEMMs, where a Householder QR of each thin factor is a serial LAPACK call per
    matrix: 2-core machine, 2026-12-07, 896 of 4096×16: QR 0.27 s on one thread, Grams 0.09 s),
    then `scale · C_l C_rᵀ = u σ vᵀ` (an r × r SVD). In float64 the Grams resolve directions down
    to ~1e-6 of a factor's largest: far below the rounding of factors stored in bf16 or float32.
    L and R are kept as given (any floating dtype): only the vectors asked for are formed, in
    float64, then rounded to `dtype` (default L's), as are S. Zero columns of L (a rank padded to
    a common width) give zero singular values."""
    C_l, C_r, M_l, M_r = _balanced_halves(_gram(L, "left"), _gram(R, "right"), L.shape[-2], R.shape[-1])
    if scale is not None:
        C_l = C_l * _wide(scale)[..., None, None]
    with _one_thread(L):
        u, S, vh = torch.linalg.svd(C_l @ C_r.mT)
    q = min(L.shape[-2], R.shape[-1], L.shape[-1])
    return FactoredSVD(L, R, S[..., :q].to(dtype or L.dtype), (M_l @ u)[..., :q], (M_r @ vh.mT)[..., :q])


def factored_svd(L: Tensor, R: Tensor, rank: int | None = None, *, oversample: int = 16, iterations: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the product `L @ R` without forming it: L (..., m, r), R (..., r, n) -> U (..., m, q),
    S (..., q) descending, V (..., n, q).

    Exact (q = min(m, n, r); `exact_factored_svd`) in O((m + n) r²). With `rank` well below r (a
    sum of many adapters), its top `rank` (q = rank) by the randomized SVD of the operator
    x ↦ L (R x) instead, in O((m + n) r (rank + oversample)) per pass, with `iterations` power
    iterations."""
    if rank is None or L.shape[-1] <= 2 * (rank + oversample):
        U, S, V = exact_factored_svd(L, R)
        return (U, S, V) if rank is None else (U[..., :rank], S[..., :rank], V[..., :rank])
    generator = torch.Generator(device=L.device).manual_seed(seed)
    omega = torch.randn((*R.shape[:-2], R.shape[-1], rank + oversample), generator=generator, dtype=L.dtype, device=L.device)
    Q = qr(L @ (R @ omega))[0]
    for _ in range(iterations):
        Q = qr(L @ (R @ qr(R.mT @ (L.mT @ Q))[0]))[0]
    u, S, vh = svd((Q.mT @ L) @ R)
    return (Q @ u)[..., :rank], S[..., :rank], vh.mT[..., :rank]
