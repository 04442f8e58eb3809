"""`svdfuse.nn` module helpers: copies of parametrized models."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import svdfuse
from svdfuse.nn import materialize


class _Block(nn.Module):
    """Batch-first attention and an MLP: merged into SVDWeight (attention) and SVDLinear (MLP) layers."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, 16)
        self.proj = nn.Linear(16, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.proj(torch.relu(self.fc(x)))


def _merged_block(k: int = 3):
    torch.manual_seed(0)
    base = _Block()
    sources = []
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        sources.append({key: v + 0.05 * torch.randn(v.shape, generator=gen) for key, v in base.state_dict().items()})
    return base, svdfuse.merge(sources, k=k, base=base, device="cpu")


def test_materializing_a_deep_copy_leaves_the_original_parametrized():
    base, result = _merged_block()
    model = result.to_module(base)
    x = torch.randn(2, 5, 8)
    expected = model(x)
    dense = materialize(copy.deepcopy(model))
    assert not parametrize.is_parametrized(dense.attn)
    assert parametrize.is_parametrized(model.attn, "in_proj_weight")
    assert parametrize.is_parametrized(model.attn.out_proj, "weight")
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=1e-5)
    # And the other way round: the copy survives the original's materialization.
    twin = copy.deepcopy(model)
    materialize(model)
    torch.testing.assert_close(twin(x), expected, atol=0, rtol=0)


def test_deep_copies_do_not_share_cached_parametrizations():
    """Under `parametrize.cached()` each copy computes its own weight: no copy reads another's σ."""
    base, result = _merged_block()
    model = result.to_module(base)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (twin.attn.parametrizations.in_proj_weight[0], twin.attn.out_proj.parametrizations.weight[0]):
            layer.sigma.mul_(2.0)
    x = torch.randn(2, 5, 8)
    expected, expected_twin = model(x), twin(x)
    assert not torch.allclose(expected, expected_twin)
    with parametrize.cached():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(twin(x), expected_twin, atol=0, rtol=0)


@pytest.mark.parametrize("build", ["to_module", "atlas"])
def test_deep_copies_of_deep_copies_stay_independent(build):
    base, result = _merged_block()
    if build == "to_module":
        model = result.to_module(base)
    else:
        sources = [{k: v + 0.05 * torch.randn(v.shape) for k, v in base.state_dict().items()} for _ in range(2)]
        model = svdfuse.atlas(sources, base=base, module=base)
    x = torch.randn(2, 5, 8)
    expected = model(x)
    copies = [copy.deepcopy(model)]
    copies.append(copy.deepcopy(copies[0]))
    materialize(copies[0])
    for m in (model, copies[1]):
        assert parametrize.is_parametrized(m.attn, "in_proj_weight")
        torch.testing.assert_close(m(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(copies[0](x), expected, atol=1e-5, rtol=1e-5)
