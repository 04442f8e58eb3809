"""`svdfuse inspect`: a model's tensors and what a merge would do with each, before any merge.

The roles come from the plan's own rule (`svdfuse.plan.tensor_role`), so what this prints is what
`svdfuse.merge` does with the same include/exclude patterns: `matrix` (merged by the method's SVD
rule, or with k made adaptable by Stage 2), `elementwise` (the method's elementwise rule; the mean
task vector for SVD methods) or `copied` (integer buffers, the base's).

A peft LoRA adapter directory is inspected on its own (`inspect_adapter`): its modules, whole
tensors and lora_bias entries as `svdfuse.adapters.LoraAdapter` parses them for a merge, from its
config and headers; against a base when one is given, by the merge's own `LoraSource`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from svdfuse.adapters import _REFUSED as REFUSED, ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, LoraSource, is_adapter
from svdfuse.plan import DEFAULT_EXCLUDE, Role, _size, tensor_role
from svdfuse.sources import SourceError, open_source

__all__ = ["AdapterInfo", "AdapterModule", "AdapterTensor", "TensorInfo", "adapter_report", "inspect_adapter", "inspect_model", "inspect_report"]


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
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model) and is_adapter(Path(model)):  # os.path: a path it cannot look at is open_source's to name
        raise SourceError(f"model ({Path(model).name!r}): is a peft adapter; inspect it with inspect_adapter(path, base=...) (svdfuse inspect does)")
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


@dataclass(frozen=True)
class AdapterModule:
    """One module a LoRA adapter updates by `scale · B A`.

    module: its name as the base names it, without peft's `base_model.model.`; kind: "linear",
    "transposed" (fan_in_fan_out), "embedding" or "conv"; shape: the weight the update fits;
    dtypes: of its factors; nbytes: of A and B together; base_key, base_shape: the base's tensor it
    updates (None without a base).
    """

    module: str
    kind: str
    rank: int
    alpha: float
    scale: float
    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    nbytes: int
    base_key: str | None = None
    base_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AdapterTensor:
    """A tensor an adapter holds beside its factors: a whole replacement ("whole",
    modules_to_save) or a `lora_B.bias` added at the module's scale ("lora_bias")."""

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float | None = None
    base_key: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class AdapterInfo:
    """What `inspect_adapter` found: the adapter's modules and other tensors, and its config's
    facts (`base_model`: its base_model_name_or_path; `features`: the scaling options it uses;
    `base`: the base it was checked against, or None)."""

    path: str
    base_model: str | None
    modules: list[AdapterModule]
    tensors: list[AdapterTensor]
    features: list[str]
    base: str | None = None


def inspect_adapter(adapter: str | os.PathLike, *, base: str | os.PathLike | None = None) -> AdapterInfo:
    """A peft LoRA adapter directory's modules (layout, rank, alpha, scale, factor dtype and
    bytes), whole tensors and lora_bias entries, from its config and headers alone. With `base`,
    also checked to fit it as a merge checks it, each module with the base tensor it updates.
    What a merge refuses (DoRA, other tuner types, ranks that disagree, ...) is refused here with
    the same message.

    Example::

        info = inspect_adapter("lora-0", base="minilm")
        print(adapter_report(info))
    """
    path = Path(adapter)
    label = f"model ({path.name!r})"
    if not path.is_dir() or not is_adapter(path):
        raise SourceError(f"{label}: {str(path)!r} is not a peft adapter directory (no {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS})")
    fitted = None if base is None else LoraSource(label, path, open_source(base, "base"))
    parsed = LoraAdapter(label, path) if fitted is None else fitted.parsed
    where: dict[str, str] = {}  # the adapter file's key -> the base tensor it updates
    if fitted is not None:
        where = {stored: key for key, stored in fitted.full.items()} | {m.a: m.key for m in fitted.modules.values()}
        where |= {stored: key for key, (stored, _) in fitted.biases.items()}
    meta = parsed.store.meta
    modules = []
    for f in parsed.modules.values():
        key = where.get(f.a)
        modules.append(AdapterModule(
            f.module, f.kind, f.rank, f.alpha, f.scale, f.shape, tuple(dict.fromkeys(meta(n)[1] for n in (f.a, f.b))),
            sum(math.prod(meta(n)[0]) * meta(n)[1].itemsize for n in (f.a, f.b)), key, None if key is None else fitted.meta(key)[0],
        ))
    tensors = [AdapterTensor(name, "whole", *meta(stored), None, where.get(stored)) for name, stored in parsed.full.items()]
    tensors += [
        AdapterTensor(f"{f.module}.bias", "lora_bias", *meta(f.bias), f.scale, where.get(f.bias)) for f in parsed.modules.values() if f.bias is not None
    ]
    config = parsed.config
    features = [name for name, used in (
        ("rslora (scale alpha/√r)", config.get("use_rslora")), ("fan_in_fan_out", config.get("fan_in_fan_out")),
        (f"rank_pattern ({len(config.get('rank_pattern') or {})})", config.get("rank_pattern")),
        (f"alpha_pattern ({len(config.get('alpha_pattern') or {})})", config.get("alpha_pattern")),
    ) if used]  # fmt: skip
    return AdapterInfo(str(path), config.get("base_model_name_or_path"), modules, tensors, features, None if base is None else str(base))


def adapter_report(info: AdapterInfo, *, per_module: bool = True) -> str:
    """Tables: every module (name, layout, rank, alpha, scale, dtype, update shape, size, and the
    base's tensor when checked against one), the other tensors, then a summary."""
    shape = lambda s: "×".join(map(str, s)) or "scalar"  # noqa: E731
    parts = []
    if per_module and info.modules:
        rows = [
            (m.module, m.kind, m.rank, f"{m.alpha:g}", f"{m.scale:.6g}", "/".join(map(_dtype_name, m.dtypes)), shape(m.shape), _size(m.nbytes))
            + (() if info.base is None else (m.base_key, shape(m.base_shape)))
            for m in info.modules
        ]
        headers = ("module", "layout", "rank", "alpha", "scale", "dtype", "updates", "size") + (() if info.base is None else ("base tensor", "base shape"))
        parts.append(tabulate(rows, headers=headers, disable_numparse=True))
    if per_module and info.tensors:
        rows = [
            (t.name, t.role if t.scale is None else f"{t.role} (× {t.scale:.6g})", _dtype_name(t.dtype), shape(t.shape), _size(t.nbytes))
            + (() if info.base is None else (t.base_key,))
            for t in info.tensors
        ]
        headers = ("tensor", "merged as", "dtype", "shape", "size") + (() if info.base is None else ("base tensor",))
        parts.append(tabulate(rows, headers=headers, disable_numparse=True))
    kinds = ", ".join(f"{kind} {sum(m.kind == kind for m in info.modules)}" for kind in dict.fromkeys(m.kind for m in info.modules))
    factor_bytes = sum(m.nbytes for m in info.modules)
    summary = [
        ("adapter", info.path),
        ("base_model_name_or_path", info.base_model or "(not recorded)"),
        ("modules", f"{len(info.modules)}" + (f" ({kinds})" if kinds else "")),
        ("total rank", f"{sum(m.rank for m in info.modules):,}"),
        ("factor bytes", _size(factor_bytes)),
        ("whole tensors", f"{sum(t.role == 'whole' for t in info.tensors)}"),
        ("lora_bias", f"{sum(t.role == 'lora_bias' for t in info.tensors)}"),
        ("total bytes", _size(factor_bytes + sum(t.nbytes for t in info.tensors))),
        ("uses", ", ".join(info.features) or "plain LoRA (scale alpha/r)"),
        ("refused, none present", ", ".join(REFUSED) + ", peft_type other than LORA, DoRA magnitude vectors"),
    ]
    if info.base is not None:
        summary.append(("fits base", f"{info.base} (every module and tensor)"))
    parts.append(tabulate(summary, tablefmt="plain", disable_numparse=True))
    return "\n\n".join(parts)
