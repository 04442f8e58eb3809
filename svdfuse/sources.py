"""Models as lazily read sources of named tensors.

A source is an `nn.Module`, a state dict, a `.safetensors` file or a Hugging Face model
directory. Tensors are read one key at a time (safetensors files are memory-mapped), so a merge
holds only the layers it is working on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

ModelLike = Union[nn.Module, Mapping[str, Tensor], str, os.PathLike]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):  # torch >= 2.7
    _SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


class SourceError(ValueError):
    """A source cannot be read or does not fit the base; the message names source and tensor."""


class Source:
    """Named tensors of one model, read on demand.

    Attributes:
        label: how errors name this source, e.g. "source 3 ('ft-cars.safetensors')".
        directory: the Hugging Face model directory it came from, if any (its config is reused on save).
    """

    def __init__(self, label: str, directory: Path | None = None) -> None:
        self.label = label
        self.directory = directory

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of `key` without reading its data."""
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        raise NotImplementedError


class MappingSource(Source):
    """An in-memory state dict (or an `nn.Module`'s)."""

    def __init__(self, label: str, tensors: Mapping[str, Tensor]) -> None:
        super().__init__(label)
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise SourceError(f"{label}: expected a mapping of name -> Tensor, {bad[0]!r} is {type(tensors[bad[0]]).__name__}")
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensors[key]
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> Tensor:
        return self._tensors[key].detach()


class SafetensorsSource(Source):
    """One or more `.safetensors` files (shards), memory-mapped and read key by key."""

    def __init__(self, label: str, files: list[Path], directory: Path | None = None) -> None:
        super().__init__(label, directory)
        self._handles = {}
        self._file_of: dict[str, object] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise SourceError(f"{label}: cannot read {str(file)!r} as safetensors ({err}); is it truncated or corrupt?") from err
            self._handles[file] = handle
            for key in handle.keys():
                self._file_of[key] = handle

    def keys(self) -> list[str]:
        return list(self._file_of)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._file_of[key].get_slice(key)
        name = sl.get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise SourceError(
                f"{self.label}: {key!r} has safetensors dtype {name}, which svdfuse cannot read; "
                f"expected one of {', '.join(_SAFETENSORS_DTYPES)}"
            )
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> Tensor:
        try:
            return self._file_of[key].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise SourceError(f"{self.label}: cannot read tensor {key!r} ({err})") from err


def _hf_weight_files(directory: Path, label: str) -> list[Path] | None:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SourceError(
                f"{label}: {str(index)!r} is not a safetensors index: expected JSON with a 'weight_map' of "
                f"name -> shard file ({type(err).__name__}: {err})"
            ) from err
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise SourceError(f"{label}: {str(index)!r} lists {len(missing)} shard files that do not exist (e.g. {missing[:3]})")
        return [directory / shard for shard in shards]
    return None


def open_source(model: ModelLike, label: str) -> Source:
    """Wrap `model` as a `Source`; `label` names it in errors ("source 2", "base")."""
    if isinstance(model, Source):
        return model
    if isinstance(model, nn.Module):
        return MappingSource(label, model.state_dict())
    if isinstance(model, Mapping):
        return MappingSource(label, model)
    if not isinstance(model, (str, os.PathLike)):
        raise SourceError(
            f"{label}: expected an nn.Module, a state dict, a .safetensors file or a Hugging Face model directory, "
            f"found {type(model).__name__}"
        )
    path = Path(model)
    label = f"{label} ({path.name!r})"
    if path.is_dir():
        files = _hf_weight_files(path, label)
        if files is not None:
            return SafetensorsSource(label, files, directory=path)
        bin_file = path / "pytorch_model.bin"
        if bin_file.is_file():
            try:
                state = torch.load(bin_file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... on bad files
                raise SourceError(f"{label}: cannot read {str(bin_file)!r} as a torch checkpoint ({type(err).__name__}: {err})") from err
            if not isinstance(state, Mapping):
                raise SourceError(f"{label}: {str(bin_file)!r} holds a {type(state).__name__}, expected a state dict")
            source = MappingSource(label, state)
            source.directory = path
            return source
        raise SourceError(f"{label}: directory {str(path)!r} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SourceError(f"{label}: expected a .safetensors file, found {str(path)!r}")
        return SafetensorsSource(label, [path])
    raise SourceError(f"{label}: {str(path)!r} does not exist")


def open_sources(models: Sequence[ModelLike] | Mapping[str, ModelLike]) -> list[Source]:
    """Open source models labelled "source 2" (a list) or "source 2 ('cars')" (a name -> model mapping)."""
    single = (str, bytes, os.PathLike, torch.nn.Module, Source)
    is_state_dict = isinstance(models, Mapping) and any(isinstance(v, Tensor) for v in models.values())
    if isinstance(models, single) or is_state_dict:
        raise TypeError(
            f"models must be a list of source models (or a name -> model mapping), found a single "
            f"{type(models).__name__}; wrap one model in a list: merge([model], ...)"
        )
    if isinstance(models, Mapping):
        return [open_source(model, f"source {i} ({name!r})") for i, (name, model) in enumerate(models.items())]
    return [open_source(model, f"source {i}") for i, model in enumerate(models)]


class Reader:
    """Reads a tensor from the base and every source, checking values as they arrive."""

    def __init__(self, base: Source, sources: list[Source], dtype: torch.dtype | None, device: torch.device) -> None:
        self.base, self.sources, self.dtype, self.device = base, sources, dtype, device
        self.differs = [False] * len(sources)  # whether source i differs from the base anywhere

    def _load(self, source: Source, key: str) -> Tensor:
        t = source.get(key)
        stored = t.dtype
        if self.dtype is not None:
            t = t.to(self.dtype)
        t = t.to(self.device)
        if not torch.isfinite(t).all():
            nan, inf = torch.isnan(t).sum().item(), torch.isinf(t).sum().item()
            cast = f" after casting from {stored} to {t.dtype}" if t.dtype != stored else ""
            raise SourceError(
                f"{source.label}: {key!r} of shape {tuple(t.shape)} holds {nan} NaN and {inf} Inf values{cast} "
                f"(of {t.numel()}); expected finite values"
            )
        return t

    def read(self, key: str, shape: tuple[int, ...], out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(base (*shape), sources (T, *shape)) on the merge device, written into `out` when given."""
        base = self._load(self.base, key).reshape(shape)
        if out is None:
            stack = torch.empty((len(self.sources), *shape), dtype=base.dtype, device=self.device)
        else:
            base, stack = out[0].copy_(base), out[1]
        for i, source in enumerate(self.sources):
            stack[i] = self._load(source, key).reshape(shape)
            self.differs[i] = self.differs[i] or not torch.equal(stack[i], base)
        return base, stack
