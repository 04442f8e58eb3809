"""Merges and Stage-2 adaptations as peft LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

A merged matrix `W = W0 + U diag(σ) Vᵀ` is a LoRA update of rank k as it stands: `lora_A = Vᵀ`
(k, n), `lora_B = U diag(σ)` (m, k), `lora_alpha = r`, so peft's scale alpha / r is 1. A Stage-2
task changes only σ, so the adapters of several tasks of one merge share `lora_A` bit for bit and
differ in `lora_B`. Every other tensor the merge changed must reach the adapter too:

- the bias of a layer with a LoRA update, as `lora_B`'s bias (`lora_bias`: merged − base);
- every other changed tensor (LayerNorms, an averaged embedding table), through its module in
  `modules_to_save` (peft keeps one copy of it per adapter);
- a changed tensor held by a module that also holds LoRA updates (open_clip's
  `positional_embedding`, on the whole vision tower) or by the model itself: no adapter can hold
  it, and the export refuses, naming it (`approximate=True` leaves it at the base's value).

peft's LoRA covers `nn.Linear`, `nn.Conv1d/2d/3d` (not grouped, not dilated, zero padding: its
`lora_A` conv takes only the base's kernel size, stride and padding, and it cannot merge a grouped
one) and `nn.Embedding`. An `nn.MultiheadAttention` is refused: peft 0.21's LoRA for it adds the
out-projection update twice (in the forward and in `merge_and_unload`), so no adapter reproduces
the merge there. Nothing here imports peft.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tabulate import tabulate
from torch import Tensor, nn

from svdfuse import linalg
from svdfuse.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from svdfuse.lora_out import Update, for_vllm, peft_config, peft_factors
from svdfuse.nn.attention import SVDMultiheadAttention
from svdfuse.nn.conv import SVDConv
from svdfuse.nn.convert import materialize, svd_layers
from svdfuse.nn.layers import SVDLinear, SVDWeight
from svdfuse.merging import MERGE_METADATA
from svdfuse.plan import DEFAULT_EXCLUDE, matches_any, resolve_rank
from svdfuse.result import MergeResult
from svdfuse.sinks import check_output, discard, publish, temporary
from svdfuse.sources import ComponentCache, MappingSource, ModelLike, Source, SourceError, open_source, short_repr, untrusted_json

__all__ = ["LoraReport", "export_lora", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

_PREFIX = PEFT_PREFIX

# name -> (U (m, r), S (r,), V (n, r)): a weight's update U diag(S) Vᵀ, in its matrix shape.
Factors = dict[str, tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class LoraReport:
    """One written adapter.

    Attributes:
        path: the adapter directory.
        r: the config's rank (the most common one; others in its `rank_pattern`).
        targets: module name -> its LoRA rank.
        modules_to_save: modules copied whole into the adapter.
        lora_bias: whether `lora_B` carries the bias updates.
        approximated: tensor name -> relative error (Frobenius) of what the adapter holds for it;
            empty unless `approximate=True` had to truncate or drop something.
    """

    path: Path
    r: int
    targets: dict[str, int]
    modules_to_save: list[str]
    lora_bias: bool
    approximated: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        ranks = Counter(self.targets.values())
        lines = [
            f"wrote {self.path}: LoRA r={self.r} on {len(self.targets)} modules"
            + (f" (ranks {', '.join(f'{r}: {c}' for r, c in sorted(ranks.items()))})" if len(ranks) > 1 else "")
            + (", with their bias updates" if self.lora_bias else "")
            + f"; {len(self.modules_to_save)} modules to save"
        ]
        if self.approximated:
            rows = sorted(self.approximated.items(), key=lambda item: -item[1])
            lines.append(tabulate([(k, f"{e:.3g}") for k, e in rows[:12]], headers=("approximated tensor", "relative error")))
        return "\n".join(lines)


@dataclass
class _Merged:
    """A merge as the export sees it: updates of matrices, and the final value of other tensors."""

    factors: Factors  # base weight name -> update factors
    frozen: dict[str, Tensor]  # base weight name -> what the update is added to (must be the base's)
    tensors: dict[str, Tensor]  # every other tensor's merged value (a missing one is the base's)
    label: str
    # weight name -> relative norm of the update beyond its factors, where the reader measured it
    # (a dense merged model); elsewhere it is what `frozen` adds to the base
    off_rank: dict[str, float] = field(default_factory=dict)


def export_lora(
    merged: MergeResult | nn.Module | ModelLike | Mapping[str, MergeResult | nn.Module],
    output: str | os.PathLike,
    *,
    base: nn.Module | str | os.PathLike,
    rank: int | float | None = None,
    approximate: bool = False,
    device: torch.device | str | None = None,
    serve: str | None = None,
    drop_full_modules: bool = False,
) -> LoraReport | dict[str, LoraReport]:
    """Write a merge, or Stage-2 adaptations of one, as peft LoRA adapters of `base`.

    `PeftModel.from_pretrained(base, output)` then computes the merged model (within fp32
    rounding), and `merge_and_unload()` gives its state dict. Target modules are named by their
    full names in `base`; a rank that differs from `r` goes in `rank_pattern` (and `alpha_pattern`,
    alpha = rank, so every scale is 1). See the module docstring for what is representable.

    Args:
        merged: what to export:
            - a `MergeResult` (its factors are the adapter, exactly);
            - a module from `result.to_module(base)`, adapted by `svdfuse.adapt` or not (its σ
              folded into `lora_B`);
            - a name -> result-or-module mapping: one adapter per name, written to
              `output/NAME/`, to load side by side (`PeftModel.from_pretrained(base,
              output/"a", adapter_name="a")`, `load_adapter(output/"b", adapter_name="b")`);
            - a dense merged model (a `.safetensors` file or Hugging Face directory, e.g. from
              `svdfuse merge -o`, a state dict, or a module without svdfuse layers): each changed
              matrix is decomposed again, `W − W0` to its rank (see `rank`).
        output: a new directory.
        base: the pre-trained model as an `nn.Module` (its module types decide each update's
            layout), or a Hugging Face directory (loaded with transformers, as its config's
            architecture).
        rank: for a dense merged model only: components per matrix, an int (at most min(m, n)
            of every changed matrix) or a fraction of min(m, n). Default: the ranks `svdfuse
            merge` recorded in the file (without them, the changed weights a merge would take as
            matrices, embedding tables excluded, at `rank`). Below a recorded rank only with
            `approximate=True`.
        approximate: allow an adapter that does not reproduce the merge: a matrix whose merged
            update is not of rank k (a merge by a method other than AXIS keeps a dense residual
            beyond the top-k components) becomes its best rank-k approximation, and a changed
            tensor no adapter can hold keeps the base's value. The report gives each one's error.
        device: where to decompose dense merged models (default: CUDA when available).
        serve: "vllm" makes every adapter loadable by vLLM's multi-LoRA loader: one rank for all
            its modules, padded with zero components to the next of its `max_lora_rank` values,
            and no whole modules or lora_B biases (refused, or with `drop_full_modules` left at
            the base's value with a warning).

    Returns:
        A `LoraReport`, or for a mapping a name -> `LoraReport` dict.

    Raises:
        ValueError: naming the tensor or module that an adapter cannot represent, and why; a
            rank it cannot honour; a merged tensor with NaN or inf; a base other than the one
            `svdfuse merge` recorded.

    Example::

        result = svdfuse.merge(sources, k=8, base=base_model)
        svdfuse.export_lora(result, "adapter", base=base_model)
        svdfuse.export_lora({"sst2": model_sst2, "imdb": model_imdb}, "adapters", base=base_model)
    """
    output = Path(output)
    check_output(output)
    if serve not in (None, "vllm") or (drop_full_modules and serve is None):
        raise ValueError(f"export_lora: serve must be None or 'vllm', and drop_full_modules goes with serve='vllm'; found serve={serve!r}, drop_full_modules={drop_full_modules!r}")
    if rank is not None:
        resolve_rank(rank, 1, 1, "rank")  # its type, sign and fraction range, before the base is loaded
    tasks = isinstance(merged, Mapping) and not _is_state_dict(merged)
    if tasks:
        if not merged:
            raise ValueError("export_lora: the mapping of tasks is empty")
        for name in merged:
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise ValueError(f"export_lora: task names become directory names, found {short_repr(name)}")
            check_output(output / name)  # a NUL byte, a name too long for the file system: before any work
    module, name_or_path = _base_module(base)
    base_state = {key: t.detach().cpu() for key, t in module.state_dict().items()}
    if tasks:
        built = {name: _build(_read(m, base, base_state, rank, approximate, device, f"task {name!r}"), module, base_state, approximate) for name, m in merged.items()}
    else:
        built = {None: _build(_read(merged, base, base_state, rank, approximate, device, "merged"), module, base_state, approximate)}
    reports: dict = {}
    tmp = temporary(output, directory=True)
    try:
        for name, (config, tensors, report) in built.items():
            where = tmp if name is None else tmp / name
            where.mkdir(exist_ok=True)
            config["base_model_name_or_path"] = name_or_path
            if serve == "vllm":
                config, tensors = for_vllm(config, tensors, drop_full_modules=drop_full_modules, where="export_lora")
            (where / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(tensors, str(where / ADAPTER_WEIGHTS), metadata={"format": "pt", "svdfuse": "lora-export"})
            written = report(output if name is None else output / name)
            if serve == "vllm":  # padded: every module at the config's rank, nothing whole
                written = replace(written, r=config["r"], targets=dict.fromkeys(written.targets, config["r"]), modules_to_save=[], lora_bias=False)
            reports[name] = written
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, output)
    return reports[None] if None in reports else reports


def _is_state_dict(value: Mapping) -> bool:
    return any(isinstance(v, Tensor) for v in value.values())


def _base_module(base: nn.Module | str | os.PathLike) -> tuple[nn.Module, str | None]:
    """The base as a module, and the name peft's config records for it."""
    if isinstance(base, nn.Module):
        return base, getattr(base, "name_or_path", None) or None
    if not isinstance(base, (str, os.PathLike)) or not Path(base).is_dir():
        raise TypeError(
            f"export_lora: base must be an nn.Module or a Hugging Face model directory, found {base!r}: a LoRA "
            "adapter is laid out by module type (Linear, Conv, Embedding), which a weights file does not record"
        )
    path = Path(base)
    if not (path / "config.json").is_file():
        raise ValueError(f"export_lora: base directory {str(path)!r} has no config.json; pass the base as an nn.Module")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("export_lora: loading a base directory needs transformers (pip install svdfuse[hf])") from err
    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    model = (cls or transformers.AutoModel).from_pretrained(path)
    return model.eval(), str(path)


def _read(merged, base, base_state: dict[str, Tensor], rank, approximate: bool, device, label: str) -> _Merged:
    if isinstance(merged, MergeResult):
        if rank is not None:
            raise ValueError(f"export_lora: {label} is a MergeResult, whose ranks are its merge's k; rank= is for dense merged models")
        cpu = lambda tensors: {key: t.detach().cpu() for key, t in tensors.items()}  # noqa: E731
        factors = {key: tuple(t.detach().cpu() for t in usv) for key, usv in merged.components.items()}
        return _Merged(factors, cpu(merged.frozen), cpu(merged.tensors), label)  # type: ignore[arg-type]
    if isinstance(merged, nn.Module) and any(True for _ in svd_layers(merged)):
        if rank is not None:
            raise ValueError(f"export_lora: {label} holds svdfuse layers, whose ranks are their merge's k; rank= is for dense merged models")
        return _from_module(merged, label)
    return _from_dense(merged, base, base_state, rank, approximate, device, label)


def _from_module(model: nn.Module, label: str) -> _Merged:
    """Factors and frozen weights of every svdfuse layer under the base's weight names; the other
    tensors from a dense copy."""
    modules = dict(model.named_modules())
    factors: Factors = {}
    frozen: dict[str, Tensor] = {}
    for name, layer in svd_layers(model):
        S = layer.S.detach()
        if S.dim() != 1:
            raise ValueError(
                f"export_lora: {label}: {name!r} holds a σ bank of {S.shape[0]} tasks (a model from stack_tasks); export "
                "the single-task models it was stacked from, as a name -> model mapping"
            )
        parent_name, _, attr = name.rpartition(".")
        if isinstance(layer, SVDWeight):  # owner.parametrizations.ATTR.0
            owner = parent_name.rpartition(".")[0].rpartition(".")[0]
            attr = parent_name.rpartition(".")[2]
            key = f"{owner}.{attr}" if owner else attr
            weight0 = modules[owner].parametrizations[attr].original
        elif isinstance(modules.get(parent_name), SVDMultiheadAttention):
            key = f"{parent_name}.in_proj_weight" if attr == "in_proj" else f"{name}.weight"
            weight0 = layer.weight0
        else:
            key = f"{name}.weight"
            weight0 = layer.weight0 if isinstance(layer, SVDLinear) else layer.base.weight
        assert isinstance(layer, (SVDLinear, SVDConv, SVDWeight))
        factors[key] = (layer.U.detach().cpu(), S.cpu(), layer.V.detach().cpu())
        frozen[key] = weight0.detach().cpu()
    dense = materialize(copy.deepcopy(model)).state_dict()
    return _Merged(factors, frozen, {k: v.detach().cpu() for k, v in dense.items() if k not in factors}, label)


def _from_dense(merged: ModelLike, base, base_state: dict[str, Tensor], rank, approximate: bool, device, label: str) -> _Merged:
    """Decompose each changed matrix of a dense merged model again, `W − W0`, at its rank."""
    from svdfuse import ops
    from svdfuse.resources import default_device

    if isinstance(merged, nn.Module):
        merged = merged.state_dict()
    source = open_source(merged, label)
    if isinstance(source, ComponentCache):
        raise SourceError(f"{source.label}: is a component cache (one source's factors, for merging), not a merged model; export the merge")
    missing = [key for key in base_state if key not in source]
    if missing:
        raise SourceError(f"{source.label}: has no tensor {missing[0]!r} of the base ({len(missing)} of its tensors are missing)")
    record = _merge_record(source)
    _check_base(source, record, base, base_state)
    ranks, tensors = _dense_ranks(source, base_state, record.get("ranks", {}), rank, approximate)
    device = torch.device(device) if device is not None else default_device()
    factors: Factors = {}
    frozen: dict[str, Tensor] = {}
    off_rank: dict[str, float] = {}
    for key, r in ranks.items():
        W, W0 = source.get(key), base_state[key]
        m, n = W.shape[0], W[0].numel()
        W64, W064 = W.reshape(m, n).to(device, torch.float64), W0.reshape(m, n).to(device, torch.float64)
        U, S, V = ops.truncated_svd(W64, r, base=W064)
        factors[key] = (U.cpu(), S.cpu(), V.cpu())
        rest = W64 - (U * S) @ V.T  # W0 plus what the factors leave out
        residual = torch.linalg.norm(rest - W064).item()
        # The merged weight was rounded once to its dtype: |fl(w) − w| <= eps/2·|w| per entry, so a
        # merge of rank r is off rank r by at most eps/2·‖W‖_F. More than eps·‖W‖_F is a real tail.
        rounding = torch.finfo(W.dtype).eps * torch.linalg.norm(W64).item()
        off_rank[key] = 0.0 if residual <= rounding else residual / torch.linalg.norm(W64 - W064).item()
        if off_rank[key]:
            frozen[key] = rest.cpu().reshape(W0.shape)
    return _Merged(factors, frozen, tensors, source.label, off_rank)


def _merge_record(source: Source) -> dict:
    """What `svdfuse merge` recorded in the file (nothing: `{}`), checked as untrusted input: a
    JSON object whose ranks map matrix names to positive ints and whose base digest is a string."""
    text = getattr(source, "metadata", {}).get(MERGE_METADATA, "{}")
    try:
        record = untrusted_json(text)
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        ranks = record.get("ranks", {})
        if not isinstance(ranks, dict) or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks.values()):
            raise ValueError(f"ranks {short_repr(ranks)}, not a map of matrix names to positive ints")
        if "base_sha256" in record and not isinstance(record["base_sha256"], str):
            raise ValueError(f"base_sha256 {short_repr(record['base_sha256'])}, not a string")
    except ValueError as err:
        raise SourceError(f"{source.label}: its {MERGE_METADATA!r} metadata is damaged ({err}); export the file svdfuse merge wrote") from None
    return record


def _check_base(source: Source, record: dict, base, base_state: dict[str, Tensor]) -> None:
    """Refuse a base other than the one `svdfuse merge` recorded (by the digest of its merged
    matrices): `W − W0` against another `W0` is no update of the merge."""
    if "base_sha256" not in record:
        return  # written before merges recorded their base, or by another tool
    if isinstance(base, nn.Module):
        found = MappingSource("base", {key: base_state[key] for key in record["ranks"] if key in base_state})
    else:
        found = open_source(base, "base")
    if any(key not in found for key in record["ranks"]) or found.digest(record["ranks"], quick=True) != record["base_sha256"]:
        raise SourceError(
            f"{source.label}: was merged against another base (recorded as {record.get('base')!r}): {found.label} differs in the "
            f"content or dtype of the {len(record['ranks'])} matrices it was merged against; export with the base it was merged against"
        )


def _dense_ranks(source: Source, base_state: dict[str, Tensor], recorded: dict, rank, approximate: bool) -> tuple[dict[str, int], dict[str, Tensor]]:
    """(changed matrix -> its adapter rank, every other changed tensor -> its merged value), every
    tensor checked before any decomposition: shape, finite values, the rank against the matrix
    and against the merge's recorded rank."""
    ranks: dict[str, int] = {}
    tensors: dict[str, Tensor] = {}
    for key, W0 in base_state.items():
        W = source.get(key)
        if tuple(W.shape) != tuple(W0.shape):
            raise SourceError(f"{source.label}: {key!r} has shape {tuple(W.shape)}, the base has {tuple(W0.shape)}")
        if torch.equal(W, W0.to(W.dtype)):
            continue
        if W.is_floating_point() and not linalg.all_finite(W):
            bad = W.numel() - int(torch.isfinite(W).sum())
            raise SourceError(f"{source.label}: {key!r} {tuple(W.shape)} holds {bad} non-finite values (NaN or inf) of {W.numel()}; no adapter reproduces it")
        # Without recorded ranks, what `svdfuse merge` would merge as matrices (embedding tables are not).
        matrix = key in recorded if recorded else W.dim() >= 2 and key.endswith("weight") and not matches_any(key, DEFAULT_EXCLUDE)
        if not matrix:
            tensors[key] = W
            continue
        m, n = W.shape[0], W[0].numel()
        merged_rank = int(recorded[key]) if key in recorded else None
        if rank is not None:
            r = resolve_rank(rank, m, n, f"{key}: rank")
        elif merged_rank is not None:
            r = merged_rank
        else:
            raise ValueError(
                f"export_lora: {source.label} records no rank for {key!r} (it was not written by svdfuse merge, or merged "
                "without k), so the adapter's rank is unknown: pass rank= (--rank), an int or a fraction of min(m, n)"
            )
        if r > min(m, n):
            raise ValueError(f"export_lora: {source.label}: rank {r} is more than min(m, n) = {min(m, n)} of {key!r} {tuple(W.shape)}")
        if merged_rank is not None and r < merged_rank and not approximate:
            raise ValueError(
                f"export_lora: {source.label}: rank {r} is below the rank {merged_rank} it was merged at ({key!r}), so the adapter "
                f"cannot reproduce it: export at rank {merged_rank} or more, or pass approximate=True (--approximate) for its best rank-{r} approximation"
            )
        ranks[key] = r
    return ranks, tensors


def _build(merged: _Merged, module: nn.Module, base_state: dict[str, Tensor], approximate: bool):
    """(adapter config, adapter tensors, report maker) of one merge."""
    modules = dict(module.named_modules())
    approximated: dict[str, float] = {}
    # A base other than the merge's leaves most of W − W0 beyond any low rank: say so before --approximate.
    far = sum(e > 0.5 for e in merged.off_rank.values())
    other_base = (
        f"{far} of its {len(merged.off_rank)} changed matrices keep a residual above 0.5, so the base is likely not the one it "
        "was merged against: export with that base; if it is, "
    ) if far > len(merged.off_rank) / 2 else ""  # fmt: skip
    updates: dict[str, tuple[str, Update, None, int]] = {}  # module -> (kind, update, None, rank)
    for key, factors in merged.factors.items():
        if key not in base_state:
            raise ValueError(f"export_lora: {merged.label}: the base has no tensor {key!r}; export with the base the merge was made from")
        U, S, V = factors
        W0 = base_state[key]
        error = merged.off_rank[key] if key in merged.off_rank else _off_rank(merged.frozen[key], W0)
        if error:
            if not approximate:
                raise ValueError(
                    f"export_lora: {merged.label}: {key!r} is not of rank {S.shape[0]}: beyond its top {S.shape[0]} components "
                    f"the merged update keeps a residual of relative norm {error:.3g}, which a rank-{S.shape[0]} adapter "
                    f"cannot hold (methods other than AXIS keep it dense); {other_base}merge by AXIS, export at a higher rank, or pass "
                    "approximate=True (--approximate) for the best rank-k approximation"
                )
            U, S, V, error = _best_rank(merged.frozen[key], W0, U, S, V)
            approximated[key] = error
        owner_name, _, attr = key.rpartition(".")
        updates[owner_name] = _layout(modules, owner_name, attr, key, U, S, V)
    changed = {
        key: value for key, value in merged.tensors.items()
        if key in base_state and key not in merged.factors and not torch.equal(value, base_state[key].to(value.dtype))
    }  # fmt: skip
    unknown = [key for key in merged.tensors if key not in base_state]
    if unknown:
        raise ValueError(f"export_lora: {merged.label}: the base has no tensor {unknown[0]!r}; export with the base the merge was made from")
    # Biases of the layers with updates: lora_B's bias, which peft's lora_bias gives every target.
    bias_keys = {f"{name}.bias" for name in updates}
    bias_changed = sorted(key for key in changed if key in bias_keys)
    lora_bias = bool(bias_changed)
    tensors: dict[str, Tensor] = {}
    for name, (kind, update, _, _) in updates.items():
        tensors.update({f"{_PREFIX}{name}.{part}": t for part, t in peft_factors(update).items()})
        B = update.L
        if lora_bias:
            if kind == "embedding" or getattr(modules[name], "bias", None) is None:
                raise ValueError(
                    f"export_lora: {merged.label}: the merge changed the bias of {bias_changed[0].rpartition('.')[0]!r}, which "
                    f"a LoRA adapter carries as lora_B's bias, but peft's lora_bias applies to every target module and "
                    f"{name!r} ({type(modules[name]).__name__}) has none"
                )
            bias0 = base_state[f"{name}.bias"]
            value = changed.get(f"{name}.bias", bias0)
            tensors[f"{_PREFIX}{name}.lora_B.bias"] = (value.double() - bias0.double()).to(B.dtype).contiguous()
    # Every other changed tensor: its module, copied whole, if it holds no update and is not the model.
    owners: dict[str, list[str]] = {}
    for key in changed:
        if key in bias_keys:
            continue
        owners.setdefault(key.rpartition(".")[0], []).append(key)
    to_save: list[str] = []
    for owner, keys in owners.items():
        holds_update = any(name == owner or name.startswith(f"{owner}.") or owner.startswith(f"{name}.") for name in updates)
        if owner and not holds_update:
            to_save.append(owner)
            continue
        if not approximate:
            where = "the model itself" if not owner else f"module {owner!r}, which also holds LoRA updates"
            raise ValueError(
                f"export_lora: {merged.label}: the merge changed {keys[0]!r}, held by {where}; no LoRA adapter can carry it "
                "(peft copies only modules without updates, modules_to_save); merge without changing it (exclude it from "
                "the sources), or pass approximate=True (--approximate) to leave it at the base's value"
            )
        for key in keys:
            approximated[key] = _relative(base_state[key], changed[key])
    to_save = [m for m in to_save if not any(m.startswith(f"{other}.") for other in to_save)]
    for owner in to_save:
        for key, value in modules[owner].state_dict().items():
            full = f"{owner}.{key}"
            tensors[f"{_PREFIX}{full}"] = changed.get(full, merged.tensors.get(full, base_state[full])).contiguous()
    _check_modules_to_save(to_save, list(modules))
    ranks = {name: rank for name, (_, _, _, rank) in updates.items()}
    config = peft_config(ranks, list(modules), modules_to_save=to_save, lora_bias=lora_bias)
    r = config["r"]

    def report(path: Path) -> LoraReport:
        return LoraReport(path, r, ranks, sorted(to_save), lora_bias, approximated)

    return config, tensors, report


def _layout(modules: dict[str, nn.Module], owner_name: str, attr: str, key: str, U: Tensor, S: Tensor, V: Tensor) -> tuple[str, Update, None, int]:
    """(kind, `Update` (L = U diag(S), R = Vᵀ), None, rank) of weight `key`'s update, laid out for its module."""
    owner = modules.get(owner_name)
    parent = modules.get(owner_name.rpartition(".")[0]) if owner_name else None
    rank = S.shape[0]
    kind_name = type(owner).__name__
    if isinstance(owner, nn.MultiheadAttention) or isinstance(parent, nn.MultiheadAttention):
        raise ValueError(
            f"export_lora: {key!r} belongs to an nn.MultiheadAttention, which peft 0.21's LoRA serves wrongly (it adds the "
            "out-projection update twice, in its forward and in merge_and_unload) and cannot target by parameter (both "
            "projections of one module); merge with exclude=['*attn*'] to export the other layers"
        )
    if owner is None or attr != "weight" or owner_name == "":
        raise ValueError(f"export_lora: {key!r} is not the weight of a layer peft's LoRA can adapt (Linear, Conv1d/2d/3d, Embedding)")
    update = lambda kind: (kind, Update(kind, (U * S).contiguous(), V.T.contiguous(), tuple(owner.weight.shape)), None, rank)  # noqa: E731
    if isinstance(owner, nn.Linear):
        return update("linear")
    if type(owner) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        why = []
        if owner.groups != 1:
            why.append(f"groups={owner.groups} (peft cannot merge a grouped conv's update)")
        if any(d != 1 for d in owner.dilation):
            why.append(f"dilation={owner.dilation} (peft's lora_A conv is not dilated)")
        if owner.padding_mode != "zeros":
            why.append(f"padding_mode={owner.padding_mode!r} (peft's lora_A conv pads with zeros)")
        if why:
            raise ValueError(f"export_lora: {key!r}: a LoRA adapter cannot reproduce this {kind_name}'s update: {'; '.join(why)}")
        return update("conv")
    if type(owner) is nn.Embedding:
        return update("embedding")
    raise ValueError(
        f"export_lora: {key!r} belongs to a {kind_name}, which peft's LoRA does not adapt (Linear, Conv1d/2d/3d, Embedding)"
    )


def _off_rank(frozen: Tensor, W0: Tensor) -> float:
    """0 where the frozen part of a merged matrix is the base weight (the update is all of W − W0),
    else the relative norm of what it adds."""
    if torch.equal(frozen.to(W0.dtype), W0):
        return 0.0
    return _relative(W0, frozen)


def _relative(reference: Tensor, value: Tensor) -> float:
    return (torch.linalg.norm((value.double() - reference.double()).flatten()) / max(torch.linalg.norm(reference.double().flatten()).item(), 1e-300)).item()


def _best_rank(frozen: Tensor, W0: Tensor, U: Tensor, S: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """The best rank-k factors of the whole update `frozen − W0 + U diag(S) Vᵀ`, and the relative
    error of keeping only them."""
    m, k = U.shape
    delta = (frozen.double().reshape(m, -1) - W0.double().reshape(m, -1)) + (U.double() * S.double()) @ V.double().T
    Uf, Sf, Vh = linalg.svd(delta)
    error = (torch.linalg.norm(Sf[k:]) / max(torch.linalg.norm(Sf).item(), 1e-300)).item()
    dtype = U.dtype
    return Uf[:, :k].to(dtype), Sf[:k].to(dtype), Vh[:k].T.to(dtype), error


def _check_modules_to_save(to_save: list[str], names: list[str]) -> None:
    """peft copies every module whose name ends in a listed one (no regex form): each must find exactly the module meant."""
    for name in to_save:
        extra = [n for n in names if n != name and n.endswith(name)]
        if extra:
            raise ValueError(f"export_lora: module to save {name!r} would also make peft copy {extra[0]!r}, whose name ends in it")
