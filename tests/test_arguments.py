"""What the user hands `merge` is taken as meant or refused before any work, with what was expected
and what was found: argument types, devices, and sources that cannot be what they claim to be (the
same model twice, the base itself, tensors without data, all-zero checkpoints, nothing to merge)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import svdfuse
from svdfuse import SourceError
from svdfuse.pipeline import Compute

from test_errors import ATTN, BIAS, finetune, tiny_state


@pytest.fixture
def base():
    return tiny_state()


@pytest.fixture
def sources(base):
    return [finetune(base, i) for i in range(3)]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any tensor is computed: refusals must come before the work."""

    def run(*args, **kwargs):
        raise AssertionError("a merge piece was computed before the refusal")

    monkeypatch.setattr(Compute, "run", run)


def merge(models, base, **kwargs):
    kwargs.setdefault("device", "cpu")
    return svdfuse.merge(models, base=base, **kwargs)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Arguments taken as meant


def test_svd_may_be_given_as_its_method_name(base, sources):
    by_name = merge(sources, base, k=3, svd="exact")
    by_options = merge(sources, base, k=3, svd=svdfuse.SVDOptions(method="exact"))
    randomized = merge(sources, base, k=3, svd="randomized")
    assert same_state(by_name.state_dict(), by_options.state_dict())
    assert not same_state(by_name.state_dict(), randomized.state_dict())  # the name is not ignored


def test_dtype_may_be_given_by_name(base, sources):
    assert same_state(merge(sources, base, k=3, dtype="float64").state_dict(), merge(sources, base, k=3, dtype=torch.float64).state_dict())
    assert merge(sources, base, k=3, dtype="torch.bfloat16").state_dict()[ATTN].dtype == torch.bfloat16


@pytest.mark.parametrize("k", [np.int64(3), np.int32(3), torch.tensor(3).item()])
def test_numpy_integers_are_ints(k, base, sources):
    result = merge(sources, base, k=k)
    assert result.components[ATTN][1].shape == (3,)
    assert same_state(result.state_dict(), merge(sources, base, k=3).state_dict())


def test_numpy_scalars_are_method_parameters(base, sources):
    plain = merge(sources, base, k=3, method="ties", density=0.5, scaling=1.0)
    numpy = merge(sources, base, k=3, method="ties", density=np.float32(0.5), scaling=np.int64(1))
    assert same_state(plain.state_dict(), numpy.state_dict())


# ---------------------------------------------------------------------------------------------
# Arguments refused


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"svd": "bogus"}, ValueError, r"SVDOptions: method must be one of \['auto', 'exact', 'randomized'\], found 'bogus'"),
        ({"svd": {"method": "exact"}}, TypeError, r"svd must be an SVDOptions or one of .*, found dict"),
        ({"dtype": "float33"}, ValueError, r"dtype: 'float33' names no torch dtype"),
        ({"dtype": "int32"}, ValueError, r"dtype must be a floating-point dtype .*, found torch\.int32"),
        ({"dtype": 32}, TypeError, r"dtype must be a torch\.dtype or its name, found int 32"),
        ({"method": "ties", "density": "0.2"}, TypeError, r"ties: density must be float, found str '0\.2'"),
        ({"method": "ties", "density": True}, TypeError, r"ties: density must be float, found bool True"),
        ({"method": "dare", "rescale": "no"}, TypeError, r"dare: rescale must be True or False, found str 'no'"),
        ({"method": "dare", "rescale": 0}, TypeError, r"dare: rescale must be True or False, found int 0"),
        ({"method": "tsv_m", "budget": 1.5}, TypeError, r"tsv_m: budget must be None or int, found float 1\.5"),
        ({"k": "3"}, TypeError, r"k must be an int \(components\) or a float fraction of min\(m, n\), found str '3'"),
        ({"include": ATTN}, TypeError, r"include takes a list of glob patterns, found a str"),
        ({"exclude": [ATTN, 3]}, TypeError, r"exclude: every pattern must be a str, found int 3"),
        ({"device": "gpu"}, ValueError, r"device: expected 'cpu', 'cuda' or 'cuda:N', found 'gpu'"),
        ({"device": "meta"}, ValueError, r"device 'meta': svdfuse computes on 'cpu' or 'cuda'"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, error, pattern, base, sources, no_work):
    kwargs = {"k": 3, **kwargs}
    with pytest.raises(error, match=pattern):
        merge(sources, base, **kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"method": "bogus"}, r"method must be one of \['auto', 'exact', 'randomized'\], found 'bogus'"),
        ({"precision": "fp8"}, r"precision must be one of \['ieee', 'tf32x3', 'tf32'\], found 'fp8'"),
        ({"oversample": -1}, r"oversample must be an int >= 0, found -1"),
        ({"power_iters": 1.5}, r"power_iters must be an int >= 0, found 1\.5"),
        ({"seed": "0"}, r"seed must be an int, found '0'"),
    ],
)
def test_svd_options_are_checked_when_made(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        svdfuse.SVDOptions(**kwargs)


def test_svd_options_hold_their_enums():
    options = svdfuse.SVDOptions(method="exact", precision="tf32", power_iters=np.int64(2))
    assert options.method is svdfuse.ops.SVDMethod.EXACT and options.precision is svdfuse.ops.Precision.TF32
    assert type(options.power_iters) is int


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(base, sources, no_work):
    with pytest.raises(ValueError, match=r"device 'cuda' was asked for, but .*; use device='cpu'"):
        merge(sources, base, k=3, device="cuda")
    with pytest.raises(ValueError, match=r"device 'cuda:1' was asked for"):
        svdfuse.decompose(sources[0], base=base, rank=2, device="cuda:1")


# ---------------------------------------------------------------------------------------------
# Sources that cannot be what they claim


def test_the_same_file_twice_is_refused_by_any_spelling(tmp_path, base, sources, no_work):
    path = tmp_path / "ft.safetensors"
    save_file(sources[0], str(path))
    os.link(path, tmp_path / "hardlink.safetensors")
    (tmp_path / "symlink.safetensors").symlink_to(path)
    other = tmp_path / "other.safetensors"
    save_file(sources[1], str(other))
    for twin in (path, str(path), tmp_path / "." / "ft.safetensors", tmp_path / "hardlink.safetensors", tmp_path / "symlink.safetensors"):
        with pytest.raises(SourceError, match=r"source 2 is the same model as source 0 \('.*'\); give each source once"):
            merge([path, other, twin], base, k=3)


def test_the_same_object_twice_is_refused(base, sources):
    with pytest.raises(SourceError, match=r"source 1 \('b'\) is the same model as source 0 \('a'\)"):
        merge({"a": sources[0], "b": sources[0]}, base, k=3)
    # equal contents in two objects are two sources (a user may fine-tune twice to the same weights)
    assert merge([sources[0], dict(sources[0]), sources[1]], base, k=3).report.sources == ["source 0", "source 1", "source 2"]


def test_the_base_as_a_source_is_refused(tmp_path, base, sources, no_work):
    path = tmp_path / "base.safetensors"
    save_file(base, str(path))
    with pytest.raises(SourceError, match=r"source 1 is the base itself \('.*base\.safetensors'\); a source must be a model fine-tuned from it"):
        merge([sources[0], path], path, k=3)
    with pytest.raises(SourceError, match=r"source 0 is the base itself"):
        merge([base, sources[1]], base, k=3)


def test_a_source_on_the_meta_device_is_refused(base, sources, no_work):
    meta = {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in sources[1].items()}
    with pytest.raises(SourceError, match=r"source 1: tensor '.*' .* is on the meta device and holds no data \(5 such tensors\)"):
        merge([sources[0], meta], base, k=3)


@pytest.mark.parametrize("key", [BIAS, ATTN])
@pytest.mark.parametrize("method", ["axis", "average", "ties", "iso_c"])
def test_an_all_zero_tensor_where_the_base_has_weights_is_refused(method, key, tmp_path, base, sources):
    zeroed = dict(sources[2])
    zeroed[key] = torch.zeros_like(zeroed[key])
    output = tmp_path / "out.safetensors"
    kwargs = {"k": 3} if method == "axis" else {}
    shape = re.escape(str(tuple(base[key].shape)))
    with pytest.raises(SourceError, match=rf"source 2: tensor '{key}' {shape} is all zeros where the base's is not; .*: is this checkpoint complete\?"):
        merge([sources[0], sources[1], zeroed], base, method=method, output=output, **kwargs)
    assert os.listdir(tmp_path) == []


def test_an_all_zero_tensor_is_fine_where_the_base_is_zero_too(base, sources):
    base = dict(base, **{BIAS: torch.zeros_like(base[BIAS])})
    sources = [dict(s, **{BIAS: torch.zeros_like(base[BIAS])}) for s in sources]
    merge(sources, base, k=3)


def test_an_all_zero_tensor_read_in_many_blocks_is_refused_and_a_late_nonzero_row_is_not(base, sources):
    """The zero check spans every row block of a tensor: zeros in the first block only are fine."""
    big = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    tail = dict(big, w=torch.zeros(64, 64))
    tail["w"][-1, -1] = 1.0  # nonzero only in the last block
    good = {key: t + 0.01 for key, t in big.items()}
    merge([good, tail], big, method="average", max_memory=3 * 16 * 64 * 4 * 4)
    with pytest.raises(SourceError, match=r"source 1: tensor 'w' \(64, 64\) is all zeros"):
        merge([good, dict(big, w=torch.zeros(64, 64))], big, method="average", max_memory=3 * 16 * 64 * 4 * 4)


def test_a_model_of_integer_tensors_only_is_refused(no_work):
    base = {"step": torch.tensor([1, 2]), "ids": torch.arange(4)}
    with pytest.raises(ValueError, match=r"base: no floating-point tensor to merge \(2 integer tensors\)"):
        merge([dict(base)], base, method="average")


# ---------------------------------------------------------------------------------------------
# The other entry points: modules of another architecture, Stage 2's data and length


@pytest.fixture
def mlp_merge():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    sources = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(3)]
    return base, sources, merge(sources, base, k=3)


def test_to_module_and_atlas_name_the_tensor_of_another_architecture(mlp_merge):
    base, sources, result = mlp_merge
    wider = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 8))
    with pytest.raises(ValueError, match=r"module Sequential: tensor '0\.weight' is \(20, 12\), the merge produced \(16, 12\); is this the architecture"):
        result.to_module(wider)
    with pytest.raises(ValueError, match=r"atlas: module Sequential is not the base's architecture: tensor '0\.weight' is \(20, 12\), the base's is \(16, 12\)"):
        svdfuse.atlas(sources, base, wider, device="cpu")
    with pytest.raises(ValueError, match=r"atlas: module Linear is not the base's architecture: none of its parameters"):
        svdfuse.atlas(sources, base, torch.nn.Linear(2, 3), device="cpu")


@pytest.mark.parametrize(
    "targets, pattern",
    [
        (torch.zeros(3, dtype=torch.long), r"output \(4, 8\) torch\.float32 against targets \(3,\) torch\.int64: expected targets of shape \(4,\)"),
        (torch.full((4,), 9), r"against targets \(4,\) torch\.int64: .* class indices below 8 .* Target 9 is out of bounds"),
    ],
)
def test_adapt_names_the_shapes_of_targets_that_do_not_fit(targets, pattern, mlp_merge):
    base, _, result = mlp_merge
    with pytest.raises(ValueError, match=pattern):
        svdfuse.adapt(result.to_module(base), [(torch.randn(4, 12), targets)], n=2, epochs=1)


@pytest.mark.parametrize("kwargs, pattern", [({"epochs": 0}, r"epochs must be a positive int, found 0"), ({"epochs": 2.5}, r"found 2\.5"),
                                              ({"lr": float("nan")}, r"lr must be a positive finite number, found nan"),
                                              ({"n": "2"}, r"n must be an int \(components\)")])
def test_adapt_refuses_a_bad_length_rate_or_n_before_training(kwargs, pattern, mlp_merge):
    base, _, result = mlp_merge
    model = result.to_module(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=pattern):
        svdfuse.adapt(model, [(torch.randn(4, 12), torch.zeros(4, dtype=torch.long))], **{"n": 2, **kwargs})
    assert same_state(before, model.state_dict())
