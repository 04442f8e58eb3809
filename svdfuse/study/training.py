"""What the study trains outside Stage 2: each task's frozen linear head, and each source's fine-tune.

Every task gets one linear head fitted on the *pretrained* embeddings of its training split (the
counterpart of CLIP's zero-shot head in the paper: made from the pretrained model alone, frozen
ever after). A source is the top of the network fine-tuned in full on its task through that frozen
head, with a fixed seed; it is cached on disk by a key of everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from svdfuse.sinks import save_safetensors

HEAD_CS = (0.001, 0.01, 0.1, 1.0)

__all__ = ["Batches", "FineTune", "accuracy", "fit_head", "fine_tune", "cached_fine_tune", "save_atomic"]


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
            yield _index(self.inputs, idx), self.labels[idx]


def _index(inputs: Any, idx: Tensor) -> Any:
    return tuple(t[idx] for t in inputs) if isinstance(inputs, tuple) else inputs[idx]


@torch.no_grad()
def embed(model: nn.Module, inputs: Any, batch: int = 256) -> Tensor:
    """`model(inputs)` in eval mode, in batches: (n, ...)."""
    model.eval()
    n = len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)
    return torch.cat([model(_index(inputs, torch.arange(i, min(i + batch, n)))) for i in range(0, n, batch)])


def accuracy(model: nn.Module, inputs: Any, labels: Tensor) -> float:
    """Top-1 accuracy (%) of `model` on `(inputs, labels)`."""
    return (embed(model, inputs).argmax(-1) == labels).float().mean().item() * 100


def fit_head(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], classes: int) -> tuple[nn.Linear, float]:
    """A linear probe on frozen embeddings (n, d): multinomial logistic regression on standardized
    embeddings, its inverse regularization C chosen on the validation split; the standardization
    is folded into the returned head (d -> classes), so it takes raw embeddings. Returns it and C."""
    from sklearn.linear_model import LogisticRegression

    mean, std = train[0].mean(0), train[0].std(0).clamp_min(1e-6)
    scaled = lambda x: ((x - mean) / std).numpy()  # noqa: E731
    best = None
    for C in HEAD_CS:
        clf = LogisticRegression(C=C, max_iter=1000).fit(scaled(train[0]), train[1].numpy())
        score = clf.score(scaled(val[0]), val[1].numpy())
        if best is None or score > best[0]:
            best = (score, C, clf)
    _, C, clf = best
    coef, intercept = torch.tensor(clf.coef_, dtype=torch.float32), torch.tensor(clf.intercept_, dtype=torch.float32)
    if coef.shape[0] == 1:  # sklearn keeps one row for two classes: logit of class 1 minus that of class 0
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    if coef.shape[0] != classes:
        raise ValueError(f"the training split holds {coef.shape[0]} of the task's {classes} classes; use more training examples")
    head = nn.Linear(train[0].shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(coef / std)
        head.bias.copy_(intercept - (coef / std) @ mean)
    return head.requires_grad_(False), C


@dataclass(frozen=True)
class FineTune:
    """Full fine-tuning of the top through a frozen head (AdamW, cosine schedule)."""

    epochs: int
    lr: float
    batch: int = 32
    weight_decay: float = 0.0


def fine_tune(top: nn.Module, head: nn.Module, data: tuple[Any, Tensor], spec: FineTune, seed: int) -> nn.Module:
    """Train every parameter of `top` (a copy) on `data` through the frozen `head`; eval mode."""
    import copy

    torch.manual_seed(seed)
    model = nn.Sequential(copy.deepcopy(top).requires_grad_(True), head)
    batches = Batches(data[0], data[1], spec.batch, seed)
    params = list(model[0].parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs * len(batches))
    model.train()
    for _ in range(spec.epochs):
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model[0].eval().requires_grad_(False)


def cache_key(**parts: Any) -> str:
    """A short stable hash of what a cached artifact depends on."""
    text = json.dumps({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in parts.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file in `path`'s folder, then rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_fine_tune(
    top: nn.Module, head: nn.Module, data: tuple[Any, Tensor], spec: FineTune, seed: int, path: Path
) -> dict[str, Tensor]:
    """The fine-tuned top's state dict, from `path` (a .safetensors file) or trained and saved there."""
    from safetensors.torch import load_file

    if path.is_file():
        return load_file(path)
    state = {k: v.contiguous() for k, v in fine_tune(top, head, data, spec, seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path)
    return state
