"""Serving many target adaptations of one merge in one batch.

Stage 2 adapts only σ, so adaptations of the same merge share U, V, W0 and everything else.
`stack_tasks` turns them into one model whose `SVDLinear` and `SVDConv` layers hold a σ bank
(num_tasks, K); inside `serve_tasks`, each request of a batch runs with its own task's σ: through
`svdfuse.ops.lowrank_matmul(..., task=...)`, one launch per linear layer for the whole batch, and
in conv layers by scaling each request's rank-K channels with its task's σ.

Bundles (`svdfuse.compress`: many independent adapters on one shared basis) serve the same way,
each request with its adapter or a mix of them: `load_bundle` and `serve_bundle` (`svdfuse.bundle`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from svdfuse._native import first_bad_task
from svdfuse.bundle import load_bundle, serve_bundle
from svdfuse.nn.convert import count_tasks, sigma_banks, svd_layers
from svdfuse.nn.layers import LowRankLayer, SVDWeight

__all__ = ["stack_tasks", "serve_tasks", "load_bundle", "serve_bundle"]


def _structure(model: nn.Module) -> dict[str, type]:
    return {name: parametrize.type_before_parametrizations(module) for name, module in model.named_modules()}


def _check_stackable(i: int, model: nn.Module, first: nn.Module, skip: set[str]) -> None:
    """Model i must be model 0 but for the σ in `skip` (state dict keys)."""
    structure, expected = _structure(model), _structure(first)
    for name in sorted(structure.keys() | expected.keys()):
        found, want = structure.get(name), expected.get(name)
        if found is not want:
            found_name, want_name = (getattr(t, "__name__", "missing") for t in (found, want))
            raise ValueError(f"stack_tasks: model {i}: module {name!r} is {found_name}, in model 0 it is {want_name}")
    state, reference = model.state_dict(), first.state_dict()
    for key in sorted(state.keys() ^ reference.keys()):
        where = "model 0" if key in reference else f"model {i}"
        raise ValueError(f"stack_tasks: model {i}: tensor {key!r} is only in {where}")
    for key, want in reference.items():
        if key in skip:
            continue
        found = state[key]
        if found.shape != want.shape or found.dtype != want.dtype:
            raise ValueError(
                f"stack_tasks: model {i}: {key!r} is {found.dtype} {tuple(found.shape)}, in model 0 it is {want.dtype} "
                f"{tuple(want.shape)}; stacked tasks must be adaptations of one merge"
            )
        if not torch.equal(found, want):
            raise ValueError(
                f"stack_tasks: model {i}: {key!r} differs from model 0's; stacked tasks share every tensor but the σ of "
                "their SVD layers (U, V, W0, biases, norms and heads included)"
            )


def stack_tasks(models: Sequence[nn.Module]) -> nn.Module:
    """One serving model for several Stage-2 adaptations of the same merge.

    The adaptations share U, V, W0 and every other tensor and differ only in σ. The result is a
    frozen deep copy of `models[0]` whose `SVDLinear` and `SVDConv` layers hold a σ bank
    (num_tasks, K), row t from `models[t]`; run it inside `serve_tasks` to give each request of a
    batch its task.

    `SVDWeight` layers (weights a module reads itself: transposed conv kernels, projections of
    attention modules `SVDMultiheadAttention` cannot take) are dense for the whole batch and cannot
    take a σ per request: their σ must be equal in every model, or stacking fails.

    Args:
        models: num_tasks >= 1 modules, each a copy of one `MergeResult.to_module` model adapted to
            its own task (e.g. `copy.deepcopy(model)` then `svdfuse.adapt`).

    Returns:
        The stacked model. `materialize(stacked, task=t)` folds task t back into dense weights.

    Raises:
        ValueError: naming the model and the module or tensor where the models differ in anything
            but σ, or the SVDWeight layer whose σ differs.

    Example::

        stacked = svdfuse.serving.stack_tasks([model_sst2, model_imdb, model_agnews])
        with svdfuse.serving.serve_tasks(stacked, torch.tensor([2, 0, 0, 1])):
            out = stacked(**batch)  # batch["input_ids"]: (4, seq); request 0 as model_agnews, 3 as model_imdb
    """
    if not models:
        raise ValueError("stack_tasks: needs at least one model")
    layers = [dict(svd_layers(model)) for model in models]
    if not layers[0]:
        raise ValueError(
            "stack_tasks: model 0 has no SVD layers; stack models from result.to_module(base) adapted to their tasks"
        )
    sigma_keys = {f"{name}.{attr}" for name in layers[0] for attr in ("sigma", "sigma_frozen")}
    for i, model in enumerate(models[1:], 1):
        _check_stackable(i, model, models[0], sigma_keys)
    sigmas = {name: [model_layers[name].S.detach() for model_layers in layers] for name in layers[0]}
    for name, rows in sigmas.items():
        for i, S in enumerate(rows):
            if S.dim() != 1:
                raise ValueError(
                    f"stack_tasks: model {i}: {name!r} already holds a σ bank {tuple(S.shape)}; stack single-task models"
                )
            if isinstance(layers[0][name], SVDWeight) and not torch.equal(S, rows[0]):
                raise ValueError(
                    f"stack_tasks: model {i}: σ of {name!r} differs from model 0's, but it is an SVDWeight (a dense weight "
                    "its module reads itself), which serves one σ for the whole batch; only SVDLinear and SVDConv layers can "
                    "hold a σ per task"
                )
    stacked = copy.deepcopy(models[0]).requires_grad_(False)
    for name, layer in svd_layers(stacked):
        if isinstance(layer, LowRankLayer):
            layer.set_sigma(torch.stack(sigmas[name]))
    return stacked


@contextlib.contextmanager
def serve_tasks(model: nn.Module, task_ids: Tensor) -> Iterator[nn.Module]:
    """Within the block, request b of every batch runs with the σ of task `task_ids[b]`.

    Every σ-bank layer broadcasts `task_ids` over its input's leading dims, so inputs must be
    batch-first at every `SVDLinear`, `(batch, ..., n)`, and every `SVDConv`, `(batch, in, *spatial)`,
    with the same batch as `task_ids` (a mismatch raises; a model that transposes to sequence-first
    inside would be misread when sequence length equals batch size). The ids live on the model's
    layers while the block runs: one batch at a time per model.

    Args:
        model: a model from `stack_tasks`.
        task_ids: int64 (batch,) with ids in [0, num_tasks). Checked on the CPU; ids on CUDA are
            not read (that would cost a sync), and a bad one gives its request's output NaN.

    Yields:
        `model`.

    Raises:
        TypeError: `task_ids` is not an int64 tensor.
        ValueError: the model has no σ bank; `task_ids` is not 1-D or (on the CPU) out of range;
            later, in the forward, an `SVDLinear` or `SVDConv` input whose first dim is not the batch.

    Example::

        with svdfuse.serving.serve_tasks(stacked, torch.tensor([2, 0, 1])):
            out = stacked(**batch)  # batch["input_ids"]: (3, seq)
    """
    banks = sigma_banks(model)
    if not banks:
        raise ValueError("serve_tasks: the model has no σ bank; build the serving model with svdfuse.serving.stack_tasks")
    num_tasks = count_tasks(banks)
    if not isinstance(task_ids, Tensor) or task_ids.dtype != torch.int64:
        found = task_ids.dtype if isinstance(task_ids, Tensor) else type(task_ids).__name__
        raise TypeError(f"serve_tasks: task_ids must be a torch.int64 tensor, found {found}")
    if task_ids.dim() != 1:
        raise ValueError(f"serve_tasks: task_ids must be (batch,), one id per request, found {tuple(task_ids.shape)}")
    if task_ids.device.type == "cpu":
        bad = first_bad_task(task_ids, num_tasks)
        if bad is not None:
            (value, (where,)) = bad
            raise ValueError(f"serve_tasks: task ids must be in [0, {num_tasks}), found {value} at {where}")
    ids = task_ids.to(banks[0][1].U.device)
    previous = [layer.task_ids for _, layer in banks]
    for _, layer in banks:
        layer.task_ids = ids
    try:
        yield model
    finally:
        for (_, layer), ids_before in zip(banks, previous):
            layer.task_ids = ids_before

