"""The single front door to svdfuse's compute.

Users and the merge pipeline call these functions; each checks its inputs, then runs the fastest
backend available for the tensors' device: the Triton kernels (`svdfuse.kernels`) on CUDA, the
compiled extension (`svdfuse._C`) where it is built, the CPU randomized SVD (`svdfuse.cpu`), and
otherwise the pure-torch reference in `svdfuse.reference` (the test oracle of all of them).
A compiled op checks its inputs itself, raising the exceptions documented here.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from svdfuse import _native, cpu, kernels, reference

__all__ = [
    "SVDMethod",
    "Precision",
    "SVDOptions",
    "DEFAULT_OVERSAMPLE",
    "DEFAULT_POWER_ITERS",
    "DEFAULT_PRECISION",
    "truncated_svd",
    "topk_components",
    "reorthogonalize",
    "lowrank_matmul",
    "MergedBlock",
    "merge_block",
    "ties_block",
    "trim_bracket",
    "trim_sample",
    "trim_select",
    "core_matmul",
    "gram",
]

# Chosen by measurement (bench/bench_rsvd_accuracy.py, results in bench/results/): on 768x768
# task-matrix-like spectra at rank 76, oversample 16 with 3 power iterations keeps the
# reconstruction error within 1.01x of Eckart-Young on every spectrum measured, and the global
# top-76 over 20 sources (what AXIS keeps) within 2e-6 of exact with the same picks. The smallest
# of one matrix's 76 singular values can still be off by up to 5e-2 relative where a noise floor
# flattens the spectrum; a top-k over many sources does not reach them. Two iterations also meet
# both targets, with a thinner margin (1.017x); the H100 timings decide whether that is worth it.
DEFAULT_OVERSAMPLE = 16
DEFAULT_POWER_ITERS = 3
# Input precision of the projections' GEMMs (fp32 data): "ieee" until the GPU measurement of
# "tf32x3" and "tf32" (bench/bench_rsvd_accuracy.py emulates them on the CPU) says otherwise.
DEFAULT_PRECISION = "ieee"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Precision(str, enum.Enum):
    """Input precision of the randomized SVD's products: fp32, or tensor-core inputs (tf32 ×3, tf32)."""

    IEEE = "ieee"
    TF32X3 = "tf32x3"
    TF32 = "tf32"


class SVDMethod(str, enum.Enum):
    """How `truncated_svd` decomposes: randomized sketch, full SVD, or whichever is cheaper."""

    AUTO = "auto"
    EXACT = "exact"
    RANDOMIZED = "randomized"


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))  # "(3, 7)", "(21,)", "()"


def _triton_serves(t: Tensor) -> bool:
    """Whether the Triton kernels take an op on `t`: CUDA, a dtype they read, Triton installed."""
    return t.is_cuda and t.dtype in _TRITON_DTYPES and kernels.available()


def _resolve_method(method: SVDMethod | str, rank: int, oversample: int, m: int, n: int) -> SVDMethod:
    method = SVDMethod(method)
    if method is SVDMethod.AUTO:
        # A sketch as wide as half the matrix does as much work as a full SVD and is less exact.
        return SVDMethod.EXACT if 2 * (rank + oversample) >= min(m, n) else SVDMethod.RANDOMIZED
    return method


def truncated_svd(
    A: Tensor,
    rank: int,
    base: Tensor | None = None,
    *,
    method: SVDMethod | str = SVDMethod.AUTO,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    precision: Precision | str = DEFAULT_PRECISION,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-`rank` SVD of `A - base` for a batch of matrices, without forming `A - base`.

    Args:
        A: (..., m, n) source matrices, fp32/bf16/fp16/fp64; accumulation is fp32 (fp64 for fp64).
        rank: number of leading components to return, 1 <= rank <= min(m, n).
        base: (m, n) or any shape broadcastable to A; subtracted from every matrix of A.
        method: "randomized" (Halko–Martinsson–Tropp), "exact" (`torch.linalg.svd`) or "auto".
        oversample: extra sketch columns of the randomized method.
        power_iters: subspace iterations of the randomized method.
        seed: seed of the Gaussian test matrix; the same seed gives the same result.
        precision: input precision of the randomized method's products with `A - base`: "ieee"
            (fp32), "tf32x3" or "tf32" (tensor-core inputs; emulated exactly on the CPU).

    The randomized method runs the Triton kernels of `svdfuse.kernels.rsvd` on CUDA (fp32, bf16
    and fp16 storage) and `svdfuse.cpu` on the CPU (every dtype: one matrix at a time converted
    to fp32, or fp64, with the base subtracted, then torch's GEMMs); "tf32" and "tf32x3" on the
    CPU, an emulation of the GPU's inputs, and other devices run the pure-torch reference.

    Returns:
        U (..., m, rank), S (..., rank) descending, V (..., n, rank), in the accumulation dtype,
        with `A - base ≈ U diag(S) Vᵀ`.

    Example::

        U, S, V = svdfuse.ops.truncated_svd(finetuned, 76, base=pretrained)
    """
    if A.dim() < 2:
        raise ValueError(f"truncated_svd: A must be (..., m, n), found shape {_shape(A)}")
    m, n = A.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"truncated_svd: rank must be in [1, {min(m, n)}] for {m}x{n} matrices, found {rank}")
    if not A.is_floating_point():
        raise TypeError(f"truncated_svd: A must be floating point, found {A.dtype}")
    if base is not None:
        if base.shape[-2:] != A.shape[-2:]:
            raise ValueError(f"truncated_svd: base has shape {_shape(base)}, A has {_shape(A)}; the last two dims must match")
        if base.device != A.device:
            raise ValueError(f"truncated_svd: base is on {base.device}, A on {A.device}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"truncated_svd: oversample and power_iters must be >= 0, found {oversample}, {power_iters}")
    if precision not in reference.PRECISIONS:
        raise ValueError(f"truncated_svd: precision must be one of {reference.PRECISIONS}, found {precision!r}")
    precision = Precision(precision).value
    if _resolve_method(method, rank, oversample, m, n) is SVDMethod.EXACT:
        return reference.exact_svd(A, rank, base)
    options = dict(oversample=oversample, power_iters=power_iters, seed=seed, precision=precision)
    if _triton_serves(A):
        from svdfuse.kernels import rsvd

        return rsvd.randomized_svd(A, rank, base, **options)
    if A.device.type == "cpu" and precision == "ieee":
        return cpu.randomized_svd(A, rank, base, oversample=oversample, power_iters=power_iters, seed=seed)
    return reference.randomized_svd(A, rank, base, **options)


@dataclass(frozen=True)
class SVDOptions:
    """How task matrices are decomposed: `truncated_svd`'s method, oversampling, power
    iterations, seed and input precision, carried together through a merge."""

    method: SVDMethod | str = SVDMethod.AUTO
    oversample: int = DEFAULT_OVERSAMPLE
    power_iters: int = DEFAULT_POWER_ITERS
    seed: int = 0
    precision: Precision | str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        for name, kind in (("method", SVDMethod), ("precision", Precision)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in {m.value for m in kind}:
                raise ValueError(f"SVDOptions: {name} must be one of {[m.value for m in kind]}, found {value!r}")
            object.__setattr__(self, name, kind(value))
        for name in ("oversample", "power_iters", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (value < 0 and name != "seed"):
                raise ValueError(f"SVDOptions: {name} must be an int{' >= 0' if name != 'seed' else ''}, found {value!r}")
            object.__setattr__(self, name, int(value))

    def truncated_svd(self, A: Tensor, rank: int, base: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`svdfuse.ops.truncated_svd(A, rank, base)` with these options."""
        return truncated_svd(
            A,
            rank,
            base,
            method=self.method,
            oversample=self.oversample,
            power_iters=self.power_iters,
            seed=self.seed,
            precision=self.precision,
        )


def topk_components(S: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-k singular components across sources, per layer.

    Args:
        S: (..., sources, r) singular values of every source's components; leading dims are layers.
        k: how many to keep, 1 <= k <= sources * r.

    Returns:
        values (..., k) descending, source index (..., k) and component index (..., k), int64.
        Ties go to the lower source index, then the lower component index. The order is that of
        `torch.sort` on the CPU, on every device: NaN, of either sign and any payload, ranks above
        +inf and NaNs tie; -0.0 ties with +0.0. On CUDA one Triton launch (`svdfuse.kernels.topk`)
        serves every layer for k <= 2048; the selection is the reference's, bit for bit.

    Raises:
        ValueError: S holds NaN (the message counts them and names the first). Not checked while
            a CUDA graph is being captured, where reading S back is not allowed: there a NaN ranks
            first and shows among the values.

    Example::

        values, source, component = svdfuse.ops.topk_components(S, 76)
    """
    if S.dim() < 2:
        raise ValueError(f"topk_components: S must be (..., sources, r), found shape {_shape(S)}")
    total = S.shape[-2] * S.shape[-1]
    if not 1 <= k <= total:
        raise ValueError(f"topk_components: k must be in [1, {total}] for S of shape {_shape(S)}, found {k}")
    # The check reads S back to the host, a sync that CUDA-graph capture forbids; a captured call
    # relies on the NaN order instead (NaN first, so it reaches the values).
    if not (S.is_cuda and torch.cuda.is_current_stream_capturing()):
        nan = torch.isnan(S)
        if nan.any():
            first = tuple(nan.nonzero()[0].tolist())
            raise ValueError(
                f"topk_components: S must hold no NaN, found {int(nan.sum())} in S of shape {_shape(S)}, "
                f"the first at index {first}"
            )
    if _triton_serves(S):
        from svdfuse.kernels import topk

        if k <= topk.MAX_K:
            values, source, component = topk.topk_components(S.float(), k)  # fp16/bf16 -> fp32 is exact
            return values.to(S.dtype), source, component
    return reference.topk_components(S, k)


def reorthogonalize(U_s: Tensor, S_s: Tensor, V_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a merged low-rank matrix `U_s diag(S_s) V_sᵀ` whose factors are not orthogonal.

    Uses QR of the stacked factors and an SVD of the K×K core; never an SVD of an m×n matrix.

    Args:
        U_s: (..., m, K), S_s: (..., K), V_s: (..., n, K) with K <= min(m, n).

    Returns:
        U_t (..., m, K) and V_t (..., n, K) with orthonormal columns, S_t (..., K) descending.

    Example::

        U_t, S_t, V_t = svdfuse.ops.reorthogonalize(U_s, S_s, V_s)
    """
    K = S_s.shape[-1]
    if U_s.shape[-1] != K or V_s.shape[-1] != K or K > min(U_s.shape[-2], V_s.shape[-2]):
        raise ValueError(
            f"reorthogonalize: expected U_s (..., m, K), S_s (..., K), V_s (..., n, K) with K <= min(m, n), "
            f"found {_shape(U_s)}, {_shape(S_s)}, {_shape(V_s)}"
        )
    return reference.reorthogonalize(U_s, S_s, V_s)


def lowrank_matmul(
    x: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    base: Tensor | None = None,
    bias: Tensor | None = None,
    task: Tensor | None = None,
) -> Tensor:
    """`y = x Wbᵀ + ((x V) ⊙ σ) Uᵀ + bias` without forming the dense m×n matrix.

    σ is one vector for every row of x, or, to serve many target tasks that share U and V in one
    batch, a row of S picked per row of x by `task`.

    Args:
        x: (..., n) inputs; fp32, bf16, fp16 or fp64, shared by every float tensor.
        U: (m, K) left factors.
        S: (K,) singular values for every row, or (num_tasks, K), one row per task.
        V: (n, K) right factors.
        base: optional (m, n) dense base weight Wb.
        bias: optional (m,).
        task: int64 of shape x.shape[:-1] with ids in [0, num_tasks): the row of S for each row of
            x. Required with a 2-D S, must be None with a 1-D S. Ids are range-checked on the CPU
            (ValueError); on CUDA a check would need a device-to-host sync, so an out-of-range id
            is never read and gives its output row NaN instead.

    Returns:
        (..., m) in x's dtype; accumulation is fp32 (fp64 for fp64). Differentiable in every float
        input (x, U, S, V, base, bias); with `task`, S's gradient sums into the rows the ids pick.

    Raises:
        ValueError: a shape, a device or (on the CPU) a task id does not fit; the message says which
            tensor, what was expected and what was found.
        TypeError: a tensor's dtype differs from x's, x is not fp32/bf16/fp16/fp64, or task is not int64.

    Example::

        sigma = torch.stack([S_cars, S_dtd, S_eurosat])           # (3, K): one σ per target task
        y = svdfuse.ops.lowrank_matmul(x, U_t, sigma, V_t, base=W0, bias=b, task=request_task)
    """
    if _native.LOAD_ERROR is not None and not torch.compiler.is_compiling():
        _native.warn_if_missing()  # once per process
    # One op, `torch.ops.svdfuse.lowrank_matmul` (svdfuse/_native.py): the dispatcher picks its kernel by
    # device, compiled (CPU, CUDA) or the reference, and that kernel checks the call, once.
    return torch.ops.svdfuse.lowrank_matmul.default(x, U, S, V, base, bias, task)


class MergedBlock(NamedTuple):
    """What `merge_block` returns: the merged values and the block's checks."""

    value: Tensor  # (N,) in the dtype asked for
    differs: Tensor  # (T,) bool: source i has an entry != the base's (NaN differs)
    zero: Tensor  # (T + 1,) bool: source i (the base, last) is all zeros in the block
    first_bad: int  # flat index of the first non-finite entry of `value`, or -1


def merge_block(
    sources: Tensor | Sequence[Tensor],
    base: Tensor,
    weights: Tensor | None = None,
    *,
    scale: float = 1.0,
    divisor: float = 1.0,
    seeds: Tensor | None = None,
    start: int = 0,
    drop_rate: float = 0.0,
    same_is_zero: bool = False,
    add_base: bool = True,
    dtype: torch.dtype | None = None,
) -> MergedBlock:
    """A linear element-wise merge of a block, and its checks, in one read of the block:
    `value = base + (Σ_i w_i · keep_i · (sources_i − base)) / divisor · scale` (Average,
    Task Arithmetic, DARE), each step rounded in the accumulation dtype, sources added in order.

    Args:
        sources: (T, N), or T tensors (N,): the block of every source, each contiguous (views of
            the sources' own tensors: nothing is copied); fp32/bf16/fp16/fp64.
        base: (N,) the base's block, in the sources' dtype.
        weights: (T,) per-source weights in the accumulation dtype (fp32, fp64 for fp64); None: ones.
        divisor, scale: applied to the sum in that order (`divisor`: T or Σw for a mean).
        seeds: DARE's (T, chunks) int64 CPU seeds, one per `reference.DARE_CHUNK` entries of the
            tensor's flat index from chunk `start // DARE_CHUNK` on; entry j of source i survives
            iff the draw `torch.rand` makes for it from its chunk's seed is >= `drop_rate`.
            None: every entry survives.
        start: the flat index in its tensor of the block's first entry (where DARE's draws start).
        same_is_zero: an entry equal to the base's is no change even where both are infinite.
        add_base: add the base back (else `value` is the merged task vector).
        dtype: of `value`; default the accumulation dtype.

    Returns:
        `MergedBlock`. Dropped or weighted, a NaN stays NaN: `first_bad` sees it.

    On CUDA without DARE's masks one Triton launch serves it (`svdfuse.kernels.elementwise`); on
    the CPU the compiled kernel (csrc/elementwise.cpp), bit for bit `reference.merge_block`'s.

    Example::

        merged = svdfuse.ops.merge_block(W.flatten(1), W0.flatten(), scale=0.3)   # Task Arithmetic
    """
    sources = list(sources)
    acc = reference.compute_dtype(base.dtype) if base.is_floating_point() else torch.float32
    if weights is None:
        weights = torch.ones(len(sources), dtype=acc, device=base.device)
    for name, value in (("scale", scale), ("divisor", divisor), ("drop_rate", drop_rate)):
        if not math.isfinite(value):
            raise ValueError(f"merge_block: {name} must be finite, found {value}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"merge_block: drop_rate must be in [0, 1), found {drop_rate}")
    # draws are multiples of 2^-24 compared with float32(drop_rate): the threshold as a count
    drop = math.ceil(torch.tensor(drop_rate, dtype=torch.float32).item() * 2**24)
    args = (sources, base, weights, scale, divisor, seeds, start, drop, same_is_zero, add_base, dtype or acc)
    # Checked here for every backend: the compiled kernel guards only its pointers (csrc/elementwise.cpp).
    _native.check_merge_block(*args[:3], seeds, start, drop, dtype or acc)
    if seeds is None and _triton_serves(base):
        from svdfuse.kernels import elementwise

        return MergedBlock(*elementwise.merge_block(sources, base, weights, scale, divisor, same_is_zero, add_base, dtype or acc))
    return _fused_block("merge_block", acc, args)


def _fused_block(name: str, acc: torch.dtype, args: tuple) -> MergedBlock:
    """A fused block op by its compiled kernel, or by the reference where that accumulates in fp64
    (the compiled kernels accumulate in fp32)."""
    if acc == torch.float64:
        value, differs, zero, bad = getattr(reference, name)(*args)
    else:
        if _native.LOAD_ERROR is not None and not torch.compiler.is_compiling():
            _native.warn_if_missing()
        value, differs, zero, bad = getattr(torch.ops.svdfuse, name).default(*args)
    return MergedBlock(value, differs, zero, int(bad))


def ties_block(
    sources: Tensor | Sequence[Tensor],
    base: Tensor,
    threshold: Tensor,
    cutoff: Tensor,
    *,
    start: int = 0,
    keep_none: bool = False,
    weights: Tensor | None = None,
    scale: float = 1.0,
    mean: bool = True,
    positive: bool = False,
    same_is_zero: bool = False,
    add_base: bool = True,
    dtype: torch.dtype | None = None,
) -> MergedBlock:
    """TIES on a block, and its checks, in one read of the block: each source's task vector
    `τ_i = sources_i − base` keeps the entries with |τ| > threshold[i], or |τ| == threshold[i] and
    flat index (from `start`) < cutoff[i] (none with `keep_none`); times weights[i]; the sign is
    elected by their sum (added in source order); the kept values that share it are summed,
    divided by their count (weighted: by their weights' sum) when `mean`, times `scale`.

    Args:
        sources: (T, N), or T contiguous tensors (N,); fp32/bf16/fp16/fp64.
        base: (N,) in the sources' dtype.
        threshold: (T,) in the accumulation dtype (fp32, fp64 for fp64); cutoff: (T,) int64.
        start: the flat index of the block's first entry in the trim's scope.
        positive: where the kept values sum to 0 (or NaN, as torch.sign has it), elect +1.
        same_is_zero, add_base, dtype: as `merge_block`.

    Returns:
        `MergedBlock`; a NaN anywhere in an entry's sources makes it NaN, which `first_bad` sees.

    On CUDA one Triton launch serves it (`svdfuse.kernels.elementwise`); on the CPU the compiled
    kernel (csrc/elementwise.cpp), bit for bit `reference.ties_block`'s.

    Example::

        merged = svdfuse.ops.ties_block(W.flatten(1), W0.flatten(), threshold, cutoff)
    """
    sources = list(sources)
    acc = reference.compute_dtype(base.dtype) if base.is_floating_point() else torch.float32
    if not math.isfinite(scale):
        raise ValueError(f"ties_block: scale must be finite, found {scale}")
    args = (sources, base, weights, threshold, cutoff, start, keep_none, scale, mean, positive, same_is_zero, add_base, dtype or acc)
    _native.check_ties_block(sources, base, weights, threshold, cutoff, start, dtype or acc)
    if _triton_serves(base):
        from svdfuse.kernels import elementwise

        return MergedBlock(*elementwise.ties_block(*args))
    return _fused_block("ties_block", acc, args)


def trim_bracket(
    sources: Tensor | Sequence[Tensor], base: Tensor, lo: Tensor, hi: Tensor, *, same_is_zero: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per source, how many |τ| = |sources_i − base| lie above hi[i], the |τ| strictly between lo[i]
    and hi[i], and how many equal each bound: the bracket pass of the exact trim
    (`svdfuse.methods.trim`), every source in one pass, the task vectors formed as it reads (in
    fp32, as `merge_block` forms them) and never stored. Entries equal to a bound are counted per
    `reference.DARE_CHUNK` entries, not gathered: low-precision task vectors hold few distinct
    values, and a bound may be equalled millions of times.

    Args:
        sources: (T, N), or T contiguous tensors (N,); fp32/bf16/fp16.
        base: (N,) in the sources' dtype (zeros where `sources` are task vectors already).
        lo, hi: (T,) fp32 bounds of each source's bracket, lo <= hi.
        same_is_zero: an entry equal to the base's is no change even where both are infinite.

    Returns:
        above (T,) int64, counts (T,) int64, values (counts.sum(),) fp32 and their flat indices
        (int64): source 0's in flat order, then source 1's, ...; bounds (T, units, 2) int64: per
        unit of `DARE_CHUNK` entries, how many equal lo and hi (all counted as hi where lo == hi).

    Example::

        above, counts, values, index, bounds = svdfuse.ops.trim_bracket(W.flatten(1), W0.flatten(), lo, hi)
    """
    sources = list(sources)
    _native.check_trim_bracket(sources, base, lo, hi)
    if base.device.type != "cpu" or _native.LOAD_ERROR is not None:
        return reference.trim_bracket(sources, base, lo, hi, same_is_zero)
    return torch.ops.svdfuse.trim_bracket.default(sources, base, lo, hi, same_is_zero)


def trim_sample(sources: Tensor | Sequence[Tensor], base: Tensor, first: int, stride: int, *, same_is_zero: bool = False) -> Tensor:
    """|τ| = |sources_i − base| at flat indices first, first + stride, ... of a block, every source
    in one call (the task vectors formed in fp32 as `trim_bracket` forms them): the sample that
    brackets the exact trim's thresholds (`svdfuse.methods.trim.strided_sample`).

    Args:
        sources: (T, N), or T contiguous tensors (N,); fp32/bf16/fp16.
        base: (N,) in the sources' dtype (zeros where `sources` are task vectors already).
        first: the first flat index sampled, >= 0; stride: >= 1.
        same_is_zero: an entry equal to the base's is no change even where both are infinite.

    Returns:
        (T, m) fp32, m = len(range(first, N, stride)).

    Example::

        sample = svdfuse.ops.trim_sample(W.flatten(1), W0.flatten(), 0, 7)
    """
    sources = list(sources)
    _native.check_trim_sample(sources, base, first, stride)
    if base.device.type != "cpu" or _native.LOAD_ERROR is not None:
        return reference.trim_sample(sources, base, first, stride, same_is_zero)
    return torch.ops.svdfuse.trim_sample.default(sources, base, first, stride, same_is_zero)


def trim_select(values: Tensor, counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Order statistics of T lists of values at once: per list i, its `rank[i]`-th largest value t
    (NaN above every number, as `torch.kthvalue` orders them), how many are > t and == t, and the
    position in the list of the (rank[i] − greater[i])-th value equal to t: where the exact trim's
    ties end (`svdfuse.methods.trim`).

    Args:
        values: (M,) fp32, the lists one after the other; counts: (T,) int64 their lengths (sum M);
        rank: (T,) int64, 1 for the largest.

    Returns:
        threshold (T,) fp32, greater (T,), equal (T,) and position (T,) int64; position is -1
        where every value equal to t is within the rank; a rank outside [1, counts[i]] gives NaN
        and -1s.

    Example::

        t, greater, equal, position = svdfuse.ops.trim_select(sample.flatten(), torch.full((T,), n), rank)
    """
    _native.check_trim_select(values, counts, rank)
    if values.device.type != "cpu" or _native.LOAD_ERROR is not None:
        return reference.trim_select(values, counts, rank)
    return torch.ops.svdfuse.trim_select.default(values, counts, rank)


def core_matmul(
    x: Tensor, U: Tensor, C: Tensor, V: Tensor, task: Tensor, base: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """`y = x Wbᵀ + ((x V) Cₜᵀ) Uᵀ + bias`, t = task of the row: many updates `U Cₜ Vᵀ` on one
    shared basis (a bundle's full cores, `svdfuse.bundle`), served in one call without forming them.

    Args:
        x: (..., n) inputs; fp32, bf16, fp16 or fp64, shared by every float tensor.
        U: (m, K), V: (n, K) the shared basis.
        C: (num_tasks, K, K) one core per task.
        task: int64 of shape x.shape[:-1], ids in [0, num_tasks); range-checked on the CPU
            (ValueError); elsewhere a bad id gives its row NaN.
        base: optional (m, n) dense base weight Wb; bias: optional (m,).

    Returns:
        (..., m) in x's dtype, accumulated in fp32 (fp64 for fp64). Inference only (no autograd).

    Raises:
        ValueError, TypeError: a shape, device, dtype or (on the CPU) task id does not fit, naming the tensor.

    Example::

        y = svdfuse.ops.core_matmul(x, U, cores, V, task=request_ids[:, None].expand(x.shape[:-1]), base=W0, bias=b)
    """
    return torch.ops.svdfuse.core_matmul.default(x, U, C, V, base, bias, task)


def gram(x: Tensor, left: bool = True) -> Tensor:
    """The float64 Gram matrices of a batch of thin factors, read in their own dtype: `xᵀx`
    (`left`) or `x xᵀ`. What the exact SVD of a LoRA product starts from (`svdfuse.factored`).

    Args:
        x: (..., a, b) fp32, bf16, fp16 or fp64 (any layout).

    Returns:
        (..., b, b) if `left`, else (..., a, a), float64.

    Raises:
        ValueError, TypeError: x has fewer than two dims or another dtype.

    On the CPU the compiled kernel (csrc/gram.cpp) converts a cache-sized tile at a time and
    accumulates in float64 (a thousand adapters' factors are never copied to float64 whole), in
    AVX-512 registers where the CPU has them (`SVDFUSE_NO_AVX512=1` picks the AVX2 build);
    elsewhere, or without the extension, `reference.gram`: a float64 copy and one batched GEMM.

    Example::

        G = svdfuse.ops.gram(B)            # (c, r, r) = Bᵀ B for B (c, m, r) bf16
        H = svdfuse.ops.gram(A, left=False)  # (c, r, r) = A Aᵀ for A (c, r, n)
    """
    _native.check_gram(x)
    if x.device.type != "cpu" or _native.LOAD_ERROR is not None:
        return reference.gram(x, left)
    return torch.ops.svdfuse.gram.default(x, left)
