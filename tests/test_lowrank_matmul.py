"""`svdfuse.ops.lowrank_matmul` and the C++ op behind it: registration, autograd, numerics, errors."""

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

from svdfuse import _native, ops, reference

SHAPES = [(64, 32, 8), (33, 17, 5)]  # (m, n, K): aligned, and odd everywhere


@pytest.fixture
def native_op():
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    return torch.ops.svdfuse.lowrank_matmul.default


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return request.getfixturevalue("cuda") if request.param == "cuda" else torch.device("cpu")


def _inputs(m, n, K, lead=(3, 7), dtype=torch.float32, device="cpu", base=True, bias=True, grad=False, seed=0):
    """x (*lead, n), U (m, K), S (K,), V (n, K), base (m, n) or None, bias (m,) or None; outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(grad)

    x, U, S, V = rand(*lead, n), rand(m, K, scale=K**-0.5), rand(K), rand(n, K, scale=n**-0.5)
    return x, U, S, V, rand(m, n, scale=n**-0.5) if base else None, rand(m) if bias else None


def _in_float64(args):
    return [None if t is None else t.detach().double() for t in args]


def _plain_torch(x, U, S, V, base, bias):
    """The same computation as plain torch matmuls in the storage dtype: torch's own error."""
    y = ((x @ V) * S) @ U.T
    if base is not None:
        y = y + x @ base.T
    return y if bias is None else y + bias


def _assert_within_torch_error(out, args):
    # Pass rule: error <= 2x torch's own error in the same dtype, plus an eps-sized floor so that a
    # case where torch happens to be exact does not demand exactness. NaN anywhere fails.
    truth = reference.lowrank_matmul(*_in_float64(args))
    torch_error = (_plain_torch(*args).double() - truth).abs().max().item()
    floor = torch.finfo(out.dtype).eps * truth.abs().max().item()
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=2 * torch_error + floor)


OPCHECK_CASES = [  # (lead dims of x, dtype, with base, with bias)
    ((), torch.float32, False, False),
    ((5,), torch.float32, True, False),
    ((5,), torch.float64, False, True),
    ((2, 3), torch.float64, True, True),
    ((0,), torch.float32, True, True),
]


@pytest.mark.parametrize("lead,dtype,base,bias", OPCHECK_CASES)
def test_opcheck(native_op, device, lead, dtype, base, bias):
    args = _inputs(7, 6, 3, lead=lead, dtype=dtype, device=device, base=base, bias=bias, grad=True)
    torch.library.opcheck(native_op, args)


@pytest.mark.parametrize(
    "trainable,with_base_bias",
    [("x,U,S,V,base,bias", True), ("x,U,S,V", False), ("S", True)],  # the last is Stage 2
)
def test_gradcheck(device, trainable, with_base_bias):
    names = ["x", "U", "S", "V", "base", "bias"]
    inputs = _inputs(5, 4, 3, lead=(2, 3), dtype=torch.float64, device=device, base=with_base_bias, bias=with_base_bias)
    args, train = dict(zip(names, inputs)), trainable.split(",")

    def f(*trained):
        return ops.lowrank_matmul(**{**args, **dict(zip(train, trained))})

    assert torch.autograd.gradcheck(f, [args[name].requires_grad_() for name in train])


@pytest.mark.parametrize("m,n,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("terms", ["lowrank", "lowrank+base+bias"])
def test_numerics_within_torch_error(device, dtype, m, n, K, terms):
    args = _inputs(m, n, K, dtype=dtype, device=device, base="base" in terms, bias="bias" in terms)
    out = ops.lowrank_matmul(*args)
    assert out.shape == (3, 7, m) and out.dtype == dtype
    _assert_within_torch_error(out, args)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(device, lead):
    x, U, S, V, base, bias = _inputs(33, 17, 5, lead=lead, device=device, grad=True)
    out = ops.lowrank_matmul(x, U, S, V, base, bias)
    assert out.shape == (*lead, 33)
    out.sum().backward()
    for t in (x, U, S, V, base, bias):
        assert t.grad.shape == t.shape and not t.grad.any()


def test_nan_in_x_poisons_its_output_row(device):
    x, U, S, V, base, bias = _inputs(33, 17, 5, device=device)
    x[1, 2, 4] = float("nan")
    out = ops.lowrank_matmul(x, U, S, V, base, bias)
    assert out[1, 2].isnan().all()
    out[1, 2] = 0
    assert out.isfinite().all()


def test_front_door_errors_say_expected_and_found():
    x, U, S, V, base, bias = _inputs(33, 17, 5)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 17\).*found \(3, 7, 16\)"):
        ops.lowrank_matmul(x[..., :16], U, S, V)
    with pytest.raises(ValueError, match=r"base must be \(33, 17\), found \(17, 33\)"):
        ops.lowrank_matmul(x, U, S, V, base.T)
    with pytest.raises(TypeError, match=r"U is torch.float64, x is torch.float32"):
        ops.lowrank_matmul(x, U.double(), S, V)


NATIVE_ERRORS = [  # (argument, how to break it, the message expected)
    ("x", lambda t: t[..., :16], r"x must have shape \(\.\.\., n\) with n = V.size\(0\) = 17, found \[3, 7, 16\]"),
    ("U", lambda t: t[0], r"U must have shape \(m, K\), found \[5\]"),
    ("S", lambda t: t[:4], r"S must have shape \(K,\) = \[5\], found \[4\]"),
    ("V", lambda t: t[:, :4], r"V must have shape \(n, K\) = \[17, 5\], found \[17, 4\]"),
    ("base", lambda t: t.T, r"base must have shape \(m, n\) = \[33, 17\], found \[17, 33\]"),
    ("bias", lambda t: t[:32], r"bias must have shape \(m,\) = \[33\], found \[32\]"),
    ("bias", lambda t: t.double(), r"bias must have x's dtype Float, found Double"),
    ("x", lambda t: t.long(), r"x must be floating point, found Long"),
]


@pytest.mark.parametrize("name,break_it,match", NATIVE_ERRORS)
def test_native_op_errors_name_the_tensor(native_op, name, break_it, match):
    args = dict(zip(["x", "U", "S", "V", "base", "bias"], _inputs(33, 17, 5)))
    args[name] = break_it(args[name])
    with pytest.raises(RuntimeError, match=match):
        native_op(*args.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_fallback_matches_native(native_op, device, monkeypatch, dtype):
    args = _inputs(33, 17, 5, dtype=dtype, device=device)
    native = ops.lowrank_matmul(*args)
    monkeypatch.setattr(_native, "lowrank_matmul_op", lambda device: None)
    torch.testing.assert_close(ops.lowrank_matmul(*args), native)


@pytest.fixture
def missing_extension(monkeypatch):
    monkeypatch.setattr(_native, "_LOAD_ERROR", ImportError("simulated"))
    _native._available.cache_clear()
    yield
    _native._available.cache_clear()


def test_missing_extension_warns_once_then_uses_the_reference(missing_extension):
    args = _inputs(33, 17, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ops.lowrank_matmul(*args) for _ in range(3)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "simulated" in messages[0], messages
    for out in outs:
        torch.testing.assert_close(out, reference.lowrank_matmul(*args), rtol=0, atol=0)


def test_registrations_survive_reimport(native_op):
    for _ in range(2):
        importlib.reload(_native)
    x, U, S, V, base, bias = _inputs(7, 6, 3, grad=True)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = native_op(*(mode.from_tensor(t) for t in (x, U, S, V, base, bias)))
    assert fake.shape == (3, 7, 7)
    native_op(x, U, S, V, base, bias).sum().backward()
    assert S.grad is not None


def test_import_stays_lean():
    code = "import sys, torch, svdfuse.ops; assert 'triton' not in sys.modules; assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_cuda_kernel_is_built(native_op, cuda):
    assert _native.lowrank_matmul_op(cuda) is native_op
