"""Stage 2: SVD layers and `svdfuse.adapt` train the top-N singular values and nothing else."""

import pytest
import torch
from torch import nn

import svdfuse
from svdfuse.nn import SVDLinear, SVDWeight, materialize, set_trainable

from _helpers import merge_perturbed


def _mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _merged(k=6, seed=0):
    torch.manual_seed(seed)
    base = _mlp()
    return base, merge_perturbed(base, sources=4, scale=0.1, seed=100, k=k)


def _data(n_batches=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_batches, 16, 12, generator=gen)
    ys = torch.randint(0, 8, (n_batches, 16), generator=gen)
    return list(zip(xs, ys))


def test_adapt_trains_only_the_top_n_singular_values():
    base, result = _merged()
    model = result.to_module(base)
    sigmas = {name: layer.S.detach().clone() for name, layer in svdfuse.nn.svd_layers(model)}
    others = {name: t.clone() for name, t in model.state_dict().items() if "sigma" not in name}
    report = svdfuse.adapt(model, _data(), n=3, epochs=2, progress=False)
    assert report.trainable == 3 * 3 and report.layers == 3
    assert len(report.epoch_losses) == 2 and all(torch.isfinite(torch.tensor(report.epoch_losses)))
    for name, layer in svdfuse.nn.svd_layers(model):
        S = layer.S.detach()
        assert torch.all(S[:3] != sigmas[name][:3]), f"{name}: a top-3 singular value did not train"
        assert torch.equal(S[3:], sigmas[name][3:]), f"{name}: a singular value past the top 3 changed"
    for name, value in model.state_dict().items():
        if "sigma" not in name:
            assert torch.equal(value, others[name]), f"{name} changed but is frozen"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".sigma") for name in trainable)


def test_adapted_layer_equals_its_dense_weight():
    base, result = _merged()
    model = result.to_module(base, n=2)
    svdfuse.adapt(model, _data(), n=2, epochs=1, progress=False)
    x = torch.randn(5, 12)
    expected = model(x)
    dense = materialize(model)
    assert not any(isinstance(m, SVDLinear) for m in dense.modules())
    torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=1e-5)
    assert set(dense.state_dict()) == set(base.state_dict())


def test_to_module_forward_equals_the_dense_merged_model():
    base, result = _merged()
    lowrank = result.to_module(base)
    dense = _mlp()
    dense.load_state_dict(result.state_dict())
    x = torch.randn(7, 3, 12)  # any leading shape
    torch.testing.assert_close(lowrank(x), dense(x), atol=1e-5, rtol=1e-5)


def test_n_above_the_merged_rank_is_an_explicit_choice():
    base, result = _merged(k=4)
    model = result.to_module(base)
    with pytest.raises(ValueError, match=r"0: 6 trainable singular values requested but the merged rank is 4.*excess='clip'"):
        set_trainable(model, 6)
    with pytest.warns(UserWarning, match="excess='clip': 3 layers"):
        assert set_trainable(model, 6, excess="clip") == 3 * 4
    x = torch.randn(3, 12)
    y = model(x)
    assert set_trainable(model, 6, excess="extend") == 3 * 6
    layer = model[0]
    assert layer.U.shape == (32, 6) and layer.V.shape == (12, 6)
    eye = torch.eye(6)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-5, rtol=0)
    # The added directions start at σ = 0: the function is unchanged until they train.
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="0: cannot extend to 20 directions in a 32x12"):
        set_trainable(model, 20, excess="extend")


def test_fraction_n_and_zero():
    base, result = _merged(k=6)
    model = result.to_module(base)
    # floor(0.25 * min(m, n)) with min(m, n) = 12, 32, 8 -> 3, 8 (> k = 6: clipped), 2
    with pytest.warns(UserWarning, match="excess='clip': 1 layers"):
        assert set_trainable(model, 0.25, excess="clip") == 3 + 6 + 2
    assert set_trainable(model, 0) == 0
    with pytest.raises(ValueError, match="leaves no singular value"):
        svdfuse.adapt(model, _data(), n=0, progress=False)


def test_adapt_needs_svd_layers_and_batches():
    with pytest.raises(ValueError, match="to_module"):
        svdfuse.adapt(_mlp(), _data(), progress=False)
    base, result = _merged()
    with pytest.raises(ValueError, match="no batches"):
        svdfuse.adapt(result.to_module(base), [], n=2, progress=False)
    with pytest.raises(TypeError, match=r"^adapt: model must be an nn.Module with svdfuse layers, found MergeResult: build it with result.to_module\(base_model\)$"):
        svdfuse.adapt(result, _data(), n=2, progress=False)


@pytest.mark.parametrize(
    "loss_fn, error, message",
    [
        (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), ValueError, r"must return a scalar tensor, found shape \(16,\); reduce it"),
        (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]).detach(), ValueError, "does not depend on the trainable singular values"),
        (lambda m, b: 1.5, TypeError, "must return a scalar tensor, found float"),
    ],
    ids=["per-example", "detached", "a-float"],
)
def test_a_loss_backward_cannot_take_is_a_one_line_error_before_any_step(loss_fn, error, message):
    base, result = _merged()
    model = result.to_module(base)
    before = {name: layer.S.detach().clone() for name, layer in svdfuse.nn.svd_layers(model)}
    with pytest.raises(error, match=f"^adapt: (loss_fn|the loss) {message}"):
        svdfuse.adapt(model, _data(), n=2, epochs=1, loss_fn=loss_fn, progress=False)
    assert all(torch.equal(layer.S, before[name]) for name, layer in svdfuse.nn.svd_layers(model))


def test_svd_weight_parametrization_trains_sigma_of_attention():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, batch_first=True)
    sources = [{k: v + 0.05 * torch.randn(v.shape) for k, v in base.state_dict().items()} for _ in range(3)]
    result = svdfuse.merge(sources, k=3, base=base, device="cpu")
    model = result.to_module(base)
    layers = dict(svdfuse.nn.svd_layers(model))
    assert all(isinstance(layer, SVDWeight) for layer in layers.values()) and len(layers) == 2
    x = torch.randn(2, 5, 8)
    loss_fn = lambda m, batch: m(batch, batch, batch)[0].square().mean()  # noqa: E731
    sigmas = {name: layer.S.detach().clone() for name, layer in layers.items()}
    others = {k: v.clone() for k, v in model.state_dict().items() if "sigma" not in k}
    svdfuse.adapt(model, [x, x], n=2, epochs=1, loss_fn=loss_fn, progress=False)
    for name, layer in layers.items():
        assert torch.all(layer.S[:2] != sigmas[name][:2]) and torch.equal(layer.S[2:], sigmas[name][2:])
    assert all(torch.equal(v, others[k]) for k, v in model.state_dict().items() if "sigma" not in k)


@pytest.mark.gpu
def test_adapt_on_cuda_trains_only_the_top_n(cuda):
    base, result = _merged()
    model = result.to_module(base).to(cuda)
    sigmas = {name: layer.S.detach().clone() for name, layer in svdfuse.nn.svd_layers(model)}
    svdfuse.adapt(model, _data(), n=3, epochs=1, progress=False)
    for name, layer in svdfuse.nn.svd_layers(model):
        assert torch.all(layer.S[:3] != sigmas[name][:3]) and torch.equal(layer.S[3:], sigmas[name][3:])
