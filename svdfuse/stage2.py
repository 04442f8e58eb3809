"""`svdfuse.adapt`: Stage 2 of AXIS, training only the top-N singular values of merged layers."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from svdfuse import arguments
from svdfuse.nn import Excess, adaptable_layers, set_trainable

__all__ = ["AdaptReport", "adapt", "default_loss"]


@dataclass
class AdaptReport:
    """What Stage 2 did: trainable scalars, mean loss per epoch, wall time."""

    trainable: int
    layers: int
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """Loss of one batch: `(inputs, targets)` -> cross-entropy of `model(inputs)`; a dict -> `model(**batch).loss`
    (Hugging Face models with labels)."""
    if isinstance(batch, dict):
        out = model(**batch)
        if getattr(out, "loss", None) is None:
            raise ValueError("a dict batch needs a model that returns .loss (pass labels), or give loss_fn=")
        return out.loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        logits = model(inputs)
        try:
            return nn.functional.cross_entropy(logits, targets)
        except (RuntimeError, ValueError, IndexError) as err:
            raise ValueError(
                f"adapt: cross-entropy of the model's output {tuple(logits.shape)} {logits.dtype} against targets "
                f"{tuple(targets.shape)} {targets.dtype}: expected targets of shape {tuple(logits.shape[:1])} holding class "
                f"indices below {logits.shape[-1]} (or probabilities of the output's shape); torch says: {err}"
            ) from err
    raise TypeError(f"cannot compute a loss from a batch of type {type(batch).__name__}; pass loss_fn=(model, batch) -> loss")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def adapt(
    model: nn.Module,
    data: Iterable[Any],
    *,
    n: int | float = 0.1,
    epochs: int = 10,
    lr: float = 1e-1,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] = default_loss,
    excess: Excess = "error",
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> AdaptReport:
    """Stage 2: train only the top-`n` singular values of every svdfuse layer on the target task.

    Everything else in `model` (U, V, the other singular values, biases, norms, heads) is frozen.
    A model from `svdfuse.atlas` trains its per-source coefficients instead (the aTLAS baseline).
    Defaults follow the AXIS paper: 10 epochs at lr 1e-1 (AdamW without weight decay, cosine
    schedule over all steps).

    Args:
        model: a module from `MergeResult.to_module` (has `SVDLinear` / `SVDConv` / `SVDWeight` layers).
        data: a re-iterable of batches (a DataLoader); each `(inputs, targets)`, a dict for
            Hugging Face models, or anything `loss_fn` understands.
        n: N per layer: an int, or a fraction of min(m, n) (floor).
        epochs, lr: training length and peak learning rate.
        optimizer: factory `params -> Optimizer` replacing the default AdamW.
        loss_fn: `(model, batch) -> scalar loss`.
        excess: what to do where N exceeds a layer's merged rank: "error", "clip" or "extend"
            (see `svdfuse.nn`).
        device: where to train (default: where the model is).
        progress: show a progress bar (default: when stderr is a terminal, as for `merge`).

    Returns:
        An `AdaptReport`; the model is trained in place and left in eval mode.

    Example::

        model = result.to_module(base_model)
        report = svdfuse.adapt(model, loader, n=0.1)
        print(report.trainable, report.epoch_losses[-1])
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        hint = ": build it with result.to_module(base_model)" if hasattr(model, "to_module") else ""
        raise TypeError(f"adapt: model must be an nn.Module with svdfuse layers, found {type(model).__name__}{hint}")
    n = arguments.count(n, "n")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"adapt: epochs must be a positive int, found {epochs!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"adapt: lr must be a positive finite number, found {lr!r}")
    trainable = set_trainable(model, n, excess)
    if trainable == 0:
        raise ValueError(f"adapt: n={n} leaves no singular value to train")
    params = [p for p in model.parameters() if p.requires_grad]
    layers = len(list(adaptable_layers(model)))
    if device is not None:
        model.to(device)
    device = params[0].device
    opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * max(1, len(data)) if hasattr(data, "__len__") else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if steps and optimizer is None else None
    report = AdaptReport(trainable=trainable, layers=layers)
    model.train()
    with tqdm(total=steps, desc=f"adapt ({trainable} σ)", unit="step", disable=None if progress is None else not progress) as bar:
        _train(model, data, loss_fn, opt, sched, epochs, device, bar, report)
    model.eval()
    report.seconds = time.perf_counter() - start
    return report


def _train(
    model: nn.Module, data: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor], opt: torch.optim.Optimizer,
    sched: Any, epochs: int, device: torch.device, bar: tqdm, report: AdaptReport,
) -> None:
    """`epochs` passes over `data`, one optimizer step a batch; each epoch's mean loss into `report`."""
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in data:
            loss = loss_fn(model, _to(batch, device))
            _check_loss(loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"adapt: loss became {loss.item()} at epoch {len(report.epoch_losses) + 1}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total, count = total + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if count == 0:
            raise ValueError("adapt: data yielded no batches")
        report.epoch_losses.append(total / count)


def _check_loss(loss: object) -> None:
    """A loss that `backward` can take: one number that depends on the trainable values."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"adapt: loss_fn must return a scalar tensor, found {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"adapt: loss_fn must return a scalar tensor, found shape {tuple(loss.shape)}; reduce it (e.g. .mean())")
    if not loss.requires_grad:
        raise ValueError("adapt: the loss does not depend on the trainable singular values (was it computed under torch.no_grad() or detached?)")
