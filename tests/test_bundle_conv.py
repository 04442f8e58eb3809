"""Bundles of conv and embedding LoRAs: compressed from real peft adapters, served per request by
`BundleConv2d` and `BundleEmbedding` (never a dense weight per request) equal to each request's
dense layer `W0 + U Σ Vᵀ`, computed here in float64 from the bundle's own parts."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import svdfuse
from svdfuse.bundle import BundleConv2d, BundleEmbedding, load_bundle, read_bundle, serve_bundle

peft = pytest.importorskip("peft")

EPS32 = torch.finfo(torch.float32).eps
F64 = torch.float64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.conv = nn.Conv2d(3, 6, 3, padding=1, stride=2)

    def forward(self, ids, image):
        return self.emb(ids).sum(1), self.conv(image)


@pytest.fixture(scope="module", params=["diagonal", "full"])
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    torch.manual_seed(0)
    base = Net().eval()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    adapters = {}
    for i in range(3):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(r=2 + i % 2, lora_alpha=4, target_modules=["emb", "conv"], init_lora_weights=False)
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(root / f"ad{i}"))
        adapters[f"ad{i}"] = root / f"ad{i}"
    svdfuse.compress(adapters, k=4, base=root / "base.safetensors", output=root / "b.safetensors", core=request.param)
    return base, read_bundle(root / "b.safetensors"), request.param


def _dense(layer, weights: torch.Tensor) -> torch.Tensor:
    """W0 + U C Vᵀ in float64 from the layer's own parts, in the weight's shape."""
    C = torch.tensordot(weights.to(F64), layer.cores.to(F64), dims=1)
    U, V = layer.U.to(F64), layer.V.to(F64)
    update = (U * C) @ V.T if C.dim() == 1 else U @ C @ V.T
    return layer.weight0.to(F64) + update.reshape(layer.weight0.shape)


def test_conv_and_embedding_requests_equal_their_dense_layers(served):
    base, bundle, core = served
    model = load_bundle(copy.deepcopy(base), bundle)
    assert isinstance(model.conv, BundleConv2d) and isinstance(model.emb, BundleEmbedding)
    requests = ["ad2", 0, {"ad0": 0.25, "ad1": 0.75}, "ad1"]
    weights = [torch.eye(3)[2], torch.eye(3)[0], torch.tensor([0.25, 0.75, 0.0]), torch.eye(3)[1]]
    gen = torch.Generator().manual_seed(1)
    ids, image = torch.randint(0, 30, (4, 5), generator=gen), torch.randn(4, 3, 9, 9, generator=gen)
    with torch.no_grad(), serve_bundle(model, requests):
        emb, conv = model.emb(ids), model.conv(image)
    for b, w in enumerate(weights):
        want_emb = nn.functional.embedding(ids[b], _dense(model.emb, w))
        want_conv = nn.functional.conv2d(image[b : b + 1].to(F64), _dense(model.conv, w), model.conv.bias.to(F64), stride=2, padding=1)[0]
        for got, want in ((emb[b], want_emb), (conv[b], want_conv)):
            assert (got.to(F64) - want).abs().max() <= 64 * EPS32 * want.abs().max(), (core, b)
        # the update is there: the base layer alone is far from it
        base_conv = nn.functional.conv2d(image[b : b + 1].to(F64), model.conv.weight0.to(F64), model.conv.bias.to(F64), stride=2, padding=1)[0]
        assert (base_conv - want_conv).abs().max() > 1e3 * EPS32 * want_conv.abs().max()


def test_a_conv_it_cannot_serve_is_refused_before_anything_is_replaced(served, tmp_path):
    base, bundle, _ = served
    model = copy.deepcopy(base)
    model.conv = nn.Conv2d(3, 6, 3, padding="same")
    with pytest.raises(ValueError, match=r"'conv.weight' is a Conv2d with groups=1, padding='same'.*numeric zero padding"):
        load_bundle(model, bundle)
    assert type(model.emb) is nn.Embedding  # nothing replaced
