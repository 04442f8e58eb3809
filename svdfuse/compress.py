"""Many adapters of one base on one shared basis: `svdfuse.compress` writes a bundle.

Per matrix, N updates ΔWᵢ (m×n) share one orthonormal U (m×K) and V (n×K); adapter i keeps only
its core Σᵢ = Uᵀ ΔWᵢ V (K×K, `core="full"`) or its diagonal (`core="diagonal"`: the least-squares
optimum on that basis, served by the per-request-σ `lowrank_matmul`). Everything is computed from
each update's exact factors (a LoRA's B, A and scale; a full fine-tune's exact SVD), never an m×n
matrix per adapter:

- `basis="stack"`: U, V are the top-K singular vectors of the side-by-side updates [ΔW₁ … ΔW_N]
  and [ΔW₁ᵀ … ΔW_Nᵀ], i.e. of [U₁ diag(s₁) … U_N diag(s_N)] from each update's SVD: the U that
  keeps the most of Σᵢ‖Uᵀ ΔWᵢ‖² (the SVD of the *sum* Σ Bᵢ Aᵢ would lose updates that cancel).
- `basis="axis"`: the K largest components over all updates (AXIS's global top-K), their U and V
  vectors re-orthogonalized by QR.

The relative error ‖ΔWᵢ − U Σᵢ Vᵀ‖ / ‖ΔWᵢ‖ is exact from factors: the residual is the product
[Lᵢ, −U Σᵢ][Rᵢ; Vᵀ] of rank r + K, whose norm is that of its QR factors' r+K square product.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from torch import Tensor

from svdfuse import arguments, factored, linalg
from svdfuse.adapters import LoraSource
from svdfuse.plan import DEFAULT_EXCLUDE, Role, resolve_rank, tensor_role
from svdfuse.resources import default_budget
from svdfuse.sinks import SafetensorsWriter, check_output, parse_size
from svdfuse.sources import ModelLike, Source, SourceError, open_source, open_sources

__all__ = ["compress", "CompressReport", "BUNDLE_FORMAT", "CORES", "BASES"]

BUNDLE_FORMAT = "bundle"  # the `svdfuse` metadata entry of a bundle file
CORES = ("diagonal", "full")
BASES = ("stack", "axis")
# Measured on 48 real MiniLM LoRAs (r=8) at K = r..8r (bench/results/compress-*.json): with full
# cores the stack basis errs less (mean relative error 0.73 against 0.78 at 2r, 0.37 against 0.41 at 8r); a diagonal
# core keeps only Uᵀ ΔW V's diagonal, which AXIS's own components fill better (0.87 against 0.97 at 8r).
DEFAULT_BASIS = {"full": "stack", "diagonal": "axis"}
_F64 = torch.float64


@dataclass(frozen=True)
class CompressReport:
    """A written (or built) bundle: adapters, matrices and each adapter × matrix relative error.

    Attributes:
        adapters: the adapters' names, in bundle order.
        keys: the base's weight names with a shared basis.
        errors: (N, M) float64, ‖ΔWᵢ − U Σᵢ Vᵀ‖ / ‖ΔWᵢ‖ of adapter i at matrix j (0 where the
            adapter leaves the matrix unchanged).
        touched: (N, M) bool, whether adapter i updates matrix j.
        k: K, columns of every basis; core: "diagonal" or "full"; basis: "stack" or "axis".
        output: the bundle's path.
    """

    adapters: list[str]
    keys: list[str]
    errors: Tensor
    touched: Tensor
    k: int
    core: str
    basis: str
    output: Path

    def table(self, max_rows: int = 16) -> str:
        """One row per adapter: mean and worst relative error over the matrices it updates."""
        rows = [(name, f"{self.errors[i][self.touched[i]].mean().item():.3g}", f"{self.errors[i].max().item():.3g}",
                 self.keys[int(self.errors[i].argmax())], int(self.touched[i].sum())) for i, name in enumerate(self.adapters)]
        shown = sorted(rows, key=lambda row: -float(row[2]))[:max_rows]
        head = (f"wrote {self.output}: {len(self.adapters)} adapters on a shared K={self.k} basis ({self.basis}) per matrix "
                f"for {len(self.keys)} matrices, {self.core} cores; mean relative error {self.errors[self.touched].mean().item():.3g}")
        more = [] if len(rows) <= max_rows else [f"({len(rows) - max_rows} more adapters with smaller worst errors)"]
        return "\n".join([head, tabulate(shown, headers=("adapter", "mean rel. error", "worst", "worst matrix", "matrices")), *more])


def compress(
    adapters: Sequence[ModelLike] | Mapping[str, ModelLike],
    *,
    k: int | float,
    base: ModelLike,
    output: str | os.PathLike,
    core: str = "full",
    basis: str | None = None,
    max_memory: int | str | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> CompressReport:
    """Express N adapters of `base` on one shared basis per matrix and write them as a bundle.

    Args:
        adapters: peft LoRA adapter directories, or full fine-tunes (any model `merge` takes), as
            a list (named by their path's name) or a name -> model mapping.
        k: K, the basis's columns per matrix: an int, or a fraction of min(m, n). At most what the
            sources span at every matrix (min(m, n) and the sum of the adapters' ranks there).
        base: the model the adapters were trained from.
        output: a new `.safetensors` file (or a directory: sharded HF layout).
        core: "full" (K×K per adapter and matrix) or "diagonal" (K values).
        basis: "stack" (top-K SVD of the side-by-side updates) or "axis" (global top-K
            components); default: the better of the two for the core as measured on 48 real
            adapters (bench/bench_compress.py): "stack" for full cores, "axis" for diagonal ones.
        max_memory: budget for one matrix's factors and work (default: half the available memory).
        exclude: glob patterns of full fine-tunes' weights not taken as matrices.

    Returns:
        A `CompressReport` (`.table()` prints each adapter's reconstruction error).

    Raises:
        SourceError, ValueError: naming the adapter, tensor and what was expected, before anything
            is written: adapters of different bases, a tensor no shared basis can hold, K above
            what the sources span, a budget too small for one matrix.

    Bundle layout (safetensors): `KEY.U` (m, K) and `KEY.V` (n, K) fp32, `KEY.cores` (N, K) or
    (N, K, K) fp32, `KEY.error` (N,) fp64; metadata `svdfuse="bundle"`, `core`, `basis`, `k`,
    `adapters` (JSON list of names) and `shapes` (JSON key -> the weight's shape).

    Example::

        report = svdfuse.compress(["lora-a/", "lora-b/", "lora-c/"], k=32, base="minilm/", output="bundle.safetensors")
        print(report.table())
    """
    if core not in CORES:
        raise ValueError(f"compress: core must be one of {CORES}, found {core!r}")
    basis = DEFAULT_BASIS[core] if basis is None else basis
    if basis not in BASES:
        raise ValueError(f"compress: basis must be one of {BASES}, found {basis!r}")
    k = arguments.count(k, "k")
    exclude = arguments.patterns(exclude, "exclude") or ()
    budget = parse_size(max_memory, "max_memory") if max_memory is not None else default_budget()
    output = check_output(output)
    names = _names(adapters)
    base_source = open_source(base, "base")
    sources = open_sources(adapters, base, base_source)
    _check_same_base(sources)
    plan = _plan(base_source, sources, k, exclude, budget)
    metadata = {
        "svdfuse": BUNDLE_FORMAT, "core": core, "basis": basis, "k": str(plan.K), "adapters": json.dumps(names),
        "shapes": json.dumps({key: list(base_source.meta(key)[0]) for key in plan.keys}),
    }
    N = len(sources)
    entries = []
    for key in plan.keys:
        m, n = plan.sizes[key]
        cores = (N, plan.K) if core == "diagonal" else (N, plan.K, plan.K)
        entries += [(f"{key}.U", (m, plan.K), torch.float32), (f"{key}.V", (n, plan.K), torch.float32),
                    (f"{key}.cores", cores, torch.float32), (f"{key}.error", (N,), _F64)]
    errors = torch.zeros(N, len(plan.keys), dtype=_F64)
    touched = torch.zeros(N, len(plan.keys), dtype=torch.bool)
    with SafetensorsWriter(output, entries, metadata=metadata) as writer:
        for j, key in enumerate(plan.keys):
            factors = [_factors(source, base_source, key) for source in sources]
            touched[:, j] = torch.tensor([f is not None for f in factors])
            U, V, cores, err = compress_matrix(factors, plan.K, core=core, basis=basis)
            errors[:, j] = err
            for suffix, t in (("U", U), ("V", V), ("cores", cores), ("error", err)):
                writer.write(f"{key}.{suffix}", t)
        writer.commit(name for name, _, _ in entries)
    return CompressReport(names, plan.keys, errors, touched, plan.K, core, basis, output)


def compress_matrix(
    factors: Sequence[tuple[Tensor, Tensor] | None], K: int, *, core: str = "diagonal", basis: str = "stack"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One matrix's shared basis, cores and errors from its updates' factors.

    Args:
        factors: per adapter, its update as (L (m, r), R (r, n)), ΔW = L R, or None (unchanged).
        K: basis columns, at most min(m, n) and the sum of the ranks r.

    Returns:
        U (m, K), V (n, K) fp32 orthonormal; cores (N, K) or (N, K, K) fp32, Σᵢ = Uᵀ ΔWᵢ V for
        the stored U, V; errors (N,) fp64, ‖ΔWᵢ − U Σᵢ Vᵀ‖ / ‖ΔWᵢ‖ (0 for an unchanged adapter).
    """
    present = [f for f in factors if f is not None]
    m, n = present[0][0].shape[0], present[0][1].shape[1]
    svds = [factored.factored_svd(L.to(_F64), R.to(_F64)) for L, R in present]
    if basis == "stack":
        U = linalg.svd(torch.cat([u * s for u, s, _ in svds], 1))[0][:, :K]
        V = linalg.svd(torch.cat([v * s for _, s, v in svds], 1))[0][:, :K]
    else:
        S = torch.cat([s for _, s, _ in svds])
        top = S.argsort(descending=True, stable=True)[:K]
        U = torch.linalg.qr(torch.cat([u for u, _, _ in svds], 1)[:, top])[0]
        V = torch.linalg.qr(torch.cat([v for _, _, v in svds], 1)[:, top])[0]
    # Cores for the basis as stored: rounding it to fp32 moves it by ~1e-7, the cores follow.
    U32, V32 = U.to(torch.float32).contiguous(), V.to(torch.float32).contiguous()
    U, V = U32.to(_F64), V32.to(_F64)
    N = len(factors)
    cores = torch.zeros((N, K) if core == "diagonal" else (N, K, K), dtype=_F64)
    errors = torch.zeros(N, dtype=_F64)
    for i, f in enumerate(factors):
        if f is None:
            continue
        L, R = f[0].to(_F64), f[1].to(_F64)
        full = (U.T @ L) @ (R @ V)
        C = (full.diagonal() if core == "diagonal" else full).to(torch.float32).to(_F64)  # the error of the core as stored
        cores[i] = C
        kept = U * C if core == "diagonal" else U @ C
        residual = _product_norm(torch.cat([L, -kept], 1), torch.cat([R, V.T], 0))
        errors[i] = residual / max(_product_norm(L, R), 1e-300)
    return U32, V32, cores.to(torch.float32), errors


def _product_norm(L: Tensor, R: Tensor) -> float:
    """‖L R‖_F without forming it: L (m, q), R (q, n); ‖R_l R_rᵀ‖ of the QR factors."""
    R_l = torch.linalg.qr(L, mode="r")[1]
    R_r = torch.linalg.qr(R.T, mode="r")[1]
    return torch.linalg.norm(R_l @ R_r.T).item()


@dataclass(frozen=True)
class _Plan:
    keys: list[str]
    sizes: dict[str, tuple[int, int]]
    K: int


def _names(adapters) -> list[str]:
    if isinstance(adapters, Mapping):
        names = [str(name) for name in adapters]
    elif isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence):
        raise TypeError(f"compress: adapters must be a list of adapters (or a name -> adapter mapping), found a single {type(adapters).__name__}")
    else:
        names = [Path(a).name if isinstance(a, (str, os.PathLike)) else f"adapter{i}" for i, a in enumerate(adapters)]
    if not names:
        raise ValueError("compress: needs at least one adapter")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name or name in seen:
            raise ValueError(f"compress: adapter {i}'s name {name!r} is " + ("empty" if not name else f"also adapter {seen[name]}'s") + "; give adapters distinct names (a name -> adapter mapping)")
        seen[name] = i
    return names


def _check_same_base(sources: list[Source]) -> None:
    """Adapters that record different base models are adapters of different bases."""
    recorded = [(s.label, s.config.get("base_model_name_or_path")) for s in sources if isinstance(s, LoraSource)]
    named = [(label, name) for label, name in recorded if name]
    for label, name in named[1:]:
        if name != named[0][1]:
            raise SourceError(f"{label}: is an adapter of {name!r}, {named[0][0]} of {named[0][1]!r}; a bundle holds adapters of one base")


def _touched(source: Source, base: Source, key: str, exclude: Sequence[str]) -> bool:
    """Whether `source` updates weight `key`; refuses what a shared basis cannot hold."""
    if isinstance(source, LoraSource):
        kind = source.touched(key)
        if kind == "dense":
            raise SourceError(
                f"{source.label}: replaces {key!r} whole (modules_to_save) or updates a bias (lora_bias); a bundle holds "
                "low-rank updates of weight matrices only: train the adapter without them"
            )
        return kind == "lora"
    shape, dtype = base.meta(key)
    if torch.equal(source.get(key).to(_F64), base.get(key).to(_F64)):
        return False
    if tensor_role(key, shape, dtype, None, exclude) is not Role.MATRIX:
        raise SourceError(
            f"{source.label}: changes {key!r} {tuple(shape)}, which is no weight matrix; a bundle holds updates of weight "
            "matrices only (every other tensor is the base's when served)"
        )
    return True


def _plan(base: Source, sources: list[Source], k: int | float, exclude: Sequence[str], budget: int) -> _Plan:
    """The matrices some adapter updates, K, and the refusals, before any work."""
    keys, sizes, widths = [], {}, {}
    for key in base.keys():
        shape = base.meta(key)[0]
        m, n = shape[0], math.prod(shape[1:])
        ranks = [source.modules[key].rank if isinstance(source, LoraSource) else min(m, n)
                 for source in sources if _touched(source, base, key, exclude)]
        if ranks:
            keys.append(key)
            sizes[key] = (m, n)
            widths[key] = sum(ranks)
    spans = {key: min(*sizes[key], widths[key]) for key in keys}
    if not keys:
        raise ValueError("compress: no adapter updates any weight matrix of the base; nothing to compress")
    m, n = sizes[keys[0]]
    K = resolve_rank(k, m, n, "k") if isinstance(k, int) else min(resolve_rank(k, *sizes[key], "k") for key in keys)
    for key in keys:
        if K > spans[key]:
            m, n = sizes[key]
            raise ValueError(
                f"compress: k={K} is more than the adapters span at {key!r} ({m}×{n}: min(m, n) and the sum of their ranks "
                f"give {spans[key]}); pick k <= {min(spans.values())}"
            )
        need = _bytes(sizes[key], len(sources), widths[key], K)
        if need > budget:
            raise ValueError(f"compress: {key!r} {sizes[key]} needs about {need / 2**20:.0f} MiB for its factors and basis, max_memory is {budget / 2**20:.0f} MiB")
    return _Plan(keys, sizes, K)


def _bytes(size: tuple[int, int], N: int, width: int, K: int) -> int:
    """fp64 working set of one matrix: every adapter's SVD factors (`width` columns in all), the
    side-by-side stack and its SVD, the cores."""
    m, n = size
    return 8 * (3 * (m + n) * width + min(m, width) ** 2 + N * K * K + (m + n) * K)


def _factors(source: Source, base: Source, key: str) -> tuple[Tensor, Tensor] | None:
    """Adapter `source`'s update of `key` as (L, R), ΔW = L R; a full fine-tune's from its exact SVD."""
    if isinstance(source, LoraSource):
        return source.factors(key, _F64) if source.touched(key) == "lora" else None
    W, W0 = source.get(key).to(_F64), base.get(key).to(_F64)
    if torch.equal(W, W0):
        return None
    delta = (W - W0).reshape(W.shape[0], -1)
    if not bool(torch.isfinite(delta).all()):
        raise SourceError(f"{source.label}: {key!r} holds NaN or Inf values; expected finite weights")
    U, S, Vh = linalg.svd(delta)
    return U * S, Vh
