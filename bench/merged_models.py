"""Real architectures merged by svdfuse and served two ways, for the model-forward benchmarks.

A base with random weights (nothing is downloaded), a few fine-tuned-like copies (a low-rank
task matrix plus noise on every merged matrix, small shifts elsewhere), `svdfuse.merge`, then:
`lowrank` = `result.to_module(base)` (SVDLinear layers, attention as SVDMultiheadAttention),
`dense` = the same model folded back by `svdfuse.nn.materialize` (plain nn.Linear with
W0 + U diag(σ) Vᵀ), and `stacked(tasks)`: `tasks` σ-perturbed copies of `lowrank` (as Stage 2
would leave them) stacked for serving a σ per request.

- "minilm": a `transformers.BertModel` of all-MiniLM-L6-v2's config (6 layers × 384, 12 heads,
  MLP 1536): MiniLM's real architecture; the weights package is not on the GPU machine.
- "vit-b-32": open_clip's ViT-B-32, its 48 visual block matrices merged (the paper's setting);
  only where open_clip is importable.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

import svdfuse
from svdfuse.nn import materialize, svd_layers
from svdfuse.serving import stack_tasks
from workloads import perturbed_sources

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512, type_vocab_size=2)
MINILM_SMALL = dict(MINILM, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)


def available() -> dict[str, str | None]:
    """name -> None if the model can be built here, else why not."""
    return {
        "minilm": None if importlib.util.find_spec("transformers") else "transformers is not installed",
        "vit-b-32": None if importlib.util.find_spec("open_clip") else "open_clip is not installed (carry its wheels)",
    }


def _sources(base: nn.Module, count: int, merged: Callable[[str, torch.Tensor], bool], device: torch.device) -> list[dict]:
    return perturbed_sources({key: t.to(device) for key, t in base.state_dict().items()}, count, merged)


def build(name: str, device: torch.device, dtype: torch.dtype, *, small: bool = False, sources: int = 3) -> dict:
    """{"lowrank": module, "dense": module, "inputs": batch -> forward kwargs/args, "forward": (model, inputs) -> out, "k": k}."""
    torch.manual_seed(0)
    if name == "minilm":
        from transformers import BertConfig, BertModel

        base = BertModel(BertConfig(**(MINILM_SMALL if small else MINILM))).eval()
        k, include = 38, None  # 10% of 384, as the paper's 76 of 768
        seq, vocab = (16 if small else 128), base.config.vocab_size

        def inputs(batch: int):
            return torch.randint(0, vocab, (batch, seq), device=device)

        def forward(model, x):
            return model(input_ids=x).last_hidden_state
    elif name == "vit-b-32":
        import open_clip

        base = open_clip.create_model("ViT-B-32", pretrained=None).eval()
        # Small: one block's 4 matrices, enough to exercise SVDLinear and SVDMultiheadAttention.
        k, include = (8, ["visual.transformer.resblocks.0.*"]) if small else (76, ["visual.transformer.*"])

        def inputs(batch: int):
            return torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)

        def forward(model, x):
            return model.encode_image(x)
    else:
        raise ValueError(f"unknown model {name!r}; known: minilm, vit-b-32")
    base = base.to(device)  # the merge reads the base on the device, and to_module copies it
    prefix = include[0].rstrip("*") if include else ("encoder.", "pooler.")
    merged = lambda key, t: t.dim() == 2 and key.startswith(prefix)  # noqa: E731
    result = svdfuse.merge(_sources(base, sources, merged, device), k=k, base=base, include=include, device=device)
    lowrank = result.to_module(base).to(device=device, dtype=dtype).eval()
    dense = materialize(copy.deepcopy(lowrank)).eval()
    stacked = functools.partial(_stacked, lowrank)
    return {"lowrank": lowrank, "dense": dense, "stacked": stacked, "inputs": inputs, "forward": forward, "k": k}


def _stacked(model: nn.Module, tasks: int) -> nn.Module:
    """`tasks` copies of `model`, each σ scaled by its own factors in [1, 2), stacked for serving."""
    gen = torch.Generator().manual_seed(1)
    copies = []
    for _ in range(tasks):
        adapted = copy.deepcopy(model)
        with torch.no_grad():
            for _, layer in svd_layers(adapted):
                layer.sigma.mul_(1 + torch.rand(layer.sigma.shape, generator=gen).to(layer.sigma))
        copies.append(adapted)
    return stack_tasks(copies)
