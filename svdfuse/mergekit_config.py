"""mergekit 0.1.5 configurations, run by svdfuse's methods with mergekit's arithmetic.

Supported `merge_method`s and what runs them (mergekit's rule, in svdfuse's terms):

- `task_arithmetic`: `W0 + λ Σ_i w_i τ_i` -> svdfuse `task_arithmetic(weights=w, scaling=λ)`;
  bit-identical to mergekit in float32.
- `ties`: each τ_i trimmed to its top `density` fraction by magnitude, weighted, sign elected
  from the weighted sum (+1 where it is exactly 0), `λ Σ w_i τ̂_i [agree] / Σ w_i [agree]` ->
  `ties(density, weights, scaling=λ, zero_sign="positive")`. Identical except where several
  entries of one τ_i tie at the trimming threshold: mergekit keeps whichever `torch.argsort`
  happens to put first, svdfuse the first in row-major order (README: "mergekit configs").
- `dare_linear`: each τ_i keeps an entry with probability `density`, `λ Σ_i w_i τ̃_i` -> `dare(
  drop_rate=1 - density, weights, scaling=λ)`. The masks are random in both tools; mergekit
  rescales each source's survivors to the L1 norm of its whole τ_i, svdfuse by 1 / density
  (the DARE paper's rule; equal in expectation). A warning says so when `rescale` is on.
- `linear`: `Σ_i w_i W_i / Σ_i w_i` over the models and `base_model` (mergekit counts it as one
  more input, weighted by `parameters.weight`) -> `task_arithmetic` over the models other than
  the base (`base_model`, or the first model) with weights `w_i / Σ w`, scaling 1: the same
  weighted mean, within float32 rounding (mergekit sums the weights, svdfuse the task vectors).

Keys: `merge_method`, `base_model`, `models: [{model, parameters: {weight, density}}]`,
`parameters` (`weight`, `density` as defaults for every model; `lambda`, `normalize`, `rescale`,
`int8_mask`), `dtype`, `out_dtype`. `weight` is required for every model, as in mergekit.
`normalize` and `rescale` are taken at the value mergekit defaults to for the method (others are
refused: svdfuse's methods have no such variant); `int8_mask` is accepted and has no effect on
the result in mergekit either (it sets the dtype of a sign mask that holds only -1, 0 and 1).
`dtype` casts every tensor (svdfuse accumulates in float32 and rounds once; mergekit computes in
`dtype`, so only float32 merges can be bit-identical). Everything else (`slices`, `modules`,
`tokenizer_source`, `tokenizer`, `chat_template`, gradients and filters as parameter values,
other methods) is refused with the key that asked for it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from svdfuse.config_file import DTYPES, ConfigError, DtypeName, MergeRequest, PathText, key_path, schema_error, shown

__all__ = ["MERGEKIT_METHODS", "translate"]

MERGEKIT_METHODS = ("task_arithmetic", "ties", "dare_linear", "linear")
# mergekit 0.1.5's defaults (merge_methods/registry.py), the only values svdfuse runs.
_NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_linear": False, "linear": True}
_RESCALE = {"task_arithmetic": False, "ties": False, "dare_linear": True}
_UNSUPPORTED = {
    "slices": "svdfuse merges whole models with the same tensors; layer slices are not supported",
    "modules": "svdfuse merges whole models; per-module definitions are not supported",
    "tokenizer_source": "svdfuse copies the base's tokenizer and does not build merged vocabularies",
    "tokenizer": "svdfuse copies the base's tokenizer and does not build merged vocabularies",
    "chat_template": "svdfuse copies the base's tokenizer files as they are",
}
_WHY_NOT = {
    "dare_ties": "svdfuse has no method that drops at random and then elects signs; run dare_linear or ties",
}


class _Strict(BaseModel):
    # strict: a value of another type is refused, not converted (`weight: true` is not 1.0)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class ModelParameters(_Strict):
    """Per-model parameters: a weight and a density."""

    @model_validator(mode="before")
    @classmethod
    def _one_value_each(cls, data: Any) -> Any:
        for key, value in (data.items() if isinstance(data, dict) else ()):
            if isinstance(value, (list, dict)):
                raise ValueError(f"{key_path((key,))}: per-layer gradients and filtered values are not supported; give one number")
        return data

    weight: float | None = Field(None, allow_inf_nan=False)
    density: float | None = Field(None, ge=0.0, le=1.0)


class SharedParameters(ModelParameters):
    """Top-level parameters: defaults for every model's weight and density, and the method's own."""

    lambda_: float | None = Field(None, alias="lambda", allow_inf_nan=False)
    normalize: bool | None = None
    rescale: bool | None = None
    int8_mask: bool | None = None


class InputModel(_Strict):
    model: PathText
    parameters: ModelParameters = ModelParameters()


class MergekitConfig(_Strict):
    """A mergekit 0.1.5 `MergeConfiguration` restricted to what svdfuse runs."""

    merge_method: str
    base_model: PathText | None = None
    models: list[InputModel] = Field(min_length=1)
    parameters: SharedParameters = SharedParameters()
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None

    @model_validator(mode="before")
    @classmethod
    def _supported_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, why in _UNSUPPORTED.items():
                if key in data:
                    raise ValueError(f"key {key!r} is not supported: {why}")
            method = data.get("merge_method")
            if isinstance(method, str) and method not in MERGEKIT_METHODS:
                why = _WHY_NOT.get(method, "svdfuse runs no equivalent")
                raise ValueError(f"merge_method {shown(method)} is not supported ({why}); supported: {', '.join(MERGEKIT_METHODS)}")
        return data

    @model_validator(mode="after")
    def _runnable(self) -> "MergekitConfig":
        method, shared = self.merge_method, self.parameters
        if method != "linear" and self.base_model is None:
            raise ValueError(f"base_model is required by {method}")
        if shared.normalize is not None and shared.normalize != _NORMALIZE[method]:
            raise ValueError(f"parameters.normalize: svdfuse runs {method} with mergekit's default normalize: {str(_NORMALIZE[method]).lower()} only")
        if shared.rescale is not None and shared.rescale != _RESCALE.get(method, shared.rescale):
            raise ValueError(f"parameters.rescale: svdfuse runs {method} with mergekit's default rescale: {str(_RESCALE[method]).lower()} only")
        if shared.rescale is not None and method == "linear":
            raise ValueError("parameters.rescale: linear takes no rescale")
        if shared.lambda_ is not None and method == "linear":
            raise ValueError("parameters.lambda: linear takes no lambda")
        if self.out_dtype is not None and self.out_dtype != (self.dtype or self.out_dtype):
            raise ValueError(f"out_dtype: svdfuse writes in the merge's dtype ({self.dtype}); give out_dtype equal to dtype or leave it out")
        listed = {m.model for m in self.models}
        if method == "linear" and self.base_model is not None and self.base_model not in listed and shared.weight is None:
            raise ValueError(
                "base_model: mergekit's linear averages base_model as one more input and needs its weight; "
                "give parameters.weight, or list it under models with its weight"
            )
        for i, entry in enumerate(self.models):
            if entry.parameters.weight is None and shared.weight is None and not self._is_base(entry.model):
                raise ValueError(f"models[{i}].parameters.weight: {method} requires a weight for every model (mergekit has no default)")
        return self

    def _is_base(self, model: str) -> bool:
        return self.base_model is not None and model == self.base_model and self.merge_method != "linear"

    def density(self) -> float:
        """The one density of all non-base models (mergekit's default 1.0)."""
        values = {m.parameters.density if m.parameters.density is not None else self.parameters.density for m in self.models if not self._is_base(m.model)}
        values = {1.0 if v is None else v for v in values}
        if len(values) > 1:
            raise ValueError(f"models[*].parameters.density: svdfuse trims every source to one density, found {shown(sorted(values))}")
        return values.pop()


def _weight(entry: InputModel, config: MergekitConfig) -> float:
    return entry.parameters.weight if entry.parameters.weight is not None else config.parameters.weight  # type: ignore[return-value]


def translate(raw: dict, path: Path, text: str) -> MergeRequest:
    """The svdfuse merge that reproduces a mergekit configuration (module docstring)."""
    try:
        config = MergekitConfig.model_validate(raw)
        density = config.density() if config.merge_method in ("ties", "dare_linear") else None
    except ValidationError as err:
        raise schema_error(path, err) from None
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    method, shared = config.merge_method, config.parameters
    scaling = 1.0 if shared.lambda_ is None else shared.lambda_
    models = [m for m in config.models if not config._is_base(m.model)]
    notes: list[str] = []
    if method == "linear":
        base = config.base_model or config.models[0].model
        # mergekit averages base_model too, with the default weight, when models does not list it
        total = sum(_weight(m, config) for m in config.models) + (config.parameters.weight if base not in {m.model for m in config.models} else 0.0)
        if total == 0:
            raise ConfigError(f"{path}: models[*].parameters.weight: linear divides by the sum of the weights, which is 0")
        models = [m for m in config.models if m.model != base]
        params: dict[str, Any] = {"scaling": 1.0, "weights": [_weight(m, config) / total for m in models]}
        run = "task_arithmetic"
    else:
        base = config.base_model  # type: ignore[assignment]
        params = {"scaling": scaling, "weights": [_weight(m, config) for m in models]}
        run = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare_linear": "dare"}[method]
        if method == "ties":
            params.update(density=density, zero_sign="positive")
        if method == "dare_linear":
            if density == 0.0:
                raise ConfigError(f"{path}: models[*].parameters.density: dare_linear at density 0 drops every entry; give a density in (0, 1]")
            params.update(drop_rate=1.0 - density, rescale=shared.rescale is not False)
            if shared.rescale is not False and density < 1.0:
                notes.append(
                    "dare_linear: svdfuse rescales the survivors by 1/density (the DARE paper's rule); mergekit 0.1.5 rescales "
                    "each source's survivors to the L1 norm of its whole task vector (equal in expectation); masks are random in both"
                )
    if not models:
        raise ConfigError(f"{path}: models: no model other than the base ({base}) to merge")
    sources = [m.model for m in models]
    twice = [s for s, n in Counter(sources).items() if n > 1]
    if twice:
        raise ConfigError(f"{path}: models: {shown(twice[0])} appears twice")
    for note in notes:
        warnings.warn(f"{path}: {note}", UserWarning, stacklevel=3)
    kwargs = dict(base=base, method=run, dtype=DTYPES[config.dtype] if config.dtype else None, **params)
    return MergeRequest(sources, kwargs, text, notes)

