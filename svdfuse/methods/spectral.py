"""Merges defined on the singular vectors of task matrices: TSV-M, Iso-C, Iso-CTS.

All SVDs of dense matrices go through `svdfuse.ops.truncated_svd`, so they run on its fastest
backend. Tensors not merged as matrices take the mean task vector, unscaled as in the papers;
`scale_nonmatrix=True` multiplies it by the method's `scaling` as the official TSV and
iso-merging code and FusionBench do.

Iso-C and Iso-CTS over LoRA adapters alone (`iso_c_factored`, `iso_cts_factored`) take the sum's
SVD from the adapters' factors, `Σ_i s_i B_i A_i = [s_1 B_1 … s_T B_T][A_1; …; A_T]`, never an
m×n matrix per source. Such a sum has rank q ≤ Σ r_i, usually far below min(m, n): its spectrum
is its q nonzero singular values (those above the rounding floor σ_1 · max(m, n) · eps), and
both methods flatten and split that, where the dense rule takes all min(m, n), whose extra
directions are arbitrary (rounding noise of W0 + ΔW). Where the sum has full rank the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from svdfuse import factored, ops
from svdfuse.methods.registry import Components, Factors, Kind, check_finite_param, register


def _polar(A: Tensor) -> Tensor:
    """Closest matrix with orthonormal columns to A (..., d, c), c <= d: P Qᵀ from A = P Σ Qᵀ."""
    P, _, Q = ops.truncated_svd(A, A.shape[-1], method="exact")
    return P @ Q.mT


def _sorted(U: Tensor, S: Tensor, V: Tensor, counts: Tensor | None = None) -> Factors:
    order = S.argsort(dim=-1, descending=True, stable=True)
    take = lambda X: torch.gather(X, -1, order.unsqueeze(-2).expand(*X.shape[:-1], -1))  # noqa: E731
    return Factors(take(U), torch.gather(S, -1, order), take(V), counts)


def _mean_task_vector(tau: Tensor, *, scaling: float = 1.0, scale_nonmatrix: bool = False) -> Tensor:
    """Tensors not merged as matrices, tau (T, R, *s) -> the mean task vector (R, *s), times
    `scaling` when `scale_nonmatrix`."""
    check_finite_param("the non-matrix mean", "scaling", scaling)
    mean = tau.mean(0)
    return mean.mul_(scaling) if scale_nonmatrix else mean


_UNSCALED_MEAN = "non-matrix tensors take the mean task vector unscaled (scale_nonmatrix=True: times scaling, as the official code and FusionBench)"


def _tsv_rank(k: int | None, T: int, m: int, n: int, *, budget: int | None = None) -> int:
    r = min(m, n)
    b = r // T if budget is None else budget
    if b < 1 or T * b > r:
        raise ValueError(
            f"tsv_m: {T} sources x {b} components per source do not fit the rank {r} of a {m}x{n} matrix; "
            f"need 1 <= budget <= {r // T}" + (" (fewer sources than rank: exclude this matrix or merge fewer sources)" if r < T else "")
        )
    return b


@register(
    "tsv_m", reference_url="https://arxiv.org/abs/2412.00081", kind=Kind.FACTORS, source_rank=_tsv_rank, others=_mean_task_vector,
    follows=f"the TSV paper: floor(r/T) components per task; {_UNSCALED_MEAN}",
)  # fmt: skip
def tsv_m(chunks: Iterator[Components], *, T: int, budget: int | None = None, scaling: float = 1.0) -> Factors:
    """TSV-M: keep each task's top `budget` singular components (default floor(min(m, n) / T)),
    stack them, replace the stacked U and V by their closest orthonormal matrices (polar
    decomposition) and sum; times `scaling`. More tasks than the matrix has room for
    (T · budget > min(m, n)) is an error, not a silent truncation.

    chunks: U (G, c, m, r), S (G, c, r), V (G, c, n, r) of consecutive sources, r >= budget, or
    r < budget where every source has only r components (LoRA adapters of rank r, their exact
    components: the rest are zero, and a zero component's arbitrary vectors would only tilt the
    polar factors of the others).
    """
    check_finite_param("tsv_m", "scaling", scaling)
    parts = [tuple(chunk) for chunk in chunks]  # (U, S, V) of each
    G, _, m, r = parts[0][0].shape
    n = parts[0][2].shape[2]
    b = min(_tsv_rank(None, T, m, n, budget=budget), r)
    U = torch.cat([p[0][..., :b] for p in parts], 1)  # (G, T, m, b)
    S = torch.cat([p[1][..., :b] for p in parts], 1)
    V = torch.cat([p[2][..., :b] for p in parts], 1)
    U_cat = U.permute(0, 2, 1, 3).reshape(G, m, T * b)
    V_cat = V.permute(0, 2, 1, 3).reshape(G, n, T * b)
    counts = torch.full((G, T), b, dtype=torch.int64, device=S.device)
    return _sorted(_polar(U_cat), scaling * S.reshape(G, T * b), _polar(V_cat), counts)


# -- from LoRA factors ----------------------------------------------------------------------


def _factored_sum_svd(chunks: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Exact SVD of Σ_i L_i R_i over chunks of sources, L (G, c, m, r), R (G, c, r, n), peft's
    scale in L -> U (G, m, w), S (G, w), V (G, n, w), w = min(m, n, Σ r). The running sum is kept as
    its own SVD (at most min(m, n) wide) and each chunk joins it as more columns of the product
    [U σ, L_1 … L_c][Vᵀ; R_1; …; R_c]: memory is one chunk plus that, for any number of sources."""
    U = S = V = None
    for L, R in chunks:
        G, c, m, r = L.shape
        L, R = L.permute(0, 2, 1, 3).reshape(G, m, c * r), R.reshape(G, c * r, R.shape[-1])
        if U is not None:
            L, R = torch.cat([U * S.unsqueeze(-2), L], -1), torch.cat([V.mT, R], -2)
        U, S, V = factored.householder_factored_svd(L, R)
    return U, S, V


def _floor(S: Tensor, m: int, n: int) -> Tensor:
    """(G, 1): singular values of S (G, w) at or below it are rounding, not rank (numpy's matrix_rank rule)."""
    return S[..., :1] * max(m, n) * torch.finfo(S.dtype).eps


def _iso_over_rank(S: Tensor, m: int, n: int) -> Tensor:
    """S (G, w) descending -> (G, w): the mean of each row's nonzero values where they are, 0 after."""
    kept = S > _floor(S, m, n)
    mean = (S * kept).sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=1)
    return mean * kept


def iso_c_factored(chunks: Callable[[], Iterator[tuple[Tensor, Tensor]]], *, scaling: float = 1.0) -> Factors:
    """Iso-C of sources that are all LoRA adapters, from their factors: the SVD of the summed
    update `[L_1 … L_T][R_1; …; R_T]` (exact, streamed over chunks), its q nonzero singular values
    replaced by their mean, times `scaling`.

    chunks: a fresh iterator at each call of L (G, c, m, r), R (G, c, r, n) of consecutive sources
    (peft's scale in L). Returns U (G, m, w), S (G, w) (zero after each matrix's rank), V (G, n, w).
    """
    check_finite_param("iso_c", "scaling", scaling)
    U, S, V = _factored_sum_svd(chunks())
    return Factors(U, scaling * _iso_over_rank(S, U.shape[-2], V.shape[-2]), V)


def iso_cts_factored(
    chunks: Callable[[], Iterator[tuple[Tensor, Tensor]]], *, T: int, common: float = 0.8, scaling: float = 1.0,
    common_size: int | None = None, fill_rank: bool = False,
) -> Factors:  # fmt: skip
    """Iso-CTS of sources that are all LoRA adapters, from their factors: `iso_cts` with r the
    rank q of each summed update; the common subspace from the summed update's exact SVD, each
    task's top s directions off it exactly from its own factors ((I − U_c U_cᵀ) L_i, R_i), a
    task's zero components (a matrix it leaves alone) dropped. Two passes over `chunks`.

    chunks: as `iso_c_factored`. Returns U (G, m, w), S (G, w), V (G, n, w), w the widest kept,
    zero columns and values after each matrix's own.
    """
    check_finite_param("iso_cts", "scaling", scaling)
    U, S, V = _factored_sum_svd(chunks())
    G, m, _ = U.shape
    n = V.shape[-2]
    floor = _floor(S, m, n)
    sizes = [_cts_sizes(q, T, m, n, common, common_size, fill_rank) if q else (0, 0) for q in (S > floor).sum(-1).tolist()]
    k_c = torch.tensor([k for k, _ in sizes], device=U.device)
    most = max(s for _, s in sizes)
    parts = []
    if most > 0:
        U_c = U * (torch.arange(U.shape[-1], device=U.device) < k_c[:, None]).unsqueeze(-2)  # each matrix's own k_c columns
        for L, R in chunks():
            off = L - U_c.unsqueeze(1) @ (U_c.mT.unsqueeze(1) @ L)
            parts.append([t[..., :most] for t in factored.householder_factored_svd(off, R)])  # exact: (G, c, m, ≤s), (G, c, ≤s), (G, c, n, ≤s)
    merged = []
    for g, (k, s) in enumerate(sizes):
        us, ss, vs = [U[g, :, :k]], [S[g, :k]], [V[g, :, :k]]
        if s > 0:
            U_t, S_t, V_t = (torch.cat([p[i][g] for p in parts])[..., :s] for i in range(3))  # (T, m, s), (T, s), (T, n, s)
            kept = (S_t > floor[g]).flatten()
            us.append(U_t.permute(1, 0, 2).reshape(m, -1)[:, kept])
            ss.append(S_t.flatten()[kept])
            vs.append(V_t.permute(1, 0, 2).reshape(n, -1)[:, kept])
        sigma = torch.cat(ss)
        if sigma.numel() == 0:  # no adapter changes this matrix
            merged.append((U[g, :, :0], sigma, V[g, :, :0]))
            continue
        merged.append((_polar(torch.cat(us, -1)), (scaling * sigma.mean()).expand_as(sigma), _polar(torch.cat(vs, -1))))
    width = max(s.numel() for _, s, _ in merged)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    return Factors(*(torch.stack([pad(f[i]) for f in merged]) for i in range(3)))


def _summed_svd(W0: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Full SVD of the Task Arithmetic sum Σ_i (W_i − W0): (G, m, r), (G, r), (G, n, r)."""
    # Summed as differences: Σ W_i − T·W0 would cancel away the small task matrices' digits.
    summed = sum(W[:, t] - W0 for t in range(W.shape[1]))
    return ops.truncated_svd(summed, min(W.shape[-2:]), method="exact")


@register(
    "iso_c", reference_url="https://arxiv.org/abs/2502.04959", kind=Kind.MATRICES, others=_mean_task_vector, factored=iso_c_factored,
    follows=f"the Iso-C paper: {_UNSCALED_MEAN}",
)  # fmt: skip
def iso_c(W0: Tensor, W: Tensor, *, scaling: float = 1.0) -> Factors:
    """Iso-C: SVD of the summed task matrix with every singular value replaced by their mean,
    times `scaling`: `scaling · mean(σ) · U Vᵀ`."""
    check_finite_param("iso_c", "scaling", scaling)
    U, S, V = _summed_svd(W0, W)
    return Factors(U, scaling * S.mean(-1, keepdim=True).expand_as(S).contiguous(), V)


def common_subspace(r: int, T: int, *, common: float = 0.8, common_size: int | None = None, fill_rank: bool = False) -> tuple[int, int]:
    """Iso-CTS's (k_c common directions, s per task) for rank r and T tasks.

    k_c is `common_size` if given, else floor(common · r) (the paper); s = floor((r − k_c) / T).
    `fill_rank` shifts floor(common · r) so that the task parts fill the rest exactly,
    k_c = r − round((r − k_c) / T) · T with Python's round (half to even), as the official
    iso-merging code and FusionBench do.
    """
    if not 0.0 <= common <= 1.0:
        raise ValueError(f"iso_cts: common must be in [0, 1], found {common}")
    if common_size is not None and fill_rank:
        raise ValueError("iso_cts: common_size gives k_c itself and fill_rank shifts the k_c of common; give one of them")
    if common_size is not None and not (isinstance(common_size, int) and 0 <= common_size <= r):
        raise ValueError(f"iso_cts: common_size must be an int in [0, r] = [0, {r}] for every merged matrix, found {common_size!r}")
    k_c = math.floor(common * r) if common_size is None else common_size
    if fill_rank:
        shifted = r - round((r - k_c) / T) * T
        if shifted < 0:
            raise ValueError(f"iso_cts: fill_rank with {T} tasks and k_c = {k_c} of rank {r} gives a negative common size {shifted}; raise common")
        k_c = shifted
    return k_c, (r - k_c) // T


def _cts_sizes(r: int, T: int, m: int, n: int, common: float, common_size: int | None, fill_rank: bool) -> tuple[int, int]:
    """`common_subspace` of rank r, refusing sizes that leave no task-specific direction."""
    k_c, s = common_subspace(r, T, common=common, common_size=common_size, fill_rank=fill_rank)
    if s == 0 and k_c < r:
        raise ValueError(
            f"iso_cts: {T} sources leave no task-specific direction in a {m}x{n} matrix with "
            + (f"common={common}" if common_size is None else f"common_size={common_size}")
            + f" ({r - k_c} directions for {T} tasks); lower common, fill_rank=True, or use iso_c"
        )
    return k_c, s


@register(
    "iso_cts", reference_url="https://arxiv.org/abs/2502.04959", kind=Kind.MATRICES, others=_mean_task_vector, factored=iso_cts_factored,
    follows=(
        "the Iso-CTS paper: floor(0.8 r) common and floor((r - k_c)/T) task directions, a few of r left unused "
        f"(fill_rank=True: the official code and FusionBench, all r used); {_UNSCALED_MEAN}"
    ),
)  # fmt: skip
def iso_cts(
    W0: Tensor, W: Tensor, *, svd: ops.SVDOptions, common: float = 0.8, scaling: float = 1.0, common_size: int | None = None, fill_rank: bool = False
) -> Factors:
    """Iso-CTS: the top k_c directions of the summed task matrix (the common subspace), plus for
    each task the top s directions of its task matrix projected off the common subspace; both
    sides orthonormalized (polar), every singular value replaced by the mean of the kept ones,
    times `scaling`. (k_c, s) from `common_subspace`: by default k_c = floor(common · r) and
    s = floor((r − k_c) / T); `common_size` gives k_c itself; `fill_rank` uses all r directions."""
    check_finite_param("iso_cts", "scaling", scaling)
    G, T, m, n = W.shape
    k_c, s = _cts_sizes(min(m, n), T, m, n, common, common_size, fill_rank)
    U, S, V = _summed_svd(W0, W)
    U_c, S_c, V_c = U[..., :k_c], S[..., :k_c], V[..., :k_c]
    parts_u, parts_s, parts_v = [U_c], [S_c], [V_c]
    if s > 0:
        tau = W - W0.unsqueeze(1)  # (G, T, m, n)
        off_common = tau - U_c.unsqueeze(1) @ (U_c.mT.unsqueeze(1) @ tau)
        U_t, S_t, V_t = svd.truncated_svd(off_common, s)  # (G, T, m, s), (G, T, s), (G, T, n, s)
        parts_u.append(U_t.permute(0, 2, 1, 3).reshape(G, m, T * s))
        parts_s.append(S_t.reshape(G, T * s))
        parts_v.append(V_t.permute(0, 2, 1, 3).reshape(G, n, T * s))
    sigma = torch.cat(parts_s, -1)
    iso = scaling * sigma.mean(-1, keepdim=True).expand_as(sigma).contiguous()
    return Factors(_polar(torch.cat(parts_u, -1)), iso, _polar(torch.cat(parts_v, -1)))
