"""Merge configurations in YAML files: svdfuse's own, and mergekit's for the methods both tools have.

A file with a `merge_method` key is a mergekit configuration (`svdfuse.mergekit_config` translates
it); any other is svdfuse's, which names every argument of `svdfuse.merge`:

    base: ./base-model
    sources:                       # a path, or {model: PATH, name: LABEL, weight: W}
      - ./ft-task1
      - {model: ./ft-task2, name: task2, weight: 0.5}
    method: ties
    parameters: {density: 0.2}
    k: 0.1
    include: ["encoder.*"]
    exclude: ["*embed*"]
    svd: {method: auto, oversample: 10, power_iters: 3, seed: 0, precision: ieee}
    dtype: float32
    output: ./merged
    shard_size: 2GB
    max_memory: 4GB
    allow_non_finite: false
    format: lora                   # model (default), or a peft LoRA adapter directory as output
    for: vllm                      # with format: lora, loadable by vLLM
    drop_full_modules: false       # with for: vllm, leave whole modules at the base's value
    rank: 16                       # k's other name, as the CLI's -k/--rank (a LoRA output's rank)

A source may be a peft LoRA adapter directory of `base`, alone or beside full fine-tunes.

The file is read within the bounds of `svdfuse.config_file` (it may come from anyone); both
dialects are validated by strict pydantic schemas before any model is opened (a value of another
type is refused, never converted): an error names the file and the key path (`merge.yaml:
sources[1].weight: ...`). Paths are taken as written, relative to the current directory, as
mergekit does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from svdfuse import arguments
from svdfuse.config_file import DTYPES, ConfigError, DtypeName, MergeRequest, PathText, read_yaml, schema_error, shown
from svdfuse.mergekit_config import translate
from svdfuse.merging import merge
from svdfuse.methods import METHODS, Method, get_method
from svdfuse.ops import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_PRECISION, SVDOptions
from svdfuse.plan import DEFAULT_EXCLUDE
from svdfuse.reference import PRECISIONS
from svdfuse.sinks import parse_size

__all__ = ["ConfigError", "MergeRequest", "load_config", "merge_config"]


class _Strict(BaseModel):
    # strict: a value of another type is refused, not converted (`k: true` is not k = 1)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SVDConfig(_Strict):
    """`svdfuse.SVDOptions` as written in a configuration."""

    method: Literal["auto", "exact", "randomized"] = "auto"
    oversample: int = Field(DEFAULT_OVERSAMPLE, ge=0)
    power_iters: int = Field(DEFAULT_POWER_ITERS, ge=0)
    seed: int = 0
    precision: Literal[PRECISIONS] = DEFAULT_PRECISION  # type: ignore[valid-type]


class SourceConfig(_Strict):
    """One source: its path, an optional label for the report, an optional per-source weight."""

    model: PathText
    name: str | None = Field(None, max_length=200)
    weight: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _a_path_alone(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"model": data}
        if not isinstance(data, dict):
            raise ValueError(f"expected a path or {{model: PATH, name: LABEL, weight: W}}, found {type(data).__name__} {shown(data)}")
        return data


class SvdfuseConfig(_Strict):
    """svdfuse's own configuration: every argument of `svdfuse.merge`."""

    base: PathText
    sources: list[SourceConfig] = Field(min_length=1)
    method: str = "axis"
    k: Any = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    svd: SVDConfig = SVDConfig()
    dtype: DtypeName | None = None
    device: str | None = Field(None, max_length=64)
    output: PathText | None = None
    shard_size: Any = "5GB"
    max_memory: Any = None
    allow_non_finite: bool = False
    format: Literal["model", "lora"] = "model"
    for_: Literal["vllm"] | None = Field(None, alias="for")
    drop_full_modules: bool = False
    rank: Any = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown merge method {shown(method)}; known: {', '.join(sorted(METHODS))}")
        return method

    @field_validator("k", "rank")
    @classmethod
    def _a_count(cls, k: Any) -> Any:
        # the API's own rule: an int or a float fraction, never a bool or a str
        if k is not None:
            try:
                arguments.count(k, "k")
            except TypeError:
                raise ValueError(f"expected an int (components) or a float fraction of min(m, n), found {type(k).__name__} {shown(k)}") from None
        return k

    @field_validator("shard_size", "max_memory")
    @classmethod
    def _a_size(cls, value: Any, info: ValidationInfo) -> Any:
        # merge's own rule (4GB, 512MiB, bytes), on a value short enough to quote
        if isinstance(value, str) and len(value) > 40:
            raise ValueError(f"expected a size such as 4GB or 512MiB, found {shown(value)}")
        if value is not None:
            try:
                parse_size(value, info.field_name)
            except (TypeError, ValueError) as err:
                raise ValueError(str(err).removeprefix(f"{info.field_name} ")) from None
        return value

    @model_validator(mode="after")
    def _parameters_fit_the_method(self) -> "SvdfuseConfig":
        method = get_method(self.method)
        accepted = method.params()
        unknown = sorted(set(self.parameters) - set(accepted))
        if unknown:
            listed = ", ".join(f"{k} (default {getattr(v, 'value', v)!r})" for k, v in accepted.items()) or "none"
            raise ValueError(f"method {self.method!r} has no parameter {shown(unknown[0])}; its parameters: {listed}")
        _check_values(method, self.parameters)
        weighted = [i for i, s in enumerate(self.sources) if s.weight is not None]
        if weighted and "weights" not in accepted:
            raise ValueError(f"sources[{weighted[0]}].weight: method {self.method!r} takes no per-source weights")
        if weighted and "weights" in self.parameters:
            raise ValueError("give per-source weights either as sources[i].weight or as parameters.weights, not both")
        if self.k is not None and self.rank is not None:
            raise ValueError("give k or rank (its other name, as the CLI's -k/--rank), not both")
        if method.needs_k and self.k is None and self.rank is None:
            raise ValueError(f"method {self.method!r} needs k, the number of components kept per matrix (int or fraction)")
        self._lora_output()
        return self

    def _lora_output(self) -> None:
        """The LoRA output's keys by `svdfuse.merge`'s rules, named as this file's keys."""
        if self.format != "lora" and (self.for_ is not None or self.drop_full_modules):
            given = "for" if self.for_ is not None else "drop_full_modules"
            raise ValueError(f"{given}: shapes a LoRA output; add format: lora")
        if self.drop_full_modules and self.for_ is None:
            raise ValueError("drop_full_modules: is for `for: vllm`; a plain adapter keeps whole modules in modules_to_save")
        if self.format == "lora" and self.output is not None and Path(self.output).suffix == ".safetensors":
            raise ValueError(f"output: format: lora writes a new adapter directory, found {shown(self.output)}")


def _check_values(method: Method, parameters: dict[str, Any]) -> None:
    """A method's parameters as the API checks them; one value each (a list of finite numbers for
    `weights`, a choice of a few characters for a str), so no message ever quotes a whole structure."""
    for name, value in parameters.items():
        if name == "weights":
            if not isinstance(value, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in value):
                raise ValueError(f"parameters.weights: expected a list of finite numbers, one per source, found {shown(value)}")
            continue
        one_value = value is None or isinstance(value, (bool, int, float)) or isinstance(value, str) and len(value) <= 40
        if not one_value:
            raise ValueError(f"parameters.{name}: expected one number, flag or choice, found {type(value).__name__} {shown(value)}")
    try:
        method.check_params({name: value for name, value in parameters.items() if name != "weights"})
    except (TypeError, ValueError) as err:
        raise ValueError(f"parameters: {err}") from None


def _labelled(entries: list[tuple[str, str | None]], path: Path) -> list[str] | dict[str, str]:
    """The sources as `svdfuse.merge` takes them: a list, or label -> path when any is named."""
    if all(name is None for _, name in entries):
        return [model for model, _ in entries]
    models: dict[str, str] = {}
    for i, (model, name) in enumerate(entries):
        label = name or model
        if label in models:
            raise ConfigError(f"{path}: sources[{i}]: {shown(label)} appears twice; give each source a distinct name")
        models[label] = model
    return models


def _native(raw: dict, path: Path, text: str) -> MergeRequest:
    try:
        config = SvdfuseConfig.model_validate(raw)
    except ValidationError as err:
        raise schema_error(path, err) from None
    entries = [(s.model, s.name) for s in config.sources]
    params = dict(config.parameters)
    if any(s.weight is not None for s in config.sources):
        # a source without a weight counts once, as in an unweighted merge
        params["weights"] = [1.0 if s.weight is None else s.weight for s in config.sources]
    kwargs = dict(
        k=config.k if config.rank is None else config.rank, base=config.base, method=config.method, include=config.include, exclude=tuple(config.exclude),
        svd=SVDOptions(**config.svd.model_dump()), dtype=DTYPES[config.dtype] if config.dtype else None,
        device=config.device, output=config.output, max_memory=config.max_memory, shard_size=config.shard_size,
        allow_non_finite=config.allow_non_finite, save_format="lora" if config.format == "lora" else "auto", serve=config.for_,
        drop_full_modules=config.drop_full_modules, **params,
    )
    return MergeRequest(_labelled(entries, path), kwargs, text)


def load_config(path: str | os.PathLike) -> MergeRequest:
    """Read and validate a svdfuse or mergekit YAML configuration; nothing is opened or merged.

    Raises:
        ConfigError: the file is not a regular UTF-8 YAML text file within the bounds of
            `svdfuse.config_file`, or a key is unknown, missing, given twice, of the wrong type or
            not supported; the message names the file and the key path.
    """
    path = Path(path)
    raw, text = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (base, sources, method, ...), found {type(raw).__name__}")
    if "merge_method" in raw:
        return translate(raw, path, text)
    return _native(raw, path, text)


def merge_config(
    path: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
):
    """Run the merge a YAML configuration describes: svdfuse's own keys or a mergekit config.

    Args:
        path: the configuration file (module docstring of `svdfuse.config` for the keys; a file
            with `merge_method` is read as a mergekit 0.1.5 config).
        output: where to write the merge (overrides the file's `output`); without either, the
            merge is returned in memory.
        device: compute device (overrides the file's `device`).
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        What `svdfuse.merge` returns: a `MergeResult`, or the `MergeReport` of what was written.

    Example::

        report = svdfuse.merge_config("ties.yaml", output="merged/")
    """
    request = load_config(path)
    kwargs = dict(request.kwargs)
    if output is not None:
        kwargs["output"] = str(output)
    if device is not None:
        kwargs["device"] = device
    return merge(request.models, progress=progress, config_text=request.text, **kwargs)
