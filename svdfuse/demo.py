"""`svdfuse demo`: the whole pipeline on an embedded default that needs no download and no GPU.

A small network is pre-trained on handwritten digits (scikit-learn's 8×8 digits), fine-tuned into
one source per image transformation (rotations, flips, inversion), and those sources are merged
by AXIS to transfer to a transformation none of them saw. Stage 2 then trains only the top
singular values on the target, and the result is served with low-rank `SVDLinear` layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import svdfuse
from svdfuse.plan import resolve_rank
from svdfuse.resources import resolve_device

# Each task is the digits seen through one transformation of the 8×8 image.
TASKS: dict[str, Callable[[Tensor], Tensor]] = {
    "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, (-2, -1)),
    "flip_lr": lambda x: torch.flip(x, (-1,)),
    "flip_ud": lambda x: torch.flip(x, (-2,)),
    "transpose": lambda x: x.mT,
    "invert": lambda x: 1.0 - x,
    "rot270": lambda x: torch.rot90(x, 3, (-2, -1)),
}
TARGET = "rot270"


def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.7 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def _batches(x: Tensor, y: Tensor, size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


def _train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for xb, yb in _batches(x, y, 64, seed + epoch):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item() * 100


def _check_ranks(k: float, n: float) -> None:
    """Refuse, before the minute of training, a k or n that some layer of the network cannot take:
    the merge keeps at most min(m, n) components, and Stage 2 trains at most the k kept."""
    for name, layer in _net().named_modules():
        if isinstance(layer, nn.Linear):
            rows, cols = layer.weight.shape
            K, N = resolve_rank(k, rows, cols, "k"), resolve_rank(n, rows, cols, "n")
            if K > min(rows, cols):
                raise ValueError(f"k={k} keeps {K} components of layer {name} ({rows}x{cols}), which has {min(rows, cols)}")
            if N > K:
                raise ValueError(f"n={n} trains {N} singular values of layer {name} ({rows}x{cols}), but k={k} keeps {K}; give n <= k")


def run_demo(
    k: float = 0.25, n: float = 0.25, epochs: int = 10, device: str | None = None, seed: int = 0, out=print
) -> dict[str, float]:
    """Run the demo and print each stage; returns the target-task accuracies (%) by model."""
    device = resolve_device(device)
    _check_ranks(k, n)
    torch.manual_seed(seed)
    times: dict[str, float] = {}
    tic = time.perf_counter()
    x_train, y_train, x_test, y_test = (t.to(device) for t in _digits(seed))
    base = _net().to(device)
    _train(base, x_train, y_train, epochs=8, lr=3e-3, seed=seed)
    sources = {}
    for task, transform in TASKS.items():
        if task == TARGET:
            continue
        model = _net().to(device)
        model.load_state_dict(base.state_dict())
        _train(model, transform(x_train), y_train, epochs=4, lr=1e-3, seed=seed + len(sources) + 1)
        sources[task] = model
    times["build sources"] = time.perf_counter() - tic
    out(f"svdfuse demo on {device}: base pre-trained on digits, {len(sources)} sources fine-tuned on {', '.join(sources)}")
    out(f"target task (seen by no source): {TARGET}\n")

    target = TASKS[TARGET]
    xt_train, xt_test = target(x_train), target(x_test)
    accuracy = {"base": _accuracy(base, xt_test, y_test)}
    averaged = _net().to(device)
    averaged.load_state_dict(svdfuse.merge(sources, base=base, method="average", device=device).state_dict())
    accuracy["average of sources"] = _accuracy(averaged, xt_test, y_test)

    tic = time.perf_counter()
    result = svdfuse.merge(sources, k=k, base=base, device=device)
    times["merge (AXIS)"] = time.perf_counter() - tic
    out(result.report.table() + "\n")
    model = result.to_module(base)
    accuracy["AXIS merge"] = _accuracy(model, xt_test, y_test)

    tic = time.perf_counter()
    report = svdfuse.adapt(model, _batches(xt_train, y_train, 64, seed), n=n, epochs=epochs, progress=False)
    times["adapt (Stage 2)"] = time.perf_counter() - tic
    accuracy["AXIS + Stage 2"] = _accuracy(model, xt_test, y_test)
    out(f"Stage 2 trained {report.trainable} singular values in {report.layers} layers; loss {report.epoch_losses[0]:.3f} -> {report.epoch_losses[-1]:.3f}")

    tic = time.perf_counter()
    with torch.no_grad():
        lowrank = model(xt_test)
        dense = svdfuse.nn.materialize(model)(xt_test)
    times["serve (low-rank vs dense)"] = time.perf_counter() - tic
    out(f"low-rank SVDLinear output vs materialized dense weights: max |diff| = {(lowrank - dense).abs().max().item():.2e}\n")

    out(f"accuracy on {TARGET} (%)")
    for name, value in accuracy.items():
        out(f"  {name:<20} {value:6.2f}")
    out("\ntime per stage (s)")
    for name, value in times.items():
        out(f"  {name:<26} {value:7.3f}")
    return accuracy
