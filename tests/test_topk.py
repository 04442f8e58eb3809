"""The Triton global top-k (`svdfuse.kernels.topk`): selection bit-identical to the reference's
stable sort (and to `torch.topk`'s values), ties by index, for a batch of layers in one launch."""

import pytest
import torch

from svdfuse import ops, reference

topk = pytest.importorskip("svdfuse.kernels.topk", reason="needs triton")


def _assert_same_selection(got, want):
    for name, g, w in zip(("values", "source", "component"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        same = g == w
        if name == "values":  # NaN matches any NaN (fp16/bf16 round trips canonicalize it); -0.0 only -0.0
            same = (same & (torch.signbit(g) == torch.signbit(w))) | (g.isnan() & w.isnan())
        mismatch = (~same).nonzero()
        assert mismatch.numel() == 0, f"{name} differs first at {mismatch[:3].tolist()}"


def _nan(dtype, negative=False, payload=0):
    """A NaN of `dtype` with the sign bit and extra payload bits asked for, made through its bits:
    a float conversion may canonicalize it."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    bits = torch.full((), float("nan"), dtype=dtype).view(as_int) | payload
    return (bits | torch.iinfo(as_int).min if negative else bits).view(dtype)


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


def test_topk_components_ranks_nan_above_inf_like_torch_sort(triton_device):
    # torch.sort's order: every NaN, of either sign and any payload, above +inf, NaNs tied (lower
    # index first). A NaN in S is thus selected, never dropped, by the kernel and the reference alike.
    S = torch.tensor([[[1.0, float("inf"), 0.0, 2.0], [0.0, 3.0, float("-inf"), 0.0]], [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 0.0]]])
    S[0, 0, 2] = _nan(torch.float32, negative=True)
    S[0, 1, 0] = _nan(torch.float32, payload=1)
    S[0, 1, 3] = _nan(torch.float32, negative=True, payload=0x3FFFFF)
    S[1, 1, 3] = _nan(torch.float32, negative=True)  # the last of its layer
    got = topk.topk_components(S.to(triton_device), 4)
    want = reference.topk_components(S, 4)
    _assert_same_selection([t.cpu() for t in got], want)
    assert (want[1] * 4 + want[2]).tolist() == [[2, 4, 7, 1], [7, 6, 5, 4]]
    torch.testing.assert_close(got[0].cpu(), torch.topk(S.flatten(-2), 4).values, rtol=0, atol=0, equal_nan=True)


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,k", [(torch.float32, 76), (torch.bfloat16, 76), (torch.float32, topk.MAX_K + 1), (torch.float64, 76)])
def test_topk_components_captured_in_a_cuda_graph(cuda, dtype, k):
    # The kernel (fp32, bf16) and the reference (k > MAX_K, fp64). Rows of 6000 values: CUDA sorts
    # rows that long by radix, on the bits, where a negative NaN alone would rank last.
    gen = torch.Generator().manual_seed(3)
    clean = torch.rand(4, 30, 200, generator=gen).to(dtype)
    S = clean.to(cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, the allocator pools
        eager = ops.topk_components(S, k)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.topk_components(S, k)
    graph.replay()
    _assert_same_selection([t.cpu() for t in captured], [t.cpu() for t in eager])
    # Eager raises on NaN; the graph cannot look, so a NaN must rank first instead.
    poisoned = clean.clone()
    poisoned[1, 7, 3] = _nan(dtype, negative=True)
    poisoned[2, 29, 199] = _nan(dtype)
    S.copy_(poisoned)
    graph.replay()
    got = [t.cpu() for t in captured]
    _assert_same_selection(got, reference.topk_components(poisoned, k))
    assert got[0][1, 0].isnan() and got[0][2, 0].isnan() and not got[0][[0, 3]].isnan().any()
