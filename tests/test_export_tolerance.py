"""A merge stored in bf16 exports as the LoRA adapter of its rank: the re-decomposition of a dense
merged model tells a merge of rank k from one with a real tail by the rounding of the merged
weight's own dtype (bf16's eps is 2^16 times fp32's), not by fp32's."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

import svdfuse

K = 2


def _models(T: int = 3, seed: int = 0) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A bf16 two-layer base and T bf16 fine-tunes, each moving its weights by a rank-3 update."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 32)).to(torch.bfloat16)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    sources = []
    for _ in range(T):
        state = {}
        for key, v in base.state_dict().items():
            if v.dim() == 2:
                update = torch.randn(v.shape[0], 3, generator=gen) @ torch.randn(3, v.shape[1], generator=gen) / 3
            else:
                update = 0.1 * torch.randn(v.shape, generator=gen)
            state[key] = (v.float() + update).to(torch.bfloat16)
        sources.append(state)
    return base, sources


def test_a_bf16_merge_of_rank_k_exports_as_a_rank_k_adapter(tmp_path):
    base, sources = _models()
    merged = tmp_path / "merged.safetensors"
    svdfuse.merge(sources, k=K, base=base, output=merged, device="cpu", progress=False)
    state = load_file(str(merged))
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    for label, model in (("file", merged), ("state dict", state)):
        out = tmp_path / f"adapter-{label.replace(' ', '-')}"
        svdfuse.export_lora(model, out, base=base, rank=None if label == "file" else K, device="cpu")
        adapter = load_file(str(out / "adapter_model.safetensors"))
        for name in ("0", "2"):
            A = adapter[f"base_model.model.{name}.lora_A.weight"].double()
            B = adapter[f"base_model.model.{name}.lora_B.weight"].double()
            assert A.shape[0] == B.shape[1] == K, label
            W, W0 = state[f"{name}.weight"].double(), base.state_dict()[f"{name}.weight"].double()
            # The adapter is the merge up to the one bf16 rounding of the stored merged weight.
            eps = torch.finfo(torch.bfloat16).eps
            assert (B @ A - (W - W0)).abs().max().item() <= eps * W.abs().max().item(), (label, name)
