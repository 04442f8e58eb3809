"""`svdfuse inspect`: a model's tensors and what a merge would do with each, before any merge.

The roles come from the plan's own rule (`svdfuse.plan.tensor_role`), so what this prints is what
`svdfuse.merge` does with the same include/exclude patterns: `matrix` (merged by the method's SVD
rule, or with k made adaptable by Stage 2), `elementwise` (the method's elementwise rule; the mean
task vector for SVD methods) or `copied` (integer buffers, the base's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tabulate import tabulate

from svdfuse.plan import DEFAULT_EXCLUDE, Role, _size, tensor_role
from svdfuse.sources import open_source

__all__ = ["TensorInfo", "inspect_model", "inspect_report"]


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: name, shape, dtype and its role in a merge."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: Role

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def inspect_model(
    model: str | os.PathLike, *, include: Sequence[str] | None = None, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> list[TensorInfo]:
    """The tensors of a `.safetensors` file, Hugging Face directory or component cache, in
    stored order, each with the role `svdfuse.merge` gives it under `include`/`exclude`.
    Reads headers only."""
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude take a list of glob patterns, found a str; write include=['fc1.weight']")
    source = open_source(model, "model")
    out = []
    for key in source.keys():
        shape, dtype = source.meta(key)
        out.append(TensorInfo(key, tuple(shape), dtype, tensor_role(key, tuple(shape), dtype, include, exclude)))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def inspect_report(tensors: list[TensorInfo], *, per_tensor: bool = True) -> str:
    """Tables: every tensor (name, dtype, shape, size, role), then totals per role and dtype."""
    parts = []
    if per_tensor:
        rows = [(t.key, _dtype_name(t.dtype), "×".join(map(str, t.shape)) or "scalar", _size(t.nbytes), t.role.value) for t in tensors]
        parts.append(tabulate(rows, headers=("tensor", "dtype", "shape", "size", "merged as"), colalign=("left", "left", "right", "right", "left")))
    summary = []
    for role in Role:
        chosen = [t for t in tensors if t.role is role]
        if chosen:
            dtypes = ", ".join(sorted({_dtype_name(t.dtype) for t in chosen}))
            summary.append((role.value, len(chosen), f"{sum(t.numel for t in chosen):,}", _size(sum(t.nbytes for t in chosen)), dtypes))
    summary.append(("total", len(tensors), f"{sum(t.numel for t in tensors):,}", _size(sum(t.nbytes for t in tensors)), ""))
    parts.append(tabulate(summary, headers=("merged as", "tensors", "parameters", "size", "dtypes"), colalign=("left", "right", "right", "right", "left")))
    return "\n\n".join(parts)
