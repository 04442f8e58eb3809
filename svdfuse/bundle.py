"""Reading a bundle (`svdfuse.compress`) and serving all its adapters in one batch.

`load_bundle(model, bundle)` replaces each Linear, Conv2d or Embedding the bundle adapts by a
`BundleLinear`, `BundleConv2d` or `BundleEmbedding`: the base's W0 and bias, the shared U (m, K) and V (n, K), and every adapter's core (N, K) or (N, K, K). Inside
`serve_bundle(model, requests)` request b of a batch runs as `requests[b]`: an adapter (its name
or index) or a weighted mix {name: weight} (core Σ wⱼ Σⱼ, exact on a shared basis). Diagonal cores
run through `ops.lowrank_matmul(..., task=)`, full ones through `ops.core_matmul`; a batch's mixes
join the bank as extra rows, so one call serves the whole batch per layer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from svdfuse import ops
from svdfuse.compress import BUNDLE_FORMAT, CORES
from svdfuse.sources import SafetensorsSource, SourceError, open_source, untrusted_json

if TYPE_CHECKING:
    from svdfuse.export import LoraReport

__all__ = ["Bundle", "read_bundle", "BundleLinear", "BundleConv2d", "BundleEmbedding", "load_bundle", "serve_bundle", "export_adapter", "Request"]

Request = int | str | Mapping[str, float]


@dataclass(frozen=True)
class Bundle:
    """A bundle in memory.

    Attributes:
        adapters: the N adapters' names; core: "diagonal" or "full"; k: K; basis: how it was chosen.
        U, V: weight name -> (m, K), (n, K) fp32. cores: weight name -> (N, K) or (N, K, K) fp32.
        errors: weight name -> (N,) fp64 relative reconstruction errors. shapes: weight name -> shape.
    """

    adapters: list[str]
    core: str
    k: int
    basis: str
    U: dict[str, Tensor]
    V: dict[str, Tensor]
    cores: dict[str, Tensor]
    errors: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]

    def weights(self, request: Request, what: str = "request") -> Tensor:
        """Adapter weights (N,) fp64 of a request: one-hot for a name or index, else the mix's."""
        N = len(self.adapters)
        w = torch.zeros(N, dtype=torch.float64)
        if isinstance(request, Mapping):
            if not request:
                raise ValueError(f"{what}: an empty mix; name at least one adapter with its weight")
            for name, weight in request.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise ValueError(f"{what}: the weight of {name!r} must be a finite number, found {weight!r}")
                w[self.index(name, what)] += float(weight)
            return w
        w[self.index(request, what)] = 1.0
        return w

    def index(self, adapter: int | str, what: str = "request") -> int:
        """The position of an adapter given by name or index."""
        if isinstance(adapter, str):
            if adapter not in self.adapters:
                shown = ", ".join(self.adapters[:8]) + (", ..." if len(self.adapters) > 8 else "")
                raise ValueError(f"{what}: no adapter {adapter!r} in the bundle (it has {len(self.adapters)}: {shown})")
            return self.adapters.index(adapter)
        if isinstance(adapter, bool) or not isinstance(adapter, int):
            raise TypeError(f"{what}: an adapter is a name, an index or a {{name: weight}} mix, found {type(adapter).__name__} {adapter!r}")
        if not 0 <= adapter < len(self.adapters):
            raise ValueError(f"{what}: adapter index must be in [0, {len(self.adapters)}), found {adapter}")
        return adapter

    def delta(self, key: str, request: Request) -> Tensor:
        """The update U Σ Vᵀ of weight `key` for a request, (m, n) fp64 (for checks and export)."""
        C = torch.tensordot(self.weights(request).to(torch.float64), self.cores[key].to(torch.float64), dims=1)
        U, V = self.U[key].to(torch.float64), self.V[key].to(torch.float64)
        return (U * C) @ V.T if self.core == "diagonal" else U @ C @ V.T


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read and check a bundle written by `svdfuse.compress` (a file, or a sharded directory).

    Raises:
        SourceError: naming the file and tensor when it is no bundle or its tensors do not agree.
    """
    source = open_source(path, "bundle")
    metadata = getattr(source, "metadata", {}) if isinstance(source, SafetensorsSource) else {}
    label = source.label
    if metadata.get("svdfuse") != BUNDLE_FORMAT:
        raise SourceError(f"{label}: is not an svdfuse bundle (its metadata has svdfuse={metadata.get('svdfuse')!r}, expected {BUNDLE_FORMAT!r}); write one with svdfuse compress")
    try:
        adapters, shapes, k = untrusted_json(metadata["adapters"]), untrusted_json(metadata["shapes"]), int(metadata["k"])
        core, basis = metadata["core"], metadata["basis"]
    except (KeyError, ValueError) as err:
        raise SourceError(f"{label}: bundle metadata is incomplete or malformed ({type(err).__name__}: {err})") from None
    if core not in CORES:
        raise SourceError(f"{label}: core {core!r} is not one of {CORES}")
    N = len(adapters)
    out: dict[str, dict[str, Tensor]] = {"U": {}, "V": {}, "cores": {}, "error": {}}
    for key, shape in shapes.items():
        m, n = shape[0], math.prod(shape[1:])
        want = {"U": (m, k), "V": (n, k), "cores": (N, k) if core == "diagonal" else (N, k, k), "error": (N,)}
        for part, expected in want.items():
            name = f"{key}.{part}"
            if name not in source:
                raise SourceError(f"{label}: has no tensor {name!r}")
            t = source.get(name)
            if tuple(t.shape) != expected:
                raise SourceError(f"{label}: {name!r} has shape {tuple(t.shape)}, expected {expected}")
            if not bool(torch.isfinite(t).all()):
                raise SourceError(f"{label}: {name!r} holds NaN or Inf values")
            out[part][key] = t
    return Bundle(adapters, core, k, basis, out["U"], out["V"], out["cores"], out["error"], {key: tuple(s) for key, s in shapes.items()})


class _BundleLayer(nn.Module):
    """What every bundle layer holds: the base's weight and bias, the shared U (m, K) and V (n, K)
    (n: the weight's other dims flattened), every adapter's core (N, K) diagonal or (N, K, K) full;
    while serving (`serve_bundle`), `bank` (the batch's cores: the adapters', then its mixes') and
    `ids`, each request's row of it, int64 (batch,)."""

    def __init__(self, weight0: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, cores: Tensor) -> None:
        super().__init__()
        dtype = weight0.dtype
        self.register_buffer("weight0", weight0.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("U", U.to(dtype).contiguous())
        self.register_buffer("V", V.to(dtype).contiguous())
        self.register_buffer("cores", cores.to(dtype).contiguous())
        self.bank: Tensor | None = None
        self.ids: Tensor | None = None

    def _check(self, x: Tensor, what: str, dims: int = 2) -> None:
        """That the layer is serving and x (at least `dims` dims) holds one row per request."""
        if self.ids is None or self.bank is None:
            raise ValueError(f"{self}: run the model inside `with svdfuse.bundle.serve_bundle(model, requests):` to say which adapter each request uses")
        if x.dim() < dims or x.shape[0] != self.ids.shape[0]:
            raise ValueError(f"serve_bundle: {self.ids.shape[0]} requests but {self} got input {tuple(x.shape)}; serving needs batch-first inputs ({what})")

    def _requests(self, x: Tensor, what: str, dims: int = 2) -> Tensor:
        """Each request's core, (batch, K) or (batch, K, K), after `_check`."""
        self._check(x, what, dims)
        return self.bank.index_select(0, self.ids)

    def dense(self, weights: Tensor) -> Tensor:
        """The dense weight, in the base weight's shape, of adapter weights (N,), for checks."""
        C = torch.tensordot(weights.to(self.cores.dtype), self.cores, dims=1)
        update = (self.U * C) @ self.V.T if C.dim() == 1 else self.U @ C @ self.V.T
        return self.weight0 + update.reshape(self.weight0.shape)

    def extra_repr(self) -> str:
        kind = "diagonal" if self.cores.dim() == 2 else "full"
        return f"weight={tuple(self.weight0.shape)}, K={self.U.shape[1]}, adapters={self.cores.shape[0]}, core={kind}"


class BundleLinear(_BundleLayer):
    """`nn.Linear` whose weight, per request, is `W0 + U Σ Vᵀ` with that request's core: diagonal
    cores through `ops.lowrank_matmul(..., task=)`, full ones through `ops.core_matmul`."""

    def __init__(self, weight0: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, cores: Tensor) -> None:
        super().__init__(weight0, bias, U, V, cores)
        self.in_features, self.out_features = weight0.shape[1], weight0.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, f"batch, ..., {self.in_features}")  # the ops index the bank themselves
        task = self.ids.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])
        if self.cores.dim() == 2:
            return ops.lowrank_matmul(x, self.U, self.bank, self.V, base=self.weight0, bias=self.bias, task=task)
        return ops.core_matmul(x, self.U, self.bank, self.V, task, base=self.weight0, bias=self.bias)


class BundleConv2d(_BundleLayer):
    """`nn.Conv2d` (groups 1, zero padding) whose weight per request is `W0 + U Σ Vᵀ` (out × in·kh·kw,
    as LoRA's conv updates): `conv(x, W0) + U Σ (conv(x, Vᵀ as K filters))`, the K-channel map
    mixed per request and widened by a 1×1 conv; never a dense weight per request."""

    def __init__(self, conv: nn.Conv2d, U: Tensor, V: Tensor, cores: Tensor) -> None:
        super().__init__(conv.weight, conv.bias, U, V, cores)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: Tensor) -> Tensor:
        C = self._requests(x, f"batch, {self.weight0.shape[1]}, H, W", dims=4)
        conv = lambda inp, w, b=None: nn.functional.conv2d(inp, w, b, self.stride, self.padding, self.dilation)  # noqa: E731
        K = self.U.shape[1]
        z = conv(x, self.V.T.reshape(K, *self.weight0.shape[1:]))  # (batch, K, H', W')
        z = z * C[:, :, None, None] if C.dim() == 2 else torch.einsum("bjk,bkhw->bjhw", C, z)
        return conv(x, self.weight0, self.bias) + nn.functional.conv2d(z, self.U[:, :, None, None])


class BundleEmbedding(_BundleLayer):
    """`nn.Embedding` whose table per request is `W0 + U Σ Vᵀ` (num × dim): a token's row gains
    `U[token] Σ Vᵀ`, from its K coordinates; never a table per request."""

    def __init__(self, embedding: nn.Embedding, U: Tensor, V: Tensor, cores: Tensor) -> None:
        super().__init__(embedding.weight, None, U, V, cores)
        self.padding_idx = embedding.padding_idx

    def forward(self, ids: Tensor) -> Tensor:
        C = self._requests(ids, "batch, ...", dims=1)
        coords = nn.functional.embedding(ids, self.U)  # (batch, ..., K)
        C = C.view(C.shape[0], *[1] * (ids.dim() - 1), *C.shape[1:])
        mixed = coords * C if self.cores.dim() == 2 else (coords.unsqueeze(-2) @ C).squeeze(-2)
        return nn.functional.embedding(ids, self.weight0, self.padding_idx) + mixed @ self.V.T


def load_bundle(model: nn.Module, bundle: Bundle | str | os.PathLike) -> nn.Module:
    """Replace, in place, each `nn.Linear`, `nn.Conv2d` (groups 1) or `nn.Embedding` of `model` whose
    weight the bundle adapts by a `BundleLinear`, `BundleConv2d` or `BundleEmbedding`.

    Args:
        model: the base the bundle's adapters were trained on (transformers, open_clip or any module
            with Linear layers), weight names as in its state dict.
        bundle: a `Bundle` or its path.

    Returns:
        `model`, frozen, to run inside `serve_bundle`.

    Raises:
        ValueError: naming the weight where the bundle does not fit the model (missing, not a
            Linear, another shape), before anything is replaced.

    Example::

        model = svdfuse.bundle.load_bundle(AutoModel.from_pretrained(base), "bundle.safetensors")
        with svdfuse.bundle.serve_bundle(model, ["sst2-a", {"sst2-a": 0.5, "imdb-b": 0.5}]):
            out = model(**batch)  # batch of 2
    """
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    modules = dict(model.named_modules())
    targets = []
    for key, shape in bundle.shapes.items():
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if module is None or attr != "weight":
            raise ValueError(f"load_bundle: the bundle adapts {key!r}, which is no module's weight in this model; load it onto the base it was compressed from")
        if type(module) not in (nn.Linear, nn.Conv2d, nn.Embedding):
            raise ValueError(f"load_bundle: the bundle adapts {key!r} of a {type(module).__name__}; nn.Linear, nn.Conv2d and nn.Embedding layers are served")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            raise ValueError(f"load_bundle: {key!r} is a Conv2d with groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}; "
                             "bundle layers serve convolutions of groups 1 with numeric zero padding")  # fmt: skip
        if tuple(module.weight.shape) != tuple(shape):
            raise ValueError(f"load_bundle: {key!r} is {tuple(module.weight.shape)} in this model, {tuple(shape)} in the bundle; load it onto the base it was compressed from")
        targets.append((owner, key, module))
    model.requires_grad_(False)
    for owner, key, module in targets:
        parts = (bundle.U[key], bundle.V[key], bundle.cores[key])
        if isinstance(module, nn.Conv2d):
            layer = BundleConv2d(module, *parts)
        elif isinstance(module, nn.Embedding):
            layer = BundleEmbedding(module, *parts)
        else:
            layer = BundleLinear(module.weight, module.bias, *parts)
        parent_name, _, child = owner.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    model.svdfuse_bundle = bundle  # names and mixes are resolved against it
    return model


def _layers(model: nn.Module) -> list[_BundleLayer]:
    return [m for m in model.modules() if isinstance(m, _BundleLayer)]


@contextlib.contextmanager
def serve_bundle(model: nn.Module, requests: Sequence[Request] | Tensor) -> Iterator[nn.Module]:
    """Within the block, request b of every batch runs with adapter (or mix) `requests[b]`.

    Args:
        model: a model from `load_bundle`; its inputs must be batch-first at every adapted Linear.
        requests: one per request: an adapter's name or index, or a {name: weight} mix; or an
            int64 (batch,) tensor of adapter indices.

    Raises:
        ValueError, TypeError: an unknown adapter, an index out of range, a non-finite weight,
            naming the request; a model without bundle layers.

    Example::

        with svdfuse.bundle.serve_bundle(model, torch.tensor([3, 0, 47])):
            out = model(**batch)
    """
    layers = _layers(model)
    bundle: Bundle | None = getattr(model, "svdfuse_bundle", None)
    if not layers or bundle is None:
        raise ValueError("serve_bundle: the model holds no bundle; load one with svdfuse.bundle.load_bundle(model, bundle)")
    N = len(bundle.adapters)
    if isinstance(requests, Tensor):
        if requests.dtype != torch.int64 or requests.dim() != 1:
            raise TypeError(f"serve_bundle: request ids must be an int64 (batch,) tensor, found {requests.dtype} {tuple(requests.shape)}")
        bad = ((requests < 0) | (requests >= N)).nonzero()
        if len(bad):
            raise ValueError(f"serve_bundle: request ids must be in [0, {N}), found {int(requests[bad[0, 0]])} at {int(bad[0, 0])}")
        ids, mixes = requests.cpu(), []
    else:
        ids_list, mixes = [], []
        for b, request in enumerate(requests):
            if isinstance(request, Mapping):
                mixes.append(bundle.weights(request, f"serve_bundle: request {b}"))
                ids_list.append(N + len(mixes) - 1)
            else:
                ids_list.append(bundle.index(request, f"serve_bundle: request {b}"))
        ids = torch.tensor(ids_list, dtype=torch.int64)
    mix = torch.stack(mixes) if mixes else None
    previous = [(layer.bank, layer.ids) for layer in layers]
    for layer in layers:
        bank = layer.cores
        if mix is not None:
            extra = torch.tensordot(mix.to(torch.float64), bank.to(torch.float64), dims=1).to(bank.dtype)
            bank = torch.cat([bank, extra])
        layer.bank, layer.ids = bank, ids.to(bank.device)
    try:
        yield model
    finally:
        for layer, (bank, ids_before) in zip(layers, previous):
            layer.bank, layer.ids = bank, ids_before


def export_adapter(
    bundle: Bundle | str | os.PathLike,
    output: str | os.PathLike,
    *,
    base: nn.Module | str | os.PathLike,
    request: Request,
    serve: str | None = None,
    drop_full_modules: bool = False,
) -> "LoraReport":
    """Write one adapter of a bundle, or a mix of them, as a peft LoRA adapter of `base`.

    Per matrix the update `U Σ Vᵀ` (Σ the adapter's or the mix's core) becomes `lora_B`, `lora_A`
    of rank K (a full core through its K×K SVD), written by `svdfuse.export_lora`: the adapter that
    `PeftModel.from_pretrained(base, output)` loads is the bundle's, within fp32 rounding.

    Args:
        bundle: a `Bundle` or its path. output: a new directory.
        base: the base as an `nn.Module`, or a Hugging Face directory.
        request: an adapter's name or index, or a {name: weight} mix.
        serve, drop_full_modules: "vllm" for vLLM's loader, as `svdfuse.export_lora` (ranks padded).

    Example::

        svdfuse.bundle.export_adapter("bundle.safetensors", "mix/", base=model, request={"a": 0.7, "b": 0.3})
    """
    from svdfuse.export import export_lora
    from svdfuse.report import MergeReport
    from svdfuse.result import MergeResult
    from svdfuse.sinks import check_output

    check_output(output)
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    weights = bundle.weights(request, "export")
    state = open_source(base.state_dict() if isinstance(base, nn.Module) else base, "base")
    components, frozen = {}, {}
    for key in bundle.shapes:
        if key not in state:
            raise ValueError(f"export: the bundle adapts {key!r}, which the base has not; export with the base it was compressed from")
        C = torch.tensordot(weights, bundle.cores[key].to(torch.float64), dims=1)
        U, V = bundle.U[key].to(torch.float64), bundle.V[key].to(torch.float64)
        if bundle.core == "full":
            u, S, vh = torch.linalg.svd(C)
            U, V, C = U @ u, V @ vh.T, S
        components[key] = (U.float(), C.float(), V.float())
        frozen[key] = state.get(key)
    result = MergeResult(components, frozen, {}, {}, MergeReport("bundle", list(bundle.adapters), [], 0.0))
    return export_lora(result, output, base=base, serve=serve, drop_full_modules=drop_full_modules)
