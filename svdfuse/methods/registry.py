"""The method registry: what a merge method is, and the table of registered ones.

A method is one of three kinds, by what it needs to see at once:

- `Kind.ELEMENTWISE` (Average, Task Arithmetic, TIES, DARE): a row block of one tensor over all
  sources, `W0: (R, *s)` and `W: (T, R, *s)` -> merged task vector `(R, *s)`. Every tensor of the
  model goes through it in blocks sized from the memory budget. Context it may declare: `block`
  (a `Block`: which tensor and where the rows start, for seeded masks) and `trim` (a `Trim`: the
  exact per-source magnitude threshold over the whole tensor, or the whole model, for methods
  that trim; `trim_density` names the parameter giving its density, and the parameters
  `trim_scope` and `trim_keep`, where the method has them, its `TrimScope` and `TrimKeep`).
- `Kind.FACTORS` (AXIS, TSV-M): per-source truncated SVDs combined. `source_rank(k, T, m, n,
  **params)` says how many components each source needs; `merge(chunks, *, k, T, **params)` takes
  an iterator of `Components` (U (G, c, m, r), S (G, c, r), V (G, c, n, r)), the factors of
  consecutive sources of a group of G same-shape matrices, and returns `Factors`. A chunk is
  valid until the next is asked for (its memory may be reused). The factors may come from an
  SVD on the fly or from per-source caches (`svdfuse.decompose`), and any number of sources streams
  through a bounded buffer.
- `Kind.MATRICES` (Iso-C, Iso-CTS): `W0: (G, m, n)`, `W: (G, T, m, n)` -> `Factors` or a dense
  `(G, m, n)`; all sources of a group at once. A method may also give `factored(chunks, *, T,
  **params)`, the same merge of a group whose sources are all LoRA adapters, from their factors:
  `chunks()` starts a pass over them, `(L (G, c, m, r), R (G, c, r, n))` of consecutive sources
  (peft's scale in L), so no m×n matrix per source is ever formed.

Tensors that are not merged as matrices take the mean task vector unless the method is
elementwise; a method may give its own rule for them (`others`, on a row block `tau: (T, R, *s)`,
e.g. the mean times the method's scaling). The merge pipeline (`svdfuse.merge`) reads, checks and
writes; methods only compute.

Every method records which paper or tool its defaults follow (`follows`), where implementations
disagree; `svdfuse methods` lists them.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
from torch import Tensor

from svdfuse.methods.trim import TrimKeep, TrimOptions, TrimScope, trim_options

__all__ = ["Kind", "Factors", "Components", "Block", "Method", "METHODS", "get_method", "register", "check_finite_param", "check_weights"]


class Kind(str, enum.Enum):
    """What a method sees at once: a row block, per-source factors, or whole matrices."""

    ELEMENTWISE = "elementwise"
    FACTORS = "factors"
    MATRICES = "matrices"


class Factors(NamedTuple):
    """Merged task matrices `U diag(S) Vᵀ` of a group, an SVD (orthonormal U, V; S descending).

    U: (G, m, r), S: (G, r), V: (G, n, r); counts: (G, T) components taken from each source, if
    the method selects components.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    counts: Tensor | None = None


@dataclass(frozen=True)
class Components:
    """The components of c consecutive sources of a group, what a `Kind.FACTORS` method takes:
    U (G, c, m, r), S (G, c, r), V (G, c, n, r). Unpacks as `U, S, V`; a method that keeps a few
    of them asks for those alone (`vectors`), which `factored.FactoredSVD` (the same interface, for
    adapters) forms without forming the rest."""

    U: Tensor
    S: Tensor
    V: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.U, self.S, self.V))

    def vectors(self, *index: Tensor) -> tuple[Tensor, Tensor]:
        """Components `index` = (layer, source, component) index tensors, broadcast to (*idx): their
        U and V as rows, (*idx, m) and (*idx, n)."""
        *batch, comp = index
        return self.U[(*batch, slice(None), comp)], self.V[(*batch, slice(None), comp)]


@dataclass(frozen=True)
class Block:
    """Where a row block lies: tensor `key`, its first element's flat index `start`, the merge's `seed`."""

    key: str
    start: int
    seed: int


def check_finite_param(method: str, name: str, value: float) -> None:
    """Refuse a non-finite scalar parameter (scaling, weights) before any work."""
    if not math.isfinite(value):
        raise ValueError(f"{method}: {name} must be a finite number, found {value}")


def check_weights(method: str, weights: Sequence[float], sources: int) -> None:
    """Refuse per-source weights that are not one finite number per source."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{method}: weights must be a list of numbers, one per source, found {type(weights).__name__}")
    if len(weights) != sources:
        raise ValueError(f"{method}: weights must give one number per source: {sources} sources, found {len(weights)} weights")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"{method}: weights[{i}] must be a number, found {w!r}")
        check_finite_param(method, f"weights[{i}]", w)


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    Attributes:
        name: what users pass as `method=`.
        reference_url: the paper it implements.
        kind: what it sees at once (`Kind`).
        merge: the merge rule of its kind (module docstring).
        needs_k: whether `k` is required (it is the method's own rank, as in AXIS).
        source_rank: for `Kind.FACTORS`, `(k, T, m, n, **params) -> r` components per source.
        trim_density: for elementwise methods that trim each task vector to its top magnitudes,
            the parameter holding the density (the pipeline computes the exact `Trim`).
        follows: which paper or tool each default follows where they disagree, in a sentence.
        others: for non-elementwise methods, `(tau (T, R, *s), **params) -> (R, *s)`, the merged
            task vector of tensors not merged as matrices (default: the mean).
        factored: for `Kind.MATRICES`, its merge of LoRA adapters from their factors (module docstring).
    """

    name: str
    reference_url: str
    kind: Kind
    merge: Callable[..., Any]
    needs_k: bool = False
    source_rank: Callable[..., int] | None = None
    trim_density: str | None = None
    follows: str = ""
    others: Callable[..., Tensor] | None = None
    factored: Callable[..., Any] | None = None

    def params(self) -> dict[str, Any]:
        """The method's own parameters and their defaults."""
        context = {"k", "svd", "keys", "block", "trim", "T", "seed"}
        out = {}
        for fn in filter(None, (self.merge, self.source_rank, self.others, self.factored)):
            for name, p in inspect.signature(fn).parameters.items():
                if p.kind is p.KEYWORD_ONLY and name not in context:
                    out[name] = p.default
        return out

    def check_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """`given` checked against the method's parameters, by name, by annotated type (a numpy
        scalar is accepted as the Python number it holds) and, for a parameter whose default is
        an enum, by its choices; returns them normalized."""
        defaults = self.params()
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            accepted = ", ".join(f"{k}={getattr(v, 'value', v)!r}" for k, v in defaults.items()) or "none"
            raise TypeError(f"method {self.name!r} has no parameter {unknown[0]!r}; its parameters: {accepted}")
        for name, value in given.items():
            if isinstance(defaults[name], enum.Enum) and value not in [e.value for e in type(defaults[name])]:  # a list: an enum member hashes by its name
                choices = ", ".join(repr(e.value) for e in type(defaults[name]))
                raise ValueError(f"{self.name}: {name} must be one of {choices}, found {getattr(value, 'value', value)!r}")
        annotations = {}
        for fn in filter(None, (self.merge, self.source_rank, self.others)):
            annotations.update({name: p.annotation for name, p in inspect.signature(fn).parameters.items()})
        return {name: _typed(f"{self.name}: {name}", value, annotations.get(name)) for name, value in given.items()}

    def call(self, fn: Callable, *args: Any, **context: Any) -> Any:
        """`fn(*args, **the subset of context it takes)`."""
        names = _parameters(fn)
        return fn(*args, **{k: v for k, v in context.items() if k in names})

    def trim(self, given: dict[str, Any]) -> TrimOptions | None:
        """The checked trim settings of a trimming method under the parameters `given`, else None."""
        if self.trim_density is None:
            return None
        value = {**self.params(), **given}
        return trim_options(
            self.name, value[self.trim_density], value.get("trim_scope", TrimScope.TENSOR), value.get("trim_keep", TrimKeep.COUNT)
        )


@functools.cache
def _parameters(fn: Callable) -> frozenset[str]:
    """The names of `fn`'s parameters: `inspect.signature` costs ~30 µs a call, and a merge calls a
    method's functions once per task (hundreds of tensors)."""
    return frozenset(inspect.signature(fn).parameters)


def _typed(what: str, value: Any, annotation: Any) -> Any:
    """`value` as the scalar type its annotation ("float", "int | None", "bool") names."""
    kinds = set(str(annotation).replace(" ", "").split("|"))
    if value is None and "None" in kinds:
        return None
    if "bool" in kinds:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError(f"{what} must be True or False, found {type(value).__name__} {value!r}")
    if "int" in kinds and isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if "float" in kinds and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if kinds & {"int", "float"}:
        expected = " or ".join(sorted(kinds & {"int", "float", "None"}))
        raise TypeError(f"{what} must be {expected}, found {type(value).__name__} {value!r}")
    return value


METHODS: dict[str, Method] = {}


def register(
    name: str,
    *,
    reference_url: str,
    kind: Kind,
    needs_k: bool = False,
    source_rank: Callable[..., int] | None = None,
    trim_density: str | None = None,
    follows: str,
    others: Callable[..., Tensor] | None = None,
    factored: Callable[..., Any] | None = None,
) -> Callable[[Callable], Callable]:
    """Register `fn` as the merge rule of method `name`; `follows` says which paper or tool its defaults follow."""

    def decorate(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        if not follows:
            raise ValueError(f"merge method {name!r}: say which paper or tool its defaults follow (follows=...)")
        method = Method(name, reference_url, kind, fn, needs_k, source_rank, trim_density, follows, others, factored)
        if factored is not None and set(method.params()) != set(replace(method, factored=None).params()):
            raise ValueError(f"merge method {name!r}: its factored merge must take the parameters its merge takes")
        METHODS[name] = method
        return fn

    return decorate


def get_method(name: str) -> Method:
    """The registered method `name`; the error lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
