"""`SVDMultiheadAttention` against `nn.MultiheadAttention` holding the same dense weights."""

import copy

import pytest
import torch
from torch import nn

from svdfuse.nn import SVDLinear, SVDMultiheadAttention, SVDWeight, svd_layers
from svdfuse.nn.convert import parametrize_tensor
from svdfuse.serving import serve_tasks, stack_tasks

from _helpers import merge_perturbed

E, H, K = 16, 4, 5


def _factors(m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U = torch.linalg.qr(torch.randn(m, K, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, K, generator=gen, dtype=torch.float64)).Q
    return U, torch.rand(K, generator=gen, dtype=torch.float64) + 0.5, V


def _pair(batch_first: bool = True, bias: bool = True, dropout: float = 0.0, seed: int = 0):
    """A float64 `SVDMultiheadAttention` and the `nn.MultiheadAttention` whose in_proj_weight and
    out_proj.weight are its W0 + U diag(σ) Vᵀ parametrized as SVDWeight (the dense path, σ shared)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, batch_first=batch_first, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    factors_in, factors_out = _factors(3 * E, E, gen), _factors(E, E, gen)
    in_proj = SVDLinear(mha.in_proj_weight, *factors_in, bias=mha.in_proj_bias)
    out_proj = SVDLinear(mha.out_proj.weight, *factors_out, bias=mha.out_proj.bias)
    low = SVDMultiheadAttention(mha, in_proj, out_proj)
    dense = copy.deepcopy(mha)
    parametrize_tensor(dense, "in_proj_weight", SVDWeight(*factors_in))
    parametrize_tensor(dense.out_proj, "weight", SVDWeight(*factors_out))
    return low, dense


def _inputs(batch_first: bool, L: int = 6, S: int = 6, N: int = 3, cross: bool = False):
    shape = (lambda n: (N, n, E)) if batch_first else (lambda n: (n, N, E))
    query = torch.randn(shape(L), dtype=torch.float64)
    if not cross:
        return query, query, query
    return query, torch.randn(shape(S), dtype=torch.float64), torch.randn(shape(S), dtype=torch.float64)


def _sigma_grads(model: nn.Module) -> list[torch.Tensor]:
    """Gradients of the in- then the out-projection's σ, of either module of `_pair`."""
    if isinstance(model, SVDMultiheadAttention):
        return [model.in_proj.sigma.grad, model.out_proj.sigma.grad]
    return [model.parametrizations.in_proj_weight[0].sigma.grad, model.out_proj.parametrizations.weight[0].sigma.grad]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("weights", ["none", "average", "per_head"])
def test_matches_dense_attention_outputs_and_sigma_gradients(batch_first, cross, weights):
    low, dense = _pair(batch_first)
    query, key, value = _inputs(batch_first, L=5, S=7 if cross else 5, cross=cross)
    kwargs = {"need_weights": weights != "none", "average_attn_weights": weights == "average"}
    out, attn = low(query, key, value, **kwargs)
    expected, expected_attn = dense(query, key, value, **kwargs)
    torch.testing.assert_close(out, expected)
    if weights == "none":
        assert attn is None and expected_attn is None
    else:
        assert attn.shape == expected_attn.shape == ((3, 5, 7 if cross else 5) if weights == "average" else (3, H, 5, 7 if cross else 5))
        torch.testing.assert_close(attn, expected_attn)
    (out.square().sum() + (0 if attn is None else attn.sum())).backward()
    (expected.square().sum() + (0 if expected_attn is None else expected_attn.sum())).backward()
    for grad, expected_grad in zip(_sigma_grads(low), _sigma_grads(dense), strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("need_weights", [False, True])
def test_masks_mean_what_they_mean_in_torch(need_weights):
    low, dense = _pair(batch_first=True)
    N, L, S = 2, 4, 6
    query, key, value = _inputs(True, L=L, S=S, N=N, cross=True)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)  # True: may not attend
    per_head = torch.randn(N * H, L, S, dtype=torch.float64)
    padding = torch.tensor([[False] * S, [False] * (S - 2) + [True] * 2])
    float_padding = torch.zeros(N, S, dtype=torch.float64).masked_fill(padding, float("-inf"))
    for attn_mask, key_padding_mask in [(causal, None), (per_head, None), (None, padding), (causal, padding), (per_head, float_padding)]:
        kwargs = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "need_weights": need_weights}
        out, attn = low(query, key, value, **kwargs)
        expected, expected_attn = dense(query, key, value, **kwargs)
        torch.testing.assert_close(out, expected)
        if need_weights:
            torch.testing.assert_close(attn, expected_attn)


def test_unbatched_input_without_bias_and_a_causal_hint():
    low, dense = _pair(bias=False)
    x = torch.randn(5, E, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs in [{}, {"attn_mask": causal, "is_causal": True, "need_weights": False}]:
        out, attn = low(x, x, x, **kwargs)
        expected, expected_attn = dense(x, x, x, **kwargs)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(attn, expected_attn)
    with pytest.raises(RuntimeError, match="is_causal is a hint that attn_mask is the causal mask"):
        low(x, x, x, is_causal=True)


def test_dropout_only_in_training_and_to_dense_round_trip():
    low, _ = _pair(dropout=0.5)
    query, key, value = _inputs(True)
    dense = low.to_dense().eval()
    assert type(dense) is nn.MultiheadAttention and dense.dropout == 0.5 and dense.batch_first
    low.eval()
    torch.testing.assert_close(low(query, key, value)[0], dense(query, key, value)[0])
    low.train()
    torch.manual_seed(1)
    dropped = low(query, key, value, need_weights=False)[0]
    assert not torch.allclose(dropped, dense(query, key, value)[0])
    torch.testing.assert_close(low.in_proj_weight, dense.in_proj_weight)


def test_float32_matches_torchs_own_attention():
    low, _ = _pair()
    low = low.float().eval()
    dense = low.to_dense().eval()
    query, key, value = (t.float() for t in _inputs(True))
    with torch.no_grad():  # torch's fused inference path for the dense module
        torch.testing.assert_close(low(query, key, value, need_weights=False)[0], dense(query, key, value, need_weights=False)[0])


def test_bad_configurations_and_inputs_are_refused():
    mha = nn.MultiheadAttention(E, H, kdim=8, vdim=8)
    linear = nn.Linear(E, 3 * E)
    with pytest.raises(ValueError, match=r"needs a fused in-projection .* found kdim=8, vdim=8, embed_dim=16"):
        SVDMultiheadAttention(mha, linear, nn.Linear(E, E))
    for kdim, vdim in ((8, E), (E, 8)):  # either one apart from embed_dim: separate projections
        with pytest.raises(ValueError, match=rf"found kdim={kdim}, vdim={vdim}, embed_dim=16"):
            SVDMultiheadAttention(nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim), linear, nn.Linear(E, E))
    with pytest.raises(ValueError, match=r"in_proj must be 48x16 for embed_dim 16, found 32x16"):
        SVDMultiheadAttention(nn.MultiheadAttention(E, H), nn.Linear(E, 2 * E), nn.Linear(E, E))
    low, _ = _pair()
    query, key, value = _inputs(True, L=4, S=6, N=2, cross=True)
    with pytest.raises(ValueError, match=r"attn_mask must be \(4, 6\) or \(8, 4, 6\), found \(6, 4\)"):
        low(query, key, value, attn_mask=torch.zeros(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(2, 6\), found \(2, 4\)"):
        low(query, key, value, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_torch_transformer_encoder_merges_serves_and_stacks():
    """nn.TransformerEncoderLayer in eval under no_grad would take torch's fused path, which reads a
    dense in_proj_weight; SVDMultiheadAttention routes it through forward, also for a σ bank."""
    torch.manual_seed(0)
    base = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True), 2).eval()
    result = merge_perturbed(base, sources=3, scale=0.05, seed=3, k=4)
    model = result.to_module(base).eval()
    assert all(isinstance(layer.self_attn, SVDMultiheadAttention) for layer in model.layers)
    dense = copy.deepcopy(base)
    dense.load_state_dict(result.state_dict())
    x = torch.randn(3, 5, E)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    models = [model, copy.deepcopy(model)]
    with torch.no_grad():
        for _, layer in svd_layers(models[1]):
            layer.sigma.mul_(1.5)
        stacked = stack_tasks(models)
        ids = torch.tensor([1, 0, 1])
        with serve_tasks(stacked, ids):
            y = stacked(x)
        for b, t in enumerate(ids.tolist()):
            torch.testing.assert_close(y[b], models[t](x)[b])


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_projects_q_k_and_v_in_one_call(batch_first, monkeypatch):
    low, dense = _pair(batch_first)
    calls = []
    monkeypatch.setattr(low.in_proj, "rows", lambda *args: calls.append(args) or pytest.fail("row-sliced projection"))
    x = _inputs(batch_first)[0]
    torch.testing.assert_close(low(x, x, x)[0], dense(x, x, x)[0])
    assert not calls
