"""The dense SVD every path runs, made to survive any finite input.

`torch.linalg.svd` calls LAPACK's divide-and-conquer `gesdd` on the CPU (cuSOLVER on CUDA), which
can fail to converge on ill-conditioned inputs, clusters of repeated singular values or rank
deficiency ("linalg.svd: The algorithm failed to converge"). A merge must never die there after
minutes of work, so `svd` retries such a batch element in float64, then with LAPACK's QR-iteration
`gesvd` (slower, and converges on every finite matrix), and returns in the input's dtype. Inputs
that are not finite are still refused: that is the caller's error to name.

On the CPU every factorization here (`svd`, `qr`, `lu_factor`) runs on one thread: LAPACK splits
its work by thread count, so its rounding depends on it, where the GEMMs around it do not (MKL's,
at the thread counts and shapes measured). A merge is then the same bytes whatever torch's thread
count, as a torchrun rank (one thread) and a process of its own compute it. The cost, measured on
the 2-core CPU machine (2026-12-07): none at a merge's sizes; LAPACK's threads pay off only on
matrices far wider than a sketch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["svd", "qr", "lu_factor", "all_finite", "one_thread", "on_threads", "broadcast_shapes"]

T = TypeVar("T")


@contextmanager
def one_thread(A: Tensor) -> Iterator[None]:
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


def on_threads(work: Callable[[T], None], items: Sequence[T], workers: int) -> None:
    """`work(item)` for every item, on `workers` threads of one torch thread each (inline when one),
    the items handed out as threads come free: where another job slows one thread, the other
    takes its share. An item's error is raised here."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            work(item)
        return
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(min(workers, len(items)), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for _ in pool.map(work, items):  # re-raises an item's error here
                pass
    finally:
        torch.set_num_threads(threads)  # the threads' setting also became the default of new threads


def qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of A (..., m, n): Q (..., m, r), R (..., r, n), r = min(m, n), as `torch.linalg.qr`."""
    with one_thread(A):
        Q, R = torch.linalg.qr(A)
    return Q, R


def lu_factor(A: Tensor) -> tuple[Tensor, Tensor]:
    """LU with partial pivoting of A (..., m, n), as `torch.linalg.lu_factor_ex`: the packed LU
    (..., m, n) and LAPACK's 1-based row swaps (..., min(m, n)); a zero pivot is no error."""
    with one_thread(A):
        LU, pivots, _ = torch.linalg.lu_factor_ex(A)
    return LU, pivots


def svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD of A (..., m, n): U (..., m, r), S (..., r) descending, Vh (..., r, n), r = min(m, n),
    as `torch.linalg.svd(A, full_matrices=False)`, with fallbacks where it fails to converge."""
    with one_thread(A):
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


def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """The shape `shapes` broadcast to, as `torch.broadcast_shapes` gives it, without that
    function's first call importing `torch._refs` and sympy (0.27 s of every process that merges
    by a randomized SVD, 2-core machine, 2026-12-07). Raises RuntimeError where they do not broadcast."""
    ndim = max((len(shape) for shape in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for dim, size in enumerate(shape, ndim - len(shape)):
            if size != 1 and out[dim] not in (1, size):
                raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast: dimension {dim - ndim} is {out[dim]} in one and {size} in another")
            out[dim] = size if size != 1 else out[dim]
    return torch.Size(out)
