"""What a merge returns: merged factors, other merged tensors, a report, and ways to use them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdfuse.plan import Plan
from svdfuse.sources import Source


@dataclass(frozen=True)
class LayerReport:
    """One merged matrix: its name, shape, the rank k of its components and, for methods that
    select components (AXIS, TSV-M), how many came from each source."""

    key: str
    shape: tuple[int, ...]
    k: int
    counts: list[int] | None


@dataclass(frozen=True)
class MergeReport:
    """Which method merged what, per-matrix selection counts, and how long it took."""

    method: str
    sources: list[str]
    layers: list[LayerReport]
    seconds: float

    def totals(self) -> list[int]:
        """Components selected from each source over all matrices (methods that select)."""
        return [sum(layer.counts[i] for layer in self.layers if layer.counts) for i in range(len(self.sources))]

    def table(self, max_rows: int = 12) -> str:
        """A plain-text table: one row per source with its share of all selected components."""
        done = f"{len(self.layers)} matrices merged by {self.method} in {self.seconds:.2f} s"
        if not any(layer.counts for layer in self.layers):
            return "\n".join([f"sources: {', '.join(self.sources)}", done])
        totals = self.totals()
        grand = max(1, sum(totals))
        width = max([len("source")] + [len(s) for s in self.sources])
        lines = [f"{'source':<{width}}  components  share", f"{'-' * width}  ----------  -----"]
        order = sorted(range(len(totals)), key=lambda i: -totals[i])
        for i in order[:max_rows]:
            lines.append(f"{self.sources[i]:<{width}}  {totals[i]:>10}  {100 * totals[i] / grand:4.1f}%")
        if len(order) > max_rows:
            lines.append(f"... {len(order) - max_rows} more sources")
        lines.append(done)
        return "\n".join(lines)


class MergeResult:
    """The merged model: `W = W0 + U_t diag(S_t) V_tᵀ (+ R)` per matrix, merged values elsewhere.

    Attributes:
        components: name -> (U_t (m, k), S_t (k,), V_t (n, k)), U_t and V_t orthonormal, S_t
            descending, in the accumulation dtype (fp32, fp64 for fp64 models). Conv kernels are
            (out, in·kh·kw) matrices here. AXIS merges are exactly rank k.
        residuals: name -> dense (m, n) part R of the merged task matrix beyond its top-k
            components, for methods whose merge is not rank k (kept frozen in Stage 2).
        tensors: name -> merged value of every other floating tensor (AXIS: the sources' mean).
        report: a `MergeReport`.
    """

    def __init__(
        self,
        base: Source,
        plan: Plan,
        components: dict[str, tuple[Tensor, Tensor, Tensor]],
        residuals: dict[str, Tensor],
        tensors: dict[str, Tensor],
        report: MergeReport,
        dtype: torch.dtype | None,
    ) -> None:
        self.components = components
        self.residuals = residuals
        self.tensors = tensors
        self.report = report
        self._base = base
        self._plan = plan
        self._shapes = {entry.key: entry.shape for entry in plan.matrices}
        self._dtype = dtype

    @property
    def source_directory(self) -> os.PathLike | None:
        """The base's Hugging Face directory, when the base was given as one."""
        return self._base.directory

    @property
    def matrices(self) -> list[str]:
        """Names of the tensors merged as matrices, in model order."""
        return [layer.key for layer in self.report.layers]

    def base_tensor(self, key: str) -> Tensor:
        """The base model's tensor `key`, read from the base source."""
        return self._base.get(key)

    def frozen_delta(self, key: str) -> Tensor | None:
        """The residual R of `key` in its original shape, or None."""
        rest = self.residuals.get(key)
        return None if rest is None else rest.reshape(self._shapes[key])

    def delta(self, key: str) -> Tensor:
        """The merged task matrix `U_t diag(S_t) V_tᵀ + R` of `key`, in its original shape."""
        parts = []
        if key in self.components:
            U, S, V = self.components[key]
            parts.append((U * S) @ V.T)
        if key in self.residuals:
            parts.append(self.residuals[key])
        return sum(parts[1:], parts[0]).reshape(self._shapes[key])

    def _dtype_of(self, key: str) -> torch.dtype:
        return self._dtype or self._plan.dtypes[key]

    def state_dict(self) -> dict[str, Tensor]:
        """Dense merged tensors under the base's names and order: `W0 + Δ_m` for matrices,
        merged values for other floating tensors, the base's own values for integer buffers."""
        out: dict[str, Tensor] = {}
        for key in self._plan.keys:
            if key in self._shapes:
                W0 = self._base.get(key)
                delta = self.delta(key)
                out[key] = (W0.to(delta) + delta).to(self._dtype_of(key))
            elif key in self.tensors:
                out[key] = self.tensors[key]
            else:
                out[key] = self._base.get(key)
        return out

    def to_module(self, base: nn.Module, trainable: int | float | None = None) -> nn.Module:
        """A copy of `base` carrying the merge, ready for `svdfuse.adapt` and serving.

        `nn.Linear` layers become `svdfuse.nn.SVDLinear` (low-rank forward), `nn.Conv1d/2d/3d`
        `svdfuse.nn.SVDConv` (low-rank too), `nn.MultiheadAttention` an
        `svdfuse.nn.SVDMultiheadAttention` with `SVDLinear` projections; other merged weights
        (transposed conv kernels, say) get an `svdfuse.nn.SVDWeight` parametrization. `trainable` is
        N, the number of top singular values each layer trains (int, or fraction of min(m, n));
        None trains all k.
        """
        from svdfuse.nn.convert import attach

        return attach(base, self, trainable)

    def save(self, path: str | os.PathLike, *, format: str = "auto") -> None:
        """Write the dense merged model: a `.safetensors` file, or a Hugging Face directory
        (config and tokenizer files copied from the base directory). Never overwrites; never
        leaves a partial file behind."""
        from svdfuse.io import save_merged

        save_merged(self, path, format=format)
