"""Behaviours a plausible bug could break while every other test passes, each pinned here: DARE's
masks follow tensor names, the BF16 storage dtype, every shard of an index is read, each matrix of
a group keeps its own residual, the number of power iterations is honoured, and merged tensors keep
their sources' dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse import ops, reference


def models(shapes: dict[str, tuple[int, ...]], sources: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=gen).to(dtype) for key, shape in shapes.items()}
    tuned = [{key: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for key, v in base.items()} for _ in range(sources)]
    return base, tuned


def test_dare_masks_follow_the_tensor_name_not_its_position():
    base, sources = models({"a.weight": (16, 8), "b.weight": (16, 8)}, 3)
    merged = svdfuse.merge(sources, base=base, method="dare", drop_rate=0.5, device="cpu").state_dict()
    # b alone (a position earlier than before): the same mask, so the same merged b
    alone = svdfuse.merge([{"b.weight": s["b.weight"]} for s in sources], base={"b.weight": base["b.weight"]}, method="dare", drop_rate=0.5, device="cpu")
    assert torch.equal(alone.state_dict()["b.weight"], merged["b.weight"])
    # the same values under two names: two independent masks
    twins = [{"a.weight": s["b.weight"], "b.weight": s["b.weight"]} for s in sources]
    both = svdfuse.merge(twins, base={"a.weight": base["b.weight"], "b.weight": base["b.weight"]}, method="dare", drop_rate=0.5, device="cpu").state_dict()
    assert not torch.equal(both["a.weight"], both["b.weight"])


def test_bf16_files_are_read_and_written_as_bf16(tmp_path):
    base, sources = models({"w": (12, 8), "b": (12,)}, 2, dtype=torch.bfloat16)
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, s in enumerate(sources):
        save_file(s, tmp_path / f"s{i}.safetensors")
        paths.append(tmp_path / f"s{i}.safetensors")
    from_files = svdfuse.merge(paths, base=tmp_path / "base.safetensors", method="average", device="cpu").state_dict()
    in_memory = svdfuse.merge(sources, base=base, method="average", device="cpu").state_dict()
    for key in base:
        assert from_files[key].dtype == torch.bfloat16 and torch.equal(from_files[key], in_memory[key])
    svdfuse.merge(paths, base=tmp_path / "base.safetensors", method="average", device="cpu", output=tmp_path / "out.safetensors")
    written = load_file(tmp_path / "out.safetensors")
    assert all(written[key].dtype == torch.bfloat16 and torch.equal(written[key], in_memory[key]) for key in base)
    header = json.loads((tmp_path / "out.safetensors").read_bytes()[8 : 8 + int.from_bytes((tmp_path / "out.safetensors").read_bytes()[:8], "little")])
    assert {header[key]["dtype"] for key in base} == {"BF16"}


def sharded(state: dict, directory, shards: int):
    """`state` as a Hugging Face directory of `shards` files with its index, keys dealt round-robin."""
    directory.mkdir()
    keys = list(state)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {key: names[i % shards] for i, key in enumerate(keys)}
    for name in names:
        save_file({key: state[key] for key in keys if weight_map[key] == name}, directory / name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_every_shard_of_an_index_is_read(tmp_path):
    shapes = {f"layer{i}.weight": (10, 6) for i in range(6)} | {"head.bias": (10,)}
    base, sources = models(shapes, 2)
    dirs = [sharded(s, tmp_path / f"s{i}", shards=3) for i, s in enumerate(sources)]
    base_dir = sharded(base, tmp_path / "base", shards=3)
    from_shards = svdfuse.merge(dirs, k=2, base=base_dir, device="cpu").state_dict()
    expected = svdfuse.merge(sources, k=2, base=base, device="cpu").state_dict()
    assert from_shards.keys() == expected.keys()
    for key in expected:
        assert torch.equal(from_shards[key], expected[key]), key


@pytest.mark.parametrize("method", ["task_arithmetic", "iso_c", "tsv_m"])
def test_each_matrix_of_a_group_keeps_its_own_residual(method):
    """A merge asked for rank k: the top-k part of each merged matrix becomes factors, the rest of
    that matrix's own merged delta stays in its frozen part, so the dense result is the same as
    without k. Three same-shape matrices make one group for the methods that merge groups."""
    base, sources = models({"a.weight": (12, 10), "b.weight": (12, 10), "c.weight": (12, 10)}, 3)
    low_rank = svdfuse.merge(sources, k=2, base=base, method=method, svd="exact", device="cpu")
    dense = svdfuse.merge(sources, base=base, method=method, svd="exact", device="cpu").state_dict()
    assert set(low_rank.components) == set(base)
    eps = torch.finfo(torch.float32).eps
    for key, value in low_rank.state_dict().items():
        assert (value - dense[key]).abs().max() <= 16 * 12 * eps * dense[key].abs().max(), key


@pytest.mark.parametrize("path", ["ops", "reference"])
def test_power_iterations_are_honoured(path):
    """Each power iteration sharpens the sketch of a slowly decaying spectrum: the top singular
    values' error must fall with every q, on the engine's CPU path and in the oracle alike."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(64, 40, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(48, 40, generator=gen, dtype=torch.float64)).Q
    truth = torch.linspace(1, 0.5, 40, dtype=torch.float64)
    A = ((U * truth) @ V.T).float()
    run = {"ops": lambda q: ops.truncated_svd(A, 6, method="randomized", oversample=2, power_iters=q, seed=0),
           "reference": lambda q: reference.randomized_svd(A, 6, oversample=2, power_iters=q, seed=0)}[path]
    errors = [(run(q)[1].double() - truth[:6]).abs().max().item() for q in (0, 1, 2, 4)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method, k", [("axis", 3), ("task_arithmetic", 3), ("average", None), ("iso_c", None)])
def test_state_dict_keeps_the_sources_dtype(method, k, dtype):
    base, sources = models({"w.weight": (12, 8), "w.bias": (12,), "n.weight": (8,)}, 2, dtype=dtype)
    base["step"] = torch.tensor([4])
    for s in sources:
        s["step"] = torch.tensor([4])
    result = svdfuse.merge(sources, k=k, base=base, method=method, device="cpu")
    assert {key: t.dtype for key, t in result.state_dict().items()} == {key: t.dtype for key, t in base.items()}
