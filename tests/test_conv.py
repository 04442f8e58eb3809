"""`SVDConv` against the dense conv with kernel W0 + (U diag(σ) Vᵀ).reshape(W0.shape): alone, in a
merged torchvision MobileNetV2, and serving a σ per request."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from svdfuse.nn import SVDConv, SVDLinear, SVDWeight, materialize, svd_layers
from svdfuse.nn.convert import parametrize_tensor
from svdfuse.serving import serve_tasks, stack_tasks

from _helpers import assert_within_torch_error, merge_perturbed, sigma_perturbed

K = 3

# (conv, input shape): odd sizes, every padding mode and kind of padding, groups 1 / 2+ / depthwise.
CASES = {
    "1d": (lambda: nn.Conv1d(4, 6, 3), (3, 4, 11)),
    "1d-groups3-strided-dilated-circular-nobias": (
        lambda: nn.Conv1d(6, 9, 4, groups=3, stride=2, padding=2, dilation=2, bias=False, padding_mode="circular"),
        (2, 6, 13),
    ),
    "1d-same-reflect": (lambda: nn.Conv1d(5, 7, 3, padding="same", padding_mode="reflect"), (2, 5, 9)),
    "2d": (lambda: nn.Conv2d(3, 8, 3), (2, 3, 7, 9)),
    "2d-groups2-rect-strided-dilated": (
        lambda: nn.Conv2d(6, 10, (3, 2), groups=2, stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        (2, 6, 9, 8),
    ),
    "2d-depthwise-replicate": (lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1, padding_mode="replicate"), (2, 8, 7, 5)),
    "2d-depthwise-x2-strided-nobias": (lambda: nn.Conv2d(6, 12, 3, groups=6, stride=2, padding=1, bias=False), (3, 6, 9, 9)),
    "2d-pointwise": (lambda: nn.Conv2d(5, 7, 1), (2, 5, 6, 5)),
    "2d-same-dilated": (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 9, 7)),
    # Even kernels: "same" pads an odd total, the odd one after; reflect pads with F.pad, not the conv.
    "2d-same-even-reflect": (lambda: nn.Conv2d(4, 6, (2, 4), padding="same", padding_mode="reflect"), (2, 4, 7, 9)),
    "2d-valid-stride3": (lambda: nn.Conv2d(4, 6, 2, padding="valid", stride=3), (2, 4, 10, 11)),
    "3d-groups2": (
        lambda: nn.Conv3d(4, 6, (2, 3, 3), groups=2, stride=(1, 2, 2), padding=(0, 1, 1)),
        (2, 4, 5, 7, 6),
    ),
    "3d-same-circular-nobias": (lambda: nn.Conv3d(3, 5, 3, padding="same", padding_mode="circular", bias=False), (1, 3, 4, 5, 6)),
    "3d-depthwise": (lambda: nn.Conv3d(4, 4, 3, groups=4, padding=1), (2, 4, 5, 4, 3)),
}


def _pair(case: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """An `SVDConv` and the conv it replaces with its kernel parametrized as `SVDWeight` (the dense
    path), both in `dtype`, and an input."""
    build, shape = CASES[case]
    torch.manual_seed(seed)
    conv = build().to(dtype)
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.normal_()
    m, n = conv.weight.shape[0], conv.weight[0].numel()
    U = torch.linalg.qr(torch.randn(m, K, dtype=torch.float64)).Q.to(dtype)
    V = torch.linalg.qr(torch.randn(n, K, dtype=torch.float64)).Q.to(dtype)
    S = (torch.rand(K, dtype=torch.float64) + 0.5).to(dtype)
    dense = copy.deepcopy(conv)
    parametrize_tensor(dense, "weight", SVDWeight(U, S, V))
    return SVDConv(conv, U, S, V), dense, torch.randn(shape, dtype=dtype)


def _dense_sigma(dense: nn.Module) -> nn.Parameter:
    return dense.parametrizations.weight[0].sigma


@pytest.mark.parametrize("case", CASES)
def test_matches_the_dense_conv_with_sigma_and_input_gradients(case):
    low, dense, x = _pair(case)
    x_low, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = low(x_low), dense(x_dense)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(low.sigma.grad, _dense_sigma(dense).grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_low.grad, x_dense.grad, rtol=0, atol=1e-12)
    with torch.no_grad():  # unbatched input, as torch's convs take it
        torch.testing.assert_close(low(x[0]), expected[0].detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_float32_error_is_within_twice_torchs_own(case):
    low, dense, x = _pair(case, torch.float32)
    with torch.no_grad():
        truth = copy.deepcopy(dense).double()(x.double())
        out = low(x)
        torch_error = (dense(x).double() - truth).abs().max().item()
    assert out.dtype == torch.float32
    floor = torch.finfo(torch.float32).eps * truth.abs().max().item()
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=2 * torch_error + floor)


def test_extended_directions_start_at_zero_and_train_like_the_dense_path():
    low, dense, x = _pair("2d-groups2-rect-strided-dilated")
    assert low.set_trainable(K + 2, "extend") == K + 2
    dense.parametrizations.weight[0].set_trainable(K + 2, "extend")
    out, expected = low(x), dense(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert low.sigma.shape == (K + 2,) and torch.all(low.sigma.grad[K:] != 0)
    torch.testing.assert_close(low.sigma.grad, _dense_sigma(dense).grad, rtol=0, atol=1e-10)


def test_weight_to_dense_and_repr():
    low, dense, x = _pair("2d-depthwise-x2-strided-nobias")
    torch.testing.assert_close(low.weight, dense.weight, rtol=0, atol=0)
    assert low.bias is None and (low.in_channels, low.out_channels, low.kernel_size) == (6, 12, (3, 3))
    folded = low.to_dense()
    assert type(folded) is nn.Conv2d and folded.groups == 6 and folded.stride == (2, 2)
    assert all(p.requires_grad for p in folded.parameters())
    torch.testing.assert_close(folded(x), low(x), rtol=0, atol=1e-12)
    assert "rank=3, trainable=3" in repr(low) and "(base): Conv2d(6, 12, kernel_size=(3, 3)" in repr(low)


def test_constructor_says_what_it_expected():
    conv = nn.Conv2d(4, 6, 3, groups=2)  # kernel matrix 6 x 18
    U, S, V = torch.randn(6, 2), torch.rand(2), torch.randn(18, 2)
    with pytest.raises(TypeError, match="nn.Conv1d, nn.Conv2d or nn.Conv3d, found ConvTranspose2d"):
        SVDConv(nn.ConvTranspose2d(4, 6, 3), U, S, V)
    message = r"kernel of shape \(6, 2, 3, 3\) needs U \(6, K\), S \(K,\) and V \(18, K\); found U \(6, 2\), S \(2,\), V \(36, 2\)"
    with pytest.raises(ValueError, match=message):
        SVDConv(conv, U, S, torch.randn(36, 2))
    with pytest.raises(ValueError, match=r"weight0 must have the kernel's shape \(6, 2, 3, 3\), found \(6, 4, 3, 3\)"):
        SVDConv(conv, U, S, V, weight0=torch.randn(6, 4, 3, 3))


class _Mixed(nn.Module):
    """A conv SVDConv takes, a transposed conv and a conv subclass it leaves to SVDWeight."""

    class _Shifted(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.shifted = self._Shifted(4, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shifted(torch.relu(self.up(torch.relu(self.conv(x)))))


def test_to_module_converts_plain_convs_and_parametrizes_the_rest():
    torch.manual_seed(0)
    base = _Mixed()
    result = merge_perturbed(base, sources=3, scale=0.05, seed=1, k=3)
    model = result.to_module(base)
    assert type(model.conv) is SVDConv
    for name in ("up", "shifted"):
        assert isinstance(getattr(model, name).parametrizations.weight[0], SVDWeight)
    dense = _Mixed()
    dense.load_state_dict(result.state_dict())
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    materialize(model)
    assert type(model.conv) is nn.Conv2d and model.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# A merged real architecture: torchvision's MobileNetV2 (depthwise and pointwise convs)
# ---------------------------------------------------------------------------------------------


def _mobilenet_v2() -> nn.Module:
    """A random-init MobileNetV2 whose BatchNorm statistics come from random images: with the
    initial ones (mean 0, var 1) its activations shrink layer by layer until the logits no longer
    depend on the input, and conv errors would not show."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of this one batch
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64))
    return model.eval()


def test_merged_mobilenet_v2_runs_every_conv_low_rank_like_the_dense_merge():
    base = _mobilenet_v2()
    result = merge_perturbed(base, sources=3, scale=0.01, seed=1, k=4, buffers=False)
    dense = copy.deepcopy(base)
    dense.load_state_dict(result.state_dict())
    model = result.to_module(base).eval()
    convs = [name for name, module in base.named_modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 52 and all(f"{name}.weight" in result.components for name in convs)
    assert all(type(model.get_submodule(name)) is SVDConv for name in convs)
    assert sum(module.groups > 1 for module in base.modules() if isinstance(module, nn.Conv2d)) == 17  # depthwise
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    truth_model = copy.deepcopy(dense).double()
    with torch.no_grad():
        features, logits = model.features(x), model(x)
        truth_features, truth_logits = truth_model.features(x.double()), truth_model(x.double())
        assert (base(x).double() - truth_logits).abs().max() > 0.1  # the merge matters
        assert_within_torch_error(features, truth_features, dense.features(x))
        assert_within_torch_error(logits, truth_logits, dense(x))
        materialize(model)
        assert {name: type(m) for name, m in model.named_modules()} == {name: type(m) for name, m in base.named_modules()}
        assert model.state_dict().keys() == base.state_dict().keys()
        for key, value in result.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value.to(model.state_dict()[key].dtype), msg=key)
        assert_within_torch_error(model(x), truth_logits, dense(x))


# ---------------------------------------------------------------------------------------------
# Serving: a σ per request
# ---------------------------------------------------------------------------------------------


def _assert_rows_match(y: torch.Tensor, outputs: list[torch.Tensor], ids: torch.Tensor) -> None:
    for b, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[b], outputs[t][b], msg=lambda m: f"request {b} (task {t}): {m}")


@pytest.mark.parametrize("case", CASES)
def test_stacked_conv_layer_serves_each_request_with_its_tasks_sigma(case):
    """The σ-bank path (low-rank convs) against each task's own layer (one σ: the rebuilt kernel)."""
    low, _, x = _pair(case)
    x = torch.cat([x + i for i in range(5)])[:5]  # 5 requests, whatever the case's batch
    models = sigma_perturbed(nn.Sequential(low), 3, seed=300)
    stacked = stack_tasks(models)
    assert stacked[0].S.shape == (3, K)
    ids = torch.tensor([2, 0, 1, 1, 0])
    with torch.no_grad(), serve_tasks(stacked, ids):
        y = stacked(x)
        outputs = [model(x) for model in models]
    _assert_rows_match(y, outputs, ids)
    for t, model in enumerate(models):
        dense = materialize(copy.deepcopy(stacked), task=t)
        assert type(dense[0]) is type(low.base)
        torch.testing.assert_close(dense(x), model(x), rtol=0, atol=1e-12)


class _ConvNet(nn.Module):
    """Plain, depthwise and pointwise convs and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, padding_mode="reflect")
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 3, height, width)
        h = torch.relu(self.depthwise(torch.relu(self.stem(x))))
        return self.head(self.pointwise(h).mean((-2, -1)))


def test_stacked_conv_net_serves_each_request_and_materializes_each_task():
    torch.manual_seed(0)
    base = _ConvNet()
    model = merge_perturbed(base, sources=3, scale=0.05, seed=20, k=3).to_module(base)
    models = sigma_perturbed(model, 3, seed=300)
    stacked = stack_tasks(models)
    layers = dict(svd_layers(stacked))
    assert {name: type(layer) for name, layer in layers.items()} == {
        "stem": SVDConv, "depthwise": SVDConv, "pointwise": SVDConv, "head": SVDLinear,
    }  # fmt: skip
    assert all(layer.S.shape == (3, 3) for layer in layers.values())
    x = torch.randn(4, 3, 7, 6)
    ids = torch.tensor([1, 2, 0, 1])
    with torch.no_grad(), serve_tasks(stacked, ids):
        y = stacked(x)
        outputs = [m(x) for m in models]
    assert all(not torch.allclose(outputs[0], out) for out in outputs[1:]), "the tasks did not differ"
    _assert_rows_match(y, outputs, ids)
    for t, m in enumerate(models):
        dense = materialize(copy.deepcopy(stacked), task=t)
        assert {name: type(mod) for name, mod in dense.named_modules()} == {name: type(mod) for name, mod in base.named_modules()}
        torch.testing.assert_close(dense(x), m(x), atol=1e-5, rtol=1e-5)


def test_serving_a_conv_stack_needs_batch_first_inputs():
    low, _, x = _pair("2d-depthwise-replicate")  # x: (2, 8, 7, 5)
    stacked = stack_tasks(sigma_perturbed(nn.Sequential(low), 2, seed=300))
    with pytest.raises(ValueError, match=r"SVDConv\(Conv2d\(8, 8, .*\)\) holds a σ bank of 2 tasks: run the model inside"):
        stacked(x)
    with serve_tasks(stacked, torch.tensor([0, 1, 1])):
        layer = r"SVDConv\(Conv2d\(8, 8, kernel_size=\(3, 3\), .*\)\)"
        shape = r"\(batch, 8, height, width\)"
        message = rf"3 task ids \(one per request\) but {layer} got input of shape \(2, 8, 7, 5\); .*batch-first inputs {shape}"
        with pytest.raises(ValueError, match=message):
            stacked(x)
    with serve_tasks(stacked, torch.tensor([0, 1] * 4)):  # as many ids as an unbatched input has channels
        with pytest.raises(ValueError, match=r"8 task ids \(one per request\) but .* got input of shape \(8, 7, 5\)"):
            stacked(x[0])
    with pytest.raises(ValueError, match="σ bank of 2 tasks"):
        stacked[0].weight
