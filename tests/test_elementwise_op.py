"""`svdfuse.ops.merge_block` and the op behind it, `torch.ops.svdfuse.merge_block`: numerics against
float64 truth, DARE's draws against the method's own masks, the block's flags, errors, opcheck.

The compiled CPU kernel adds the sources in order with the reference's roundings, so on the CPU it
must equal `reference.merge_block` bit for bit, as well as stay within 2x torch's own error."""

import math

import pytest
import torch

from svdfuse import ops, reference
from svdfuse.methods.elementwise import chunk_seeds, survivors

from _helpers import assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHUNK = reference.DARE_CHUNK


@pytest.fixture
def native_op():
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    return torch.ops.svdfuse.merge_block.default


def _block(T, N, dtype, seed=0):
    """sources (T, N), base (N,): a base of O(1) and task vectors of O(1e-2), as fine-tunes have."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=gen, dtype=torch.float64)
    sources = base + 1e-2 * torch.randn(T, N, generator=gen, dtype=torch.float64)
    return sources.to(dtype), base.to(dtype)


def _truth(sources, base, weights, scale, divisor, keep):
    tau = sources.double() - base.double()
    return base.double() + (tau * weights.double()[:, None] * keep).sum(0) / divisor * scale


def _args(sources, base, weights, scale, divisor, seeds=None, start=0, drop=0, same=False, add=True, dtype=torch.float32):
    return (list(sources), base, weights, scale, divisor, seeds, start, drop, same, add, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,start", [(5, 3 * 4099, 0), (3, CHUNK + 777, CHUNK - 333), (1, 1, 5)])
@pytest.mark.parametrize("dare", [False, True])
def test_merge_block_within_torch_error_and_equal_to_reference(native_op, dtype, T, N, start, dare):
    sources, base = _block(T, N, dtype)
    weights = torch.linspace(0.5, 1.5, T)
    seeds = chunk_seeds(7, "w", T, start, N) if dare else None
    drop, rate = (int(0.3 * 2**24), 0.3) if dare else (0, 0.0)
    args = _args(sources, base, weights, 0.7, 1.3, seeds, start, drop)
    value, differs, zero, bad = native_op(*args)
    ref = reference.merge_block(*args)
    assert torch.equal(value, ref[0])
    keep = torch.stack([survivors(7, "w", i, start, torch.Size([N]), rate, torch.device("cpu")) for i in range(T)])
    truth = _truth(sources, base, weights, 0.7, 1.3, keep.double())
    # torch's own way in fp32: the method functions' chain of ops
    tau = (sources.float() - base.float()) * weights[:, None] * keep
    torch_out = tau.sum(0).div_(1.3).mul_(0.7).add_(base.float())
    assert_within_torch_error(value, truth, torch_out)
    assert torch.equal(differs, (sources != base).any(1)) and not zero.any() and int(bad) == -1


def test_dare_draws_are_the_methods_masks(native_op):
    """Sources whose task vectors are 1 everywhere: the merged task vector counts the survivors."""
    start, N, rate = 2 * CHUNK - 1000, CHUNK + 5000, 0.9
    sources, base = torch.ones(2, N), torch.zeros(N)
    seeds = chunk_seeds(3, "layer.weight", 2, start, N)
    expected = [survivors(3, "layer.weight", i, start, torch.Size([N]), rate, torch.device("cpu")).float() for i in range(2)]
    one = ops.merge_block(sources[:1], base, seeds=seeds[:1], start=start, drop_rate=rate, add_base=False).value
    both = ops.merge_block(sources, base, seeds=seeds, start=start, drop_rate=rate, add_base=False).value
    assert torch.equal(one, expected[0]) and torch.equal(both, expected[0] + expected[1])
    assert 0.05 < one.mean() < 0.15


@pytest.mark.parametrize("dtype", DTYPES)
def test_flags_name_what_differs_what_is_zero_and_the_first_non_finite(native_op, dtype):
    T, N = 4, 2 * CHUNK + 3
    sources, base = _block(T, N, dtype)
    sources[1] = base  # unchanged
    sources[2] = 0.0  # all zeros
    sources[3, N - 2] = float("nan")  # in the last tile
    sources[3, N - 1] = float("inf")
    value, differs, zero, bad = native_op(*_args(sources, base, torch.ones(T), 1.0, 1.0))
    assert differs.tolist() == [True, False, True, True]
    assert zero.tolist() == [False, False, True, False, False]
    assert int(bad) == N - 2 and value[N - 2].isnan()
    base[:] = 0.0
    _, _, zero, _ = native_op(*_args(sources[:3], base, torch.ones(3), 1.0, 1.0))
    assert zero.tolist() == [False, False, True, True]


def test_nan_survives_a_drop_and_a_zero_weight(native_op):
    N = 300
    sources, base = _block(2, N, torch.float32)
    sources[0, 17] = float("nan")
    seeds = chunk_seeds(0, "k", 2, 0, N)
    value, _, _, bad = native_op(*_args(sources, base, torch.tensor([0.0, 1.0]), 1.0, 1.0, seeds, 0, drop=1 << 24))
    assert int(bad) == 17 and value[17].isnan()


def test_overflow_of_the_output_dtype_is_reported(native_op):
    sources = torch.full((2, 10), 60000.0)
    base = torch.zeros(10)
    value, _, _, bad = native_op(*_args(sources, base, torch.ones(2), 1.0, 1.0, dtype=torch.float16))
    assert int(bad) == 0 and value.dtype == torch.float16 and value.isinf().all()


def test_same_is_zero_keeps_an_infinite_entry_equal_to_the_base(native_op):
    base = torch.tensor([float("-inf"), 1.0, 2.0])
    sources = torch.stack([base, base + 1.0])
    kept = native_op(*_args(sources, base, torch.ones(2), 1.0, 2.0, same=True))[0]
    assert torch.equal(kept, torch.tensor([float("-inf"), 1.5, 2.5]))
    assert native_op(*_args(sources, base, torch.ones(2), 1.0, 2.0))[0][0].isnan()  # -inf - -inf


def test_strided_sources_and_float64_through_the_front_door(native_op):
    buffer = torch.randn(3, 50, 7, dtype=torch.float64)
    W, W0 = buffer[:, :41].reshape(3, -1), torch.randn(41 * 7, dtype=torch.float64)
    assert not W.is_contiguous()
    out = ops.merge_block(W, W0, divisor=3.0)
    assert out.value.dtype == torch.float64
    torch.testing.assert_close(out.value, W0 + (W - W0).sum(0) / 3.0, atol=1e-14, rtol=0)
    fp32 = ops.merge_block(W.float(), W0.float(), divisor=3.0)
    strided = native_op(*_args(buffer.float()[:, :41].reshape(3, -1), W0.float(), torch.ones(3), 1.0, 3.0))[0]
    assert torch.equal(fp32.value, strided)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "base": a["base"][:-1]}, r"source 0 must be contiguous of shape \(N,\) = \[9\] \(the base's\), found \[10\]"),
        (lambda a: {**a, "base": a["base"].double()}, "source 0 must have the base's dtype torch.float64, found torch.float32"),
        (lambda a: {**a, "weights": torch.ones(2)}, r"weights must be torch.float32 of shape \(T,\) = \[3\]"),
        (lambda a: {**a, "seeds": torch.zeros(3, 2, dtype=torch.int64)}, r"seeds must be int64 \(T, chunks\) = \[3, 1\]"),
        (lambda a: {**a, "drop_rate": 1.0}, r"drop_rate must be in \[0, 1\), found 1.0"),
        (lambda a: {**a, "scale": float("nan")}, "scale must be finite, found nan"),
        (lambda a: {**a, "base": a["base"].int()}, "base must be float32, float64, float16 or bfloat16, found torch.int32"),
        (lambda a: {**a, "sources": a["sources"][:, ::2]}, r"source 0 must be contiguous of shape \(N,\) = \[10\]"),
    ],
)
def test_bad_input_is_refused_naming_it(change, message):
    good = dict(sources=torch.ones(3, 10), base=torch.ones(10), weights=torch.ones(3), seeds=None)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.merge_block(**change(good))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dare", [False, True])
def test_opcheck(dtype, dare):
    sources, base = _block(3, 1000, dtype)
    seeds = chunk_seeds(1, "k", 3, 500, 1000) if dare else None
    args = _args(sources, base, torch.ones(3), 0.3, 1.0, seeds, 500, 1 << 23, False, True, dtype)
    torch.library.opcheck(torch.ops.svdfuse.merge_block.default, args)


# -- ties_block ---------------------------------------------------------------------------------


def _ties_args(sources, base, threshold, cutoff, start=0, keep_none=False, weights=None, scale=1.0, mean=True,
               positive=False, same=False, add=True, dtype=torch.float32):  # fmt: skip
    return (list(sources), base, weights, threshold, cutoff, start, keep_none, scale, mean, positive, same, add, dtype)


def _torch_ties(tau, keep, weights, scale, mean, positive):
    """TIES as a chain of torch ops in tau's dtype (the method before the fused op)."""
    t = tau * keep
    if weights is not None:
        t = t * weights[:, None]
    elected = t.sum(0).sign()
    if positive:
        elected[elected == 0] = 1
    agree = (t * elected) > 0
    merged = (t * agree).sum(0)
    if mean:
        count = agree.sum(0) if weights is None else (agree * weights[:, None]).sum(0)
        merged = merged / count.masked_fill(count == 0, 1)
    return merged * scale


@pytest.fixture
def ties_op():
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    return torch.ops.svdfuse.ties_block.default


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,start", [(5, 3 * 4099, 0), (3, CHUNK + 777, 1000), (1, 7, 5), (20, 5000, 0)])
@pytest.mark.parametrize("weighted,mean,positive", [(False, True, False), (True, True, True), (True, False, False)])
def test_ties_block_within_torch_error_and_equal_to_reference(ties_op, dtype, T, N, start, weighted, mean, positive):
    sources, base = _block(T, N, dtype, seed=T)
    tau = sources.float() - base.float()
    threshold = tau.abs().quantile(0.7, dim=1) if N > 1 else tau.abs()[:, 0]
    cutoff = torch.full((T,), start + N // 2, dtype=torch.int64)
    weights = torch.linspace(0.5, 1.5, T) if weighted else None
    args = _ties_args(sources, base, threshold, cutoff, start, weights=weights, scale=0.8, mean=mean, positive=positive)
    value, differs, zero, bad = ties_op(*args)
    assert torch.equal(value, reference.ties_block(*args)[0])
    index = torch.arange(start, start + N)
    a = tau.abs()
    keep = (a > threshold[:, None]) | ((a == threshold[:, None]) & (index < cutoff[:, None]))  # decided in fp32
    exact = _torch_ties(tau.double(), keep, None if weights is None else weights.double(), 0.8, mean, positive)
    plain = _torch_ties(tau, keep, weights, 0.8, mean, positive)
    assert_within_torch_error(value, base.double() + exact, plain + base.float())
    assert torch.equal(differs, (sources != base).any(1)) and not zero.any() and int(bad) == -1


def test_ties_cutoff_keeps_ties_at_the_threshold_only_before_it(ties_op):
    """Every |τ| equal to the threshold: exactly the entries before the cutoff survive."""
    N, start = 3 * 2048 + 5, 100
    base = torch.zeros(N)
    sources = torch.stack([torch.full((N,), 0.5), torch.full((N,), -0.5)])
    cutoff = torch.tensor([start + 3000, start + N])
    value = ties_op(*_ties_args(sources, base, torch.tensor([0.5, 0.5]), cutoff, start, mean=False))[0]
    # before 3000 both survive and cancel (sign 0: nothing agrees); after, only the -0.5 does
    assert torch.equal(value[:3000], torch.zeros(3000)) and torch.equal(value[3000:], torch.full((N - 3000,), -0.5))
    none = ties_op(*_ties_args(sources, base, torch.tensor([0.5, 0.5]), cutoff, start, keep_none=True))[0]
    assert torch.equal(none, torch.zeros(N))


def test_ties_flags_and_nan(ties_op):
    T, N = 3, CHUNK + 11
    sources, base = _block(T, N, torch.float32)
    sources[1] = base
    sources[2, N - 1] = float("nan")
    value, differs, zero, bad = ties_op(*_ties_args(sources, base, torch.zeros(T), torch.zeros(T, dtype=torch.int64)))
    assert differs.tolist() == [True, False, True] and not zero.any()
    assert int(bad) == N - 1 and value[N - 1].isnan() and value[:-1].isfinite().all()


def test_ties_method_trims_elects_and_averages():
    """`svdfuse.methods.elementwise.ties` on task vectors, by hand: 3 sources, 4 entries."""
    from svdfuse.methods.elementwise import ties
    from svdfuse.methods.registry import Block
    from svdfuse.methods.trim import exact_trim

    tau = torch.tensor([[1.0, -2.0, 0.1, 3.0], [2.0, 1.0, -0.2, -1.0], [-4.0, 0.5, 0.3, 2.0]])
    trim = exact_trim(lambda: iter([(0, tau, None)]), 4, 3, 0.5, torch.float32)  # the top 2 of each
    got = ties(tau.clone(), block=Block("k", 0, 0), trim=trim, density=0.5)
    # kept: [1? no: -2, 3], [2, 1], [-4, 2] -> column sums: -2, -1, 0, 5
    kept = torch.tensor([[0.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, 0.0], [-4.0, 0.0, 0.0, 2.0]])
    assert torch.equal(trim.mask(tau, 0), kept != 0)
    assert torch.equal(got, torch.tensor([-4.0, -2.0, 0.0, 2.5]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_opcheck(dtype):
    sources, base = _block(3, 1000, dtype)
    args = _ties_args(sources, base, torch.full((3,), 0.01), torch.full((3,), 1200, dtype=torch.int64), 500,
                      weights=torch.ones(3), dtype=dtype)  # fmt: skip
    torch.library.opcheck(torch.ops.svdfuse.ties_block.default, args)


# -- the Triton kernel (CPU under TRITON_INTERPRET=1, CUDA with -m gpu) ---------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N", [(3, 1000), (1, 1), (4, 2 * 1024 + 7)])
@pytest.mark.parametrize("same,add", [(False, True), (True, False)])
def test_triton_merge_block_within_torch_error(triton_device, dtype, T, N, same, add):
    from svdfuse.kernels import elementwise

    sources, base = _block(T, N, dtype, seed=3)
    sources[0, N // 2] = base[N // 2]
    weights = torch.linspace(0.5, 1.5, T)
    on = [s.to(triton_device) for s in sources]
    value, differs, zero, bad = elementwise.merge_block(on, base.to(triton_device), weights.to(triton_device), 0.7, 1.3, same, add, dtype)
    truth = _truth(sources, base, weights, 0.7, 1.3, torch.ones(T, N, dtype=torch.float64)) - (0 if add else base.double())
    tau = (sources.float() - base.float()) * weights[:, None]
    torch_out = tau.sum(0).div_(1.3).mul_(0.7).add_(base.float() if add else 0.0).to(dtype)
    assert_within_torch_error(value.cpu(), truth, torch_out)
    assert torch.equal(differs.cpu(), (sources != base).any(1)) and not zero.any() and bad == -1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,start", [(5, 2 * 1024 + 7, 0), (1, 7, 5), (3, 1000, 300)])
@pytest.mark.parametrize("weighted,mean,positive,same", [(False, True, False, False), (True, True, True, True), (True, False, False, False)])
def test_triton_ties_block_within_torch_error_and_its_flags(triton_device, dtype, T, N, start, weighted, mean, positive, same):
    from svdfuse.kernels import elementwise

    sources, base = _block(T, N, dtype, seed=T)
    sources[0, N // 2] = base[N // 2]
    tau = sources.float() - base.float()
    threshold = tau.abs().quantile(0.7, dim=1) if N > 1 else tau.abs()[:, 0]
    cutoff = torch.full((T,), start + N // 2, dtype=torch.int64)
    weights = torch.linspace(0.5, 1.5, T) if weighted else None
    args = _ties_args(sources, base, threshold, cutoff, start, weights=weights, scale=0.8, mean=mean, positive=positive, same=same)
    on = [a.to(triton_device) if isinstance(a, torch.Tensor) else [s.to(triton_device) for s in a] if isinstance(a, list) else a for a in args]
    value, differs, zero, bad = elementwise.ties_block(*on)
    index = torch.arange(start, start + N)
    a = tau.abs()
    keep = (a > threshold[:, None]) | ((a == threshold[:, None]) & (index < cutoff[:, None]))  # decided in fp32
    exact = _torch_ties(tau.double(), keep, None if weights is None else weights.double(), 0.8, mean, positive)
    plain = _torch_ties(tau, keep, weights, 0.8, mean, positive)
    assert_within_torch_error(value.cpu(), base.double() + exact, plain + base.float())
    assert torch.equal(differs.cpu(), (sources != base).any(1)) and not zero.any() and bad == -1


def test_triton_ties_block_cutoff_keep_none_and_nan(triton_device):
    """Ties at the threshold survive only before the cutoff; `keep_none` keeps nothing; a NaN is reported."""
    from svdfuse.kernels import elementwise

    N, start = 2 * 1024 + 5, 100
    base = torch.zeros(N)
    sources = torch.stack([torch.full((N,), 0.5), torch.full((N,), -0.5)])
    sources[1, N - 1] = float("nan")
    on = lambda t: t.to(triton_device)  # noqa: E731
    threshold, cutoff = on(torch.tensor([0.5, 0.5])), on(torch.tensor([start + 1000, start + N]))
    rows = [on(s) for s in sources]
    value, differs, zero, bad = elementwise.ties_block(rows, on(base), None, threshold, cutoff, start, False, 1.0, False, False, False, True, torch.float32)
    # before 1000 both survive and cancel (sign 0: nothing agrees); after, only the -0.5 does
    assert torch.equal(value.cpu()[:1000], torch.zeros(1000)) and torch.equal(value.cpu()[1000:-1], torch.full((N - 1001,), -0.5))
    assert bad == N - 1 and value[N - 1].isnan() and differs.tolist() == [True, True] and zero.tolist() == [False, False, True]
    none = elementwise.ties_block(rows[:1], on(base), None, threshold[:1], cutoff[:1], start, True, 1.0, True, False, False, True, torch.float32)[0]
    assert torch.equal(none.cpu(), torch.zeros(N))


def test_triton_merge_block_flags_and_strided_rows(triton_device):
    from svdfuse.kernels import elementwise

    T, N = 3, 2 * 1024 + 3
    buffer = torch.zeros(T, N + 5)
    base = torch.randn(N)
    buffer[0, :N] = base
    buffer[2, :N] = base + 1.0
    buffer[2, N - 1] = float("nan")
    rows = list(buffer.to(triton_device)[:, :N])  # evenly spaced rows of one buffer: read in place
    value, differs, zero, bad = elementwise.merge_block(rows, base.to(triton_device), torch.ones(T, device=triton_device), 1.0, 1.0, False, True, torch.float32)
    assert differs.tolist() == [False, True, True] and zero.tolist() == [False, True, False, False]
    assert bad == N - 1 and value[N - 1].isnan()
    expected = reference.merge_block([r.cpu() for r in rows], base, torch.ones(T), 1.0, 1.0, None, 0, 0, False, True, torch.float32)[0]
    torch.testing.assert_close(value.cpu()[:-1], expected[:-1], atol=1e-6, rtol=1e-6)


# -- trim_bracket --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,N", [(3, CHUNK + 999), (1, 5), (4, 0)])
def test_trim_bracket_counts_and_gathers_like_plain_torch(T, N, dtype):
    """The bracket of |x_i − x0| formed in fp32 from the sources as stored, against plain torch."""
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    gen = torch.Generator().manual_seed(T)
    base = torch.randn(N, generator=gen).to(dtype)
    x = (base.float() + torch.randn(T, N, generator=gen)).to(dtype)
    x[:, ::7] = (base[::7].float() + 0.5).to(dtype)  # ties at a bound (0.5 off the base, or its rounding)
    a = (x.double() - base.double()).abs().float()  # exact in fp64, then the one rounding fp32 makes
    lo = a[:, ::7][:, :1].reshape(-1) if N else torch.full((T,), 0.5)  # a bound many entries equal
    hi = torch.linspace(0.8, 1.2, T).maximum(lo)
    hi[0] = lo[0]  # a bracket of one value: its entries count as hi's
    above, counts, values, index, bounds = torch.ops.svdfuse.trim_bracket.default(list(x), base, lo, hi, False)
    assert above.tolist() == (a > hi[:, None]).sum(1).tolist()
    within = (a > lo[:, None]) & (a < hi[:, None])
    assert counts.tolist() == within.sum(1).tolist()
    assert torch.equal(values, a[within])  # source by source, each in flat order
    assert torch.equal(index, within.nonzero()[:, 1])
    units = -(-N // CHUNK)
    assert list(bounds.shape) == [T, units, 2]
    for u in range(units):
        part = a[:, u * CHUNK : (u + 1) * CHUNK]
        at_lo = ((part == lo[:, None]) & (lo != hi)[:, None]).sum(1)
        assert bounds[:, u, 0].tolist() == at_lo.tolist() and bounds[:, u, 1].tolist() == (part == hi[:, None]).sum(1).tolist()
    if N > 7:
        assert int(bounds[:, :, 1].sum()) > 0 and int(bounds[1:, :, 0].sum()) > 0  # the bounds are equalled


def test_trim_bracket_same_is_zero_makes_an_infinite_entry_equal_to_the_base_no_change():
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    base = torch.tensor([-math.inf, 1.0, 2.0, math.inf])
    x = torch.tensor([[-math.inf, 3.0, 2.0, math.inf]])
    lo, hi = torch.tensor([0.0]), torch.tensor([1.0])
    for same_is_zero, above, at_lo in ((True, 1, 3), (False, 1, 1)):  # inf − inf is NaN: no count
        got = torch.ops.svdfuse.trim_bracket.default(list(x), base, lo, hi, same_is_zero)
        assert (int(got[0][0]), int(got[1][0]), int(got[4][0, 0, 0])) == (above, 0, at_lo), same_is_zero
        ref = reference.trim_bracket(list(x), base, lo, hi, same_is_zero)
        assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_trim_bracket_opcheck():
    x = torch.randn(3, 300)
    args = (list(x), torch.zeros(300), torch.full((3,), 0.5), torch.full((3,), 1.0), False)
    torch.library.opcheck(torch.ops.svdfuse.trim_bracket.default, args, test_utils=("test_schema", "test_faketensor"))


# -- trim_sample ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,N,first,stride", [(3, 3 * CHUNK + 999, 5, 7), (8, 40000, 0, 1), (1, 5, 4, 3), (2, 5, 5, 2), (4, 0, 0, 1)])
def test_trim_sample_is_the_strided_magnitudes_of_plain_torch(T, N, first, stride, dtype):
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    gen = torch.Generator().manual_seed(N)
    base = torch.randn(N, generator=gen).to(dtype)
    x = (base.float() + torch.randn(T, N, generator=gen)).to(dtype)
    got = torch.ops.svdfuse.trim_sample.default(list(x), base, first, stride, False)
    expected = (x.double() - base.double()).abs().float()[:, first::stride]  # exact in fp64, then fp32's one rounding
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(ops.trim_sample(x, base, first, stride), expected) and torch.equal(reference.trim_sample(list(x), base, first, stride, False), expected)


def test_trim_sample_same_is_zero_and_its_checks():
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    base = torch.tensor([-math.inf, 1.0, 2.0, math.inf, 0.5])
    x = torch.tensor([[-math.inf, 3.0, 2.0, math.inf, -0.5]])
    for same_is_zero, expected in ((True, [0.0, 2.0, 0.0, 0.0, 1.0]), (False, [math.nan, 2.0, 0.0, math.nan, 1.0])):
        got = torch.ops.svdfuse.trim_sample.default(list(x), base, 0, 1, same_is_zero)
        torch.testing.assert_close(got[0], torch.tensor(expected), rtol=0, atol=0, equal_nan=True)  # inf − inf is NaN
        torch.testing.assert_close(got, reference.trim_sample(list(x), base, 0, 1, same_is_zero), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="trim_sample: first must be >= 0 and stride >= 1, found 0 and 0"):
        ops.trim_sample(x, base, 0, 0)
    with pytest.raises(ValueError, match=r"trim_sample: source 0 must be contiguous of shape \(N,\) = \[5\]"):
        ops.trim_sample([x[0, :4]], base, 0, 1)


def test_trim_sample_opcheck():
    x = torch.randn(3, 300)
    torch.library.opcheck(torch.ops.svdfuse.trim_sample.default, (list(x), torch.zeros(300), 2, 7, False), test_utils=("test_schema", "test_faketensor"))


# -- trim_select ---------------------------------------------------------------------------------


def _order_key(v: torch.Tensor) -> torch.Tensor:
    """v in float64 with NaN above +inf (infinities mapped to ±1e299, NaN to 1e300)."""
    return torch.where(v.isnan(), 1e300, v.double().clamp(-1e299, 1e299))


def _select_by_sort(v: torch.Tensor, k: int) -> tuple[float, int, int, int]:
    """The k-th largest of v by a full sort (NaN largest), its counts above and equal, and the
    position of the (k − above)-th equal one, or -1 where all of them are within the rank."""
    key = _order_key(v)
    t = key.sort(descending=True).values[k - 1]
    above, same = int((key > t).sum()), (key == t)
    need = k - above
    position = int(same.nonzero()[need - 1, 0]) if need < int(same.sum()) else -1
    return float(t), above, int(same.sum()), position


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_trim_select_order_statistics_against_a_sort(backend):
    if backend == "compiled":
        pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    select = torch.ops.svdfuse.trim_select.default if backend == "compiled" else reference.trim_select
    gen = torch.Generator().manual_seed(0)
    lists = [
        torch.randn(1000, generator=gen),
        torch.round(torch.randn(777, generator=gen) * 2) / 2,  # many ties at any rank
        torch.tensor([1.0, math.nan, 3.0, 3.0, math.inf, math.nan, -1.0]),
        torch.tensor([2.0]),
        torch.zeros(50),
    ]
    for ranks in ([1, 100, 3, 1, 20], [1000, 777, 7, 1, 50], [500, 300, 2, 1, 1], [37, 401, 5, 1, 49]):
        values = torch.cat(lists)
        counts = torch.tensor([len(v) for v in lists])
        t, greater, equal, position = select(values, counts, torch.tensor(ranks))
        for i, (v, k) in enumerate(zip(lists, ranks)):
            want_t, want_above, want_equal, want_position = _select_by_sort(v, k)
            assert float(_order_key(t[i])) == want_t, (backend, i, k)
            assert (int(greater[i]), int(equal[i]), int(position[i])) == (want_above, want_equal, want_position), (backend, i, k)
    # a rank outside the list: NaN and -1s, for the caller to fall back
    t, greater, equal, position = select(torch.ones(3), torch.tensor([3]), torch.tensor([4]))
    assert t.isnan().all() and greater.tolist() == equal.tolist() == position.tolist() == [-1]


def test_trim_select_of_magnitudes_against_a_sort():
    """Lists of |τ| (no NaN, no sign: the compiled kernel's radix select) of every shape a trim
    meets: spread over many octaves, in a narrow bracket, bf16's few values with long ties, zeros
    and infinities, subnormals; ranks at both ends and between."""
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    gen = torch.Generator().manual_seed(1)
    lists = [
        torch.randn(20000, generator=gen).abs() * 1e-3,
        1.0 + torch.rand(3001, generator=gen) * 1e-4,  # a bracket's values: a few thousand ulps apart
        (torch.randn(5000, generator=gen) * 1e-2).abs().bfloat16().float(),  # ties everywhere
        torch.cat([torch.zeros(40), torch.full((9,), math.inf), torch.rand(60, generator=gen)]),
        torch.rand(257, generator=gen) * 1e-40,  # subnormals
        torch.full((33,), 0.25),
    ]
    values, counts = torch.cat(lists), torch.tensor([len(v) for v in lists])
    for fraction in (0.0, 0.001, 0.2, 0.5, 0.8, 1.0):
        ranks = torch.tensor([max(1, min(len(v), round(fraction * len(v)))) for v in lists])
        t, greater, equal, position = torch.ops.svdfuse.trim_select.default(values, counts, ranks)
        for i, (v, k) in enumerate(zip(lists, ranks.tolist())):
            want = _select_by_sort(v, k)
            assert (float(_order_key(t[i])), int(greater[i]), int(equal[i]), int(position[i])) == want, (i, k)


def test_trim_select_opcheck():
    args = (torch.randn(30), torch.tensor([10, 20]), torch.tensor([3, 20]))
    torch.library.opcheck(torch.ops.svdfuse.trim_select.default, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_ties_block_routes_to_the_triton_kernel_where_it_serves(triton_device, monkeypatch):
    """`svdfuse.ops.ties_block` on a device the Triton kernels serve launches `kernels.elementwise.ties_block`."""
    from svdfuse.kernels import elementwise

    calls = []
    launch = elementwise.ties_block
    monkeypatch.setattr(elementwise, "ties_block", lambda *args: (calls.append(1), launch(*args))[1])
    monkeypatch.setattr(ops, "_triton_serves", lambda t: True)  # as on CUDA; the interpreter runs it here
    sources, base = _block(3, 1000, torch.float32, seed=1)
    on = lambda t: t.to(triton_device)  # noqa: E731
    threshold, cutoff = torch.full((3,), 0.5), torch.full((3,), 500, dtype=torch.int64)
    got = ops.ties_block([on(s) for s in sources], on(base), on(threshold), on(cutoff), scale=0.8)
    expected = reference.ties_block(list(sources), base, None, threshold, cutoff, 0, False, 0.8, True, False, False, True, torch.float32)
    assert calls == [1]
    torch.testing.assert_close(got.value.cpu(), expected[0], atol=1e-6, rtol=1e-6)
