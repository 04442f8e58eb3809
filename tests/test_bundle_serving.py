"""Serving a bundle: each request of one batch as its adapter (or mix) against the dense per-request
model W0 + U Σ Vᵀ in float64; `ops.core_matmul` against its reference and plain torch, opcheck;
export back to peft equal to the bundle's adapter; the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svdfuse
from svdfuse import ops, reference
from svdfuse.bundle import Bundle, export_adapter, load_bundle, read_bundle, serve_bundle
from _helpers import assert_within_torch_error
from test_compress import Net, make_adapter, make_base

peft = pytest.importorskip("peft")

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module", params=["diagonal", "full"])
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base, path = make_base(root)
    adapters = {f"ad{i}": make_adapter(base, root / f"ad{i}", seed=10 + i, r=2 + i % 2) for i in range(4)}
    svdfuse.compress(adapters, k=4, base=path, output=root / "b.safetensors", core=request.param)
    bundle = read_bundle(root / "b.safetensors")
    return base, bundle, root


def dense_model(base: nn.Module, bundle: Bundle, request, dtype=torch.float64) -> nn.Module:
    """The base with every bundle weight replaced by W0 + U Σ Vᵀ of `request`, formed densely here."""
    model = copy.deepcopy(base).to(dtype)
    weights = torch.zeros(len(bundle.adapters), dtype=torch.float64)
    for name, w in (request.items() if isinstance(request, dict) else [(request, 1.0)]):
        weights[name if isinstance(name, int) else bundle.adapters.index(name)] += w
    state = model.state_dict()
    for key in bundle.shapes:
        C = (weights[:, None] * bundle.cores[key].double().reshape(len(weights), -1)).sum(0).reshape(bundle.cores[key].shape[1:])
        U, V = bundle.U[key].double(), bundle.V[key].double()
        delta = U @ torch.diag(C) @ V.T if C.dim() == 1 else U @ C @ V.T
        state[key] = (state[key].double() + delta).to(dtype)
    model.load_state_dict(state)
    return model


def test_each_request_equals_its_dense_model(served):
    base, bundle, _ = served
    model = load_bundle(copy.deepcopy(base), bundle)
    requests = ["ad2", 0, {"ad1": 0.25, "ad3": -0.5}, "ad2", 3, {"ad0": 1.0}]
    x = torch.randn(len(requests), 5, 24, generator=torch.Generator().manual_seed(1))
    with serve_bundle(model, requests):
        out = model(x)
    for b, request in enumerate(requests):
        truth = dense_model(base, bundle, request)(x[b : b + 1].double())
        torch_out = dense_model(base, bundle, request, torch.float32)(x[b : b + 1])
        assert_within_torch_error(out[b : b + 1], truth, torch_out)


def test_ids_tensor_and_outside_serving(served):
    base, bundle, _ = served
    model = load_bundle(copy.deepcopy(base), bundle)
    x = torch.randn(3, 24)
    with serve_bundle(model, torch.tensor([1, 1, 3])):
        out = model(x)
    with serve_bundle(model, ["ad1", "ad1", "ad3"]):
        assert torch.equal(model(x), out)
    with pytest.raises(ValueError, match="inside `with svdfuse.bundle.serve_bundle"):
        model(x)


@pytest.mark.parametrize(
    "requests, expected",
    [
        (["ad0", "nope"], r"request 1: no adapter 'nope' in the bundle"),
        ([{"ad0": float("nan")}], r"request 0: the weight of 'ad0' must be a finite number"),
        ([7], r"request 0: adapter index must be in \[0, 4\), found 7"),
        (torch.tensor([0, -1]), r"request ids must be in \[0, 4\), found -1 at 1"),
        ([{}], r"an empty mix"),
    ],
)
def test_bad_requests(served, requests, expected):
    base, bundle, _ = served
    model = load_bundle(copy.deepcopy(base), bundle)
    with pytest.raises(ValueError, match=expected):
        with serve_bundle(model, requests):
            pass


def test_a_bundle_that_does_not_fit(served):
    base, bundle, _ = served

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.blocks[1]["q"] = nn.Linear(24, 21)

    with pytest.raises(ValueError, match=r"'blocks.1.q.weight' is \(21, 24\) in this model, \(20, 24\) in the bundle"):
        load_bundle(Other(), bundle)
    with pytest.raises(ValueError, match=r"'blocks.0.q.weight', which is no module's weight"):
        load_bundle(nn.Sequential(nn.Linear(24, 20)), bundle)


@pytest.mark.parametrize("request_", ["ad1", {"ad0": 0.5, "ad2": 0.5}])
def test_export_equals_the_bundles_adapter(served, tmp_path, request_):
    base, bundle, root = served
    export_adapter(root / "b.safetensors", tmp_path / "lora", base=copy.deepcopy(base), request=request_)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).merge_and_unload().state_dict()
    truth = dense_model(base, bundle, request_).state_dict()
    for key, want in truth.items():
        err = (merged[key].double() - want).abs().max().item()
        assert err <= 8 * EPS32 * want.abs().max().item(), f"{key}: {err:.3g}"


def test_export_refusals_write_nothing(served, tmp_path, capsys):
    from svdfuse.cli import main

    base, bundle, root = served
    with pytest.raises(ValueError, match="no adapter 'zz'"):
        export_adapter(root / "b.safetensors", tmp_path / "x", base=base, request={"zz": 1.0})
    assert not (tmp_path / "x").exists()
    assert main(["export", "lora", "--bundle", str(root / "b.safetensors"), "--mix", "ad0=inf", "--base", str(root), "-o", str(tmp_path / "y")]) == 2
    assert "the weight of 'ad0' must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_core_matmul_against_reference_and_torch():
    gen = torch.Generator().manual_seed(0)
    m, n, K, T = 9, 7, 5, 4
    x = torch.randn(3, 6, n, generator=gen)
    U, V = torch.randn(m, K, generator=gen), torch.randn(n, K, generator=gen)
    C, W, b = torch.randn(T, K, K, generator=gen), torch.randn(m, n, generator=gen), torch.randn(m, generator=gen)
    task = torch.tensor([[3, 0, 3, 1, 1, 0]] * 3)
    out = ops.core_matmul(x, U, C, V, task, base=W, bias=b)
    d = lambda t: t.double()  # noqa: E731
    truth_check = torch.stack([torch.stack([d(x[i, j]) @ (d(W) + d(U) @ d(C[task[i, j]]) @ d(V).T).T + d(b) for j in range(6)]) for i in range(3)])
    truth = reference.core_matmul(d(x), d(U), d(C), d(V), d(W), d(b), task)
    torch_out = torch.stack([torch.stack([x[i, j] @ (W + U @ C[task[i, j]] @ V.T).T + b for j in range(6)]) for i in range(3)])
    assert_within_torch_error(out, truth, torch_out, truth_check=truth_check)
    torch.library.opcheck(torch.ops.svdfuse.core_matmul.default, (x, U, C, V, W, b, task))
    torch.library.opcheck(torch.ops.svdfuse.core_matmul.default, (x[:, :0], U, C, V, None, None, task[:, :0]))
    with pytest.raises(ValueError, match=r"task ids must be in \[0, num_tasks\) = \[0, 4\).*found 4 at \[0, 1\]"):
        ops.core_matmul(x, U, C, V, torch.tensor([[0, 4, 0, 0, 0, 0]] * 3))
    with pytest.raises(ValueError, match=r"C must have shape \(num_tasks, K, K\) with K = 5, found \[4, 5, 4\]"):
        ops.core_matmul(x, U, C[..., :4], V, task)


def test_core_matmul_gathers_cores_in_blocks_over_many_rows_and_tasks():
    """More rows than one block of gathered cores (4 MB: 1024 rows at K = 32), 50 tasks in any order."""
    gen = torch.Generator().manual_seed(1)
    m, n, K, T = 20, 24, 32, 50
    x = torch.randn(2500, n, generator=gen)
    U, V, C = torch.randn(m, K, generator=gen), torch.randn(n, K, generator=gen), torch.randn(T, K, K, generator=gen)
    task = torch.randint(0, T, (2500,), generator=gen)
    out = ops.core_matmul(x, U, C, V, task)
    d = lambda t: t.double()  # noqa: E731
    truth = reference.core_matmul(d(x), d(U), d(C), d(V), None, None, task)
    torch_out = reference.core_matmul(x, U, C, V, None, None, task)
    assert_within_torch_error(out, truth, torch_out)
