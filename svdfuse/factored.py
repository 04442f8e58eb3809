"""The exact SVD of a product from its factors: what a LoRA update `s·B·A` (m×n, rank r) is made
of, in O((m + n) r²), never O(m·n·min(m, n)) and never an m×n matrix.

`exact_factored_svd`: `L = Q_l C_l`, `Rᵀ = Q_r C_r` from the float64 Gram matrices `LᵀL`, `R Rᵀ`
(`svdfuse.ops.gram`: read in the factors' own dtype, no float64 copy of a thousand adapters), then
an r × r SVD of `C_l C_rᵀ`. Its singular vectors are kept as maps of the factors (`FactoredSVD`)
and formed only where a method asks: AXIS keeps k components of Σ rᵢ. `factored_svd` adds the
randomized SVD of the operator `x ↦ L (R x)` for the top few of a very wide sum.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from svdfuse import linalg, ops

Buffers = Callable[[str, tuple[int, ...], torch.dtype], Tensor]  # name, shape, dtype -> memory to use

__all__ = ["FactoredSVD", "exact_factored_svd", "singular_values", "householder_factored_svd", "factored_svd"]


class FactoredSVD:
    """The exact SVD of a product `scale · L @ R` kept beside its factors, its singular vectors not
    yet formed: `U = L @ left`, `V = Rᵀ @ right`, handed out in S's dtype. The singular values of
    every product come first and cheaply (`singular_values`); a method that keeps a few components
    of many (AXIS's global top-k) asks for those alone (`vectors`), and only their factors' r × r
    maps and m×q products are made. The same interface as `methods.Components`.

    L (..., m, r), R (..., r, n); S (..., q) descending; grams: `LᵀL`, `R Rᵀ` (..., r, r) float64;
    scale (...) or None.
    """

    def __init__(
        self, L: Tensor, R: Tensor, S: Tensor, grams: tuple[Tensor, Tensor], scale: Tensor | None = None, buffer: Buffers | None = None
    ) -> None:
        self.L, self.R, self.S, self.grams, self.scale = L, R, S, grams, scale
        self.buffer = buffer or (lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=L.device))

    @functools.cached_property
    def _all_maps(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._maps(None)

    @property
    def U(self) -> Tensor:
        return (_wide(self.L) @ self._all_maps[0]).to(self.S.dtype)

    @property
    def V(self) -> Tensor:
        return (_wide(self.R).mT @ self._all_maps[1]).to(self.S.dtype)

    def __iter__(self) -> Iterator[Tensor]:
        """U, S, V, S here from the r × r SVDs that the vectors come from (each σ to ε64·σ₁, where
        `S`, from the eigenvalues σ², is to ε64·σ₁²/σ: the same at the top, coarser below)."""
        return iter((self.U, self._all_maps[2].to(self.S.dtype), self.V))

    def _maps(self, factors: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """`left`, `right` (F, r, q) float64 of the flat batch indices `factors` (None: all, (..., r, q)),
        and their singular values (F, q): the r × r SVD of the balanced halves of those products alone."""
        G_l, G_r = self.grams
        scale = self.scale
        if factors is not None:
            G_l, G_r = G_l.flatten(0, -3)[factors], G_r.flatten(0, -3)[factors]
            scale = None if scale is None else scale.flatten()[factors]
        q = self.S.shape[-1]
        with linalg.one_thread(G_l):
            C_l, C_r, M_l, M_r = _balanced_halves(G_l, G_r, self.L.shape[-2], self.R.shape[-1])
            if scale is not None:
                C_l = C_l * _wide(scale)[..., None, None]
            u, S, vh = torch.linalg.svd(C_l @ C_r.mT)
        pad = lambda t: torch.nn.functional.pad(t[..., :q], (0, max(0, q - t.shape[-1])))  # noqa: E731
        return pad(M_l @ u), pad(M_r @ vh.mT), pad(S)

    def vectors(self, *index: Tensor) -> tuple[Tensor, Tensor]:
        """Components `index` = (batch indices..., component) index tensors, broadcast to (*idx):
        their U and V as rows, (*idx, m) and (*idx, n). Each factor asked for is widened to float64
        once, however many of its components are: a product's top components come from few
        factors, and the widened copies are most of the cost, gathered into `buffer("chosen", ...)`
        and widened into `buffer("wide", ...)` (fresh memory's page faults cost 13 ms per 64 factors
        4096 × 16, the copy 1 ms)."""
        *batch, comp = torch.broadcast_tensors(*index)
        which = torch.zeros_like(comp)  # the flat batch index of each component asked for
        for i, size in zip(batch, self.L.shape[:-2]):
            which = which * size + i
        factors, slot_of = torch.unique(which.flatten(), return_inverse=True)
        # each asked component's column among its factor's: factors (F), columns (F, r, most)
        order = torch.argsort(slot_of, stable=True)
        starts = torch.searchsorted(slot_of[order], torch.arange(len(factors)))
        column = torch.empty_like(slot_of)
        column[order] = torch.arange(len(order)) - starts[slot_of[order]]
        most = int(column.max()) + 1 if column.numel() else 0
        left, right, _ = self._maps(factors)

        def rows(factor: Tensor, chosen: Tensor, transposed: bool) -> Tensor:
            chosen = chosen.mT  # (F, q, r)
            picked = chosen.new_zeros((len(factors), most, chosen.shape[2]))
            picked[slot_of, column] = chosen[slot_of, comp.flatten()]
            flat = factor.flatten(0, -3)
            shape = (len(factors), *flat.shape[1:])
            stored = torch.index_select(flat, 0, factors, out=self.buffer("chosen", shape, flat.dtype))
            wide = self.buffer("wide", shape, torch.float64).copy_(stored)
            formed = picked @ (wide if transposed else wide.mT)  # (F, most, m or n)
            return formed[slot_of, column].reshape(*comp.shape, -1).to(self.S.dtype)

        return rows(self.L, left, False), rows(self.R, right, True)

    def resized(self, q: int) -> FactoredSVD:
        """The top q components, with zero ones after the last where q exceeds their number."""
        S = torch.nn.functional.pad(self.S[..., :q], (0, max(0, q - self.S.shape[-1])))
        return FactoredSVD(self.L, self.R, S, self.grams, self.scale, self.buffer)


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float64)


def _balance(G_l: Tensor, G_r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The Gram matrices of `L D`, `D⁻¹ R` (the product unchanged) and D's diagonal d (..., r): each
    rank direction as large in one factor as in the other, so that a direction small in one and
    large in the other is not taken for rounding noise."""
    norm_l, norm_r = G_l.diagonal(dim1=-2, dim2=-1).sqrt(), G_r.diagonal(dim1=-2, dim2=-1).sqrt()
    d = torch.where((norm_l > 0) & (norm_r > 0), (norm_r / norm_l.clamp(min=torch.finfo(torch.float64).tiny)).sqrt(), torch.ones_like(norm_l))
    return G_l * d[..., :, None] * d[..., None, :], G_r / d[..., :, None] / d[..., None, :], d


def _balanced_halves(G_l: Tensor, G_r: Tensor, m: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the Gram matrices `LᵀL`, `R Rᵀ` (..., r, r) float64: `C_l`, `C_r` (..., r, r) and the maps
    `M_l`, `M_r` with `L = (L M_l) C_l`, `Rᵀ = (Rᵀ M_r) C_r`, `L M_l`, `Rᵀ M_r` orthonormal (zero columns
    where a factor has no such direction), of the balanced factors (`_balance`)."""
    G_l, G_r, d = _balance(G_l, G_r)
    halves = []
    for G, scale, rows in ((G_l, d, m), (G_r, 1 / d, n)):
        lam, P = torch.linalg.eigh(G)
        # Below this, an eigenvalue is the Gram's rounding (float64, `rows` products), not a direction.
        keep = lam > lam.amax(-1, keepdim=True) * max(rows, lam.shape[-1]) * torch.finfo(torch.float64).eps
        root = torch.where(keep, lam, 0).sqrt()
        halves += [root[..., :, None] * P.mT, scale[..., :, None] * P * torch.where(keep, 1 / root.clamp(min=torch.finfo(torch.float64).tiny), 0)[..., None, :]]
    C_l, M_l, C_r, M_r = halves
    return C_l, C_r, M_l, M_r


def singular_values(G_l: Tensor, G_r: Tensor, m: int, n: int, scale: Tensor | None = None) -> Tensor:
    """The singular values (..., r) descending of `scale · L R` from its factors' Gram matrices
    `LᵀL`, `R Rᵀ` (..., r, r) float64 alone, no vectors: σ² are the eigenvalues of `Cᵀ G_r C` for
    the Cholesky factor `C Cᵀ = G_l` of the balanced Grams (two Choleskys and one symmetric
    eigenvalue problem per product, where the vectors take two symmetric eigendecompositions and an
    SVD: 2-core machine, 2026-12-07, 14 000 of 16 × 16 float64: 0.13 s against 0.80 s). A direction
    that one factor lacks (a zero column or row) gives σ = 0 exactly. A product with a factor
    singular to rounding (a Cholesky pivot within r² of the level `_balanced_halves` drops, or a
    failed Cholesky) takes the route of the vectors instead, which drops that direction (σ ~ ε·σ₁,
    where σ² from `Cᵀ G_r C` would leave √ε·σ₁)."""
    B_l, B_r, _ = _balance(G_l, G_r)
    live = (B_l.diagonal(dim1=-2, dim2=-1) > 0) & (B_r.diagonal(dim1=-2, dim2=-1) > 0)
    both = live[..., :, None] & live[..., None, :]
    eye = torch.eye(B_l.shape[-1], dtype=B_l.dtype, device=B_l.device)

    def cholesky(G: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """G's Cholesky factor (lacking directions as identity) and whether G is singular to rounding."""
        C, info = torch.linalg.cholesky_ex(torch.where(both, G, eye))
        level = G.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True) * max(rows, G.shape[-1]) * G.shape[-1] ** 2 * torch.finfo(G.dtype).eps
        return C, (info != 0) | (live & (C.diagonal(dim1=-2, dim2=-1) ** 2 <= level)).any(-1)

    C, singular_l = cholesky(B_l, m)
    singular = singular_l | cholesky(B_r, n)[1]
    core = torch.where(both, C.mT @ B_r @ C, -eye)  # a lacking direction: an eigenvalue −1, clamped to σ = 0 below
    lam = torch.linalg.eigvalsh(core).flip(-1)
    if scale is not None:
        lam = lam * _wide(scale)[..., None] ** 2
    S = lam.clamp(min=0).sqrt()
    if singular.any():  # `_balanced_halves` balances the Grams itself
        C_l, C_r, _, _ = _balanced_halves(G_l[singular], G_r[singular], m, n)
        if scale is not None:
            C_l = C_l * _wide(scale)[singular][..., None, None]
        S[singular] = torch.linalg.svdvals(C_l @ C_r.mT)
    return S


_PART = 1024  # products a thread takes at a time: a few ms of LAPACK calls


def _singular_values_on_threads(G_l: Tensor, G_r: Tensor, m: int, n: int, scale: Tensor | None) -> Tensor:
    """`singular_values` of a batch, its parts on torch's threads, each part's small factorizations
    on one of them (`linalg.on_threads`: 0.16 s against 0.27 s on one thread for 16 000 products of
    rank 16, 2-core machine, 2026-12-07; torch runs a batch's LAPACK calls one after another)."""
    shape, r = G_l.shape[:-2], G_l.shape[-1]
    flat_l, flat_r = G_l.reshape(-1, r, r), G_r.reshape(-1, r, r)
    flat_s = None if scale is None else scale.reshape(-1)
    S = torch.empty((flat_l.shape[0], r), dtype=torch.float64, device=G_l.device)

    def part(start: int) -> None:
        at = slice(start, start + _PART)
        S[at] = singular_values(flat_l[at], flat_r[at], m, n, None if flat_s is None else flat_s[at])

    parts = range(0, flat_l.shape[0], _PART)
    if G_l.device.type == "cpu" and torch.get_num_threads() > 1 and len(parts) > 1:
        linalg.on_threads(part, parts, torch.get_num_threads())
    else:
        with linalg.one_thread(G_l):
            for start in parts:
                part(start)
    return S.reshape(*shape, r)


def exact_factored_svd(
    L: Tensor,
    R: Tensor,
    dtype: torch.dtype | None = None,
    *,
    scale: Tensor | None = None,
    grams: tuple[Tensor, Tensor] | None = None,
    buffer: Buffers | None = None,
) -> FactoredSVD:
    """The exact SVD of `scale · L @ R` without forming it, L (..., m, r), R (..., r, n), `scale`
    (...) or none, in O((m + n) r²): `L = Q_l C_l`, `Rᵀ = Q_r C_r` from the float64 Gram matrices
    `LᵀL`, `R Rᵀ` (`ops.gram`: one pass over the factors, where a Householder QR of each thin factor
    is a serial LAPACK call per matrix and forms Q besides: 2-core machine, 2026-12-07, 896 of
    4096×16 float32: QR 0.27 s on one thread, float64 Grams by GEMM 0.09 s), then
    `scale · C_l C_rᵀ = u σ vᵀ` (an r × r SVD); the r × r work runs on one thread, as small
    factorizations do (`linalg.one_thread`). In float64 the Grams resolve directions down
    to ~1e-6 of a factor's largest: far below the rounding of factors stored in bf16 or float32.
    The singular values of every product are found at once (`singular_values`); the r × r SVDs
    only where vectors are asked for. L and R are kept as given (any floating dtype): only the
    vectors asked for are formed, in float64, then rounded to `dtype` (default L's), as are S.
    Zero columns of L (a rank padded to a common width) give zero singular values. `grams`: `LᵀL`,
    `R Rᵀ` where the caller has them; `buffer(name, shape, dtype)`: scratch memory the caller
    reuses (default fresh)."""
    grams = grams or (ops.gram(L), ops.gram(R, left=False))
    S = _singular_values_on_threads(*grams, L.shape[-2], R.shape[-1], scale)
    q = min(L.shape[-2], R.shape[-1], L.shape[-1])
    return FactoredSVD(L, R, S[..., :q].to(dtype or L.dtype), grams, scale, buffer)


def householder_factored_svd(L: Tensor, R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact SVD of `L @ R`, L (..., m, w), R (..., w, n) -> U (..., m, q), S (..., q),
    V (..., n, q), q = min(m, n, w), by Householder QR of L and Rᵀ and a q × q SVD: every direction
    to the dtype's rounding, where the Gram route (`exact_factored_svd`) squares the conditioning
    of the smallest. For methods that weigh the smallest singular values as the largest (Iso-C
    sets them all to their mean): trained MiniLM adapters in float64, 3e-8 off the truth against
    the Gram route's 8e-5. A serial LAPACK call per matrix, formed vectors: slower."""
    Q_l, C_l = linalg.qr(L)
    Q_r, C_r = linalg.qr(R.mT)
    u, S, vh = linalg.svd(C_l @ C_r.mT)
    return Q_l @ u, S, Q_r @ vh.mT


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
    Q = linalg.qr(L @ (R @ omega))[0]
    for _ in range(iterations):
        Q = linalg.qr(L @ (R @ linalg.qr(R.mT @ (L.mT @ Q))[0]))[0]
    u, S, vh = linalg.svd((Q.mT @ L) @ R)
    return (Q @ u)[..., :rank], S[..., :rank], vh.mT[..., :rank]
