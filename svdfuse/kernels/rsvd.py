"""The batched randomized truncated SVD on CUDA: `svdfuse._rsvd`'s driver with a Triton projection.

- `rsvd_project`: `(A - base) X` or `(A - base)ᵀ X` for every matrix of a batch in one Triton
  launch. The difference is taken tile by tile in fp32 registers, so no `A - base` is ever stored,
  and sources are read in their storage dtype (fp32, bf16, fp16).
- orthonormalization by `_rsvd.cholesky_qr2` (fp64 Grams, certified, Householder where it
  cannot): two small GEMM passes instead of a batched Householder QR, which is slow on a GPU.
- `randomized_svd`: the driver, with the library's or the Jacobi kernel's projected SVD.

`reference.rsvd_project` and `reference.randomized_svd` are the oracles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from svdfuse import _rsvd, linalg
from svdfuse.kernels.small_svd import small_svd

# Untuned starting points (no GPU measurement yet; `bench_rsvd.py --stages` sweeps them): a tile as
# wide as the sketch, so that every tile of A is read once per projection when the sketch is at
# most 128 columns wide. At these, every specialisation compiles for sm_90a without spills
# (tests/test_triton_compile.py).
_BLOCK_M = 64
_BLOCK_K = 32
_NUM_WARPS = 4  # per 128 columns of the tile
_NUM_STAGES = 3

# How a sketch wider than 128 columns (W2: 128 + 16 = 144) is tiled: "split" into tiles of at most
# 128 columns, each reading its rows of A again (twice at W2); "whole", one tile as wide as the
# sketch rounded up to a power of two (256 at W2: 112 padded columns), reading A once, with twice
# the warps. A switch, not a guess: `bench_rsvd.py --stages` times both and records the winner.
SKETCH_TILINGS = {"split": 128, "whole": 256}
SKETCH_TILING = "split"


@triton.jit
def _round_tf32(x):
    # Round-to-nearest (ties away) onto tf32's 10 mantissa bits, as `reference._round_tf32` does:
    # fed fp32 registers, the tensor cores would drop those bits (truncate), doubling the error.
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def _matrix_offset(offsets, batch, ptr, ALIGNED: tl.constexpr):
    # A matrix's start read from its offset table. Triton cannot see that a loaded offset keeps the
    # base pointer 16-byte aligned, so without the hint every load of the tile is scalar (4-byte
    # async copies for fp32, 2-byte loads for bf16) and nothing vectorises; the launcher sets
    # ALIGNED only after checking that every offset is a multiple of 16 bytes.
    offset = tl.load(offsets + batch)
    if ALIGNED:
        offset = tl.multiple_of(offset, 128 // ptr.dtype.element_ty.primitive_bitwidth)
    return offset


@triton.jit
def _rsvd_project_kernel(
    A, a_offsets, B, b_offsets, X, x_offsets, C,
    M, N, W,
    stride_am, stride_an, stride_bm, stride_bn, stride_xn, stride_xw, stride_cm,
    HAS_BASE: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr, X_ROWS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # C[b] = (A[b] - B[b]) @ X[b]; A[b], B[b]: (M, N) by strides, X[b]: (N, W), C[b]: (M, W) fp32.
    # Batch entries are located through offset tables, so broadcast operands are never copied.
    batch = tl.program_id(0)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tile_m, tile_w = tl.program_id(1) // tiles_w, tl.program_id(1) % tiles_w
    # Index vectors in int64: with int32 strides, `row * stride` wraps for a matrix (or a view with
    # a large stride) that spans 2³¹ elements; every offset below inherits the width from them.
    rm = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rw = tile_w.to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptr = A + _matrix_offset(a_offsets, batch, A, ALIGNED)
    x_ptr = X + _matrix_offset(x_offsets, batch, X, ALIGNED)
    b_ptr = B + _matrix_offset(b_offsets, batch, B, ALIGNED) if HAS_BASE else B
    if X_ROWS_ALIGNED:
        # The sketch's width and row stride (92 = 76 + 16 at W1) are multiples of 16 bytes but not
        # of 16 elements, the only integers Triton specialises: without this, X's loads (its
        # column mask) and C's stores stay scalar. The launcher checks both; rounding down to a
        # multiple of 4 changes nothing then and lets the compiler prove it (`tl.multiple_of`
        # on a kernel argument is dropped).
        W = W // 4 * 4
        stride_xn = stride_xn // 4 * 4
        stride_cm = stride_cm // 4 * 4
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        kk = k0 + rk
        in_a = (rm[:, None] < M) & (kk[None, :] < N)
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_an, mask=in_a, other=0.0).to(tl.float32)
        if HAS_BASE:
            base = tl.load(b_ptr + rm[:, None] * stride_bm + kk[None, :] * stride_bn, mask=in_a, other=0.0)
            a -= base.to(tl.float32)
        in_x = (kk[:, None] < N) & (rw[None, :] < W)
        x = tl.load(x_ptr + kk[:, None] * stride_xn + rw[None, :] * stride_xw, mask=in_x, other=0.0)
        if PRECISION == "tf32":
            a, x = _round_tf32(a), _round_tf32(x)
        acc = tl.dot(a, x, acc, input_precision=PRECISION)
    c_ptr = C + batch.to(tl.int64) * M * W
    tl.store(c_ptr + rm[:, None] * stride_cm + rw[None, :], acc, mask=(rm[:, None] < M) & (rw[None, :] < W))


def _batch_offsets(t: Tensor, batch: torch.Size) -> tuple[Tensor, bool]:
    """Element offset of every matrix of `t` (..., r, c) broadcast to `batch`, flattened:
    (prod(batch),) int64; and whether every offset is a multiple of 16 bytes (the kernel's
    alignment hint). An offset is a sum of batch strides times indices, so it suffices that every
    batch dim of more than one matrix strides by a multiple of 16 bytes."""
    strides = t.expand(*batch, *t.shape[-2:]).stride()[:-2]
    per_16_bytes = max(1, 16 // t.element_size())
    aligned = all(stride % per_16_bytes == 0 for size, stride in zip(batch, strides) if size > 1)
    return _offsets(tuple(batch), strides, t.device), aligned


@functools.lru_cache(maxsize=64)
def _offsets(batch: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> Tensor:
    # Cached: a randomized SVD asks for the same few tables at every projection, and building one
    # costs a host-to-device copy.
    offsets = torch.zeros(batch, dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(batch, strides)):
        shape = [1] * len(batch)
        shape[dim] = size
        offsets += (torch.arange(size, dtype=torch.int64) * stride).view(shape)
    return offsets.reshape(-1).to(device)


def rsvd_project(
    A: Tensor, X: Tensor, base: Tensor | None = None, *, transpose: bool = False, precision: str = "ieee"
) -> Tensor:
    """`(A - base) X`, or `(A - base)ᵀ X` with `transpose`, in one launch; `reference.rsvd_project`
    is its oracle.

    A: (..., m, n) fp32/bf16/fp16; base: broadcastable to A, any float dtype, or None;
    X: (..., n, w) fp32, or (..., m, w) with `transpose`, broadcast over A's batch dims.
    precision: the GEMM's input precision for fp32, "ieee", "tf32x3" or "tf32".
    Returns (..., m, w), or (..., n, w) with `transpose`, fp32.
    """
    At = A.mT if transpose else A
    Bt = None if base is None else (base.mT if transpose else base)
    M, N = At.shape[-2:]
    W = X.shape[-1]
    if X.shape[-2] != N:
        raise ValueError(f"rsvd_project: X must be (..., {N}, w), found {tuple(X.shape)}")
    X = X.to(torch.float32)
    batch = linalg.broadcast_shapes(A.shape[:-2], X.shape[:-2], () if base is None else base.shape[:-2])
    C = torch.empty(*batch, M, W, dtype=torch.float32, device=A.device)
    if C.numel() == 0:
        return C.zero_()
    block_w = max(16, min(SKETCH_TILINGS[SKETCH_TILING], triton.next_power_of_2(W)))
    grid = (batch.numel(), triton.cdiv(M, _BLOCK_M) * triton.cdiv(W, block_w))
    Bt_ = At if Bt is None else Bt  # a valid pointer when there is no base; never read
    (a_offsets, a_aligned), (b_offsets, b_aligned), (x_offsets, x_aligned) = (
        _batch_offsets(t, batch) for t in (At, Bt_, X)
    )
    _rsvd_project_kernel[grid](
        At, a_offsets, Bt_, b_offsets, X, x_offsets, C,
        M, N, W,
        At.stride(-2), At.stride(-1), Bt_.stride(-2), Bt_.stride(-1), X.stride(-2), X.stride(-1), W,
        HAS_BASE=Bt is not None, PRECISION=precision, ALIGNED=a_aligned and b_aligned and x_aligned,
        X_ROWS_ALIGNED=W % 4 == 0 and X.stride(-2) % 4 == 0 and X.stride(-1) == 1,
        BLOCK_M=_BLOCK_M, BLOCK_W=block_w, BLOCK_K=_BLOCK_K, num_warps=_NUM_WARPS * max(1, block_w // 128),
        num_stages=_NUM_STAGES,
    )  # fmt: skip
    return C


def tall_svd_jacobi(B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`_rsvd.tall_svd` through a small core: B = Q_b (Q_bᵀ B), then the Jacobi kernel on the
    w×w core. B: (..., n, w) fp32 -> left (..., n, w), S (..., w), right (..., w, w)."""
    Q_b = _rsvd.cholesky_qr2(B)
    U_c, S, V_c = small_svd(Q_b.mT @ B)
    return Q_b @ U_c, S, V_c


def _torch_tall_svd(driver: str | None) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """`_rsvd.tall_svd` with one of cuSOLVER's drivers (`torch.linalg.svd(driver=...)`)."""

    def tall_svd(B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        left, S, right_h = torch.linalg.svd(B, full_matrices=False, driver=driver)
        return left, S, right_h.mT

    return tall_svd


def tall_svd_loop(B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`_rsvd.tall_svd` one matrix after another: B (..., n, w) -> (..., n, w), (..., w), (..., w, w)."""
    flat = B.reshape(-1, *B.shape[-2:])
    parts = [_rsvd.tall_svd(b) for b in flat]
    return tuple(torch.stack(t).reshape(*B.shape[:-2], *t[0].shape) for t in zip(*parts))  # type: ignore[return-value]


# The SVD of the projected matrix (100-400 tall n×w matrices per layer group): torch's batched call
# (cuSOLVER's default driver, which runs matrices of this size one after another), an explicit
# loop, the batched gesvdj / gesvda drivers, or the batched Jacobi kernel of `small_svd` on the w×w
# core. A switch, not a guess: `bench_rsvd.py --stages` times each with its accuracy and records
# the fastest that meets the accuracy target; until a GPU run has, torch's default.
PROJECTED_SVDS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]] = {
    "library": _rsvd.tall_svd,
    "loop": tall_svd_loop,
    "gesvdj": _torch_tall_svd("gesvdj"),
    "gesvda": _torch_tall_svd("gesvda"),
    "jacobi": tall_svd_jacobi,
}
PROJECTED_SVD = "library"


def randomized_svd(
    A: Tensor,
    rank: int,
    base: Tensor | None = None,
    *,
    oversample: int,
    power_iters: int,
    seed: int,
    precision: str = "ieee",
    projected_svd: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD of `A - base` on CUDA; `reference.randomized_svd` is its oracle.

    A: (..., m, n) fp32/bf16/fp16; base broadcastable to A, or None. `projected_svd` defaults to
    `PROJECTED_SVDS[PROJECTED_SVD]`. Returns U (..., m, rank), S (..., rank), V (..., n, rank) fp32.
    """
    m, n = A.shape[-2:]
    omega = _rsvd.gaussian(n, min(rank + oversample, m, n), torch.float32, A.device, seed)

    def project(X: Tensor, transpose: bool = False) -> Tensor:
        return rsvd_project(A, X, base, transpose=transpose, precision=precision)

    return _rsvd.randomized_svd(project, omega, rank, power_iters, projected_svd=projected_svd or PROJECTED_SVDS[PROJECTED_SVD])
