"""TSV-M and Iso-CTS through svdfuse vs the published approach (a full SVD per task per layer).

Shapes are CLIP ViT-B/32's visual blocks (12 × in_proj 2304×768, out_proj 768×768, c_fc
3072×768, c_proj 768×3072 = 48 matrices), sources GPU-resident. Both paths run in this process;
the table gives time, speed-up and the merged task matrices' relative difference, for svdfuse's
default (randomized truncated SVDs) and with exact SVDs. The exact path reproduces the published
result to fp32 rounding; the randomized one may pick other vectors inside near-degenerate (flat,
noise-like) parts of a task's spectrum, equally good by Eckart–Young but not the same vectors, so
its difference measures that freedom, not an error.

    python bench/bench_methods.py --device cuda               # the full 48 matrices, 8 and 20 sources
    python bench/bench_methods.py --device cpu --blocks 1 --sources 8   # a smoke run
"""

from __future__ import annotations

import argparse
import math

import torch

from common import median_ms, record
import svdfuse

BLOCK = {"attn.in_proj_weight": (2304, 768), "attn.out_proj.weight": (768, 768), "mlp.c_fc.weight": (3072, 768), "mlp.c_proj.weight": (768, 3072)}


def make_sources(blocks: int, T: int, device: torch.device, seed: int = 0) -> tuple[dict, list[dict]]:
    """A base and T sources whose task matrices have a decaying spectrum (rank-32 signal + noise)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = {f"blocks.{b}.{name}": torch.randn(shape, generator=gen, device=device) * 0.02 for b in range(blocks) for name, shape in BLOCK.items()}
    sources = []
    for _ in range(T):
        src = {}
        for key, W0 in base.items():
            m, n = W0.shape
            signal = torch.randn(m, 32, generator=gen, device=device) @ torch.randn(32, n, generator=gen, device=device) / 32
            src[key] = W0 + 1e-3 * signal + 1e-4 * torch.randn(m, n, generator=gen, device=device)
        sources.append(src)
    return base, sources


def _polar(A: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def tsv_m_published(base: dict, sources: list[dict]) -> dict:
    out = {}
    for key, W0 in base.items():
        T, r = len(sources), min(W0.shape)
        b = r // T
        us, ss, vs = [], [], []
        for src in sources:  # one full SVD per task per layer
            U, S, Vh = torch.linalg.svd(src[key] - W0, full_matrices=False)
            us.append(U[:, :b]), ss.append(S[:b]), vs.append(Vh[:b].T)
        out[key] = (_polar(torch.cat(us, 1)) * torch.cat(ss)) @ _polar(torch.cat(vs, 1)).T
    return out


def iso_cts_published(base: dict, sources: list[dict], common: float = 0.8) -> dict:
    out = {}
    for key, W0 in base.items():
        taus = [src[key] - W0 for src in sources]
        U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
        r = S.numel()
        k = math.floor(common * r)
        s = (r - k) // len(taus)
        us, ss, vs = [U[:, :k]], [S[:k]], [Vh[:k].T]
        for tau in taus:  # one full SVD per task per layer
            Ut, St, Vth = torch.linalg.svd(tau - us[0] @ (us[0].T @ tau), full_matrices=False)
            us.append(Ut[:, :s]), ss.append(St[:s]), vs.append(Vth[:s].T)
        out[key] = torch.cat(ss).mean() * _polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 1)).T
    return out


PUBLISHED = {"tsv_m": tsv_m_published, "iso_cts": iso_cts_published}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--sources", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    print(f"{'method':8} {'T':>3} {'matrices':>8} {'svd':>10} {'published ms':>13} {'svdfuse ms':>11} {'speed-up':>9} {'rel diff':>9}")
    for T in args.sources:
        base, sources = make_sources(args.blocks, T, device)
        for method, published in PUBLISHED.items():
            ms_theirs = median_ms(lambda: published(base, sources), device, warmup=1, repeats=args.repeats)
            truth = published(base, sources)
            for svd in ("randomized", "exact"):
                options = svdfuse.SVDOptions(method="auto" if svd == "randomized" else "exact")
                ours = lambda: svdfuse.merge(sources, base=base, method=method, svd=options, device=device)  # noqa: E731
                ms_ours = median_ms(ours, device, warmup=1, repeats=args.repeats)
                result = ours()
                diff = max(((result.delta(k) - truth[k]).norm() / truth[k].norm()).item() for k in truth)
                rows.append({"method": method, "sources": T, "matrices": len(base), "svd": svd, "published_ms": ms_theirs,
                             "svdfuse_ms": ms_ours, "speedup": ms_theirs / ms_ours, "max_rel_diff": diff})
                print(f"{method:8} {T:3d} {len(base):8d} {svd:>10} {ms_theirs:13.1f} {ms_ours:11.1f} {ms_theirs / ms_ours:9.2f} {diff:9.2e}")
    print(f"wrote {record('methods', device, rows)}")


if __name__ == "__main__":
    main()
