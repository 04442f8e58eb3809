"""peft LoRA adapters as sources: `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).

An adapter of a base is the model `W0 + s·B·A` at the modules it targets and the base everywhere
else, so it is a `Source` of the base's tensors. It is a *factored* source: `factors(key)` gives
each update as `L (m, r) @ R (r, n)` in the base tensor's matrix shape, peft's scale folded into
`L`, so SVD methods decompose it exactly in O((m + n) r²) and never form an m×n matrix; `read`
rebuilds `W0[rows] + L[rows] R` one row block at a time for the methods that need the weights.

What peft writes, and how it is read (peft 0.21, `tuners/lora/`):
- scale `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`; r and alpha per module from
  `rank_pattern` / `alpha_pattern`, a key matching a module name as `(.*\\.)?(KEY)$`;
- `fan_in_fan_out` (GPT-2's Conv1D, weight stored in × out): ΔW = (B A)ᵀ;
- embeddings: `lora_embedding_A` (r, num), `lora_embedding_B` (dim, r), ΔW = (B A)ᵀ;
- convs: `lora_A` (r, in, *kernel), `lora_B` (out, r, 1, ...): ΔW = B A as out × in·kh·kw;
- `lora_bias`: `lora_B.bias`, the layer's bias gains `s·bias`;
- any other tensor (`modules_to_save`, saved embedding tables) replaces the base's whole.
What no low-rank update reproduces is refused at open: DoRA, other tuner types, aLoRA,
trainable tokens, LoRA on bare parameters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from svdfuse import linalg
from svdfuse.sources import DIRECTORY_KINDS, Batch, MappingSource, SafetensorsSource, Source, SourceError, model_file, untrusted_json

__all__ = ["LoraAdapter", "LoraFactors", "LoraSource", "stack_factors", "refuse_non_finite", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "is_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Config fields whose truthy value makes the adapter something other than W0 + s·B·A.
_REFUSED = {
    "use_dora": "DoRA (a learned magnitude rescales every column of W0 + ΔW: not a low-rank update)",
    "alora_invocation_tokens": "aLoRA (the update applies only after its invocation tokens)",
    "trainable_token_indices": "trainable tokens (per-token embedding rows, not a LoRA update)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "layer replication (the adapted model has more layers than the base)",
    "use_qalora": "QA-LoRA (its lora_A acts on pooled input groups)",
    "use_bdlora": "block-diagonal LoRA",
}
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$")


def is_adapter(path: Path) -> bool:
    """Whether directory `path` holds a peft adapter (its config or its weights)."""
    return (path / ADAPTER_CONFIG).is_file() or (path / ADAPTER_WEIGHTS).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One targeted module: the base weight it updates, how its factors are laid out, its scale.

    kind: "linear", "transposed" (fan_in_fan_out), "embedding" or "conv"; a, b: the factors' keys in
    the adapter file; bias: the key of `lora_B.bias` (lora_bias), or None.
    """

    key: str
    kind: str
    a: str
    b: str
    rank: int
    scale: float
    bias: str | None = None


def _pattern(patterns: dict, name: str, default):
    """peft's `get_pattern_key`: the first pattern key that matches the module name as `(.*\\.)?(KEY)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


@dataclass(frozen=True)
class LoraFactors:
    """One targeted module as the adapter's files describe it, before any base.

    module: peft's module name without its `base_model.model.` prefix; kind: "linear",
    "transposed" (fan_in_fan_out), "embedding" or "conv" (from the factors' own layout); a, b, bias:
    the adapter file's keys (bias: `lora_B.bias`, or None); scale: peft's, `alpha / r` or
    `alpha / √r` (rslora); shape: the weight an update of these factors fits (out × in, in × out
    when transposed, num × dim for an embedding, out × in × *kernel for a conv).
    """

    module: str
    kind: str
    a: str
    b: str
    rank: int
    alpha: float
    scale: float
    shape: tuple[int, ...]
    bias: str | None = None


class _Layouts:
    """The last few layouts' parsed results, by layout: an adapter whose config and tensor
    headers equal another's has the same modules (and, on the same base, the same placement), so a
    thousand adapters trained alike are parsed and checked against the base once, not a thousand
    times (~0.35 ms each: 2-core machine, 2026-12-07). Only what parsed without error is kept; the
    values are shared and never changed."""

    def __init__(self, size: int = 16) -> None:
        self.size, self._held = size, OrderedDict()

    def get(self, key: tuple) -> tuple | None:
        value = self._held.get(key)
        if value is not None:
            self._held.move_to_end(key)
        return value

    def put(self, key: tuple, value: tuple) -> None:
        self._held[key] = value
        while len(self._held) > self.size:
            self._held.popitem(last=False)


_PARSED = _Layouts()  # layout -> (modules, full)
_PLACED = _Layouts()  # (id(base), layout) -> (base, modules, full, biases)


class LoraAdapter:
    """A peft LoRA adapter directory read on its own: its config, its factors' headers and what
    each targets; no tensor data is read and no base is needed. What svdfuse refuses (DoRA,
    other tuner types, ranks that disagree) is refused here, naming the adapter and the key.

    Attributes:
        config: `adapter_config.json`; store: the adapter's weights file as a `Source`.
        modules: module name -> its `LoraFactors`, in the file's order.
        full: tensor name (prefix removed) -> its key in the file: whole tensors (modules_to_save).
    """

    def __init__(self, label: str, directory: Path) -> None:
        self.label, self.directory = label, directory
        self.config = self._config(directory)
        self.store = self._weights(directory)
        # what the config and the tensors' names, shapes and dtypes say: the same for a thousand
        # adapters trained alike, parsed once (`_Layouts`); None: not known from headers alone
        self.layout = (json.dumps(self.config, sort_keys=True), self.store.layout()) if isinstance(self.store, SafetensorsSource) else None
        parsed = None if self.layout is None else _PARSED.get(self.layout)
        self.modules, self.full = parsed or self._parse()
        if parsed is None and self.layout is not None:
            _PARSED.put(self.layout, (self.modules, self.full))

    def _parse(self) -> tuple[dict[str, LoraFactors], dict[str, str]]:
        """`modules` and `full` from the config and the tensors' names and shapes."""
        label = self.label
        self.modules: dict[str, LoraFactors] = {}
        self.full: dict[str, str] = {}
        parts: dict[str, dict[str, str]] = {}
        for key in self.store.keys():
            name = key.removeprefix(PEFT_PREFIX)
            if "lora_magnitude_vector" in name:
                raise SourceError(f"{label}: {key!r} is a DoRA magnitude vector; DoRA is not a low-rank update and cannot be merged exactly")
            found = _LORA_KEY.match(name)
            if found is None:
                if "lora_" in name:
                    raise SourceError(f"{label}: {key!r} is no LoRA factor svdfuse knows (lora_A/lora_B.weight, lora_B.bias, lora_embedding_A/B)")
                self.full[name] = key
                continue
            parts.setdefault(found["module"], {})[found["part"]] = key
        for module, have in parts.items():
            self.modules[module] = self._factors(module, have)
        return self.modules, self.full

    def _config(self, directory: Path) -> dict:
        path = directory / ADAPTER_CONFIG
        if os.path.lexists(path):  # an adapter's files are read as a model's: inside its directory, regular files
            path = model_file(directory, ADAPTER_CONFIG, self.label, "the adapter directory")
        try:
            config = untrusted_json(path.read_text())
        except (OSError, ValueError) as err:
            raise SourceError(f"{self.label}: cannot read {str(path)!r} as a peft adapter config ({type(err).__name__}: {err})") from err
        if not isinstance(config, dict):
            raise SourceError(f"{self.label}: {str(path)!r} holds a {type(config).__name__}, expected a JSON object")
        kind = config.get("peft_type")
        if str(kind).upper() != "LORA":
            raise SourceError(f"{self.label}: is a peft {kind} adapter; svdfuse merges LoRA adapters exactly, not {kind} (peft_type 'LORA' expected)")
        for field, what in _REFUSED.items():
            if config.get(field):
                raise SourceError(f"{self.label}: {field}={config[field]!r} makes this adapter {what}; svdfuse cannot merge it exactly")
        for field in ("r", "lora_alpha"):
            if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool) or config[field] <= 0:
                raise SourceError(f"{self.label}: {ADAPTER_CONFIG} field {field!r} must be a positive number, found {config.get(field)!r}")
        return config

    def _weights(self, directory: Path) -> Source:
        safetensors, bin_file = directory / ADAPTER_WEIGHTS, directory / _ADAPTER_BIN
        if os.path.lexists(safetensors):
            return SafetensorsSource(self.label, [model_file(directory, ADAPTER_WEIGHTS, self.label, "the adapter directory")])
        if os.path.lexists(bin_file):
            bin_file = model_file(directory, _ADAPTER_BIN, self.label, "the adapter directory")
            try:
                state = torch.load(bin_file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... on bad files
                raise SourceError(f"{self.label}: cannot read {str(bin_file)!r} as a torch checkpoint ({type(err).__name__}: {err})") from err
            return MappingSource(self.label, state)
        raise SourceError(f"{self.label}: adapter directory {str(directory)!r} holds no {ADAPTER_WEIGHTS} or {_ADAPTER_BIN}")

    def _factors(self, module: str, have: dict[str, str]) -> LoraFactors:
        embedding = "lora_embedding_A" in have or "lora_embedding_B" in have
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        for part in (a_part, b_part):
            if part not in have:
                raise SourceError(f"{self.label}: module {module!r} has no {part} beside its other factor")
        a, b = have[a_part], have[b_part]
        a_shape, b_shape = self.store.meta(a)[0], self.store.meta(b)[0]
        r = a_shape[0] if len(a_shape) >= 2 else -1
        if b_shape[1:2] != (r,) or len(b_shape) < 2:
            raise SourceError(f"{self.label}: {module!r}: lora_A has rank {r} {a_shape}, lora_B {b_shape} does not (mismatched ranks)")
        kind = "embedding" if embedding else "conv" if len(a_shape) > 2 else "transposed" if self.config.get("fan_in_fan_out") else "linear"
        shape = (b_shape[0], *a_shape[1:]) if kind in ("linear", "conv") else (a_shape[1], b_shape[0])
        rank = _pattern(self.config.get("rank_pattern") or {}, module, self.config["r"])
        if rank != r:
            raise SourceError(f"{self.label}: {module!r}: its factors have rank {r}, the config's r/rank_pattern says {rank}")
        alpha = _pattern(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return LoraFactors(module, kind, a, b, r, alpha, scale, shape, have.get("lora_B.bias"))


class LoraSource(Source):
    """A peft LoRA adapter of `base`, read as the adapted model's tensors.

    Attributes:
        modules: base weight name -> its `LoraModule`.
        full: base tensor name -> the adapter file's key of its whole replacement (modules_to_save).
        biases: base bias name -> (its `lora_B.bias` key, scale): lora_bias updates.
        config: the adapter's `adapter_config.json`; parsed: its `LoraAdapter`, before the base.
        store: the adapter's weights file as a `Source`.
    """

    reads_any_dtype = True  # `read` converts itself: W0 + ΔW is formed in out's dtype, not rounded to the base's
    derived = True  # it stands for W0 + s·B·A: compared with the other adapters by `fingerprint`
    fingerprints = "lora"
    copy_reason = "an adapter is its factors and scales, whatever its directory is called"

    def __init__(self, label: str, directory: Path, base: Source) -> None:
        super().__init__(label, None)
        self.adapter_dir, self.base = directory, base
        self._spans: dict[str, tuple[torch.dtype, tuple[str, int, int], tuple[str, int, int]] | None] = {}
        self.parsed = adapter = LoraAdapter(label, directory)
        self.config, self.store = adapter.config, adapter.store
        self._check_base(self.config.get("base_model_name_or_path"))
        placed = None if adapter.layout is None else _PLACED.get((id(base), adapter.layout))
        if placed is None or placed[0] is not base:
            placed = (base, *self._place(adapter))
            if adapter.layout is not None:
                _PLACED.put((id(base), adapter.layout), placed)
        _, self.modules, self.full, self.biases = placed

    def _place(self, adapter: LoraAdapter) -> tuple[dict[str, LoraModule], dict[str, str], dict[str, tuple[str, float]]]:
        """`modules`, `full` and `biases`: the adapter's modules on the base's tensors, checked to fit."""
        base_keys = set(self.base.keys())
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}
        self.biases: dict[str, tuple[str, float]] = {}  # base bias name -> (lora_B.bias key, scale)
        for name, stored in adapter.full.items():
            self.full[self._base_key(name, base_keys, stored)] = stored
        for factors in adapter.modules.values():
            self._add(factors, base_keys)
        self._check_full()
        return self.modules, self.full, self.biases

    # -- opening ---------------------------------------------------------------------------

    def _check_base(self, recorded: str | None) -> None:
        """An adapter names its base on the Hub, or by a local path. Two Hub names that differ are
        two bases; a local path says nothing once copied, so only the shapes judge it then."""
        directory = self.base.directory
        if not recorded or directory is None or not (directory / "config.json").is_file():
            return
        try:
            name = untrusted_json((directory / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            return
        hub = lambda s: isinstance(s, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not os.path.exists(s)  # noqa: E731
        if hub(recorded) and hub(name) and recorded.lower() != name.lower():
            raise SourceError(
                f"{self.label}: is an adapter of {recorded!r} (base_model_name_or_path), the base is {name!r} "
                f"({str(directory)!r}'s config); merge adapters with the base they were trained on"
            )

    def _base_key(self, name: str, base_keys: set[str], key: str) -> str:
        """The base's tensor for `name` (a module's tensor, named as peft saw the model): the same
        name, or the one base name that it ends in or that ends in it (a task head's prefix)."""
        if name in base_keys:
            return name
        found = [k for k in base_keys if k.endswith(f".{name}") or name.endswith(f".{k}")]
        if len(found) != 1:
            what = "no tensor" if not found else f"{len(found)} tensors ({sorted(found)[:3]})"
            raise SourceError(f"{self.label}: {key!r} fits {what} of the base; is this an adapter of another model?")
        return found[0]

    def _add(self, factors: LoraFactors, base_keys: set[str]) -> None:
        module, kind, r, a, b = factors.module, factors.kind, factors.rank, factors.a, factors.b
        key = self._base_key(f"{module}.weight", base_keys, a)
        shape = self.base.meta(key)[0]
        a_shape, b_shape = self.store.meta(a)[0], self.store.meta(b)[0]
        if kind == "embedding":  # A (r, num), B (dim, r); ΔW (num, dim)
            want_a, want_b = (r, shape[0]), (shape[-1], r)
        elif kind == "transposed":  # A (r, in), B (out, r); weight (in, out)
            want_a, want_b = (r, shape[0]), (shape[1], r)
        else:  # A (r, in, *kernel), B (out, r, 1, ...); weight (out, in, *kernel)
            want_a, want_b = (r, *shape[1:]), (shape[0], r, *(1,) * (len(shape) - 2))
        if a_shape != want_a or b_shape != want_b:
            raise SourceError(
                f"{self.label}: {module!r}: factors A {a_shape}, B {b_shape} do not fit the base's {key!r} {shape} "
                f"(expected A {want_a}, B {want_b} for a {kind} LoRA); is this an adapter of another model?"
            )
        if factors.bias is not None:
            bias = factors.bias
            bias_key = self._base_key(f"{module}.bias", base_keys, bias)
            if self.store.meta(bias)[0] != self.base.meta(bias_key)[0]:
                raise SourceError(f"{self.label}: {bias!r} {self.store.meta(bias)[0]} does not fit the base's {bias_key!r} {self.base.meta(bias_key)[0]}")
            self.full.pop(bias_key, None)
            self.biases[bias_key] = (bias, factors.scale)
        self.modules[key] = LoraModule(key, kind, a, b, r, factors.scale, factors.bias)

    def _check_full(self) -> None:
        for key, stored in self.full.items():
            if self.store.meta(stored)[0] != self.base.meta(key)[0]:
                raise SourceError(f"{self.label}: {stored!r} has shape {self.store.meta(stored)[0]}, the base's {key!r} has {self.base.meta(key)[0]}")
            if key in self.modules:
                raise SourceError(f"{self.label}: {key!r} is both a LoRA target and saved whole ({stored!r})")

    # -- the Source interface ------------------------------------------------------------------

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.base.meta(key)

    def fingerprint(self, *, quick: bool = False) -> str:
        """What makes two adapters the same update: what each module's factors update and by which
        scale, and the digest of the adapter file's tensors (`quick`: of the names, shapes and dtypes
        of all, the first and last rows of the B factors, biases and whole tensors: a few bytes per
        module; the A factors' rows are as wide as the model). Never equal to a model's fingerprint."""
        layout = sorted((m.key, m.kind, m.a, m.b, m.rank, m.scale, m.bias) for m in self.modules.values())
        parts = [layout, sorted(self.full.items()), sorted(self.biases.items())]
        if quick:
            keys = self.store.keys()
            parts.append([(key, *map(str, self.store.meta(key))) for key in sorted(keys)])
            a_factors = {m.a for m in self.modules.values()}
            parts.append(self.store.digest([key for key in keys if key not in a_factors], quick=True))
        else:
            parts.append(self.store.digest())
        return "lora:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def touched(self, key: str) -> str | None:
        """"lora" (a factored update), "dense" (a whole replacement or a bias update) or None (the base's)."""
        return "lora" if key in self.modules else "dense" if key in self.full or key in self.biases else None

    def factor_dtype(self, key: str) -> torch.dtype:
        """The dtype that holds `key`'s factors as stored (the wider of the two where they differ)."""
        module = self.modules[key]
        return torch.promote_types(self.store.meta(module.a)[1], self.store.meta(module.b)[1])

    def factor_bytes(self, key: str) -> int:
        """Bytes of `key`'s stored factors."""
        module = self.modules[key]
        return sum(math.prod(self.store.meta(name)[0]) * self.store.meta(name)[1].itemsize for name in (module.a, module.b))

    def read_factors(self, key: str, L: Tensor, R: Tensor, batch: Batch | None = None) -> None:
        """The unscaled update factors of `key` into L (m, r) and R (r, n) (any dtype): ΔW = scale · L R
        in the base tensor's matrix shape; the plain copies by `batch` where one is given."""
        module = self.modules[key]
        if module.kind in ("linear", "conv"):  # B (m, r, 1...), A (r, *in): straight into the buffers
            _read_into(self.store, module.b, 0, L.shape[0], L.view(-1, module.rank, *(1,) * (len(self.store.meta(module.b)[0]) - 2)), batch)
            _read_into(self.store, module.a, 0, module.rank, R.view(self.store.meta(module.a)[0]), batch)
        else:  # ΔW = (B A)ᵀ = Aᵀ Bᵀ
            L.copy_(self.store.get(module.a).T)
            R.copy_(self.store.get(module.b).T)

    def factor_spans(self, key: str) -> tuple[torch.dtype, tuple[str, int, int], tuple[str, int, int]] | None:
        """Where `read_factors` of `key` is two plain copies as stored (a linear or conv module in a
        safetensors file, both factors of one dtype): that dtype and the (file, offset, length) of
        B (m × r values: L's) and of A (r × n values: R's); else None. Kept once found: a merge
        asks for every module of every adapter once a pass."""
        if key not in self._spans:
            self._spans[key] = self._factor_spans(key)
        return self._spans[key]

    def _factor_spans(self, key: str) -> tuple[torch.dtype, tuple[str, int, int], tuple[str, int, int]] | None:
        module = self.modules[key]
        if module.kind not in ("linear", "conv") or not isinstance(self.store, SafetensorsSource):
            return None
        (b_shape, b_dtype), (a_shape, a_dtype) = self.store.meta(module.b), self.store.meta(module.a)
        if a_dtype != b_dtype:
            return None
        return b_dtype, self.store.span(module.b, 0, b_shape[0]), self.store.span(module.a, 0, a_shape[0])

    def factors(self, key: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The update of `key` as L (m, r) @ R (r, n), peft's scale in L, in `dtype`, checked finite;
        m × n is the base tensor's matrix shape (conv kernels as out × in·kh·kw)."""
        module = self.modules[key]
        shape = self.base.meta(key)[0]
        L, R = torch.empty((shape[0], module.rank), dtype=dtype), torch.empty((module.rank, math.prod(shape[1:])), dtype=dtype)
        self.read_factors(key, L, R)
        self.check_finite(key, L, R)
        return L.mul_(module.scale), R

    def check_finite(self, key: str, L: Tensor, R: Tensor) -> None:
        """Refuse factors of `key` that are not finite, naming the adapter's tensor."""
        module = self.modules[key]
        left, right = (module.a, module.b) if module.kind in ("embedding", "transposed") else (module.b, module.a)
        for t, name in ((L, left), (R, right)):
            if not linalg.all_finite(t):
                raise SourceError(f"{self.label}: {name!r} holds NaN or Inf values; expected finite LoRA factors")

    def get(self, key: str) -> Tensor:
        shape, dtype = self.meta(key)
        out = torch.empty(shape, dtype=dtype)
        self.read(key, 0, shape[0] if shape else 1, out)
        return out

    def read(self, key: str, start: int, stop: int, out: Tensor) -> None:
        if key in self.full:
            return _read_into(self.store, self.full[key], start, stop, out)
        _read_into(self.base, key, start, stop, out)
        if key not in self.modules and key not in self.biases:
            return
        acc = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
        w = out.reshape(stop - start, -1) if acc == out.dtype else out.reshape(stop - start, -1).to(acc)
        if key in self.modules:
            L, R = self.factors(key, acc)
            w.addmm_(L[start:stop], R)
        else:
            stored, scale = self.biases[key]
            bias = self.store.get(stored).to(acc)
            if not linalg.all_finite(bias):
                raise SourceError(f"{self.label}: {stored!r} holds NaN or Inf values; expected a finite bias")
            w.add_(bias[start:stop].reshape(-1, 1), alpha=scale)
        if w.data_ptr() != out.data_ptr():
            out.copy_(w.reshape(out.shape))


def stack_factors(
    adapters: Sequence[LoraSource],
    keys: Sequence[str],
    dtype: torch.dtype | None,
    *,
    buffer: Callable[[str, tuple[int, ...], torch.dtype], Tensor] | None = None,
    checked: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every adapter's unscaled factors of the same-shape weights `keys` stacked: L (G, c, m, r),
    R (G, c, r, n) in `dtype` (None: as stored), and their scales (G, c) in float64 (0 where an adapter leaves a key alone;
    ranks padded with zeros to the widest). Read into one buffer in the stored dtype (the widest of
    theirs: no adapter's factors are rounded to another's), converted and checked finite once: a
    thousand adapters cost a few large ops, not thousands of small ones. `buffer(name, shape, dtype)`
    gives the buffers to read into ("L", "R"; default fresh ones). `checked=False` leaves the
    finite check to the caller (`refuse_non_finite`), which may have a cheaper one."""
    shape = adapters[0].meta(keys[0])[0]
    ranks = {(g, j): a.modules[key].rank for g, key in enumerate(keys) for j, a in enumerate(adapters) if key in a.modules}
    r = max(ranks.values(), default=1)
    stored = functools.reduce(torch.promote_types, sorted({adapters[j].factor_dtype(keys[g]) for g, j in ranks}, key=str)) if ranks else dtype or torch.float32
    buffer = buffer or (lambda name, size, dtype: torch.empty(size, dtype=dtype))
    L = buffer("L", (len(keys), len(adapters), shape[0], r), stored)
    R = buffer("R", (len(keys), len(adapters), r, math.prod(shape[1:])), stored)
    if len(ranks) < len(keys) * len(adapters) or any(v < r for v in ranks.values()):  # padding: zeros
        L.zero_(), R.zero_()
    scale = torch.zeros((len(keys), len(adapters)), dtype=torch.float64)
    # a factor that fills its place whole is read straight to its address: ~2 µs of Python each, not ~20
    plain = Batch.available() and L.is_contiguous() and R.is_contiguous() and L.device.type == "cpu"
    l_size, r_size = L[0, 0].nbytes, R[0, 0].nbytes
    with Batch() as batch:  # a thousand adapters' factors in a few calls, not 100k reads
        for (g, j), rank in ranks.items():
            adapter, key = adapters[j], keys[g]
            spans = adapter.factor_spans(key) if plain and rank == r else None
            if spans is not None and spans[0] == stored and spans[1][2] == l_size and spans[2][2] == r_size:
                module, at = adapter.modules[key], g * len(adapters) + j
                batch.read_span(adapter.store, module.b, *spans[1], L.data_ptr() + at * l_size)
                batch.read_span(adapter.store, module.a, *spans[2], R.data_ptr() + at * r_size)
            else:
                adapter.read_factors(key, L[g, j, :, :rank], R[g, j, :rank], batch)
            scale[g, j] = adapter.modules[key].scale
    L, R = L.to(dtype or stored), R.to(dtype or stored)
    if checked and not (linalg.all_finite(L) and linalg.all_finite(R)):
        refuse_non_finite(adapters, keys, L, R)
    return L, R, scale


def refuse_non_finite(adapters: Sequence[LoraSource], keys: Sequence[str], L: Tensor, R: Tensor) -> None:
    """Name the adapter and tensor whose factors in `stack_factors`' L, R hold NaN or Inf."""
    for g, key in enumerate(keys):
        for j, adapter in enumerate(adapters):
            if key in adapter.modules:
                adapter.check_finite(key, L[g, j], R[g, j])


def _read_into(source: Source, key: str, start: int, stop: int, out: Tensor, batch: Batch | None = None) -> None:
    """Rows [start, stop) of `key` into `out`, whatever its dtype; a plain copy by `batch` where one is given."""
    stored = source.meta(key)[1]
    if batch is not None and Batch.takes(source, key, out):
        batch.read(source, key, start, stop, out)
        return
    if out.dtype == stored and out.is_contiguous():
        source.read(key, start, stop, out)
        return
    staging = torch.empty(out.shape, dtype=stored)
    source.read(key, start, stop, staging)
    out.copy_(staging)


def _open_adapter(path: Path, label: str, base: Source | None) -> LoraSource | None:
    """`sources.open_source`'s reader of a peft adapter directory (its config or weights), against `base`."""
    if not is_adapter(path):
        return None
    if base is None:
        raise SourceError(f"{label}: is a peft adapter; it is read against a base (pass base=...)")
    return LoraSource(label, path, base)


DIRECTORY_KINDS.append(_open_adapter)
