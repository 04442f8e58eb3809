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

Both are validated by pydantic schemas before any model is opened: an error names the file and
the key path (`merge.yaml: sources[1].weight: ...`). Paths are taken as written, relative to the
current directory, as mergekit does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from svdfuse.methods import METHODS, get_method
from svdfuse.ops import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_PRECISION, SVDOptions
from svdfuse.plan import DEFAULT_EXCLUDE
from svdfuse.reference import PRECISIONS

__all__ = ["ConfigError", "MergeRequest", "load_config", "merge_config"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DtypeName = Literal["float32", "float16", "bfloat16", "float64"]


class ConfigError(ValueError):
    """A configuration file that cannot be run: says which file, which key, what was expected."""


def key_path(loc: tuple) -> str:
    """('sources', 1, 'weight') -> 'sources[1].weight'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def schema_error(path: Path, error: ValidationError) -> ConfigError:
    """One line per problem, each naming the file and the key path."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{path}: {key_path(item['loc'])}: {message}" if item["loc"] else f"{path}: {message}")
    return ConfigError("\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SVDConfig(_Strict):
    """`svdfuse.SVDOptions` as written in a configuration."""

    method: Literal["auto", "exact", "randomized"] = "auto"
    oversample: int = Field(DEFAULT_OVERSAMPLE, ge=0)
    power_iters: int = Field(DEFAULT_POWER_ITERS, ge=0)
    seed: int = 0
    precision: Literal[PRECISIONS] = DEFAULT_PRECISION  # type: ignore[valid-type]


class SourceConfig(_Strict):
    """One source: its path, an optional label for the report, an optional per-source weight."""

    model: str
    name: str | None = None
    weight: float | None = Field(None, allow_inf_nan=False)


class SvdfuseConfig(_Strict):
    """svdfuse's own configuration: every argument of `svdfuse.merge`."""

    base: str
    sources: list[str | SourceConfig] = Field(min_length=1)
    method: str = "axis"
    k: int | float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    svd: SVDConfig = SVDConfig()
    dtype: DtypeName | None = None
    device: str | None = None
    output: str | None = None
    shard_size: int | str = "5GB"
    max_memory: int | str | None = None
    allow_non_finite: bool = False

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown merge method {method!r}; known: {', '.join(sorted(METHODS))}")
        return method

    @model_validator(mode="after")
    def _parameters_fit_the_method(self) -> "SvdfuseConfig":
        accepted = get_method(self.method).params()
        unknown = sorted(set(self.parameters) - set(accepted))
        if unknown:
            listed = ", ".join(f"{k} (default {v!r})" for k, v in accepted.items()) or "none"
            raise ValueError(f"method {self.method!r} has no parameter {unknown[0]!r}; its parameters: {listed}")
        weighted = [i for i, s in enumerate(self.sources) if isinstance(s, SourceConfig) and s.weight is not None]
        if weighted and "weights" not in accepted:
            raise ValueError(f"sources[{weighted[0]}].weight: method {self.method!r} takes no per-source weights")
        if weighted and "weights" in self.parameters:
            raise ValueError("give per-source weights either as sources[i].weight or as parameters.weights, not both")
        if get_method(self.method).needs_k and self.k is None:
            raise ValueError(f"method {self.method!r} needs k, the number of components kept per matrix (int or fraction)")
        return self


@dataclass
class MergeRequest:
    """What a configuration asks `svdfuse.merge` to do: the sources (label -> path) and the
    keyword arguments, plus the file's text for the model card."""

    models: list[str] | dict[str, str]
    kwargs: dict[str, Any]
    text: str
    notes: list[str] = field(default_factory=list)


def _labelled(entries: list[tuple[str, str | None]], path: Path) -> list[str] | dict[str, str]:
    """The sources as `svdfuse.merge` takes them: a list, or label -> path when any is named."""
    if all(name is None for _, name in entries):
        return [model for model, _ in entries]
    models: dict[str, str] = {}
    for i, (model, name) in enumerate(entries):
        label = name or model
        if label in models:
            raise ConfigError(f"{path}: sources[{i}]: {label!r} appears twice; give each source a distinct name")
        models[label] = model
    return models


def _native(raw: dict, path: Path, text: str) -> MergeRequest:
    try:
        config = SvdfuseConfig.model_validate(raw)
    except ValidationError as err:
        raise schema_error(path, err) from None
    entries = [(s, None) if isinstance(s, str) else (s.model, s.name) for s in config.sources]
    params = dict(config.parameters)
    if any(isinstance(s, SourceConfig) and s.weight is not None for s in config.sources):
        # a source without a weight counts once, as in an unweighted merge
        params["weights"] = [1.0 if isinstance(s, str) or s.weight is None else s.weight for s in config.sources]
    kwargs = dict(
        k=config.k, base=config.base, method=config.method, include=config.include, exclude=tuple(config.exclude),
        svd=SVDOptions(**config.svd.model_dump()), dtype=DTYPES[config.dtype] if config.dtype else None,
        device=config.device, output=config.output, max_memory=config.max_memory, shard_size=config.shard_size,
        allow_non_finite=config.allow_non_finite, **params,
    )
    return MergeRequest(_labelled(entries, path), kwargs, text)


def load_config(path: str | os.PathLike) -> MergeRequest:
    """Read and validate a svdfuse or mergekit YAML configuration; nothing is opened or merged.

    Raises:
        ConfigError: the file is not YAML, or a key is unknown, missing, of the wrong type or not
            supported; the message names the file and the key path.
    """
    path = Path(path)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (base, sources, method, ...), found {type(raw).__name__}")
    if "merge_method" in raw:
        from svdfuse.mergekit_config import translate

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
    import svdfuse

    request = load_config(path)
    kwargs = dict(request.kwargs)
    if output is not None:
        kwargs["output"] = str(output)
    if device is not None:
        kwargs["device"] = device
    return svdfuse.merge(request.models, progress=progress, config_text=request.text, **kwargs)
