"""The CPU randomized SVD behind `svdfuse.ops.truncated_svd`.

On a CPU the floor is the GEMMs: 2 + 2q passes of an m×n×w product per matrix, at torch's GEMM
rate. So each matrix is converted to the accumulation dtype with its base subtracted once, into a
working buffer of a few matrices (never a copy of the whole batch), and every pass runs on that
buffer: one GEMM per product, where projecting the source and the base apart would cost two and
cancel digits besides (the base is often 20× the difference). Task matrices already in the
accumulation dtype with no base (the merge pipeline forms fp32 ones in place) need no copy: they
are worked on where they lie. The driver is `svdfuse._rsvd`'s.

The batch is cut into cache-sized chunks of matrices, each taken through all its passes, QRs and
SVD while it is in cache, and the chunks are shared among torch's threads, each chunk on one
thread: two independent streams of work keep both cores busy through the factorizations (which
run on one thread, `svdfuse.linalg`) where one parallel GEMM left a core idle, and a busy machine
is never made to wake a thread pool for every small op. Every product is taken with the sketch on
the left, `(Xᵀ D)ᵀ`: the sketches then come out column-major, as LAPACK takes them, and the
product streams D once in its own row order (1.3-1.6× the rate of `D X` on these shapes, 2-core
EPYC, 2026-12-07). A matrix too large for a chunk is taken alone on all of torch's threads.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from svdfuse import _rsvd, linalg

# A chunk: matrices taken together through the whole randomized SVD, at least one. Sized to stay
# in cache through the 2 + 2q passes (2-core EPYC, 2026-12-07, C1's three shape groups: 4 MB
# chunks on two threads take 0.53-0.62× the time of the whole batch a pass at a time, the same
# bytes; 16 MB chunks no faster, 1 MB chunks slower).
_CHUNK_BYTES = 4 << 20
# Elements converted per op: the copy and the subtraction of a block meet in cache (4× faster
# than two passes over a whole 5632×2048 matrix), and blocks stay large: every op is a parallel
# region, which costs a scheduler quantum when a shared machine is oversubscribed.
_BLOCK_BYTES = 4 << 20

# Householder QR, not `_rsvd.cholesky_qr2`: MKL's blocked QR is faster on this hardware, where fp64
# GEMMs run at half rate (2026-12-01, 2-core EPYC, `bench/bench_cpu.py --stages`: 4.4 against
# 9.2 ms for a 5632×118 sketch, the whole C2 SVD 1.33 against 1.54 s).
ORTHONORMALIZE = _rsvd.householder
# The power iterations' intermediate bases by LU: 0.38 against 1.0 ms for the Householder QR of
# seven 384×54 sketches on one thread (2-core EPYC, 2026-12-07), C1's largest group 0.84× the
# time; the last basis is ORTHONORMALIZE's. C1's merged matrices stay within the fp32 paper path's
# distance of a float64 AXIS: 1.1-3.6e-5 relative over three seeds, Householder throughout
# 1.1-3.0e-5, the fp32 paper path 1.1-2.1e-5 (ties at the top-k's edge, not the basis, set the worst).
NORMALIZE = _rsvd.lu_basis


def _workers(m: int, n: int, itemsize: int) -> int:
    """Threads that take chunks at once: torch's, where a matrix fits a chunk; else one, whose
    products use torch's threads."""
    return torch.get_num_threads() if m * n * itemsize <= _CHUNK_BYTES else 1


def buffer_matrices(count: int, m: int, n: int, itemsize: int) -> int:
    """How many of `count` m×n matrices the working buffers hold at once (at least one)."""
    per_chunk = max(1, _CHUNK_BYTES // (m * n * itemsize))
    return max(1, min(count, per_chunk * _workers(m, n, itemsize)))


def _fill(D: Tensor, A: Tensor, base: Tensor | None) -> None:
    """D = A - base in D's dtype, block of rows by block of rows. D, A: (k, m, n); base: (k, m, n),
    typically a broadcast view of one matrix, or None."""
    rows = max(1, _BLOCK_BYTES // (D.shape[0] * D.shape[-1] * D.element_size()))
    for r in range(0, D.shape[-2], rows):
        block = D[:, r : r + rows]
        block.copy_(A[:, r : r + rows])
        if base is not None:
            block.sub_(base[:, r : r + rows])


def _project(D: Tensor) -> _rsvd.Project:
    def project(X: Tensor, transpose: bool = False) -> Tensor:
        return (X.mT @ (D if transpose else D.mT)).mT  # column-major (..., m or n, w)

    return project


def randomized_svd(
    A: Tensor, rank: int, base: Tensor | None = None, *, oversample: int, power_iters: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD of `A - base` on the CPU; `svdfuse.reference.randomized_svd` is its oracle.

    A: (..., m, n) fp32/bf16/fp16/fp64; base broadcastable to A, or None. Returns U (..., m, rank),
    S (..., rank), V (..., n, rank) in fp32 (fp64 for fp64 A), the batch dims broadcast.
    """
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    m, n = A.shape[-2:]
    out_batch = linalg.broadcast_shapes(A.shape[:-2], () if base is None else base.shape[:-2])
    batch = out_batch or torch.Size([1])
    # Chunks stay within one row of the innermost batch dim and are filled by one op each: a base
    # broadcast over the sources of a group (or over everything) is a stride-0 view there, never copied.
    A = A.expand(*batch, m, n)
    base = None if base is None else base.expand(*batch, m, n)
    inner, count = batch[-1], batch.numel()
    rows = list(itertools.product(*map(range, batch[:-1])))
    omega = _rsvd.gaussian(n, min(rank + oversample, m, n), acc, A.device, seed)
    U = torch.empty(count, m, rank, dtype=acc)
    S = torch.empty(count, rank, dtype=acc)
    V = torch.empty(count, n, rank, dtype=acc)
    # Task matrices handed over in the accumulation dtype are worked on where they lie: no copy.
    direct = base is None and A.dtype == acc
    per_chunk = max(1, min(inner, _CHUNK_BYTES // (m * n * U.element_size())))
    chunks = [(row, lo, min(lo + per_chunk, inner)) for row in range(len(rows)) for lo in range(0, inner, per_chunk)]

    def work(chunk: tuple[int, int, int]) -> None:
        row, lo, hi = chunk
        if direct:
            D = A[rows[row]][lo:hi]
        else:
            D = torch.empty(hi - lo, m, n, dtype=acc)
            _fill(D, A[rows[row]][lo:hi], None if base is None else base[rows[row]][lo:hi])
        out = _rsvd.randomized_svd(_project(D), omega, rank, power_iters, orthonormalize=ORTHONORMALIZE, normalize=NORMALIZE)
        first = row * inner + lo
        for full, part in zip((U, S, V), out):
            full[first : first + hi - lo] = part

    linalg.on_threads(work, chunks, _workers(m, n, U.element_size()))
    return U.reshape(*out_batch, m, rank), S.reshape(*out_batch, rank), V.reshape(*out_batch, n, rank)


def core_matmul(
    x: Tensor, U: Tensor, C: Tensor, V: Tensor, base: Tensor | None, bias: Tensor | None, task: Tensor
) -> Tensor:
    """The CPU `core_matmul`: `t = x V` for all rows in one GEMM, each row's core applied by one
    batched (K, K) × (K, 1) product over rows, the cores gathered a bounded block at a time,
    then `t Uᵀ` (and the base) in one GEMM: a few large ops whatever the number of tasks in the
    batch, where a GEMM per task present costs a parallel region each (48 adapters in a batch of 64
    requests: 144 small ops). `svdfuse.reference.core_matmul` is its oracle. Ids in range."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(acc)
    t = x2 @ V.to(acc)  # (rows, K)
    ids = task.reshape(-1)
    cores = C.to(acc)
    K = cores.shape[-1]
    mixed = torch.empty_like(t)
    step = max(1, _BLOCK_BYTES // max(1, K * K * t.element_size()))  # gathered cores per block
    for first in range(0, t.shape[0], step):
        rows = slice(first, first + step)
        torch.bmm(cores.index_select(0, ids[rows]), t[rows].unsqueeze(-1), out=mixed[rows].unsqueeze(-1))  # C t per row
    y = mixed @ U.to(acc).T if base is None else torch.addmm(mixed @ U.to(acc).T, x2, base.to(acc).T)
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], U.shape[0])
