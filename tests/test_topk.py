"""The Triton global top-k (`svdfuse.kernels.topk`): selection bit-identical to the reference's
stable sort (and to `torch.topk`'s values), ties by index, for a batch of layers in one launch."""

import pytest
import torch

from svdfuse import ops, reference

topk = pytest.importorskip("svdfuse.kernels.topk", reason="needs triton")


def _assert_same_selection(got, want):
    for name, g, w in zip(("values", "source", "component"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        mismatch = (g != w).nonzero()
        assert mismatch.numel() == 0, f"{name} differs first at {mismatch[:3].tolist()}"
        if name == "values":  # -0.0 stays -0.0
            assert torch.equal(torch.signbit(g), torch.signbit(w))


CASES = [  # (shape of S: (layers..., sources, r), k)
    ((3, 5, 7), 6),
    ((2, 2, 9, 4), 36),  # k = every component
    ((4, 1, 1), 1),  # one source, one component
    ((1, 20, 3), 5),
]


@pytest.mark.parametrize("shape,k", CASES)
def test_topk_components_equals_reference_with_ties(triton_device, shape, k):
    gen = torch.Generator().manual_seed(0)
    S = torch.randint(0, 4, shape, generator=gen).float()  # a few distinct values: ties everywhere
    S.view(-1)[::5] = -0.0
    got = topk.topk_components(S.to(triton_device), k)
    _assert_same_selection([t.cpu() for t in got], reference.topk_components(S, k))
    torch.testing.assert_close(got[0].cpu(), torch.topk(S.flatten(-2), k).values, rtol=0, atol=0)


def test_topk_components_orders_infinities_and_signed_zeros(triton_device):
    S = torch.tensor([[[1.0, float("-inf"), -0.0, float("inf")], [0.0, -3.0, 1.0, float("inf")]]])
    got = topk.topk_components(S.to(triton_device), 8)
    _assert_same_selection([t.cpu() for t in got], reference.topk_components(S, 8))


def test_topk_components_merges_chunks(triton_device, monkeypatch):
    # Small chunks, so that the running best-of buffer merges many of them, k not a power of two.
    monkeypatch.setattr(topk, "_MIN_CHUNK", 8)
    gen = torch.Generator().manual_seed(1)
    S = torch.rand(3, 13, 11, generator=gen)
    S[1, 7:, :] = S[1, 0, 0]  # a block of ties spread over chunks
    for k in (1, 5, 8, 9, 100):
        got = topk.topk_components(S.to(triton_device), k)
        _assert_same_selection([t.cpu() for t in got], reference.topk_components(S, k))


def test_topk_components_empty_layer_batch(triton_device):
    values, source, component = topk.topk_components(torch.zeros(0, 4, 3, device=triton_device), 2)
    assert values.shape == source.shape == component.shape == (0, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("layers,sources,r,k", [(48, 20, 76, 76), (48, 400, 16, 16), (1, 7, 300, 1000), (5, 3, 5, 15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_components_on_cuda_runs_the_kernel(cuda, monkeypatch, layers, sources, r, k, dtype):
    launches = []
    kernel = topk.topk_components
    monkeypatch.setattr(topk, "topk_components", lambda *args: launches.append(args) or kernel(*args))
    gen = torch.Generator().manual_seed(2)
    S = torch.rand(layers, sources, r, generator=gen).sort(-1, descending=True).values.to(dtype)
    S[:, 1] = S[:, 0]  # two sources with identical spectra: ties across sources
    got = ops.topk_components(S.to(cuda), k)
    _assert_same_selection([t.cpu() for t in got], reference.topk_components(S, k))
    assert len(launches) == 1
