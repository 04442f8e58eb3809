"""Merged layers whose only trainable numbers are their top singular values, and the conversions
between them and plain modules.

- `layers`: `SVDLinear` (low-rank forward through `svdfuse.ops.lowrank_matmul`), `SVDWeight` (a
  parametrization for weights a module reads itself), `TaskCoefficients` (aTLAS).
- `conv`: `SVDConv`, `nn.Conv1d/2d/3d` with a low-rank kernel update (σ per request when serving).
- `attention`: `SVDMultiheadAttention`, `nn.MultiheadAttention` with `SVDLinear` projections.
- `convert`: `MergeResult.to_module` (`attach`), `materialize`, `set_trainable` and the layer walks.
"""

from svdfuse.nn.attention import SVDMultiheadAttention
from svdfuse.nn.conv import SVDConv
from svdfuse.nn.convert import adaptable_layers, materialize, set_trainable, svd_layers
from svdfuse.nn.layers import Excess, SVDLinear, SVDWeight, TaskCoefficients

__all__ = [
    "SVDLinear",
    "SVDConv",
    "SVDWeight",
    "SVDMultiheadAttention",
    "TaskCoefficients",
    "Excess",
    "svd_layers",
    "adaptable_layers",
    "set_trainable",
    "materialize",
]
