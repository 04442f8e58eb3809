"""What a merge returns: merged factors, other merged tensors, a report, and ways to use them.

`MergeResult` is plain data, filled by the merge from its stream of outputs (it is the in-memory
sink); it holds no source and reads nothing back.
"""

from __future__ import annotations

import enum
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from svdfuse.report import LayerReport, MergeReport

if TYPE_CHECKING:
    from svdfuse.templates import Template


class SaveFormat(str, enum.Enum):
    """How `MergeResult.save` writes: by the path's suffix, one safetensors file, or a Hugging Face directory."""

    AUTO = "auto"
    SAFETENSORS = "safetensors"
    HF = "hf"


@dataclass
class MergeResult:
    """The merged model, in memory: `W = frozen + U_t diag(S_t) V_tᵀ` per merged matrix that has
    components, merged values for everything else.

    Attributes:
        components: name -> (U_t (m, k), S_t (k,), V_t (n, k)), U_t and V_t orthonormal, S_t
            descending, in the accumulation dtype (fp32, fp64 for fp64 models). Conv kernels are
            (out, in·kh·kw) matrices here. AXIS merges are exactly rank k.
        frozen: name -> the dense part of each matrix in `components` that Stage 2 leaves alone,
            in the model's shape: the base weight, plus (methods whose merge is not rank k) the
            merged task matrix beyond its top-k components, then in the accumulation dtype.
        tensors: name -> merged value of every other tensor, dense and final (other floating
            tensors merged by the method's elementwise rule, matrices of a merge without
            components, integer buffers as the base's).
        dtypes: name -> dtype each tensor is written in.
        report: a `MergeReport`.
        template: what a Hugging Face directory output holds besides weights, when the base has it
            (`svdfuse.templates.Template`: a base directory's config and tokenizer, or a
            transformers module's config and its own directory's files); None: weights only.
    """

    components: dict[str, tuple[Tensor, Tensor, Tensor]]
    frozen: dict[str, Tensor]
    tensors: dict[str, Tensor]
    dtypes: dict[str, torch.dtype]
    report: MergeReport
    template: Template | Path | None = None
    order: list[str] = field(default_factory=list)

    @property
    def matrices(self) -> list[str]:
        """Names of the tensors merged as matrices, in model order."""
        return [layer.key for layer in self.report.layers]

    def delta(self, key: str) -> Tensor:
        """The merged weight minus the frozen part, `U_t diag(S_t) V_tᵀ`, in `key`'s shape."""
        U, S, V = self.components[key]
        return ((U * S) @ V.T).reshape(self.frozen[key].shape)

    def state_dict(self) -> dict[str, Tensor]:
        """Dense merged tensors under the base's names and order: `frozen + U_t diag(S_t) V_tᵀ` for
        matrices with components, the merged values of everything else."""
        out = {}
        for key in self.order:
            if key in self.components:
                frozen = self.frozen[key]
                out[key] = (frozen.to(self.components[key][0].dtype) + self.delta(key)).to(self.dtypes[key])
            else:
                out[key] = self.tensors[key]
        return out

    def to_module(
        self, base: nn.Module, n: int | float | None = None, *, basis: str = "delta", trainable: int | float | None = None
    ) -> nn.Module:
        """A copy of `base` carrying the merge, ready for `svdfuse.adapt` and serving.

        `nn.Linear` layers become `svdfuse.nn.SVDLinear` (low-rank forward), `nn.Conv1d/2d/3d`
        `svdfuse.nn.SVDConv` (low-rank too), `nn.MultiheadAttention` an
        `svdfuse.nn.SVDMultiheadAttention` with `SVDLinear` projections; other merged weights
        (transposed conv kernels, say) get an `svdfuse.nn.SVDWeight` parametrization. `n` is N, the
        number of top singular values each layer trains (int, or fraction of min(m, n)), as in
        `svdfuse.adapt`; None trains all k. (`trainable=` is its former name, deprecated.)

        `basis` says which singular values those are: "delta" (default), the merge's own
        components of the task matrix Δ_m (the top-k it kept); "weight", the top-`n` singular
        components of each merged weight W0 + Δ_m itself (one float64 SVD per matrix; the rest of
        the weight frozen), which every method's merge can take and which never trains a σ = 0
        direction. Either way the module starts from the same merged weights.
        """
        if trainable is not None:
            warnings.warn("to_module(trainable=...) is deprecated; pass n=..., as to svdfuse.adapt", DeprecationWarning, stacklevel=2)
            n = trainable if n is None else n
        from svdfuse.nn.convert import attach

        # Integer buffers are the base's by construction: the module keeps its own.
        merged = {key: t for key, t in self.tensors.items() if t.is_floating_point()}
        return attach(base, self.components, self.frozen, merged, self.matrices, self.report.method, n, basis)

    def save(self, path: str | os.PathLike, *, format: SaveFormat | str = SaveFormat.AUTO, shard_size: int | str = "5GB") -> None:
        """Write the dense merged model: a `.safetensors` file, or a Hugging Face directory (the
        base directory's config and tokenizer files, or a transformers base module's config and its
        own directory's files; a model card `README.md` of the merge; shards above `shard_size`).
        Never overwrites; never leaves a partial file behind."""
        from svdfuse.sinks import check_output, parse_size, write_state_dict

        path = check_output(path)
        if format not in tuple(SaveFormat):
            raise ValueError(f"format must be 'auto', 'safetensors' or 'hf', found {format!r}")
        format = SaveFormat(format)
        if format is SaveFormat.AUTO:
            format = SaveFormat.SAFETENSORS if path.suffix == ".safetensors" else SaveFormat.HF
        if format is SaveFormat.HF and self.template is None:
            from svdfuse.templates import NO_TEMPLATE

            raise ValueError(
                f"cannot write {str(path)!r} as a Hugging Face directory: {NO_TEMPLATE}; save to a .safetensors file "
                "instead (open_clip loads one with create_model(name, pretrained=FILE))"
            )
        if format is SaveFormat.SAFETENSORS and path.suffix != ".safetensors":
            raise ValueError(f"format='safetensors' writes one file whose name ends in .safetensors, found {str(path)!r}")
        from svdfuse.card import card_files

        files = card_files(self.report, path) if format is SaveFormat.HF else {}
        write_state_dict(self.state_dict(), path, template=self.template, shard_size=parse_size(shard_size, "shard_size"), files=files)
