"""Pure-torch reference implementations of every op in `svdfuse.ops`.

They are the test oracle of every backend: plain torch, each written the obvious way and sharing no
code with the production paths. Ops without a CPU path of their own (`exact_svd`,
`topk_components`, `reorthogonalize`, `lowrank_matmul`) also run them on the CPU; the randomized
SVD has its own (`svdfuse.cpu`). All of them accumulate in float32 (float64 when the inputs are
float64) whatever the storage dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from svdfuse import linalg


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype svdfuse accumulates in for data stored in `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def task_sigma(S: Tensor, task: Tensor | None) -> Tensor:
    """σ of each row of x: S (K,) -> (1, K), one for all rows; S (num_tasks, K) and task -> (rows, K).

    A row whose task id is outside [0, num_tasks) gets NaN, as in the CUDA kernels: a bad id is never
    read, and its row cannot pass silently.
    """
    if task is None:
        return S.reshape(1, -1)
    ids = task.reshape(-1)
    valid = (ids >= 0) & (ids < S.shape[0])
    return S.index_select(0, ids.clamp(0, S.shape[0] - 1)).masked_fill(~valid[:, None], float("nan"))


def lowrank_matmul(
    x: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    base: Tensor | None = None,
    bias: Tensor | None = None,
    task: Tensor | None = None,
) -> Tensor:
    """`x Wbᵀ + ((x V) ⊙ σ) Uᵀ + bias`; x: (..., n), U: (m, K), V: (n, K) -> (..., m).

    σ is S (K,) for every row, or row `task[...]` of S (num_tasks, K) for each row, task: x.shape[:-1].
    """
    acc = compute_dtype(x.dtype)
    # rows counted, not reshape(-1, n): -1 is ambiguous for 0 elements (n = 0).
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(acc)
    y = ((x2 @ V.to(acc)) * task_sigma(S.to(acc), task)) @ U.to(acc).T
    if base is not None:
        y = y + x2 @ base.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], U.shape[0])


def lowrank_matmul_backward(
    grad: Tensor,
    x: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    base: Tensor | None,
    task: Tensor | None,
    needs: tuple[bool, ...],
) -> list[Tensor | None]:
    """Gradients of `lowrank_matmul` with respect to (x, U, S, V, base, bias), None where `needs` (one
    flag for each of those six) is False or the input is None; grad: (..., m) like the output.

    The formula of the C++ autograd (csrc/lowrank_matmul_autograd.cpp), in the accumulation dtype and
    cast once per gradient. With `task`, S's gradient sums each row's contribution into the row its id
    picked; a row with an id outside [0, num_tasks) adds NaN to the row its clamped id names, as its
    output row is NaN.
    """
    acc = compute_dtype(x.dtype)
    rows = x.shape[:-1].numel()
    x2, g2 = x.reshape(rows, V.shape[0]).to(acc), grad.reshape(rows, U.shape[0]).to(acc)
    U_, V_ = U.to(acc), V.to(acc)
    sigma = task_sigma(S.to(acc), task)
    gU = g2 @ U_  # the gradient with respect to (x V) ⊙ σ
    t = x2 @ V_
    out: list[Tensor | None] = [None] * 6
    if needs[0]:
        gx = (gU * sigma) @ V_.T
        out[0] = (gx if base is None else gx + g2 @ base.to(acc)).to(x.dtype).reshape(x.shape)
    if needs[1]:
        out[1] = (g2.T @ (t * sigma)).to(U.dtype)
    if needs[2]:
        per_row = gU * t
        if task is None:
            out[2] = per_row.sum(0).to(S.dtype)
        else:
            ids = task.reshape(-1)
            bad = ((ids < 0) | (ids >= S.shape[0]))[:, None]
            picked = ids.clamp(0, S.shape[0] - 1)
            out[2] = S.new_zeros(S.shape, dtype=acc).index_add(0, picked, per_row.masked_fill(bad, float("nan"))).to(S.dtype)
    if needs[3]:
        out[3] = (x2.T @ (gU * sigma)).to(V.dtype)
    if needs[4] and base is not None:
        out[4] = (g2.T @ x2).to(base.dtype)
    if needs[5]:
        out[5] = g2.sum(0).to(x.dtype)
    return out


def _gaussian(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    # Drawn on the CPU so that a seed gives the same test matrix on every device.
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def _minus_base(A: Tensor, base: Tensor | None, acc: torch.dtype) -> Tensor:
    return A.to(acc) if base is None else A.to(acc) - base.to(acc)


def exact_svd(A: Tensor, rank: int, base: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of `A - base` by a full SVD (`svdfuse.linalg.svd`); A: (..., m, n) -> U (..., m, r), S (..., r), V (..., n, r)."""
    delta = _minus_base(A, base, compute_dtype(A.dtype))
    U, S, Vh = linalg.svd(delta)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :].mT


def _broadcast_matmul(B: Tensor, X: Tensor) -> Tensor:
    """B @ X where B broadcasts over batch dims of X, without expanding B (torch.matmul would copy
    B once per broadcast batch entry): those dims are folded into the columns of X instead."""
    if X.dim() == 2 or B.shape[:-2] == X.shape[:-2]:
        return B @ X
    batch = linalg.broadcast_shapes(B.shape[:-2], X.shape[:-2])
    nb = len(batch)
    B = B.reshape((1,) * (nb - (B.dim() - 2)) + B.shape)
    X = X.expand(*batch, *X.shape[-2:])
    spread = [i for i in range(nb) if B.shape[i] == 1 and batch[i] != 1]
    keep = [i for i in range(nb) if i not in spread]
    perm = keep + [nb] + spread + [nb + 1]
    folded = X.permute(*perm).reshape(*[batch[i] for i in keep], X.shape[-2], -1)
    Y = B.reshape(*[B.shape[i] for i in keep], *B.shape[-2:]) @ folded
    Y = Y.reshape(*[batch[i] for i in keep], B.shape[-2], *[batch[i] for i in spread], X.shape[-1])
    return Y.permute(*[perm.index(d) for d in range(nb + 2)])


PRECISIONS = ("ieee", "tf32x3", "tf32")


def _round_tf32(t: Tensor) -> Tensor:
    # What an fp32 tensor core reads: the mantissa rounded to 10 bits, to nearest, ties away from
    # zero (cvt.rna.tf32.f32). Products of tf32 values are exact in fp32, so rounding the inputs and
    # multiplying in fp32 reproduces the hardware up to the order of the fp32 additions.
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _matmul(X: Tensor, Y: Tensor, precision: str) -> Tensor:
    """X @ Y (fp32) as a GEMM of the given input precision computes it."""
    if precision == "ieee" or X.dtype != torch.float32:
        return X @ Y
    X_hi, Y_hi = _round_tf32(X), _round_tf32(Y)
    out = X_hi @ Y_hi
    if precision == "tf32x3":  # hi*hi + hi*lo + lo*hi recovers ~fp32 accuracy from three tf32 GEMMs
        out = out + X_hi @ _round_tf32(Y - Y_hi) + _round_tf32(X - X_hi) @ Y_hi
    return out


def rsvd_project(A: Tensor, X: Tensor, base: Tensor | None = None, *, transpose: bool = False, precision: str = "ieee") -> Tensor:
    """`(A - base) X`, or `(A - base)ᵀ X`, in the accumulation dtype; `A - base` is formed only to
    emulate tf32 inputs.

    A: (..., m, n) any float dtype; base broadcastable to A (None for zero); X: (..., n, w), or
    (..., m, w) with `transpose`, fp32 (fp64 for fp64 A), broadcast over A's batch dims.
    `precision` is that of the GEMM inputs: "ieee" fp32, "tf32x3" or "tf32" (fp32 only).
    """
    acc = compute_dtype(A.dtype)
    if precision != "ieee":
        # Emulates the fused kernel, which rounds the difference itself to tf32: form it here.
        delta = _minus_base(A, base, acc)
        return _matmul(delta.mT if transpose else delta, X, precision)
    Ac = A.to(acc).mT if transpose else A.to(acc)
    if base is None:
        return Ac @ X
    return Ac @ X - _broadcast_matmul(base.to(acc).mT if transpose else base.to(acc), X)


def randomized_svd(
    A: Tensor, rank: int, base: Tensor | None = None, *, oversample: int, power_iters: int, seed: int, precision: str = "ieee"
) -> tuple[Tensor, Tensor, Tensor]:
    """Halko–Martinsson–Tropp randomized SVD of `A - base`, batched over the leading dims: the
    oracle of every backend's driver (`svdfuse._rsvd`), sharing no code with them.

    A: (..., m, n) any float dtype, base broadcastable to A or None -> U (..., m, rank),
    S (..., rank), V (..., n, rank) in the accumulation dtype. Plainly: `A - base` formed once, a
    Gaussian Ω (n, w) from `seed` drawn on the CPU, w = min(rank + oversample, m, n), Householder
    QR after every product, the SVD of the projected matrix by `torch.linalg.svd`. `precision`
    emulates the GPU's GEMM inputs ("tf32": `A - base` and the right factor rounded to tf32).
    """
    acc = compute_dtype(A.dtype)
    delta = _minus_base(A, base, acc)
    m, n = delta.shape[-2:]
    width = min(rank + oversample, m, n)
    omega = _gaussian((n, width), acc, A.device, seed)
    Q = torch.linalg.qr(_matmul(delta, omega, precision)).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(_matmul(delta.mT, Q, precision)).Q
        Q = torch.linalg.qr(_matmul(delta, Q, precision)).Q
    # (A - base)ᵀ Q = Bᵀ = Vb S Ubᵀ, so A - base ≈ Q B = (Q Ub) S Vbᵀ.
    Vb, S, Ub_t = linalg.svd(_matmul(delta.mT, Q, precision))
    U = Q @ Ub_t.mT
    return U[..., :rank], S[..., :rank], Vb[..., :rank]


def topk_components(S: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-k of `S: (..., sources, r)` over sources × components.

    Ties go to the lower source index, then the lower component index (a stable sort), so the
    selection is deterministic on every device. NaN, of either sign and any payload, ranks above
    +inf, and NaNs tie; -0.0 ties with +0.0.
    """
    sources, r = S.shape[-2:]
    flat = S.reshape(*S.shape[:-2], sources * r)
    # Every NaN sorts as the one canonical +NaN: the CPU sort ranks any NaN above +inf, but CUDA's
    # radix sort orders NaNs by their bits, which puts a negative NaN below -inf, out of the top k.
    key = torch.where(flat.isnan(), float("nan"), flat)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    values = torch.gather(flat, -1, order)
    return values, torch.div(order, r, rounding_mode="floor"), order % r


def reorthogonalize(U_s: Tensor, S_s: Tensor, V_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of `U_s diag(S_s) V_sᵀ` through QR of the factors and an SVD of the K×K core.

    U_s: (..., m, K), S_s: (..., K), V_s: (..., n, K) -> U_t (..., m, K), S_t (..., K), V_t (..., n, K)
    with orthonormal U_t, V_t and S_t descending.
    """
    acc = compute_dtype(U_s.dtype)
    Qu, Ru = linalg.qr(U_s.to(acc))
    Qv, Rv = linalg.qr(V_s.to(acc))
    core = (Ru * S_s.to(acc).unsqueeze(-2)) @ Rv.mT
    Uc, S_t, Vch = linalg.svd(core)
    return Qu @ Uc, S_t, Qv @ Vch.mT


# DARE's draws come in chunks of a tensor's flat index space, each chunk from its own seeded CPU
# generator (svdfuse.methods.elementwise.survivors names the seeds).
DARE_CHUNK = 1 << 16


def dare_keep(seeds: Tensor, start: int, numel: int, drop: int) -> Tensor:
    """DARE's keep-mask of `numel` entries from flat index `start`: entry j survives iff the uniform
    draw torch.rand makes for it is >= drop / 2^24. seeds: (chunks,) int64, one per chunk
    `DARE_CHUNK` from chunk start // DARE_CHUNK on. Returns bool (numel,), on the CPU."""
    first = start // DARE_CHUNK
    draws = torch.cat([torch.rand(DARE_CHUNK, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()])
    return draws[start - first * DARE_CHUNK :][:numel] >= drop / 2**24


def merge_block(
    sources: list[Tensor],
    base: Tensor,
    weights: Tensor,
    scale: float,
    divisor: float,
    seeds: Tensor | None,
    start: int,
    drop: int,
    same_is_zero: bool,
    add_base: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`svdfuse.ops.merge_block`, op by op: the task vectors, weighted, masked, summed, divided,
    scaled, the base added, cast; and the block's flags."""
    acc = compute_dtype(base.dtype)
    x, x0, tau = _task_vectors(sources, base, acc, same_is_zero)
    tau = tau * weights.to(acc)[:, None]
    if seeds is not None:
        tau = tau * torch.stack([dare_keep(s, start, x.shape[1], drop) for s in seeds]).to(tau.device)
    merged = _in_order(tau) / torch.tensor(divisor, dtype=acc) * torch.tensor(scale, dtype=acc)
    return _with_flags((merged + x0 if add_base else merged).to(dtype), x, x0)


def _task_vectors(sources: list[Tensor], base: Tensor, acc: torch.dtype, same_is_zero: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The block's sources x (T, N) and base x0 (N,) in `acc`, and τ = x − x0 (0 where equal, with `same_is_zero`)."""
    x, x0 = torch.stack(sources).to(acc) if sources else base.new_empty((0, base.shape[0]), dtype=acc), base.to(acc)
    tau = x - x0
    return x, x0, tau.masked_fill(x == x0, 0.0) if same_is_zero else tau


def _with_flags(out: Tensor, x: Tensor, x0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`out` and the block's flags, as the fused ops return them: differs (T,), zero (T + 1,), first bad index."""
    differs = (x != x0).any(1)
    zero = torch.cat([(x == 0).all(1), (x0 == 0).all()[None]])
    bad = (~torch.isfinite(out)).nonzero()
    first_bad = bad[0, 0] if len(bad) else torch.tensor(-1)
    return out, differs, zero, first_bad.to(device=x.device, dtype=torch.int64)


def _in_order(terms: Tensor) -> Tensor:
    """The sum over the first dim added in order, as the kernels add (torch.sum may pair terms)."""
    total = torch.zeros(terms.shape[1:], dtype=terms.dtype, device=terms.device)
    for t in terms:
        total = total + t
    return total


def ties_block(
    sources: list[Tensor],
    base: Tensor,
    weights: Tensor | None,
    threshold: Tensor,
    cutoff: Tensor,
    start: int,
    keep_none: bool,
    scale: float,
    mean: bool,
    positive: bool,
    same_is_zero: bool,
    add_base: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`svdfuse.ops.ties_block`, op by op: trim, weight, elect, combine the agreeing values; flags."""
    acc = compute_dtype(base.dtype)
    x, x0, tau = _task_vectors(sources, base, acc, same_is_zero)
    a = tau.abs()
    index = torch.arange(start, start + x.shape[1], device=x.device)
    keep = (a > threshold[:, None]) | ((a == threshold[:, None]) & (index < cutoff[:, None]))
    t = tau * (keep & (not keep_none))
    if weights is not None:
        t = t * weights[:, None]
    elected = _in_order(t).sign()
    if positive:
        elected[elected == 0] = 1
    agree = (t * elected) > 0
    merged = _in_order(t * agree)
    if mean:
        count = _in_order(agree.to(acc) * (1.0 if weights is None else weights[:, None]))
        merged = merged / count.masked_fill(count == 0, 1)
    merged = merged * torch.tensor(scale, dtype=acc)
    return _with_flags((merged + x0 if add_base else merged).to(dtype), x, x0)


def _abs_task_vectors(sources: list[Tensor], base: Tensor, same_is_zero: bool) -> Tensor:
    """|sources_i − base| (T, N) in fp32, an entry equal to the base's 0 with `same_is_zero`."""
    x, x0 = torch.stack(sources).float(), base.float()
    tau = x - x0
    if same_is_zero:
        tau = tau.masked_fill(x == x0, 0.0)
    return tau.abs()


def trim_bracket(sources: list[Tensor], base: Tensor, lo: Tensor, hi: Tensor, same_is_zero: bool) -> tuple[Tensor, ...]:
    """`svdfuse.ops.trim_bracket`, op by op."""
    a = _abs_task_vectors(sources, base, same_is_zero) if sources else lo.new_empty((0, base.shape[0]))
    above = (a > hi[:, None]).sum(1)
    within = (a > lo[:, None]) & (a < hi[:, None])
    at_lo = (a == lo[:, None]) & (lo != hi)[:, None]
    at_hi = a == hi[:, None]
    units = -(-a.shape[1] // DARE_CHUNK)
    pad = units * DARE_CHUNK - a.shape[1]
    per_unit = [torch.nn.functional.pad(m.long(), (0, pad)).reshape(len(sources), units, DARE_CHUNK).sum(2) for m in (at_lo, at_hi)]
    bounds = torch.stack(per_unit, 2)
    return above, within.sum(1), a[within], within.nonzero()[:, 1].clone(), bounds  # storage of its own (offset 0), as the fake impl gives


def trim_sample(sources: list[Tensor], base: Tensor, first: int, stride: int, same_is_zero: bool) -> Tensor:
    """`svdfuse.ops.trim_sample`, op by op: |τ| at flat indices first, first + stride, ... -> (T, m) fp32."""
    if not sources:
        return base.new_empty((0, len(range(first, base.shape[0], stride))), dtype=torch.float32)
    return _abs_task_vectors([x[first::stride] for x in sources], base[first::stride], same_is_zero)


def trim_select(values: Tensor, counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`svdfuse.ops.trim_select`, source by source with `torch.kthvalue` (NaN above every number)."""
    T = counts.shape[0]
    threshold = torch.full((T,), math.nan)
    greater, equal, position = (torch.full((T,), -1, dtype=torch.int64) for _ in range(3))
    for i, v in enumerate(values.split(counts.tolist())):
        k = int(rank[i])
        if not 1 <= k <= v.numel():
            continue
        t = v.kthvalue(v.numel() - k + 1).values
        same = v.isnan() if t.isnan() else v == t
        threshold[i], greater[i], equal[i] = t, int(((v > t) | (v.isnan() & ~t.isnan())).sum()), int(same.sum())
        need = k - int(greater[i])
        if need < int(equal[i]):
            position[i] = int(same.nonzero()[need - 1, 0])
    return threshold, greater, equal, position


def core_matmul(
    x: Tensor, U: Tensor, C: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor
) -> Tensor:
    """`x Wbᵀ + ((x V) C[task]ᵀ) Uᵀ + bias` row by row; x: (..., n), U: (m, K), C: (num_tasks, K, K),
    V: (n, K), task: x.shape[:-1] -> (..., m). A row whose id is outside [0, num_tasks) gets NaN."""
    acc = compute_dtype(x.dtype)
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(acc)
    ids = task.reshape(-1)
    valid = (ids >= 0) & (ids < C.shape[0])
    cores = C.to(acc).index_select(0, ids.clamp(0, C.shape[0] - 1))  # (rows, K, K)
    t = torch.einsum("rk,rjk->rj", x2 @ V.to(acc), cores).masked_fill(~valid[:, None], float("nan"))
    y = t @ U.to(acc).T
    if base is not None:
        y = y + x2 @ base.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], U.shape[0])


def gram(x: Tensor, left: bool) -> Tensor:
    """`svdfuse.ops.gram`: `xᵀx` (left) or `x xᵀ` of x (..., a, b) in float64, by a float64 copy."""
    w = x.to(torch.float64)
    return w.mT @ w if left else w @ w.mT
