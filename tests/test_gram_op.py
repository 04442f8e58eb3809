"""`svdfuse.ops.gram` and the op behind it, `torch.ops.svdfuse.gram`: the float64 Gram matrices of
thin factors read in their own dtype. Against float64 truth with a bound from float64's rounding of
the sums (the products of bf16, fp16 and fp32 values are exact in float64), the compiled CPU kernel
against the reference, odd layouts and sizes, errors, opcheck."""

import os
import subprocess
import sys

import pytest
import torch

from svdfuse import ops, reference

F64 = torch.float64
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.fixture
def native_op():
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    return torch.ops.svdfuse.gram.default


def _within_float64_sums(got: torch.Tensor, x: torch.Tensor, left: bool) -> None:
    """|got − xᵀx| ≤ 2·count·ε64·(|x|ᵀ|x|): the sums' rounding, twice (the kernel's and the truth's)."""
    w = x.to(F64)
    truth, scale = (w.mT @ w, w.abs().mT @ w.abs()) if left else (w @ w.mT, w.abs() @ w.abs().mT)
    count = x.shape[-2] if left else x.shape[-1]
    assert got.dtype == F64 and got.shape == truth.shape
    assert ((got - truth).abs() <= 2 * count * torch.finfo(F64).eps * scale).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("shape", [(3, 3000, 4), (2, 5, 700, 16), (1, 9), (4, 33, 70)], ids=["tiles", "batch2", "row", "square-ish"])
def test_gram_within_float64_rounding_and_equal_to_reference(native_op, dtype, left, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=F64) * torch.logspace(0, -3, shape[-1], dtype=F64)).to(dtype)
    if not left:
        x = x.mT.contiguous()
    got = native_op(x, left)
    _within_float64_sums(got, x, left)
    _within_float64_sums(reference.gram(x, left), x, left)
    _within_float64_sums(ops.gram(x, left), x, left)


def test_the_build_for_cpus_without_avx512_too(native_op):
    """This file's sums under SVDFUSE_NO_AVX512=1: the AVX2 or portable build, which a CPU without
    AVX-512 runs, where this one runs the AVX-512 build."""
    env = {**os.environ, "SVDFUSE_NO_AVX512": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "rounding or layout"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]


def test_any_layout_and_empty_sizes(native_op):
    x = torch.randn(4, 6, 50).mT  # (4, 50, 6), not contiguous
    _within_float64_sums(native_op(x, True), x, True)
    _within_float64_sums(native_op(x, False), x, False)
    assert torch.equal(native_op(torch.ones(2, 0, 3), True), torch.zeros(2, 3, 3, dtype=F64))
    assert native_op(torch.ones(0, 5, 3), False).shape == (0, 5, 5)
    assert native_op(torch.ones(2, 5, 0), True).shape == (2, 0, 0)


@pytest.mark.parametrize(
    "x,error,message",
    [(torch.ones(5), ValueError, r"gram: x must have shape \(\.\.\., a, b\), found \[5\]"),
     (torch.ones(2, 3, dtype=torch.int64), TypeError, "gram: x must be torch.float32, .* found torch.int64")],
)  # fmt: skip
def test_bad_input_is_refused_naming_it(x, error, message):
    with pytest.raises(error, match=message):
        ops.gram(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x = torch.randn(3, 40, 8).to(dtype)
    torch.library.opcheck(torch.ops.svdfuse.gram.default, (x, True))
    torch.library.opcheck(torch.ops.svdfuse.gram.default, (x, False))
