"""What the study trains: linear probes, the sources' fine-tunes and every method's Stage 2, all
through one loop (`train`), and the versioned on-disk cache of what is expensive to redo.

One loop for everything, so that methods differ only in what they merge and which parameters
Stage 2 trains: AdamW, cosine schedule, a fixed number of epochs with early stopping on the
validation split (the epoch with the best validation accuracy is kept; epoch 0 is the start).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from svdfuse.study.tasks import StudyError

# Everything that changes what a cached artifact means bumps this: older caches are refused.
PROTOCOL_VERSION = 3
HEAD_CS = (0.001, 0.01, 0.1, 1.0)
# Standardization divides by at least this fraction of the mean feature std (see `fit_head`).
HEAD_STD_FLOOR = 0.1

__all__ = [
    "Batches", "Schedule", "Trained", "accuracy", "correct", "embed", "fit_head", "train", "cache_key", "load_cached",
    "save_atomic", "PROTOCOL_VERSION",
]  # fmt: skip


class Batches:
    """A re-iterable of `(inputs, labels)` mini-batches, reshuffled on each pass by a seeded
    generator; `inputs` is a tensor or a tuple of tensors sharing their first dim."""

    def __init__(self, inputs: Any, labels: Tensor, size: int, seed: int) -> None:
        self.inputs, self.labels, self.size = inputs, labels, size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.size)

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=self.gen)
        for i in range(0, len(order), self.size):
            idx = order[i : i + self.size]
            yield index(self.inputs, idx), self.labels[idx]


def index(inputs: Any, idx: Tensor) -> Any:
    """Rows `idx` of `inputs`, a tensor or a tuple of tensors sharing their first dim."""
    return tuple(t[idx] for t in inputs) if isinstance(inputs, tuple) else inputs[idx]


@torch.no_grad()
def embed(model: nn.Module, inputs: Any, batch: int = 256) -> Tensor:
    """`model(inputs)` in eval mode, in batches: (n, ...)."""
    model.eval()
    n = len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)
    return torch.cat([model(index(inputs, torch.arange(i, min(i + batch, n)))) for i in range(0, n, batch)])


def correct(model: nn.Module, inputs: Any, labels: Tensor) -> Tensor:
    """Whether `model` classifies each example right: bool (n,)."""
    return embed(model, inputs).argmax(-1) == labels


def accuracy(model: nn.Module, inputs: Any, labels: Tensor) -> float:
    """Top-1 accuracy (%) of `model` on `(inputs, labels)`."""
    return correct(model, inputs, labels).float().mean().item() * 100


def fit_head(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], classes: int) -> tuple[nn.Linear, float]:
    """A linear probe on frozen embeddings (n, d): multinomial logistic regression on standardized
    embeddings, its inverse regularization C chosen on the validation split; the standardization
    is folded into the returned head (d -> classes), so it takes raw embeddings. Returns it
    (requires_grad off) and its validation accuracy (%)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mean, std = train[0].mean(0), train[0].std(0).nan_to_num(1.0)
    # A ReLU feature that fires on a handful of examples has a std ~1e-4 of the others'; scaled to
    # unit variance, it got a weight of ~1e3 in the folded head, so the first change of that feature
    # by a fine-tune or Stage 2 swung the logits and training never left its start. Floored, such
    # a feature counts for as little as it varies.
    std = std.clamp_min(max(HEAD_STD_FLOOR * std.mean().item(), 1e-6))
    scaled = lambda x: ((x - mean) / std).numpy()  # noqa: E731
    best = None
    # Cs ascending, each fit starting from the last one's solution: a few iterations each, where
    # a cold start at C = 1 on a thousand-dimensional embedding takes hundreds.
    clf = LogisticRegression(max_iter=1000, warm_start=True)
    # One BLAS thread: lbfgs makes thousands of tiny BLAS calls, and waking a second thread for
    # each cost 4x the time on a busy 2-core machine (1.3 s against 4.9 s for 160 x 1280).
    with threadpool_limits(1):
        for C in HEAD_CS:
            clf.set_params(C=C).fit(scaled(train[0]), train[1].numpy())
            score = clf.score(scaled(val[0]), val[1].numpy())
            if best is None or score > best[0]:
                best = (score, clf.coef_.copy(), clf.intercept_.copy())
    score, coef, intercept = best
    coef, intercept = torch.tensor(coef, dtype=torch.float32), torch.tensor(intercept, dtype=torch.float32)
    if coef.shape[0] == 1:  # sklearn keeps one row for two classes: logit of class 1 minus that of class 0
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    if coef.shape[0] != classes:
        raise StudyError(f"the training split holds {coef.shape[0]} of the task's {classes} classes; use more training examples")
    head = nn.Linear(train[0].shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(coef / std)
        head.bias.copy_(intercept - (coef / std) @ mean)
    return head.requires_grad_(False), score * 100


@dataclass(frozen=True)
class Schedule:
    """How `train` trains: epochs (at most; early stopping on validation), batch size, and the
    linear head's learning rate (the same for every method)."""

    epochs: int
    batch: int = 32
    head_lr: float = 1e-3
    patience: int = 5


@dataclass
class Trained:
    """What `train` left: validation accuracy (%) of the kept epoch, which epoch (0: the start)."""

    val: float
    epoch: int


def train(
    model: nn.Module, groups: Iterable[tuple[Iterable[nn.Parameter], float]], data: tuple[Any, Tensor], val: tuple[Any, Tensor],
    schedule: Schedule, seed: int,
) -> Trained:
    """Train the parameters of `groups` ((params, lr) pairs) of `model` on `data` by cross-entropy
    (AdamW, no weight decay, cosine schedule over all epochs); after each epoch, measure validation
    accuracy, keep the best state (the first of equals, the start included) and stop after
    `patience` epochs without a gain. `model` is left in the kept state, eval mode."""
    torch.manual_seed(seed)
    groups = [{"params": list(params), "lr": lr} for params, lr in groups]
    groups = [g for g in groups if g["params"]]
    trainable = [p for g in groups for p in g["params"]]
    for p in trainable:
        p.requires_grad_(True)
    batches = Batches(data[0], data[1], schedule.batch, seed)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.epochs * len(batches))
    best = Trained(accuracy(model, *val), 0)
    kept = [p.detach().clone() for p in trainable]
    for epoch in range(1, schedule.epochs + 1):
        model.train()
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        score = accuracy(model, *val)
        if score > best.val:
            best, kept = Trained(score, epoch), [p.detach().clone() for p in trainable]
        elif epoch - best.epoch >= schedule.patience:
            break
    with torch.no_grad():
        for p, value in zip(trainable, kept):
            p.copy_(value)
    model.eval()
    return best


# ------------------------------------------------------------------------------------- cache


def cache_key(**parts: Any) -> str:
    """A short stable hash of what a cached artifact depends on."""
    text = json.dumps({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in parts.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_cached(path: Path, key: str, task: str) -> Any | None:
    """The payload cached at `path`, None when there is none; a file written for other data or by
    another protocol version is refused, naming the task (the study never mixes them)."""
    if not path.is_file():
        return None
    stored = torch.load(path, weights_only=False)
    if not isinstance(stored, dict) or stored.get("protocol") != PROTOCOL_VERSION:
        found = stored.get("protocol") if isinstance(stored, dict) else type(stored).__name__
        raise StudyError(f"task {task}: cache {path} is from study protocol {found}, this is protocol {PROTOCOL_VERSION}; delete it or use another --cache")
    if stored.get("key") != key:
        raise StudyError(f"task {task}: cache {path} was made from other data or settings (key {stored.get('key')}, expected {key}); delete it or use another --cache")
    return stored["payload"]


def save_atomic(payload: Any, path: Path, key: str) -> None:
    """Cache `payload` at `path` with the protocol version and `key`, through a temporary file and
    a rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"protocol": PROTOCOL_VERSION, "key": key, "payload": payload}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
