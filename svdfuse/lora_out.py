"""LoRA out: a merge written as a peft adapter straight from its factors, never through a dense model.

A merged update `U diag(σ) Vᵀ` (AXIS rank k) is `lora_B = U diag(σ)`, `lora_A = Vᵀ` with
`lora_alpha = r` (scale 1); Task Arithmetic of adapters is their exact concatenation
`[λ s_1 B_1 … λ s_T B_T] [A_1; …; A_T]`, or its top-R by the factored SVD. Per-module ranks go
in `rank_pattern`/`alpha_pattern`. A changed bias of an updated layer is `lora_B`'s bias
(`lora_bias`); any other changed tensor's module is saved whole (`modules_to_save`).

`serve="vllm"` makes the adapter loadable by vLLM's multi-LoRA loader: one rank for every
module, padded with zero components up to the next of its `max_lora_rank` values, and no whole
tensors (refused with the reason, or dropped with `drop_full_modules=True` and a warning).
The layout helpers here are also what `svdfuse.export_lora` writes with.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from svdfuse import factored
from svdfuse.plan import resolve_rank
from svdfuse.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoraSource, stack_factors
from svdfuse.sinks import LowRank, discard, publish, temporary
from svdfuse.sources import Source

__all__ = ["VLLM_RANKS", "Update", "LoraSink", "concatenate", "for_vllm", "peft_factors", "peft_config", "vllm_rank", "write_adapter"]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


@dataclass(frozen=True)
class Update:
    """One weight's merged update `L @ R` in its matrix shape: L (m, r), R (r, n); `shape` the
    weight's own; `kind` its layout ("linear", "transposed" for fan_in_fan_out, "embedding", "conv")."""

    kind: str
    L: Tensor
    R: Tensor
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.L.shape[1]


def peft_factors(update: Update) -> dict[str, Tensor]:
    """peft's tensors of one update, named after the module: {"lora_A.weight": A, "lora_B.weight": B}
    (or `lora_embedding_A/B`), so that peft's ΔW is `L @ R` in the weight's layout."""
    L, R, r = update.L.contiguous(), update.R.contiguous(), update.rank
    if update.kind == "linear":
        return {"lora_A.weight": R, "lora_B.weight": L}
    if update.kind == "transposed":  # weight (in, out) = L R; peft: (B A)ᵀ
        return {"lora_A.weight": L.T.contiguous(), "lora_B.weight": R.T.contiguous()}
    if update.kind == "embedding":  # weight (num, dim) = L R; peft: (B A)ᵀ with A (r, num), B (dim, r)
        return {"lora_embedding_A": L.T.contiguous(), "lora_embedding_B": R.T.contiguous()}
    if update.kind == "conv":
        return {"lora_A.weight": R.reshape(r, *update.shape[1:]), "lora_B.weight": L.reshape(*L.shape, *(1,) * (len(update.shape) - 2))}
    raise ValueError(f"unknown LoRA layout {update.kind!r}")


def vllm_rank(r: int, where: str) -> int:
    """The smallest of vLLM's max_lora_rank values that holds rank r."""
    for allowed in VLLM_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"{where}: rank {r} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}; merge at a lower k (or --rank)")


def _refuse_whole(what: list[str], drop_full_modules: bool, where: str) -> None:
    """Changed tensors `what` that only whole modules or lora_bias carry: refused for vLLM, or dropped with a warning."""
    if not drop_full_modules:
        raise ValueError(
            f"{where} for vLLM: the merge changed {len(what)} tensors a LoRA update cannot carry (e.g. {what[:3]}), "
            "which only whole modules (modules_to_save) or lora_bias could; vLLM's LoRA loader takes neither "
            "(no full lm_head or embedding tensors): pass drop_full_modules=True (--drop-full-modules) to leave them at the base's value"
        )
    warnings.warn(f"{where} for vLLM: {len(what)} changed tensors left at the base's value (e.g. {what[:3]})", stacklevel=4)


def for_vllm(config: dict, tensors: dict[str, Tensor], *, drop_full_modules: bool, where: str) -> tuple[dict, dict[str, Tensor]]:
    """A peft adapter (its config and tensors, scale 1 in every module) made loadable by vLLM's
    multi-LoRA loader: every module at one rank, the next of `VLLM_RANKS` above the widest, with
    zero components (lora_A's rows, lora_B's columns); no whole modules or lora_B biases, which
    its loader does not take: refused naming them, or with `drop_full_modules` left at the base's
    value with a warning."""
    whole = [key for key in tensors if ".lora_" not in key or key.endswith(".lora_B.bias")]
    if whole:
        _refuse_whole([key.removeprefix(PEFT_PREFIX) for key in whole], drop_full_modules, where)
        tensors = {key: t for key, t in tensors.items() if key not in whole}
        config = {**config, "modules_to_save": None, "lora_bias": False}
    a_parts = [key for key in tensors if key.endswith(("lora_A.weight", "lora_embedding_A"))]
    if not a_parts:
        return config, tensors
    rank = vllm_rank(max(tensors[key].shape[0] for key in a_parts), f"{where} for vLLM")
    padded = dict(tensors)
    for a_key in a_parts:
        b_key = a_key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        A, B = tensors[a_key], tensors[b_key]
        extra = rank - A.shape[0]
        padded[a_key] = torch.cat([A, A.new_zeros(extra, *A.shape[1:])], 0)
        padded[b_key] = torch.cat([B, B.new_zeros(B.shape[0], extra, *B.shape[2:])], 1)
    return {**config, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}, padded


def target_modules(targets: Sequence[str], names: Sequence[str]) -> list[str] | str:
    """`target_modules` naming exactly `targets`: peft takes a listed name to mean that module or
    any whose name ends in '.' + it, so where that would reach further, a regex it matches whole."""
    wanted = set(targets)
    if any(n not in wanted and n.endswith(f".{target}") for target in targets for n in names):
        return "|".join(re.escape(name) for name in sorted(targets))
    return sorted(targets)


def peft_config(ranks: Mapping[str, int], names: Sequence[str], *, modules_to_save: Sequence[str], lora_bias: bool, fan_in_fan_out: bool = False) -> dict:
    """A peft LoRA config for updates of `ranks` (module -> rank), every scale 1 (alpha = rank).
    `names`: every module name of the base (what a target name must not reach beyond)."""
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    # peft looks a module's rank up as re.match(rf"(.*\.)?({key})$", name): a leading ^ keeps a
    # key from also matching a longer name that ends in it.
    pattern = {f"^{re.escape(name)}": rank for name, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "target_modules": target_modules(list(ranks), names),
        "modules_to_save": sorted(modules_to_save) or None, "lora_dropout": 0.0, "bias": "none", "lora_bias": lora_bias,
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip


def _module_names(keys: Sequence[str]) -> list[str]:
    """Every module name the tensor names imply (each tensor's owner and the owners above it)."""
    names = set()
    for key in keys:
        parts = key.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


def write_adapter(
    output: str | Path,
    updates: Mapping[str, Update],
    changed: Mapping[str, Tensor],
    base: Source,
    *,
    base_name: str | None = None,
    serve: str | None = None,
    drop_full_modules: bool = False,
) -> dict:
    """Write the peft adapter of `updates` (weight name -> `Update`) and `changed` (tensor name ->
    its merged value, where it differs from the base's) to the new directory `output`, all or
    nothing. Returns its config."""
    targets = {key.rpartition(".")[0]: update for key, update in updates.items()}
    bad = [key for key in updates if not key.endswith(".weight") or "." not in key]
    if bad:
        raise ValueError(f"LoRA output: {bad[0]!r} is not a layer's weight; peft's LoRA adapts the weights of Linear, Conv and Embedding layers")
    biases = {key: value for key, value in changed.items() if key.endswith(".bias") and key.rpartition(".")[0] in targets}
    full = {key: value for key, value in changed.items() if key not in biases}
    if serve == "vllm" and (full or biases):  # before the checks of what a LoRA can carry: dropped, they need none
        _refuse_whole(sorted(full) + sorted(biases), drop_full_modules, "LoRA output")
        full, biases = {}, {}
    tensors: dict[str, Tensor] = {}
    for name, update in targets.items():
        tensors.update({f"{PEFT_PREFIX}{name}.{part}": t.contiguous() for part, t in peft_factors(update).items()})
        if biases:
            if update.kind == "embedding" or f"{name}.bias" not in base:
                raise ValueError(f"LoRA output: the merge changed the bias of {next(iter(biases)).rpartition('.')[0]!r}, carried as lora_B's bias, "
                                 f"but peft's lora_bias applies to every target and {name!r} has no bias")  # fmt: skip
            bias0 = base.get(f"{name}.bias").double()
            value = biases.get(f"{name}.bias")
            tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = (torch.zeros_like(bias0) if value is None else value.double() - bias0).to(update.L.dtype)
    owners = sorted({key.rpartition(".")[0] for key in full})
    for owner in owners:
        if not owner or any(name == owner or name.startswith(f"{owner}.") for name in targets):
            key = next(k for k in full if k.rpartition(".")[0] == owner)
            raise ValueError(f"LoRA output: the merge changed {key!r}, held by {'the model itself' if not owner else f'module {owner!r}, which also holds LoRA updates'}; "
                             "no LoRA adapter can carry it (peft saves whole only modules without updates)")  # fmt: skip
        for key in base.keys():
            if key.rpartition(".")[0] == owner:
                tensors[f"{PEFT_PREFIX}{key}"] = (full[key] if key in full else base.get(key)).contiguous()
    names = _module_names(base.keys())
    config = peft_config({name: u.rank for name, u in targets.items()}, names, modules_to_save=owners, lora_bias=bool(biases),
                         fan_in_fan_out=any(u.kind == "transposed" for u in targets.values()))  # fmt: skip
    config["base_model_name_or_path"] = base_name
    if serve == "vllm":
        config, tensors = for_vllm(config, tensors, drop_full_modules=drop_full_modules, where="LoRA output")
    tmp = temporary(Path(output), directory=True)
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "svdfuse": "lora"})
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, Path(output))
    return config


def _wide(source: Source, key: str) -> Tensor:
    """`key` of an adapter's model in float64 (W0 + ΔW not rounded to the base's dtype)."""
    shape = source.meta(key)[0]
    out = torch.empty(shape, dtype=torch.float64)
    source.read(key, 0, shape[0] if shape else 1, out)
    return out


def refuse_whole_tensors(sources: Sequence[Source], base: Source) -> None:
    """Before any work: an adapter source that changes whole tensors (modules_to_save, lora_bias)
    cannot go to vLLM."""
    for source in sources:
        if not isinstance(source, LoraSource):
            continue
        for key in [*source.full, *source.biases]:
            if not torch.equal(_wide(source, key), base.get(key).to(torch.float64)):
                raise ValueError(
                    f"LoRA output for vLLM: {source.label} changes {key!r} whole (modules_to_save or lora_bias); vLLM's LoRA loader "
                    "takes no full modules (lm_head, embeddings) or biases: pass drop_full_modules=True (--drop-full-modules) to leave them at the base's value"
                )


def layout(sources: Sequence[Source], key: str, shape: tuple[int, ...]) -> str:
    """How weight `key` is laid out for peft: as any adapter among the sources lays it out, else
    by its dims (2: linear, more: conv)."""
    for source in sources:
        if isinstance(source, LoraSource) and key in source.modules:
            return source.modules[key].kind
    return "linear" if len(shape) == 2 else "conv"


class LoraSink:
    """Takes a merge's outputs (`pipeline.Merged`) and writes them as one adapter at commit.

    A matrix must come as factors over the base's own weight, no residual (AXIS, TSV-M: rank k);
    every other tensor is kept only where it differs from the base's.
    """

    def __init__(self, output: str | Path, base: Source, sources: Sequence[Source], *, base_name: str | None, serve: str | None, drop_full_modules: bool) -> None:
        self.output, self.base, self.sources = Path(output), base, sources
        self.options = dict(base_name=base_name, serve=serve, drop_full_modules=drop_full_modules)
        self.updates: dict[str, Update] = {}
        self.changed: dict[str, Tensor] = {}

    def write(self, item) -> None:
        spec, value = item.spec, item.value
        if isinstance(value, LowRank):
            if item.residual:
                raise ValueError(
                    f"LoRA output: {spec.key!r} {spec.shape}: the merged update is not of rank {value.S.shape[-1]} (the method keeps "
                    "a dense residual beyond its top-k components); merge by axis or tsv_m, or Task Arithmetic of adapters alone"
                )
            if bool((value.S != 0).any()):
                self.updates[spec.key] = Update(layout(self.sources, spec.key, spec.shape), (value.U * value.S).cpu(), value.V.T.cpu(), spec.shape)
            return
        rows = value.reshape((-1, *spec.shape[1:]) if spec.shape else ())
        base = torch.empty(rows.shape, dtype=spec.dtype)
        self.base.read(spec.key, item.start, item.start + (rows.shape[0] if spec.shape else 1), base)
        if torch.equal(rows, base.to(rows.dtype)) and spec.key not in self.changed:
            return
        if spec.key not in self.changed:
            self.changed[spec.key] = self.base.get(spec.key).to(spec.out_dtype)
        target = self.changed[spec.key]
        if spec.shape:
            target[item.start : item.start + rows.shape[0]] = rows
        else:
            target.copy_(rows)

    def commit(self, keys: list[str], report) -> None:
        write_adapter(self.output, self.updates, self.changed, self.base, **self.options)

    def abort(self) -> None:
        pass  # nothing is on disk before commit

    def result(self, report):
        return report


def concatenate(
    sources: Sequence[LoraSource],
    base: Source,
    output: str | Path,
    *,
    coefficients: Sequence[float],
    k: int | float | None,
    budget: int | None = None,
    dtype: torch.dtype = torch.float32,
    **options,
) -> dict:
    """Task Arithmetic of adapters as one adapter: per module `[c_1 L_1 … c_T L_T] [R_1; …; R_T]`
    (c_i = scaling · weight_i), or its top-k (an int, or a fraction of min(m, n)) by the factored SVD
    (exact; randomized on the factored operator where Σ r far exceeds k); whole tensors (modules to
    save, lora_bias) as `W0 + Σ c_i (W_i − W0)`. Returns the config.

    Every adapter's factors of one module are held at once (the side-by-side product, and its
    top-k's passes over it): a module whose factors, as stored, converted and laid side by side,
    exceed `budget` bytes is refused before anything is read."""
    updates: dict[str, Update] = {}
    keys = sorted({key for s in sources for key in s.modules}, key=base.keys().index)
    for key in keys if budget is not None else ():
        shape = base.meta(key)[0]
        touching = [s for s in sources if key in s.modules]
        held = sum(s.modules[key].rank for s in touching) * (shape[0] + math.prod(shape[1:])) * (touching[0].factor_dtype(key).itemsize + 2 * dtype.itemsize)
        if held > budget:
            raise ValueError(
                f"LoRA output: {key!r} {tuple(shape)}: the {len(touching)} adapters' factors of it take {held / 2**30:.2f} GiB held side by side, "
                f"above the memory budget of {budget / 2**30:.2f} GiB; raise max_memory (--max-memory), merge fewer adapters, "
                "or merge by axis (its factors stream in chunks under the budget)"
            )
    for key in keys:
        if any(s.touched(key) == "dense" for s in sources):
            raise ValueError(f"LoRA output: {key!r} is a LoRA target of one adapter and saved whole by another; merge into a model instead")
        stored_L, stored_R, scale = (t[0] for t in stack_factors(sources, [key], None))  # (c, m, r), (c, r, n), (c,) as stored
        c, m, r = stored_L.shape
        real = torch.arange(r) < torch.tensor([s.modules[key].rank if key in s.modules else 0 for s in sources])[:, None]  # (c, r): no padding
        real &= (torch.tensor(coefficients, dtype=dtype) != 0)[:, None]
        # side by side, (m, c·r) and (c·r, n): L converted and laid out in one copy, then scaled
        L = torch.empty((m, c, r), dtype=dtype).copy_(stored_L.permute(1, 0, 2))
        L = L.mul_((scale.to(dtype) * torch.tensor(coefficients, dtype=dtype))[:, None]).view(m, c * r)
        R = stored_R.reshape(c * r, -1).to(dtype)
        del stored_L, stored_R
        if not bool(real.all()):  # padded ranks and zero weights leave no column
            L, R = L[:, real.flatten()], R[real.flatten()]
        rank = None if k is None else resolve_rank(k, L.shape[0], R.shape[1], "k")
        if rank is not None and rank < L.shape[1]:
            U, S, V = factored.factored_svd(L, R, rank)
            L, R = U * S, V.T
        shape = base.meta(key)[0]
        updates[key] = Update(layout(sources, key, shape), L.contiguous(), R.contiguous(), shape)
    changed: dict[str, Tensor] = {}
    for key in sorted({k for s in sources for k in base.keys() if s.touched(k) == "dense"}, key=base.keys().index):
        W0 = base.get(key).to(torch.float64)
        value = W0 + sum(c * (_wide(s, key) - W0) for c, s in zip(coefficients, sources) if s.touched(key))
        changed[key] = value.to(base.meta(key)[1])
    return write_adapter(output, updates, changed, base, **options)
