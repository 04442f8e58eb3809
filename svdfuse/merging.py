"""`svdfuse.merge`: sources → plan → compute, piece by piece → a sink (files, or a `MergeResult`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from svdfuse import arguments, distributed
from svdfuse.adapters import LoraSource
from svdfuse.card import card_files
from svdfuse.methods import Kind, check_weights, get_method
from svdfuse.ops import SVDOptions
from svdfuse.lora_out import LoraSink, concatenate, refuse_whole_tensors
from svdfuse.pipeline import Compute, Merged, Progress
from svdfuse.plan import DEFAULT_EXCLUDE, Plan, Role, make_plan, svd_fields
from svdfuse.resources import bound_allocator, default_budget, peak_rss, resolve_device, release_free_memory
from svdfuse.report import LayerReport, MergeReport
from svdfuse.result import MergeResult
from svdfuse.sinks import LowRank, SafetensorsWriter, check_output, parse_size
from svdfuse.sources import ModelLike, Reader, SourceError, open_source, open_sources
from svdfuse.templates import Template, template_of

__all__ = ["SVDOptions", "merge", "MERGE_METADATA"]

# The safetensors `__metadata__` key of a merge written to files: {"method", "ranks": name -> k}, so
# that `svdfuse export lora` can decompose a dense merged model again at each matrix's own rank.
MERGE_METADATA = "svdfuse.merge"

class _MemorySink:
    """Collects the outputs into a `MergeResult`."""

    def __init__(self, plan: Plan, template: Template | None) -> None:
        self.components: dict = {}
        self.frozen: dict = {}
        self.tensors: dict = {}
        self.plan, self.template = plan, template

    def write(self, item: Merged) -> None:
        spec, value = item.spec, item.value
        if isinstance(value, LowRank):
            self.components[spec.key] = (value.U, value.S, value.V)
            self.frozen[spec.key] = value.frozen
        elif item.start == 0 and value.shape == spec.shape:
            self.tensors[spec.key] = value
        else:
            if spec.key not in self.tensors:
                self.tensors[spec.key] = torch.empty(spec.shape, dtype=spec.out_dtype, device=value.device)
            self.tensors[spec.key][item.start : item.start + value.shape[0]] = value

    def commit(self, keys: list[str], report: MergeReport) -> None:
        pass

    def abort(self) -> None:
        pass

    def result(self, report: MergeReport) -> MergeResult:
        order = [s.key for s in self.plan.specs]
        components = {key: self.components[key] for key in order if key in self.components}
        dtypes = {s.key: s.out_dtype for s in self.plan.specs}
        return MergeResult(components, self.frozen, self.tensors, dtypes, report, self.template, order)


class _FileSink:
    """Writes the outputs as they come through a `SafetensorsWriter`."""

    def __init__(self, writer: SafetensorsWriter) -> None:
        self.writer = writer

    def write(self, item: Merged) -> None:
        value = item.value
        if isinstance(value, LowRank):
            value = value.dense(item.spec.out_dtype)
        self.writer.write(item.spec.key, value, item.start)

    def commit(self, keys: list[str], report: MergeReport) -> None:
        self.writer.commit(keys, card_files(report, self.writer.path))

    def abort(self) -> None:
        self.writer.abort()

    def result(self, report: MergeReport) -> MergeReport:
        return report


# A task that read less leaves at most about that much free heap behind, which the next one
# reuses: a trim after each of them (~0.3 ms, and the page faults of memory taken again after it)
# made an in-memory TIES of 12 MiniLM bf16 sources 0.33 s where it takes 0.26 (2-core machine,
# 2026-12-07).
_TRIM_AFTER_BYTES = 64 << 20


def _run(tasks: list, compute: Compute, sink, group: distributed.Group) -> list[LayerReport]:
    """Compute this rank's tasks into the sink; every rank learns of a failure on any rank before
    anything is published (and the output is removed). Returns the layer reports of all ranks."""
    layers: list[LayerReport] = []
    bound_allocator()
    with group.together(undo=sink.abort):
        for i, task in enumerate(tasks):
            for item in compute.run(task, tasks[i + 1] if i + 1 < len(tasks) else None):
                sink.write(item)
                if item.layer is not None:
                    layers.append(item.layer)
            if task.nbytes >= _TRIM_AFTER_BYTES:
                release_free_memory()
    return [layer for ranks in group.gather(layers) for layer in ranks]


def _check_changed(sources: list, differs: list[bool], group: distributed.Group) -> None:
    differs = [any(flags) for flags in zip(*group.gather(differs))]
    unchanged = [s.label for s, d in zip(sources, differs) if not d]
    if unchanged:
        raise SourceError(f"{', '.join(unchanged)}: identical to the base in every tensor; a source must be fine-tuned from it")


def merge(
    models: Sequence[ModelLike] | Mapping[str, ModelLike],
    k: int | float | None = None,
    *,
    base: ModelLike,
    method: str = "axis",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    svd: SVDOptions | str = SVDOptions(),
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    output: str | None = None,
    max_memory: int | str | None = None,
    shard_size: int | str = "5GB",
    progress: bool | None = None,
    allow_non_finite: bool = False,
    config_text: str | None = None,
    save_format: str = "auto",
    serve: str | None = None,
    drop_full_modules: bool = False,
    **params: Any,
) -> MergeResult | MergeReport:
    """Merge fine-tuned `models` of one `base`, by AXIS (arXiv 2508.19353) or another method.

    AXIS, per matrix: decompose every task matrix `Δ_i = W_i - W0` into rank-one components,
    keep the global top-k by singular value across all sources, sum them and re-orthogonalize.
    Tensors that are not matrices (biases, norms) are averaged; integer buffers are the base's.
    Other methods (`svdfuse.methods.METHODS`): "average", "task_arithmetic", "ties", "dare",
    "tsv_m", "iso_c", "iso_cts"; their parameters go in `params`.

    Work is cut into pieces that fit `max_memory`: row blocks over all sources for elementwise
    tensors, groups of same-shape matrices (or one matrix over chunks of sources) for SVD methods.
    With `output`, each merged tensor is written the moment it is computed, so peak memory is the
    budget plus a constant for any number of sources and any model size. Inside an initialized
    torch.distributed process group (torchrun), the ranks share the work by bytes and write one
    output together; every tensor is computed exactly as in one process.

    Args:
        models: the T source models, a list or a name -> model mapping (names label the report);
            each an nn.Module, a state dict, a .safetensors file or a Hugging Face model
            directory with the base's tensor names and shapes, or a `svdfuse.decompose` cache.
        k: per matrix, an int or a float in (0, 1] as floor(k * min(m, n)). For AXIS (required)
            the components kept; for other methods the rank adapted in Stage 2: the merged task
            matrix's top-k SVD components become `components`, the rest stays dense and frozen.
        base: the pre-trained model the sources were fine-tuned from (same kinds as `models`).
        method: the merge method's registered name.
        include: glob patterns of tensor names to merge as matrices (default: every weight with
            2 or more dims; conv kernels as out × in·kh·kw).
        exclude: glob patterns of names never merged as matrices (default: embedding tables).
        svd: decomposition options, or just the method ("exact", "randomized"); the default
            picks randomized or exact SVD by shape.
        dtype: cast every tensor to this dtype (or its name, "bfloat16") first; by default mixed
            dtypes are an error.
        device: where to compute (default: CUDA when available).
        output: write the merged model here instead of returning it: a new `.safetensors` file,
            or a new directory in the Hugging Face layout (sharded above `shard_size`, with the
            base directory's config and tokenizer when the base is one).
        max_memory: memory budget for the pieces, bytes or a size such as "4GB" (default: half
            of the memory available, split among the processes of this machine).
        shard_size: largest shard of a directory output, bytes or a size such as "2GB".
        progress: show a progress bar (bytes read, rate, time left); default: when stderr is a
            terminal, as for `adapt`.
        allow_non_finite: merge tensors that are not matrices even where a value is NaN or ±inf
            (a mask stored as -inf, say) instead of refusing them; matrices merged by an SVD must
            be finite regardless.
        config_text: the configuration file this merge comes from (`svdfuse.merge_config`),
            quoted in the model card.
        save_format: "auto" (the merged model), or "lora": `output` is a new peft adapter
            directory written from the merged factors (AXIS, TSV-M: rank k; Task Arithmetic or
            Average of adapters alone: their exact concatenation, or its top-k when k is given).
        serve: with save_format="lora", "vllm" makes the adapter loadable by vLLM (one rank,
            padded to the next of its max_lora_rank values; no whole modules).
        drop_full_modules: for serve="vllm", leave changed tensors no LoRA update carries
            (modules_to_save, biases) at the base's value, with a warning, instead of refusing.
        params: the method's parameters, e.g. `density=0.2` for "ties".

    Returns:
        Without `output`, a `MergeResult` with `state_dict()`, `components[name] = (U_t (m, k),
        S_t (k,), V_t (n, k))`, `report` and `to_module(base)`. With `output`, the `MergeReport`
        of what was written.

    Example::

        result = svdfuse.merge(["ft-cars.safetensors", "ft-dtd.safetensors"], k=76, base="vit-b32.safetensors")
        svdfuse.merge(checkpoints, k=0.05, base="llama", output="merged/", max_memory="8GB", shard_size="2GB")
    """
    start = time.perf_counter()
    group = distributed.current()
    given = dict(  # as given, before the checks normalize them: what the processes compare
        method=method, k=k, params=params, include=include, exclude=exclude, svd=svd, dtype=dtype, device=device, output=output,
        max_memory=max_memory, shard_size=shard_size, allow_non_finite=allow_non_finite, config_text=config_text,
        save_format=save_format, serve=serve, drop_full_modules=drop_full_modules,
    )
    failure = None
    try:  # every rank checks, then all agree on the request and on whether the checks passed
        spec = get_method(method)
        params = spec.check_params(params)
        svd = arguments.svd_options(svd)
        k = None if k is None else arguments.count(k, "k")
        dtype = None if dtype is None else arguments.dtype(dtype)
        if spec.needs_k and k is None:
            raise TypeError(f"method {method!r} needs k, the number of components kept per matrix (int or fraction)")
        include, exclude = arguments.patterns(include, "include"), arguments.patterns(exclude, "exclude")
        if group.active and output is None:
            raise ValueError(f"a merge over {group.world} processes writes its result to files: pass output=PATH")
        budget = parse_size(max_memory, "max_memory") if max_memory is not None else default_budget(_local_processes(group))
        shard_bytes = parse_size(shard_size, "shard_size")
        if output is not None:
            check_output(output)
        lora = _lora_options(save_format, serve, drop_full_modules, output)
        if lora is not None and group.active:
            raise ValueError(f"save_format='lora' is written by one process, found {group.world}: run it without torchrun")
        device = resolve_device(device)
    except Exception as err:
        failure = err
    distributed.agree(group, lambda: _request(models, base, **given), failure)
    if max_memory is None:
        budget = min(group.gather(budget))  # one plan for all: the tightest machine's default
    with group.together():
        base_source = open_source(base, "base")
        sources = open_sources(models, base, base_source)
        if lora is not None and lora["serve"] == "vllm" and not lora["drop_full_modules"]:
            refuse_whole_tensors(sources, base_source)
        if lora is not None and spec.name in ("task_arithmetic", "average") and all(isinstance(s, LoraSource) for s in sources):
            return _concatenated(spec.name, sources, base_source, base, params, k, output, lora, start, budget)
        if lora is not None and spec.kind is Kind.ELEMENTWISE:
            raise ValueError(
                f"save_format='lora' writes a low-rank merge; {method} merges element by element, which is low-rank only as "
                "task_arithmetic or average of LoRA adapters alone: merge by axis or tsv_m, or write a model"
            )
        if params.get("weights") is not None:
            check_weights(method, params["weights"], len(sources))
        plan = make_plan(
            base_source, sources, spec, k, include=include, exclude=exclude, dtype=dtype, budget=budget, svd=svd, params=params,
        )
        if all(s.role is Role.COPIED for s in plan.specs):
            raise ValueError(f"{base_source.label}: no floating-point tensor to merge ({len(plan.specs)} integer tensors); svdfuse merges weights")
        if not plan.matrices and (include is not None or spec.kind is not Kind.ELEMENTWISE):
            raise ValueError(
                f"include={None if include is None else list(include)} and exclude={list(exclude)} leave no weight with 2 or more "
                f"dims to merge as a matrix; {method} would only average the other tensors"
            )
    distributed.agree(group, lambda: {  # the same paths may hold other files on another machine
        "base contents": f"{base_source.label}: {base_source.fingerprint(quick=True)}",
        "source contents": [f"{source.label}: {source.fingerprint(quick=True)}" for source in sources],
    }, None)  # fmt: skip
    mine = distributed.partition([task.nbytes for task in plan.tasks], group.world)[group.rank]
    tasks = [plan.tasks[i] for i in mine]
    sink = bar = None
    try:  # from the moment the writer exists, any exit but the commit removes what it wrote
        if lora is not None:
            sink = LoraSink(output, base_source, sources, base_name=_base_name(base, base_source), **lora)
        elif output is not None:
            template = template_of(base, base_source.directory) if Path(output).suffix != ".safetensors" else None
            entries = [(s.key, s.shape, s.out_dtype) for s in plan.specs]
            ranks = {s.key: s.k for s in plan.matrices if s.k is not None}
            record: dict[str, Any] = {"method": method, "ranks": ranks}
            if ranks:  # which base: an export against another one is refused (`export_lora`)
                record |= {"base": _base_name(base, base_source) or base_source.label, "base_sha256": base_source.digest(ranks, quick=True)}
            metadata = {MERGE_METADATA: json.dumps(record, separators=(",", ":"))}
            sink = _FileSink(SafetensorsWriter(output, entries, shard_size=shard_bytes, template=template, metadata=metadata))
        else:
            sink = _MemorySink(plan, template_of(base, base_source.directory))
        bar = tqdm(
            total=sum(task.nbytes for task in tasks), unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"merge ({method})", disable=True if group.rank != 0 else (None if progress is None else not progress),
        )
        state = Progress([False] * len(sources), bar.update)
        compute = Compute(
            spec, Reader(base_source, sources, dtype), svd=svd, device=device, params=params, want_factors=output is None, want_base=lora is None, progress=state,
            budget=budget, model_trim=plan.model_trim, allow_non_finite=allow_non_finite,
        )
        layers = _run(tasks, compute, sink, group)
        bar.close()
        with group.together(undo=sink.abort):
            _check_changed(sources, state.differs, group)
        position = {s.key: i for i, s in enumerate(plan.specs)}
        layers.sort(key=lambda layer: position[layer.key])  # groups follow shapes; users read in model order
        report = MergeReport(
            method, [s.label for s in sources], layers, time.perf_counter() - start, output=None if output is None else str(output),
            budget=budget, peak_rss=peak_rss(), processes=group.world, bytes_read=plan.nbytes, base=str(base) if isinstance(base, (str, os.PathLike)) else base_source.label,
            parameters=_card_parameters(spec, k, params, include, exclude, dtype, svd), config=config_text,
        )
        sink.commit([s.key for t in tasks for s in t.specs], report)
    except BaseException:
        if bar is not None:
            bar.close()
        if sink is not None:
            sink.abort()
        raise
    return sink.result(report)


def _request(models, base, **options: Any) -> dict[str, Any]:
    """What every process of a merge must agree on before opening anything, comparable across
    processes: the models by `distributed.fingerprint`, the output as an absolute path, the device
    by its type (each rank has its own GPU), every other option as its repr."""
    if isinstance(models, Mapping):
        named = [[repr(name), distributed.fingerprint(model)] for name, model in models.items()]
    elif isinstance(models, Sequence) and not isinstance(models, (str, bytes)):
        named = [distributed.fingerprint(model) for model in models]
    else:
        named = [distributed.fingerprint(models)]
    device, output = options.pop("device"), options.pop("output")
    request: dict[str, Any] = {"sources": named, "base": distributed.fingerprint(base)}
    request.update({name: repr(value) for name, value in options.items()})
    request["device"] = repr(getattr(device, "type", device))
    request["output"] = os.path.abspath(output) if isinstance(output, (str, os.PathLike)) else repr(output)
    return request


def _lora_options(save_format: str, serve: str | None, drop_full_modules: bool, output) -> dict | None:
    """The LoRA output's options, checked before any work; None for a model output."""
    if save_format not in ("auto", "lora"):
        raise ValueError(f"save_format must be 'auto' or 'lora', found {save_format!r}")
    if serve not in (None, "vllm"):
        raise ValueError(f"serve must be None or 'vllm', found {serve!r}")
    if save_format != "lora":
        if serve is not None or drop_full_modules:
            raise ValueError("serve= and drop_full_modules= shape a LoRA output: pass save_format='lora' (--format lora)")
        return None
    if output is None or Path(output).suffix == ".safetensors":
        raise ValueError(f"save_format='lora' writes a new adapter directory: pass output=DIR, found {output!r}")
    if drop_full_modules and serve is None:
        raise ValueError("drop_full_modules= is for serve='vllm' (--for vllm); a plain adapter keeps whole modules in modules_to_save")
    return {"serve": serve, "drop_full_modules": drop_full_modules}


def _base_name(base: ModelLike, source) -> str | None:
    """What the adapter's config records as its base: the base directory, or a module's name."""
    if source.directory is not None:
        return str(source.directory)
    return getattr(base, "name_or_path", None) or None


def _concatenated(method: str, sources: list, base_source, base, params: dict, k, output, lora: dict, start: float, budget: int) -> MergeReport:
    """Task Arithmetic (or Average) of adapters alone, as an adapter: their factors concatenated."""
    T = len(sources)
    weights = params.get("weights") or [1.0] * T
    scale = params.get("scaling", 0.3) if method == "task_arithmetic" else 1.0 / (sum(weights) if params.get("weights") else T)
    config = concatenate(sources, base_source, output, coefficients=[scale * w for w in weights], k=k, budget=budget,
                         base_name=_base_name(base, base_source), **lora)  # fmt: skip
    return MergeReport(method, [s.label for s in sources], [], time.perf_counter() - start, output=str(output), peak_rss=peak_rss(),
                       base=_base_name(base, base_source), parameters={"k": k, **params, "save_format": "lora", "lora": config})  # fmt: skip


def _card_parameters(spec, k, params: dict, include, exclude, dtype, svd: SVDOptions) -> dict:
    """What the model card lists: k, every method parameter (defaults filled in), patterns, dtype,
    and the SVD options where the method decomposes."""
    out: dict[str, Any] = {"k": k} if k is not None else {}
    out.update({name: params.get(name, default) for name, default in spec.params().items()})
    out.update(include=None if include is None else list(include), exclude=list(exclude), dtype=None if dtype is None else str(dtype).removeprefix("torch."))
    if spec.kind is not Kind.ELEMENTWISE or k is not None:
        out["svd"] = svd_fields(svd)
    return out


def _local_processes(group: distributed.Group) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", group.world))
