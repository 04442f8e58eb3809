"""SVD of hundreds of small square matrices at once: one-sided Jacobi, one Triton program each.

The randomized SVD ends with the SVD of one w×w core per source (w = rank + oversample, at most a
few hundred); a library SVD handles such a batch one matrix after another. Here every program
orthogonalizes the columns of its matrix with plane rotations (Hestenes), w/2 disjoint pairs at a
time in round-robin order, and accumulates the rotations: `M J = Ũ Σ`, so `M = Ũ Σ Jᵀ`.
`torch.linalg.svd` is its oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Cyclic Jacobi converges quadratically once close; fp32 columns are orthogonal to rounding after
# 6-10 sweeps for w <= 256. The loop stops earlier when a whole sweep rotated nothing.
MAX_SWEEPS = 16


@triton.jit
def _small_svd_kernel(A, J, W, HALF: tl.constexpr, MAX_SWEEPS: tl.constexpr, TOL: tl.constexpr):
    # A, J: (batch, W, W) fp32 scratch, W even; A holds M (zero-padded), J the identity. On return
    # the columns of A are Ũ Σ (orthogonal) and J the accumulated rotations.
    # Batch offsets in int64; offsets within a matrix stay below W², and W is a few hundred (its
    # tiles live in registers), so int32 is ample there.
    b = tl.program_id(0).to(tl.int64)
    A += b * W * W
    J += b * W * W
    rows = tl.arange(0, 2 * HALF)
    j = tl.arange(0, HALF)
    live = rows < W
    # Typed scalars: loop-carried values must keep one type through the loops.
    sweep = tl.full([], 0, tl.int32)
    off = tl.full([], 1.0, tl.float32)
    while (sweep < MAX_SWEEPS) & (off > TOL):
        off = tl.full([], 0.0, tl.float32)
        for r in range(W - 1):
            # Round-robin pairing (the circle method): every pair of columns meets once a sweep,
            # and the W/2 pairs of a round are disjoint, so they rotate in parallel.
            p = tl.where(j == 0, 0, (j - 1 + r) % (W - 1) + 1)
            q = (W - 2 - j + r) % (W - 1) + 1
            pair = j < W // 2
            mask = live[:, None] & pair[None, :]
            ap = tl.load(A + rows[:, None] * W + p[None, :], mask=mask, other=0.0)
            aq = tl.load(A + rows[:, None] * W + q[None, :], mask=mask, other=0.0)
            alpha = tl.sum(ap * ap, 0)
            beta = tl.sum(aq * aq, 0)
            gamma = tl.sum(ap * aq, 0)
            scale = tl.sqrt(alpha * beta)
            rotate = tl.abs(gamma) > TOL * scale
            off = tl.maximum(off, tl.max(tl.abs(gamma) / tl.where(scale > 0, scale, 1.0), 0))
            # The rotation that zeroes gamma, its tangent the smaller root (Rutishauser's formulas).
            zeta = (beta - alpha) / tl.where(rotate, 2.0 * gamma, 1.0)
            t = tl.where(zeta >= 0, 1.0, -1.0) / (tl.abs(zeta) + tl.sqrt(1.0 + zeta * zeta))
            c = tl.where(rotate, 1.0 / tl.sqrt(1.0 + t * t), 1.0)
            s = tl.where(rotate, c * t, 0.0)
            tl.debug_barrier()  # every thread has read this round's columns before any is rewritten
            tl.store(A + rows[:, None] * W + p[None, :], c[None, :] * ap - s[None, :] * aq, mask=mask)
            tl.store(A + rows[:, None] * W + q[None, :], s[None, :] * ap + c[None, :] * aq, mask=mask)
            # J's columns are read only now, once A's are dead: two (W, W/2) tiles live at a time
            # instead of four, which is what kept the kernel in registers at W = 92.
            jp = tl.load(J + rows[:, None] * W + p[None, :], mask=mask, other=0.0)
            jq = tl.load(J + rows[:, None] * W + q[None, :], mask=mask, other=0.0)
            tl.debug_barrier()  # J's columns are read everywhere before any is rewritten
            tl.store(J + rows[:, None] * W + p[None, :], c[None, :] * jp - s[None, :] * jq, mask=mask)
            tl.store(J + rows[:, None] * W + q[None, :], s[None, :] * jp + c[None, :] * jq, mask=mask)
            tl.debug_barrier()  # the next round reads what this one wrote
        sweep += 1


def small_svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a batch of small square fp32 matrices; `torch.linalg.svd` is its oracle.

    M: (..., w, w) -> U (..., w, w), S (..., w) descending, V (..., w, w), with M = U diag(S) Vᵀ and
    U, V orthonormal (columns of U whose σ is zero are completed orthonormally).
    """
    w = M.shape[-1]
    lead = M.shape[:-2]
    W = w + w % 2  # the pairing needs an even count: a zero column joins odd sizes
    batch = M.reshape(-1, w, w).shape[0]
    A = torch.zeros(batch, W, W, dtype=torch.float32, device=M.device)
    A[:, :w, :w] = M.reshape(-1, w, w)
    J = torch.eye(W, dtype=torch.float32, device=M.device).repeat(batch, 1, 1)
    if batch:
        eps = torch.finfo(torch.float32).eps
        half = triton.next_power_of_2(W) // 2
        # Four (W, W/2) tiles live in registers through a round: spread them over more warps as W grows.
        warps = 4 if half <= 32 else 8 if half <= 64 else 16
        _small_svd_kernel[(batch,)](A, J, W, HALF=half, MAX_SWEEPS=MAX_SWEEPS, TOL=float(eps), num_warps=warps)
    S = A.norm(dim=-2)  # (batch, W): column norms are the singular values
    S, order = S.sort(dim=-1, descending=True, stable=True)
    A = A.gather(-1, order.unsqueeze(-2).expand_as(A))
    V = J.gather(-1, order.unsqueeze(-2).expand_as(J))
    U = A / torch.where(S > 0, S, 1.0).unsqueeze(-2)
    U, S, V = U[:, :w, :w], S[:, :w], V[:, :w, :w]
    U = _complete(U, S)
    return U.reshape(*lead, w, w), S.reshape(*lead, w), V.reshape(*lead, w, w)


def _complete(U: Tensor, S: Tensor) -> Tensor:
    """Columns of U for σ at rounding level carry no direction: replace them by an orthonormal
    completion of the others (Householder QR keeps the leading columns up to sign)."""
    tiny = S <= S[:, :1] * (S.shape[-1] * torch.finfo(torch.float32).eps)
    needs = tiny.any(-1)
    if bool(needs.any()):
        Ub = torch.where(tiny[needs].unsqueeze(-2), 0.0, U[needs])
        Q, R = torch.linalg.qr(Ub.double())
        sign = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
        U[needs] = (Q * sign.unsqueeze(-2)).float()
    return U
