"""TIES's exact trim over row blocks against a brute-force sort, on ties-heavy task vectors."""

import math

import pytest
import torch

from svdfuse.methods.trim import exact_trim


def _brute(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep-mask of the floor(density · numel) largest |τ| per source, ties to the earlier flat index."""
    T = tau.shape[0]
    a = tau.reshape(T, -1).abs()
    keep = math.floor(density * a.shape[1])
    mask = torch.zeros_like(a, dtype=torch.bool)
    for i in range(T):
        index = torch.arange(a.shape[1], dtype=torch.float64)
        order = torch.from_numpy(__import__("numpy").lexsort((index.numpy(), -a[i].double().numpy())))[:keep]
        mask[i, order] = True
    return mask.reshape(tau.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("limit", [1 << 22, 0], ids=["bracket", "radix"])
def test_exact_trim_matches_a_sort_with_ties_for_any_block_size(dtype, limit):
    gen = torch.Generator().manual_seed(0)
    T, R, n = 3, 23, 29
    for values in ("continuous", "few", "zeros"):
        tau = torch.randn(T, R, n, generator=gen, dtype=dtype)
        if values == "few":
            tau = torch.round(tau * 3) / 3  # many equal magnitudes at any threshold
        if values == "zeros":
            tau[:, : R // 2] = 0  # half the entries unchanged, as in sparse fine-tunes
        for density in (0.0, 0.05, 0.2, 0.5, 0.7, 1.0):
            expected = _brute(tau, density)
            for block in (4, R):
                def blocks():
                    for s in range(0, R, block):
                        yield s * n, tau[:, s : s + block].clone(), None

                trim = exact_trim(blocks, R * n, T, density, dtype, limit=limit)
                got = torch.cat([trim.mask(tau[:, s : s + block], s * n) for s in range(0, R, block)], 1)
                assert torch.equal(got, expected), (values, density, block, (got != expected).nonzero()[:3].tolist())


def test_the_bracket_margin_widens_for_a_sample_of_alike_rows():
    """A sample read as whole rows is a cluster sample: where each row's entries are alike, the
    sampled fraction above a threshold varies like a sample of rows, not of entries, and the
    bracket's margin must follow (6 deviations of each); for independent entries it stays binomial."""
    from svdfuse.methods.trim import _MARGIN, _margins

    gen = torch.Generator().manual_seed(0)
    clusters, m, p = 100, 50, 0.2
    size = clusters * m
    alike = torch.ones(1, clusters, m) + 1e-3 * torch.rand(1, clusters, m, generator=gen)
    alike[:, : int(p * clusters)] += 9.0  # a fifth of the rows hold every large entry
    independent = torch.rand(1, clusters, m, generator=gen)
    by_rows = _MARGIN * size * math.sqrt(p * (1 - p) / clusters)
    by_entries = _MARGIN * size * math.sqrt(p * (1 - p) / size)
    assert float(_margins(alike, p)[0]) >= 0.9 * by_rows  # ~7x the binomial margin
    assert float(_margins(independent, p)[0]) <= 1.5 * by_entries + 8
