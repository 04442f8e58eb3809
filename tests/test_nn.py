"""`svdfuse.nn` module helpers: copies of parametrized models and serving many target tasks at once."""

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import svdfuse
from svdfuse.nn import SVDLinear, SVDWeight, materialize
from svdfuse.nn.convert import parametrize_tensor
from svdfuse.serving import serve_tasks, stack_tasks

from _helpers import merge_perturbed, sigma_perturbed


class _Block(nn.Module):
    """Batch-first attention and an MLP: merged into SVDMultiheadAttention and SVDLinear layers."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, 16)
        self.proj = nn.Linear(16, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.proj(torch.relu(self.fc(x)))


class _ConvBlock(nn.Module):
    """A transposed conv kernel (which SVDConv does not take) and a linear head: merged into an
    SVDWeight parametrization and an SVDLinear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(4, 6, 3)
        self.fc = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 4, length)
        return self.fc(torch.relu(self.conv(x)).mean(-1))


def _merged_block(k: int = 3, block: type[nn.Module] = _Block):
    torch.manual_seed(0)
    base = block()
    return base, merge_perturbed(base, sources=3, scale=0.05, seed=10, k=k)


def test_materializing_a_deep_copy_leaves_the_original_parametrized():
    base, result = _merged_block(block=_ConvBlock)
    model = result.to_module(base)
    x = torch.randn(2, 4, 5)
    expected = model(x)
    dense = materialize(copy.deepcopy(model))
    assert not parametrize.is_parametrized(dense.conv)
    assert parametrize.is_parametrized(model.conv, "weight")
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=1e-5)
    # And the other way round: the copy survives the original's materialization.
    twin = copy.deepcopy(model)
    materialize(model)
    torch.testing.assert_close(twin(x), expected, atol=0, rtol=0)


def test_deep_copies_do_not_share_cached_parametrizations():
    """Under `parametrize.cached()` each copy computes its own weight: no copy reads another's σ."""
    base, result = _merged_block(block=_ConvBlock)
    model = result.to_module(base)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.conv.parametrizations.weight[0].sigma.mul_(2.0)
    x = torch.randn(2, 4, 5)
    expected, expected_twin = model(x), twin(x)
    assert not torch.allclose(expected, expected_twin)
    with parametrize.cached():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(twin(x), expected_twin, atol=0, rtol=0)


@pytest.mark.parametrize("build", ["to_module", "atlas"])
def test_deep_copies_of_deep_copies_stay_independent(build):
    base, result = _merged_block(block=_ConvBlock)
    if build == "to_module":
        model = result.to_module(base)
    else:
        sources = [{k: v + 0.05 * torch.randn(v.shape) for k, v in base.state_dict().items()} for _ in range(2)]
        model = svdfuse.atlas(sources, base=base, module=base)
    x = torch.randn(2, 4, 5)
    expected = model(x)
    copies = [copy.deepcopy(model)]
    copies.append(copy.deepcopy(copies[0]))
    materialize(copies[0])
    for m in (model, copies[1]):
        assert parametrize.is_parametrized(m.conv, "weight")
        torch.testing.assert_close(m(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(copies[0](x), expected, atol=1e-5, rtol=1e-5)


class _Doubled(nn.Module):
    """A parametrization with a right_inverse, which registering it again would run."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / 2


def test_deep_copies_keep_other_parametrizations_of_the_module_as_they_were():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    parametrize.register_parametrization(layer, "weight", _Doubled())
    U, V = torch.linalg.qr(torch.randn(5, 2)).Q, torch.linalg.qr(torch.randn(6, 2)).Q
    parametrize_tensor(layer, "weight", SVDWeight(U, torch.tensor([1.0, 0.5]), V))
    x = torch.randn(3, 6)
    twin = copy.deepcopy(layer)
    assert [type(p) for p in twin.parametrizations.weight] == [_Doubled, SVDWeight]
    torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)
    torch.testing.assert_close(twin.parametrizations.weight.original, layer.parametrizations.weight.original, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Serving many target tasks in one batch: stack_tasks and serve_tasks
# ---------------------------------------------------------------------------------------------


def _mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _adapted_mlps(num_tasks: int = 3) -> list[nn.Module]:
    """Copies of one merged MLP, each adapted by `svdfuse.adapt` to its own random task."""
    torch.manual_seed(0)
    base = _mlp()
    sources = [{k: v + 0.1 * torch.randn(v.shape) for k, v in base.state_dict().items()} for _ in range(4)]
    merged = svdfuse.merge(sources, k=6, base=base, device="cpu").to_module(base)
    models = []
    for t in range(num_tasks):
        gen = torch.Generator().manual_seed(100 + t)
        data = [(torch.randn(16, 12, generator=gen), torch.randint(0, 8, (16,), generator=gen)) for _ in range(3)]
        model = copy.deepcopy(merged)
        svdfuse.adapt(model, data, n=4, epochs=1, progress=False)
        models.append(model)
    return models


def _sigma_adapted_blocks(num_tasks: int = 3, block: type[nn.Module] = _Block) -> list[nn.Module]:
    """Copies of one merged block whose SVDLinear σ differ (SVDWeight σ, which cannot, stay shared)."""
    base, result = _merged_block(block=block)
    return sigma_perturbed(result.to_module(base), num_tasks, seed=200, stackable_only=True)


def _assert_rows_match(y: torch.Tensor, outputs: list[torch.Tensor], ids: torch.Tensor) -> None:
    for b, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[b], outputs[t][b], msg=lambda m: f"request {b} (task {t}): {m}")


def test_stacked_model_serves_each_request_with_its_tasks_sigma():
    models = _adapted_mlps()
    stacked = stack_tasks(models)
    layers = dict(svdfuse.nn.svd_layers(stacked))
    assert len(layers) == 3 and all(layer.S.shape == (3, 6) for layer in layers.values())
    assert not any(p.requires_grad for p in stacked.parameters())
    x = torch.randn(7, 12)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    with torch.no_grad(), serve_tasks(stacked, ids):
        y = stacked(x)
    outputs = [model(x).detach() for model in models]
    assert all(not torch.allclose(outputs[0], out) for out in outputs[1:]), "the adaptations did not differ"
    _assert_rows_match(y, outputs, ids)


def test_stacked_block_serves_attention_and_mlp_with_each_requests_sigma():
    models = _sigma_adapted_blocks()
    stacked = stack_tasks(models)
    layers = dict(svdfuse.nn.svd_layers(stacked))
    assert set(layers) == {"attn.in_proj", "attn.out_proj", "fc", "proj"}
    assert all(isinstance(layer, SVDLinear) and layer.S.shape == (3, 3) for layer in layers.values())
    x = torch.randn(4, 5, 8)  # (batch, seq, d): each SVDLinear sees (4, 5, n)
    ids = torch.tensor([1, 2, 0, 1])
    with torch.no_grad(), serve_tasks(stacked, ids):
        y = stacked(x)
    _assert_rows_match(y, [model(x).detach() for model in models], ids)
    for t, model in enumerate(models):  # the attention's own σ matter: folding one task gives its outputs
        torch.testing.assert_close(materialize(copy.deepcopy(stacked), task=t)(x), model(x), atol=1e-5, rtol=1e-5)


def test_stacked_conv_block_serves_the_linear_head_per_request():
    models = _sigma_adapted_blocks(block=_ConvBlock)
    stacked = stack_tasks(models)
    assert {type(layer) for _, layer in svdfuse.nn.svd_layers(stacked)} == {SVDLinear, SVDWeight}
    x = torch.randn(3, 4, 5)
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad(), serve_tasks(stacked, ids):
        y = stacked(x)
    _assert_rows_match(y, [model(x).detach() for model in models], ids)


def test_one_task_stack_serves_without_task_ids_and_materializes():
    (model,) = _adapted_mlps(1)
    stacked = stack_tasks([model])
    x = torch.randn(5, 12)
    torch.testing.assert_close(stacked(x), model(x))
    torch.testing.assert_close(materialize(stacked)(x), model(x), atol=1e-5, rtol=1e-5)


def test_serving_a_stack_needs_batch_first_task_ids():
    models = _sigma_adapted_blocks()
    stacked = stack_tasks(models)
    x = torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match=r"σ bank of 3 tasks: run the model inside `with svdfuse.serving.serve_tasks"):
        stacked(x)
    bad_ids = [
        (torch.tensor([0, 1, 2, 1], dtype=torch.int32), TypeError, "task_ids must be a torch.int64 tensor, found torch.int32"),
        ([0, 1, 2, 1], TypeError, "found list"),
        (torch.zeros(4, 5, dtype=torch.int64), ValueError, r"must be \(batch,\), one id per request, found \(4, 5\)"),
        (torch.tensor([0, 3, 1, 1]), ValueError, r"task ids must be in \[0, 3\), found 3 at 1"),
        (torch.tensor([0, 1, -1, 1]), ValueError, r"found -1 at 2"),
    ]
    for ids, error, match in bad_ids:
        with pytest.raises(error, match=match):
            with serve_tasks(stacked, ids):
                pass
    with serve_tasks(stacked, torch.tensor([0, 1, 2])):
        layer = r"SVDLinear\(in_features=8, out_features=24\)"  # the attention's in-projection, the first layer
        message = rf"3 task ids \(one per request\) but {layer} got input of shape \(4, 5, 8\); .*batch-first"
        with pytest.raises(ValueError, match=message):
            stacked(x)
        with pytest.raises(ValueError, match=r"got input of shape \(8,\)"):
            stacked.fc(torch.randn(8))
    with pytest.raises(ValueError, match="no σ bank; build the serving model with svdfuse.serving.stack_tasks"):
        with serve_tasks(models[0], torch.tensor([0])):
            pass


def test_serve_tasks_nests_and_restores():
    models = _adapted_mlps(2)
    stacked = stack_tasks(models)
    x = torch.randn(3, 12)
    outputs = [model(x).detach() for model in models]
    with torch.no_grad(), serve_tasks(stacked, torch.tensor([1, 1, 1])):
        with serve_tasks(stacked, torch.tensor([0, 0, 0])):
            torch.testing.assert_close(stacked(x), outputs[0])
        torch.testing.assert_close(stacked(x), outputs[1])
    with pytest.raises(ValueError, match="serve_tasks"):
        stacked(x)


def test_materialize_of_a_stack_folds_the_task_asked_for():
    models = _adapted_mlps()
    stacked = stack_tasks(models)
    with pytest.raises(ValueError, match=r"serves 3 tasks .*; pass task=i"):
        materialize(copy.deepcopy(stacked))
    with pytest.raises(ValueError, match=r"task must be in \[0, 3\), found 3"):
        materialize(copy.deepcopy(stacked), task=3)
    with pytest.raises(ValueError, match="task=0 picks one task of a model from svdfuse.serving.stack_tasks"):
        materialize(copy.deepcopy(models[0]), task=0)
    with pytest.raises(ValueError, match="σ bank of 3 tasks"):
        stacked[0].weight
    x = torch.randn(5, 12)
    for t, model in enumerate(models):
        dense = materialize(copy.deepcopy(stacked), task=t)
        assert not any(isinstance(m, SVDLinear) for m in dense.modules())
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)


def _with_changed(model: nn.Module, key: str) -> nn.Module:
    """A copy of `model` whose tensor `key` (a state dict name) is nudged."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.state_dict(keep_vars=True)[key].add_(1e-3)
    return other


def test_stack_tasks_refuses_models_that_differ_beyond_sigma():
    models = _sigma_adapted_blocks(2)
    with pytest.raises(ValueError, match="at least one model"):
        stack_tasks([])
    with pytest.raises(ValueError, match="model 0 has no SVD layers"):
        stack_tasks([_Block(), _Block()])
    for key in ["fc.U", "proj.V", "fc.weight0", "proj.bias", "attn.in_proj.weight0", "attn.out_proj.bias"]:
        message = rf"model 1: '{re.escape(key)}' differs from model 0's; stacked tasks share every tensor but the σ"
        with pytest.raises(ValueError, match=message):
            stack_tasks([models[0], _with_changed(models[1], key)])
    base, wider = _merged_block(k=4)  # the same sources merged at another rank
    message = r"model 1: 'attn.in_proj.U' is torch.float32 \(24, 4\), in model 0 it is torch.float32 \(24, 3\); .*one merge"
    with pytest.raises(ValueError, match=message):
        stack_tasks([models[0], wider.to_module(base)])
    extra = copy.deepcopy(models[1])
    extra.act = nn.ReLU()
    with pytest.raises(ValueError, match="model 1: module 'act' is ReLU, in model 0 it is missing"):
        stack_tasks([models[0], extra])
    mlps = _adapted_mlps(2)
    mlps[1][1] = nn.GELU()
    with pytest.raises(ValueError, match="model 1: module '1' is GELU, in model 0 it is ReLU"):
        stack_tasks(mlps)
    head = copy.deepcopy(models[1])
    head.register_buffer("scale", torch.ones(1))
    with pytest.raises(ValueError, match="model 1: tensor 'scale' is only in model 1"):
        stack_tasks([models[0], head])
    convs = _sigma_adapted_blocks(2, block=_ConvBlock)
    with torch.no_grad():
        convs[1].conv.parametrizations.weight[0].sigma.mul_(2)
    message = r"model 1: σ of 'conv.parametrizations.weight.0' differs from model 0's, but it is an SVDWeight"
    with pytest.raises(ValueError, match=message):
        stack_tasks(convs)
    with pytest.raises(ValueError, match=r"model 0: 'attn.in_proj' already holds a σ bank \(2, 3\); stack single-task models"):
        stack_tasks([stack_tasks(models)])


@pytest.mark.gpu
def test_stacked_model_on_cuda_serves_each_request_with_its_tasks_sigma(cuda):
    models = [model.to(cuda) for model in _adapted_mlps()]
    stacked = stack_tasks(models)
    x = torch.randn(7, 12, device=cuda)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2], device=cuda)
    with torch.no_grad(), serve_tasks(stacked, ids):
        y = stacked(x)
    _assert_rows_match(y, [model(x).detach() for model in models], ids.cpu())


class _Mixed(nn.Module):
    """Every kind of merged layer: attention (SVDMultiheadAttention), linear, conv (SVDConv) and a
    transposed conv (SVDWeight)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 6)
        self.conv = nn.Conv1d(4, 6, 3)
        self.up = nn.ConvTranspose1d(6, 4, 3)


@pytest.mark.parametrize("method,params", [("axis", {"k": 2}), ("task_arithmetic", {"k": 2}), ("average", {"k": 5})])
def test_weight_basis_starts_from_the_merged_weights_and_trains_their_own_top_singular_values(method, params):
    torch.manual_seed(0)
    base = _Mixed().double()
    sources = []
    for i in range(3):
        gen = torch.Generator().manual_seed(20 + i)
        sources.append({key: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for key, v in base.state_dict().items()})
    result = svdfuse.merge(sources, base=base, method=method, device="cpu", **params)
    model = result.to_module(base, 3, basis="weight")
    expected = materialize(result.to_module(base)).state_dict()
    found = materialize(copy.deepcopy(model)).state_dict()
    assert found.keys() == expected.keys()
    for key in expected:  # float64 truth: the same merged weights at init
        torch.testing.assert_close(found[key], expected[key], atol=1e-12, rtol=0)
    layers = dict(svdfuse.nn.svd_layers(model))
    assert len(layers) == len(result.components)
    tops = {key: torch.linalg.svdvals(expected[key].reshape(U.shape[0], -1))[:3] for key, (U, _, _) in result.components.items()}
    matched = set()
    for layer in layers.values():
        assert layer.sigma.numel() == 3 and layer.sigma_frozen.numel() == 0
        key = next(k for k, top in tops.items() if torch.allclose(layer.sigma.detach(), top, atol=1e-12, rtol=0))
        matched.add(key)
    assert matched == set(tops)  # every layer trains its own merged weight's top 3 σ


def test_basis_must_be_delta_or_weight():
    base, result = _merged_block()
    with pytest.raises(ValueError, match="basis must be one of 'delta', 'weight', found 'merged'"):
        result.to_module(base, basis="merged")
