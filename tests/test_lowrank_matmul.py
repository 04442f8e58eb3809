"""`svdfuse.ops.lowrank_matmul` and the op behind it, `torch.ops.svdfuse.lowrank_matmul`: registration,
autograd, numerics, errors.

The op's kernels: compiled CPU and CUDA ones (svdfuse._C) and the pure-torch default kernel, which
serves every device without a compiled one and every device in a build without the extension. This
file runs against the compiled CPU kernel, and again (`test_reference_build_passes_this_file`) in a
process where `svdfuse._C` cannot load, against the default kernel and the Python autograd.
"""

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from svdfuse import _native, ops, reference
from svdfuse.nn import SVDLinear
from svdfuse.ops import lowrank_matmul

from _helpers import assert_within_torch_error

SHAPES = [(64, 32, 8), (33, 17, 5)]  # (m, n, K): aligned, and odd everywhere


@pytest.fixture
def op():
    """The op, whichever kernels serve it: it exists with or without the extension."""
    return torch.ops.svdfuse.lowrank_matmul.default


@pytest.fixture
def native_op(op):
    """The op where the compiled extension serves the CPU (and CUDA, where built)."""
    pytest.importorskip("svdfuse._C", reason="the compiled extension svdfuse._C is not built")
    return op


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return request.getfixturevalue("cuda") if request.param == "cuda" else torch.device("cpu")


def _inputs(m, n, K, lead=(3, 7), dtype=torch.float32, device="cpu", base=True, bias=True, grad=False, seed=0):
    """x (*lead, n), U (m, K), S (K,), V (n, K), base (m, n) or None, bias (m,) or None; outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(grad)

    x, U, S, V = rand(*lead, n), rand(m, K, scale=K**-0.5), rand(K), rand(n, K, scale=max(n, 1) ** -0.5)
    return x, U, S, V, rand(m, n, scale=max(n, 1) ** -0.5) if base else None, rand(m) if bias else None


def _with_tasks(args, num_tasks, seed=1):
    """`_inputs`' args with S (num_tasks, K) and task ids (x.shape[:-1]) covering every task."""
    x, U, S, V, base, bias = args
    gen = torch.Generator().manual_seed(seed)
    S2 = torch.randn((num_tasks, S.shape[0]), generator=gen, dtype=torch.float64).to(S.dtype).to(S.device)
    task = torch.arange(x.shape[:-1].numel()).remainder(num_tasks)
    task = task[torch.randperm(task.numel(), generator=gen)].reshape(x.shape[:-1]).to(x.device)
    return x, U, S2.requires_grad_(S.requires_grad), V, base, bias, task


def _in_float64(args):
    return [t.detach().double() if t is not None and t.is_floating_point() else t for t in args]


def _plain_torch(x, U, S, V, base, bias, task=None):
    """The same computation as plain torch matmuls in the storage dtype: torch's own error."""
    y = ((x @ V) * (S if task is None else S[task])) @ U.T
    if base is not None:
        y = y + x @ base.T
    return y if bias is None else y + bias


def _assert_within_torch_error(out, args):
    exact = _in_float64(args)
    assert_within_torch_error(out, reference.lowrank_matmul(*exact), _plain_torch(*args), truth_check=_plain_torch(*exact))


OPCHECK_CASES = [  # (lead dims of x, dtype, with base, with bias)
    ((), torch.float32, False, False),
    ((5,), torch.float32, True, False),
    ((5,), torch.float64, False, True),
    ((2, 3), torch.float64, True, True),
    ((0,), torch.float32, True, True),
]


@pytest.mark.parametrize("lead,dtype,base,bias", OPCHECK_CASES)
def test_opcheck(op, device, lead, dtype, base, bias):
    # The compiled kernel of the device; in the reference build, the default kernel.
    args = _inputs(7, 6, 3, lead=lead, dtype=dtype, device=device, base=base, bias=bias, grad=True)
    torch.library.opcheck(op, args)


TASK_OPCHECK_CASES = [  # (lead dims of x, dtype, with base, with bias, num_tasks)
    ((), torch.float32, False, False, 2),
    ((5,), torch.float32, True, True, 3),
    ((2, 3), torch.float64, True, False, 4),
    ((0,), torch.float32, True, True, 2),
]


@pytest.mark.parametrize("lead,dtype,base,bias,num_tasks", TASK_OPCHECK_CASES)
def test_opcheck_with_task(op, device, lead, dtype, base, bias, num_tasks):
    args = _inputs(7, 6, 3, lead=lead, dtype=dtype, device=device, base=base, bias=bias, grad=True)
    torch.library.opcheck(op, _with_tasks(args, num_tasks))


@pytest.mark.parametrize(
    "trainable,terms",
    # "S" is Stage 2; a bias without a base moves bias to the autograd node's input 4.
    [("x,U,S,V,base,bias", "base+bias"), ("x,U,S,V", ""), ("S", "base+bias"), ("x,S,bias", "bias")],
)
def test_gradcheck(device, trainable, terms):
    names = ["x", "U", "S", "V", "base", "bias"]
    inputs = _inputs(5, 4, 3, lead=(2, 3), dtype=torch.float64, device=device, base="base" in terms, bias="bias" in terms)
    args, train = dict(zip(names, inputs)), trainable.split(",")

    def f(*trained):
        return ops.lowrank_matmul(**{**args, **dict(zip(train, trained))})

    assert torch.autograd.gradcheck(f, [args[name].requires_grad_() for name in train])


@pytest.mark.parametrize("trainable", ["x,S", "x,U,S,V,base,bias", "S"])
def test_gradcheck_per_task_sigma(device, trainable):
    names = ["x", "U", "S", "V", "base", "bias", "task"]
    inputs = _with_tasks(_inputs(5, 4, 3, lead=(2, 3), dtype=torch.float64, device=device), num_tasks=3)
    args, train = dict(zip(names, inputs)), trainable.split(",")

    def f(*trained):
        return ops.lowrank_matmul(**{**args, **dict(zip(train, trained))})

    assert torch.autograd.gradcheck(f, [args[name].requires_grad_() for name in train])


def test_no_graph_without_a_gradient(op):
    # The autograd kernel hands such calls straight to the kernel: no node, an output without grad.
    x, U, S, V, base, bias = _inputs(5, 4, 3)
    assert op(x, U, S, V, base, bias).grad_fn is None
    S.requires_grad_()
    with torch.no_grad():
        assert not op(x, U, S, V, base, bias).requires_grad
    assert op(x, U, S, V, base, bias).grad_fn is not None


def test_per_task_sigma_gradient_goes_to_the_picked_rows():
    # Task 2 picks no row of x: its row of S gets exactly zero gradient; the others get some.
    x, U, S, V, base, bias, task = _with_tasks(_inputs(5, 4, 3, lead=(6,), grad=True), num_tasks=3)
    task = torch.tensor([0, 1, 1, 0, 0, 1])
    ops.lowrank_matmul(x, U, S, V, base, bias, task).square().sum().backward()
    assert not S.grad[2].any() and S.grad[:2].abs().min() > 0


@pytest.mark.parametrize("m,n,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("terms", ["lowrank", "lowrank+base+bias"])
def test_per_task_sigma_within_torch_error(device, op, dtype, m, n, K, terms):
    args = _with_tasks(_inputs(m, n, K, dtype=dtype, device=device, base="base" in terms, bias="bias" in terms), 4)
    for out in (op(*args), reference.lowrank_matmul(*args)):
        assert out.shape == (3, 7, m) and out.dtype == dtype
        _assert_within_torch_error(out, args)


def test_reference_per_task_sigma_is_one_sigma_per_row():
    # The float64 oracle of per-request σ against the one-σ path, row by row.
    x, U, S, V, base, bias, task = _in_float64(_with_tasks(_inputs(33, 17, 5), num_tasks=3))
    out = reference.lowrank_matmul(x, U, S, V, base, bias, task)
    for index in torch.cartesian_prod(torch.arange(3), torch.arange(7)):
        i, j = index.tolist()
        row = reference.lowrank_matmul(x[i, j], U, S[task[i, j]], V, base, bias)
        torch.testing.assert_close(out[i, j], row, rtol=1e-12, atol=1e-12)


def test_reference_gives_a_bad_task_row_nan():
    # What the CUDA kernels do with an id they cannot check without a sync.
    x, U, S, V, base, bias, task = _with_tasks(_inputs(33, 17, 5), num_tasks=3)
    task[1, 2] = 3
    out = reference.lowrank_matmul(x, U, S, V, base, bias, task)
    assert out[1, 2].isnan().all()
    out[1, 2] = 0
    assert out.isfinite().all()


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


@pytest.mark.parametrize("m,n,lead", [(0, 17, (3,)), (33, 0, (3,)), (33, 0, (0,)), (0, 17, (2, 0))])
def test_empty_matrix_dims(device, m, n, lead):
    # m = 0 or n = 0 leaves 0 elements where a reshape(-1, ...) is ambiguous: forward, reference and
    # backward must count rows instead. n = 0 gives y = bias (x V and x Wbᵀ are empty sums).
    x, U, S, V, base, bias = _inputs(m, n, 5, lead=lead, device=device, grad=True)
    for f in (ops.lowrank_matmul, reference.lowrank_matmul):
        out = f(x, U, S, V, base, bias)
        assert out.shape == (*lead, m)
        torch.testing.assert_close(out, bias.expand_as(out) if n == 0 else out.new_zeros(out.shape))
    ops.lowrank_matmul(x, U, S, V, base, bias).sum().backward()
    for t in (x, U, S, V, base, bias):
        assert t.grad.shape == t.shape


def test_empty_batch_with_task(device):
    x, U, S, V, base, bias, task = _with_tasks(_inputs(33, 17, 5, lead=(2, 0), device=device, grad=True), 3)
    out = ops.lowrank_matmul(x, U, S, V, base, bias, task)
    assert out.shape == (2, 0, 33)
    out.sum().backward()
    assert S.grad.shape == (3, 5) and not S.grad.any()


def test_noncontiguous_inputs(device):
    args = _with_tasks(_inputs(33, 17, 5, lead=(4, 6), device=device), num_tasks=3)
    x, U, S, V, base, bias, task = args
    strided = (x.mT.contiguous().mT, U.T.contiguous().T, S.T.contiguous().T, V.T.contiguous().T,
               base.T.contiguous().T, bias, task.T.contiguous().T)  # fmt: skip
    assert not any(t.is_contiguous() for t in strided if t.dim() == 2)
    torch.testing.assert_close(ops.lowrank_matmul(*strided), ops.lowrank_matmul(*args))


def test_nan_in_x_poisons_its_output_row(device):
    x, U, S, V, base, bias = _inputs(33, 17, 5, device=device)
    x[1, 2, 4] = float("nan")
    out = ops.lowrank_matmul(x, U, S, V, base, bias)
    assert out[1, 2].isnan().all()
    out[1, 2] = 0
    assert out.isfinite().all()


@pytest.fixture(params=["cpu", "meta"])
def checked_on(request):
    """Where the op's checks run: "cpu" the kernel (compiled, in C++; in the reference build the
    default kernel, in Python), "meta" the fake impl (Python), as torch.compile traces it. One set of
    messages for all of them."""
    return torch.device(request.param)


def _on(device, args):
    return [None if t is None else t.to(device) for t in args]


def test_front_door_errors_say_expected_and_found(checked_on):
    x, U, S, V, base, bias = _on(checked_on, _inputs(33, 17, 5))
    cases = [  # (arguments, exception, message)
        ((x[..., :16], U, S, V), ValueError, r"x must have shape \(\.\.\., n\) with n = V.size\(0\) = 17, found \[3, 7, 16\]"),
        ((x, U, S, V, base.T), ValueError, r"base must have shape \(m, n\) = \[33, 17\], found \[17, 33\]"),
        ((x, U.double(), S, V), TypeError, r"U must have x's dtype torch.float32, found torch.float64"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ops.lowrank_matmul(*args)


def test_front_door_task_errors_say_expected_and_found(checked_on):
    x, U, S, V, base, bias, task = _on(checked_on, _with_tasks(_inputs(33, 17, 5), num_tasks=3))
    cases = [  # (S, task, exception, message)
        (
            S,
            None,
            ValueError,
            r"task is required when S has shape \(num_tasks, K\) = \[3, 5\].*x.shape\[:-1\] = \[3, 7\]",
        ),
        (S[0], task, ValueError, r"task must be None when S has shape \(K,\).*found a task of shape \[3, 7\]"),
        (S, task.reshape(-1), ValueError, r"task must have shape x.shape\[:-1\] = \[3, 7\], found \[21\]"),
        (S, task.int(), TypeError, r"task must have dtype torch.int64, found torch.int32"),
        (S[:, :4], task, ValueError, r"S must have shape \(num_tasks, K\) = \[3, 5\], found \[3, 4\]"),
        (S[:0], task, ValueError, r"S must have at least one task row, found shape \[0, 5\]"),
    ]
    if checked_on.type == "cpu":  # the ids are read where that is free: not by the fake impl
        for bad in (3, -1):
            task = task.clone()
            task[2, 5] = bad
            match = rf"task ids must be in \[0, num_tasks\) = \[0, 3\) \(the rows of S\), found {bad} at \[2, 5\]"
            cases.append((S, task, ValueError, match))
    for S_, task_, error, match in cases:
        with pytest.raises(error, match=match):
            ops.lowrank_matmul(x, U, S_, V, task=task_)


def test_each_call_is_checked_once(op, monkeypatch):
    # The front door adds no check of its own: the kernel that serves the call checks it, the compiled
    # one in C++ (the Python checks would cost host time on every call), the default one in Python.
    calls = []
    check = _native.check_lowrank_matmul
    monkeypatch.setattr(_native, "check_lowrank_matmul", lambda *args: calls.append(1) or check(*args))
    ops.lowrank_matmul(*_with_tasks(_inputs(33, 17, 5), num_tasks=3))
    assert len(calls) == (0 if _native.LOAD_ERROR is None else 1)


OP_ERRORS = [  # (argument, how to break it, the exception and message expected)
    ("x", lambda t: t[..., :16], ValueError, r"x must have shape \(\.\.\., n\) with n = V.size\(0\) = 17, found \[3, 7, 16\]"),
    ("U", lambda t: t[0], ValueError, r"U must have shape \(m, K\), found \[5\]"),
    ("S", lambda t: t[:4], ValueError, r"S must have shape \(K,\) = \[5\], found \[4\]"),
    ("V", lambda t: t[:, :4], ValueError, r"V must have shape \(n, K\) = \[17, 5\], found \[17, 4\]"),
    ("base", lambda t: t.T, ValueError, r"base must have shape \(m, n\) = \[33, 17\], found \[17, 33\]"),
    ("bias", lambda t: t[:32], ValueError, r"bias must have shape \(m,\) = \[33\], found \[32\]"),
    ("bias", lambda t: t.double(), TypeError, r"bias must have x's dtype torch.float32, found torch.float64"),
    ("S", lambda t: t.half(), TypeError, r"S must have x's dtype torch.float32, found torch.float16"),
    ("V", lambda t: t.bfloat16(), TypeError, r"V must have x's dtype torch.float32, found torch.bfloat16"),
    (
        "x",
        lambda t: t.long(),
        TypeError,
        r"x must be torch.float32, torch.float64, torch.float16 or torch.bfloat16, found torch.int64",
    ),
    ("x", lambda t: t.to(torch.float8_e4m3fn), TypeError, r"x must be torch.float32, .*, found torch.float8_e4m3fn"),
]


@pytest.mark.parametrize("name,break_it,error,match", OP_ERRORS)
def test_op_errors_name_the_tensor(op, checked_on, name, break_it, error, match):
    args = dict(zip(["x", "U", "S", "V", "base", "bias"], _on(checked_on, _inputs(33, 17, 5))))
    args[name] = break_it(args[name])
    with pytest.raises(error, match=match):
        op(*args.values())


def test_op_errors_name_a_tensor_on_another_device(op):
    # Meta tensors with CPU ones: the dispatcher picks the meta (fake) kernel, whose checks see the mix.
    x, U, S, V, base, bias = _inputs(33, 17, 5)
    with pytest.raises(ValueError, match=r"V must be on x's device cpu, found meta"):
        op(x, U, S, V.to("meta"), base, bias)


def _set(index, value):
    def set_it(t):
        t = t.clone()
        t[index] = value
        return t

    return set_it


OP_TASK_ERRORS = [  # (argument, how to break it, the exception and message expected, whether it reads the ids)
    (
        "task",
        lambda t: None,
        ValueError,
        r"task is required when S has shape \(num_tasks, K\) = \[3, 5\]: an int64 tensor of shape x.shape\[:-1\] = \[3, 7\]",
        False,
    ),
    ("S", lambda t: t[0], ValueError, r"task must be None when S has shape \(K,\) .*, found a task of shape \[3, 7\]", False),
    ("task", lambda t: t[0], ValueError, r"task must have shape x.shape\[:-1\] = \[3, 7\], found \[7\]", False),
    ("task", lambda t: t.int(), TypeError, r"task must have dtype torch.int64, found torch.int32", False),
    (
        "task",
        _set((1, 1), 3),
        ValueError,
        r"task ids must be in \[0, num_tasks\) = \[0, 3\) \(the rows of S\), found 3 at \[1, 1\]",
        True,
    ),
    ("task", _set((0, 4), -2), ValueError, r"task ids must be in \[0, num_tasks\) = \[0, 3\) .*, found -2 at \[0, 4\]", True),
    ("S", lambda t: t[:0], ValueError, r"S must have at least one task row, found shape \[0, 5\]", False),
    ("S", lambda t: t[None], ValueError, r"S must have shape \(K,\) or \(num_tasks, K\), found \[1, 3, 5\]", False),
]


@pytest.mark.parametrize("name,break_it,error,match,reads_ids", OP_TASK_ERRORS)
def test_op_task_errors(op, checked_on, name, break_it, error, match, reads_ids):
    if reads_ids and checked_on.type == "meta":
        pytest.skip("the fake impl cannot read task ids")
    args = dict(zip(["x", "U", "S", "V", "base", "bias", "task"], _with_tasks(_inputs(33, 17, 5), num_tasks=3)))
    args[name] = break_it(args[name])
    with pytest.raises(error, match=match):
        op(*_on(checked_on, args.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_fallback_matches_native(native_op, device, dtype):
    # What the default kernel computes where no compiled kernel serves: the same numbers.
    args = _inputs(33, 17, 5, dtype=dtype, device=device)
    torch.testing.assert_close(reference.lowrank_matmul(*args), ops.lowrank_matmul(*args))


@pytest.fixture
def missing_extension():
    if _native.LOAD_ERROR is None:
        pytest.skip("the extension loaded; test_reference_build_passes_this_file runs this where it cannot")
    _native.warn_if_missing.cache_clear()
    yield
    _native.warn_if_missing.cache_clear()


def test_missing_extension_warns_once_then_uses_the_reference(missing_extension):
    args = _inputs(33, 17, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ops.lowrank_matmul(*args) for _ in range(3)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "svdfuse._C is not available" in messages[0], messages
    assert caught[0].filename == __file__  # points at the caller of svdfuse.ops
    for out in outs:
        torch.testing.assert_close(out, reference.lowrank_matmul(*args), rtol=0, atol=0)


def test_reference_build_passes_this_file():
    # This file again, in a process where `import svdfuse._C` fails (tests/conftest.py): the op, its
    # default kernel, fake impl and Python autograd must stand without the extension.
    if _native.LOAD_ERROR is not None:
        pytest.skip("this is the reference build")
    env = {**os.environ, "SVDFUSE_TEST_WITHOUT_EXTENSION": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-v", "-p", "no:cacheprovider", "-k", "not reference_build and not import_stays_lean"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    for ran in ("test_opcheck_with_task[", "test_gradcheck_per_task_sigma[", "test_op_task_errors[",
                "test_missing_extension_warns_once_then_uses_the_reference", "test_torch_compile_fullgraph["):  # fmt: skip
        assert f"::{ran}" in run.stdout and all("PASSED" in line for line in run.stdout.splitlines() if f"::{ran}" in line and "SKIPPED" not in line), ran


def test_tracing_runs_the_fake_impl_not_a_kernel(op, monkeypatch):
    # Meta tensors, as torch.compile and export trace: the fake impl gives the output's shape without
    # running the reference's products (which the default kernel would on the meta device).
    monkeypatch.setattr(reference, "lowrank_matmul", lambda *args: pytest.fail("a kernel ran on meta tensors"))
    args = _on("meta", _with_tasks(_inputs(33, 17, 5), num_tasks=3))
    out = op(*args)
    assert out.shape == (3, 7, 33) and out.device.type == "meta"


def test_registrations_survive_reimport():
    for _ in range(2):
        importlib.reload(_native)
    # Looked up after the reloads: where no extension defines the ops, a reload defines them anew,
    # and an overload object held from before may name another op of the library.
    op = torch.ops.svdfuse.lowrank_matmul.default
    args = _inputs(7, 6, 3, grad=True)
    torch.library.opcheck(op, args)  # schema, fake impl, autograd: all there again
    x, U, S, V, base, bias = args
    op(x, U, S, V, base, bias).sum().backward()
    assert S.grad is not None


def test_svdlinear_serves_through_the_op_with_one_sigma(monkeypatch):
    x, U, S, V, base, bias = _inputs(33, 17, 5)
    layer = SVDLinear(base, U, S, V, bias=bias, trainable=2)
    tasks = []

    def spy(*args, **kwargs):
        tasks.append(kwargs.get("task"))
        return lowrank_matmul(*args, **kwargs)

    monkeypatch.setattr(ops, "lowrank_matmul", spy)
    out = layer(x)
    assert tasks == [None]
    torch.testing.assert_close(out, x @ layer.weight.T + bias)


def test_import_stays_lean():
    code = "import sys, torch, svdfuse.ops; assert 'triton' not in sys.modules; assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_cuda_kernel_is_built(native_op, cuda):
    # CUDA calls reach the compiled kernel, not the default one, whose torch matmuls would show.
    args = _inputs(33, 17, 5, lead=(1,), device=cuda)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        ops.lowrank_matmul(*args)
    names = {event.name for event in profile.events()}
    assert "svdfuse::lowrank_matmul" in names and not names & {"aten::matmul", "aten::mm"}, names


def test_torch_compile_fullgraph(device):
    # Inductor on the GPU; on the CPU aot_eager traces the same graph (fake impl, autograd) without a
    # C++ compile of the rest.
    x, U, S, V, base, bias, task = _with_tasks(_inputs(33, 17, 5, lead=(3,), device=device, grad=True), 3)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(ops.lowrank_matmul, fullgraph=True, backend=backend)
    out = compiled(x, U, S, V, base, bias, task)
    torch.testing.assert_close(out, ops.lowrank_matmul(x, U, S, V, base, bias, task))
    out.sum().backward()
    assert S.grad.shape == S.shape and x.grad.shape == x.shape


def _first_rows(args, rows):
    """`args` with x (and task) cut to their first `rows` rows."""
    x, U, S, V, base, bias, *task = args
    return (x[:rows], U, S, V, base, bias, *(t[:rows] for t in task))


# The CUDA op picks its path by the rows of x (leading dims flattened): the fused kernel up to 16
# rows (kFusedMaxRows in csrc/lowrank_matmul_cuda.cu) and K <= 512 (kFusedMaxRank), cuBLAS above.
GPU_SHAPES = [(512, 1024, 64), (4095, 4097, 65), (96, 80, 600)]  # aligned; odd everywhere; K past the fused kernel
GPU_ROWS = [1, 3, 16, 17, 4096]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,K", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("terms", ["lowrank", "lowrank+base+bias", "lowrank+task", "lowrank+base+bias+task"])
def test_cuda_paths_within_torch_error(cuda, dtype, m, n, K, terms):
    args = _inputs(m, n, K, lead=(max(GPU_ROWS),), dtype=dtype, device=cuda, base="base" in terms, bias="bias" in terms)
    if "task" in terms:
        args = _with_tasks(args, num_tasks=5)
    for rows in GPU_ROWS:
        part = _first_rows(args, rows)
        out = ops.lowrank_matmul(*part)
        assert out.shape == (rows, m) and out.dtype == dtype
        _assert_within_torch_error(out, part)
    # The same 16 rows through both paths: alone (fused) and as part of 17 rows (GEMMs).
    part = _first_rows(args, 16)
    _assert_within_torch_error(ops.lowrank_matmul(*_first_rows(args, 17))[:16], part)
    _assert_within_torch_error(ops.lowrank_matmul(*part), part)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 17])  # the fused (cooperative) kernel; cuBLAS GEMMs
def test_cuda_graph_replay_matches_eager(native_op, cuda, rows):
    # bench_lowrank_matmul.py times L1 by CUDA-graph replay: the launch must be capturable and a
    # replay must recompute from the inputs' current contents, not replay stale results.
    args = _inputs(512, 1024, 64, lead=(rows,), dtype=torch.bfloat16, device=cuda)
    x = args[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.lowrank_matmul(*args)  # warm-up outside the capture (allocator, handles)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.lowrank_matmul(*args)
    for seed in (1, 2):
        x.copy_(_inputs(512, 1024, 64, lead=(rows,), dtype=torch.bfloat16, device=cuda, seed=seed)[0])
        out.fill_(float("nan"))  # poisoned: every element must be written by the replay
        graph.replay()
        torch.cuda.synchronize()
        _assert_within_torch_error(out, args)  # the kernel may reduce in any order: not bit-exact


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(), (2, 8), (3, 1, 5), (2, 9)])  # 1, 16, 15 rows fused; 18 rows GEMMs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_task", [False, True])
def test_cuda_leading_shapes(cuda, lead, dtype, with_task):
    args = _inputs(33, 17, 5, lead=lead, dtype=dtype, device=cuda)
    if with_task:
        args = _with_tasks(args, num_tasks=3)
    out = ops.lowrank_matmul(*args)
    assert out.shape == (*lead, 33)
    _assert_within_torch_error(out, args)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [3, 17])  # fused, GEMMs
@pytest.mark.parametrize("bad", [3, -1])
def test_cuda_bad_task_id_gives_its_row_nan(cuda, rows, bad):
    x, U, S, V, base, bias, task = _with_tasks(_inputs(33, 17, 5, lead=(rows,), device=cuda, grad=True), 3)
    task[1] = bad
    out = ops.lowrank_matmul(x, U, S, V, base, bias, task)
    assert out[1].isnan().all()
    assert out[torch.arange(rows, device=cuda) != 1].isfinite().all()
    out.sum().backward()
    assert x.grad[1].isnan().all() and S.grad.isnan().any()


def _unaligned(t, offset):
    """`t` copied to start `offset` elements into its storage: a data_ptr off the 16-byte grid."""
    if t is None or offset == 0:
        return t
    buf = t.new_empty(t.numel() + offset)
    buf[offset:] = t.reshape(-1)
    return buf[offset:].view(t.shape)


# (m, n, K, rows) of the fused kernel's edges: K = 1, the largest fused K with 16 rows, n = 0
# (y = bias), odd everything, the paper's K = 76 (bf16 rows alternate 16- and 8-byte aligned) and
# L1's decode shape.
FUSED_EDGES = [
    (1, 1, 1, 1),
    (33, 17, 1, 16),
    (7, 300, 512, 16),
    (5, 4097, 65, 2),
    (40, 0, 3, 3),
    (301, 777, 76, 5),
    (4096, 4096, 128, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,K,rows", FUSED_EDGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 1])  # 1: x, U, S, V, base, bias all start off the 16-byte grid
@pytest.mark.parametrize("num_tasks", [None, 1])
def test_cuda_fused_edges(cuda, m, n, K, rows, dtype, offset, num_tasks):
    args = _inputs(m, n, K, lead=(rows,), dtype=dtype, device=cuda)
    if num_tasks:
        args = _with_tasks(args, num_tasks)
    args = tuple(t if t is None or t.dtype == torch.int64 else _unaligned(t, offset) for t in args)
    out = ops.lowrank_matmul(*args)
    assert out.shape == (rows, m)
    _assert_within_torch_error(out, args)


@pytest.mark.gpu
def test_cuda_deterministic_mode_gives_the_same_bits(cuda, monkeypatch):
    # The fused kernel sums the blocks' partial x V with atomics, in a run-dependent order; with
    # deterministic algorithms on, the op takes the cuBLAS path, whose bits repeat.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args = _inputs(4095, 4097, 65, lead=(3,), device=cuda, base=False)
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = [ops.lowrank_matmul(*args) for _ in range(5)]
    finally:
        torch.use_deterministic_algorithms(enabled)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    _assert_within_torch_error(outs[0], args)
