"""Bad input fails early and clearly, and never leaves partial output behind.

Every error must name the source (its position and file or directory name), the tensor, and what
was expected vs found. Fixtures are tiny models written to disk the way users hold them: single
`.safetensors` files and Hugging Face directories (config.json + model.safetensors), beside
in-memory state dicts and `nn.Module`s.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

import svdfuse
import svdfuse.sinks
from svdfuse import SourceError
from svdfuse.sources import open_source

from _helpers import module_from

# Shapes: the two matrices have min(m, n) = 8 and 6; "norm.weight" is averaged, "step" copied.
ATTN, MLP, BIAS, NORM = "blocks.0.attn.weight", "blocks.1.mlp.weight", "blocks.0.attn.bias", "norm.weight"


def tiny_state(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        ATTN: torch.randn(12, 8, generator=g),
        BIAS: torch.randn(12, generator=g),
        MLP: torch.randn(6, 12, generator=g),
        NORM: torch.ones(6),
        "step": torch.tensor(7),
    }


def finetune(base: dict[str, Tensor], seed: int, scale: float = 0.05) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in base.items()}


def write_hf_dir(state: dict[str, Tensor], path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 12}))
    save_file(state, str(path / "model.safetensors"))
    return path


def as_kind(state: dict[str, Tensor], kind: str, tmp_path: Path, name: str):
    """`state` as the user would hand it over: "file", "hf" (directory), "dict" or "module"."""
    if kind == "file":
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        return path
    if kind == "hf":
        return write_hf_dir(state, tmp_path / f"{name}-hf")
    if kind == "dict":
        return state
    return module_from(state)


def label(index: int, kind: str, name: str) -> str:
    """The regex for how errors name source `index` of the given kind."""
    if kind == "file":
        return re.escape(f"source {index} ('{name}.safetensors')") + ": "
    if kind == "hf":
        return re.escape(f"source {index} ('{name}-hf')") + ": "
    return f"source {index}: "


KINDS = ["file", "hf", "dict", "module"]


@pytest.fixture
def base() -> dict[str, Tensor]:
    return tiny_state()


@pytest.fixture
def base_file(tmp_path, base) -> Path:
    path = tmp_path / "base.safetensors"
    save_file(base, str(path))
    return path


@pytest.fixture
def good_file(tmp_path, base) -> Path:
    path = tmp_path / "ft0.safetensors"
    save_file(finetune(base, 0), str(path))
    return path


def merge(models, base, k=4, **kwargs):
    return svdfuse.merge(models, k, base=base, device="cpu", **kwargs)


def listing(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones included) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(directory.rglob("*"))}


# ---------------------------------------------------------------------------------------------
# Sources that do not fit the base


def test_empty_source_list_is_an_error(base_file):
    with pytest.raises(SourceError, match=r"at least one source model, found an empty list"):
        merge([], base_file)
    with pytest.raises(SourceError, match=r"at least one source model, found an empty list"):
        merge((), base_file)


@pytest.mark.parametrize("single", ["path", "dict", "module"])
def test_a_single_model_instead_of_a_list_is_an_error(single, good_file, base):
    # Iterating a path or a state dict would "open" its characters or keys as models.
    model = {"path": str(good_file), "dict": finetune(base, 0), "module": module_from(finetune(base, 0))}[single]
    kind = {"path": "str", "dict": "dict", "module": "Module"}[single]
    with pytest.raises(TypeError, match=rf"models must be a list of source models \(or a name -> model mapping\), found a single {kind}; wrap"):
        merge(model, base)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_key_names_source_and_tensor(kind, tmp_path, base):
    bad = finetune(base, 1)
    del bad[MLP]
    models = [finetune(base, 0), as_kind(bad, kind, tmp_path, "ft1")]
    with pytest.raises(SourceError, match=label(1, kind, "ft1") + r".*missing 1 \(e\.g\. \['blocks\.1\.mlp\.weight'\]\)"):
        merge(models, base)


@pytest.mark.parametrize("kind", KINDS)
def test_extra_key_names_source_and_tensor(kind, tmp_path, base):
    bad = finetune(base, 1)
    bad["head.weight"] = torch.randn(3, 6)
    models = [finetune(base, 0), as_kind(bad, kind, tmp_path, "ft1")]
    with pytest.raises(SourceError, match=label(1, kind, "ft1") + r".*1 not in the base \(e\.g\. \['head\.weight'\]\)"):
        merge(models, base)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_mismatch_names_source_tensor_and_both_shapes(kind, tmp_path, base):
    bad = finetune(base, 1)
    bad[MLP] = torch.randn(6, 13)
    models = [finetune(base, 0), as_kind(bad, kind, tmp_path, "ft1")]
    pattern = label(1, kind, "ft1") + re.escape("'blocks.1.mlp.weight' has shape (6, 13), base has (6, 12)")
    with pytest.raises(SourceError, match=pattern):
        merge(models, base)


def test_shape_mismatch_in_a_non_matrix_tensor(base):
    bad = finetune(base, 1)
    bad[NORM] = torch.ones(7)
    with pytest.raises(SourceError, match=re.escape("source 1: 'norm.weight' has shape (7,), base has (6,)")):
        merge([finetune(base, 0), bad], base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "key, index, value, counts",
    [
        (ATTN, (3, 5), float("nan"), "1 NaN and 0 Inf"),
        (MLP, (0, 0), float("inf"), "0 NaN and 1 Inf"),
        (BIAS, (2,), float("-inf"), "0 NaN and 1 Inf"),  # averaged, not merged as a matrix
    ],
)
def test_non_finite_source_values_are_named(kind, key, index, value, counts, tmp_path, base):
    bad = finetune(base, 1)
    bad[key][index] = value
    models = [finetune(base, 0), as_kind(bad, kind, tmp_path, "ft1")]
    shape = re.escape(str(tuple(base[key].shape)))
    pattern = label(1, kind, "ft1") + re.escape(repr(key)) + rf" of shape {shape} holds {counts} values \(of {base[key].numel()}\)"
    with pytest.raises(SourceError, match=pattern):
        merge(models, base)


@pytest.mark.parametrize("kind", ["file", "dict"])
def test_non_finite_base_values_are_named(kind, tmp_path, base):
    bad_base = {k: v.clone() for k, v in base.items()}
    bad_base[MLP][1, 1] = float("nan")
    bad_base[MLP][2, 2] = float("nan")
    base_arg = as_kind(bad_base, kind, tmp_path, "base")
    head = re.escape("base ('base.safetensors'): ") if kind == "file" else "base: "
    with pytest.raises(SourceError, match="^" + head + r"'blocks\.1\.mlp\.weight' of shape \(6, 12\) holds 2 NaN and 0 Inf"):
        merge([finetune(base, 0), finetune(base, 1)], base_arg)


def test_overflow_when_casting_is_reported_as_a_cast(base):
    bad = finetune(base, 1)
    bad[ATTN][0, 0] = 1e6  # finite in fp32, inf in fp16
    half_base = {k: v.half() if v.is_floating_point() else v for k, v in base.items()}
    with pytest.raises(SourceError, match=r"source 1: 'blocks\.0\.attn\.weight' .* 0 NaN and 1 Inf values after casting from torch\.float32 to torch\.float16"):
        merge([finetune(base, 0), bad], half_base, dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# k


@pytest.mark.parametrize(
    "k, error, pattern",
    [
        (0, ValueError, r"k must be positive, found 0$"),
        (-3, ValueError, r"k must be positive, found -3$"),
        (0.0, ValueError, r"k as a fraction of min\(m, n\) must be in \(0, 1\], found 0\.0$"),
        (-0.5, ValueError, r"must be in \(0, 1\], found -0\.5$"),
        (1.5, ValueError, r"must be in \(0, 1\], found 1\.5$"),
        (float("nan"), ValueError, r"must be in \(0, 1\], found nan$"),
        (True, TypeError, r"k must be an int \(components\) or a float fraction of min\(m, n\), found bool True$"),
        (False, TypeError, r"k must be an int \(components\) or a float fraction of min\(m, n\), found bool False$"),
        ("4", TypeError, r"k must be an int \(components\) or a float fraction of min\(m, n\), found str '4'$"),
        (np.float32(1.5), ValueError, r"must be in \(0, 1\], found 1\.5$"),
        (None, TypeError, r"method .axis. needs k, the number of components kept per matrix"),
    ],
)
def test_bad_k_is_refused_before_any_work(k, error, pattern, base):
    with pytest.raises(error, match=pattern):
        merge([finetune(base, 0), finetune(base, 1)], base, k=k)


def test_k_larger_than_min_dim_lists_every_offending_matrix(base):
    models = [finetune(base, 0), finetune(base, 1)]
    with pytest.raises(ValueError, match=r"k=9 is larger than min\(m, n\) of 2 matrices .*'blocks\.0\.attn\.weight' 12x8.*'blocks\.1\.mlp\.weight' 6x12"):
        merge(models, base, k=9)
    # Only the 6x12 matrix is too small for k=7: the message must list it and only it.
    with pytest.raises(ValueError, match=r"k=7 is larger than min\(m, n\) of 1 matrices \(e\.g\. \[\"'blocks\.1\.mlp\.weight' 6x12\"\]\)"):
        merge(models, base, k=7)
    # The boundary is allowed: k == min(m, n) of every matrix, and the fraction 1.0.
    assert merge(models, base, k=6, include=["blocks.*"]).components[MLP][1].shape == (6,)
    assert merge(models, base, k=1.0).components[ATTN][1].shape == (8,)


# ---------------------------------------------------------------------------------------------
# Sources that are not fine-tuned, or not in the base's dtype


def test_source_identical_to_base_is_named(tmp_path, base, base_file, good_file):
    same = tmp_path / "same.safetensors"
    save_file(base, str(same))
    with pytest.raises(SourceError, match=r"^source 1 \('same\.safetensors'\): identical to the base in every tensor"):
        merge([good_file, same], base_file)
    # Two of them: both named, the fine-tuned one not.
    with pytest.raises(SourceError, match=r"^source 0 \('same\.safetensors'\), source 2: identical to the base") as info:
        merge([same, good_file, dict(base)], base_file)
    assert "ft0" not in str(info.value) and "source 1" not in str(info.value)


@pytest.mark.parametrize("kind", ["file", "dict"])
def test_mixed_dtypes_are_an_error_unless_a_dtype_is_given(kind, tmp_path, base, base_file, good_file):
    half = {k: v.half() if v.is_floating_point() else v for k, v in finetune(base, 1).items()}
    models = [good_file, as_kind(half, kind, tmp_path, "half")]
    # The first tensor in the base's order (a file's keys are sorted) is reported.
    pattern = label(1, kind, "half") + r"'blocks\.0\.attn\.bias' is torch\.float16, base is torch\.float32; .*pass dtype="
    with pytest.raises(SourceError, match=pattern):
        merge(models, base_file)
    result = merge(models, base_file, dtype=torch.float32)
    merged = result.state_dict()
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in base.items()}
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    # The fp16 source really took part: its bias enters the average.
    expected_bias = (finetune(base, 0)[BIAS] + half[BIAS].float()) / 2
    torch.testing.assert_close(merged[BIAS], expected_bias)


def test_integer_buffers_of_unsigned_safetensors_dtypes_are_read(tmp_path, base):
    # safetensors files may hold U16/U32/U64 tensors (e.g. token ids); they are copied from the base.
    with_ids = {**base, "ids": torch.tensor([0, 1, 2, 3, 4]).to(torch.uint16)}
    paths = [as_kind(with_ids, "file", tmp_path, "base")] + [
        as_kind({**finetune(base, i), "ids": torch.tensor([0, 1, 2, 3, 4]).to(torch.uint16)}, "file", tmp_path, f"ft{i}") for i in range(2)
    ]
    merged = merge(paths[1:], paths[0]).state_dict()
    assert merged["ids"].dtype == torch.uint16 and merged["ids"].tolist() == [0, 1, 2, 3, 4]


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """A safetensors file written byte by byte, for dtypes torch cannot save."""
    header, offset, data = {}, 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_unsupported_safetensors_dtype_names_source_tensor_and_dtype(tmp_path, base, base_file):
    state = finetune(base, 1)
    raw = {k: ({torch.float32: "F32", torch.int64: "I64"}[v.dtype], list(v.shape), v.numpy().tobytes()) for k, v in state.items()}
    raw[NORM] = ("F4", [6], b"\x00" * 3)  # 4-bit floats: safetensors knows them, torch cannot compute in them
    path = write_raw_safetensors(tmp_path / "f4.safetensors", raw)
    with pytest.raises(SourceError, match=r"source 1 \('f4\.safetensors'\): 'norm\.weight' has safetensors dtype F4, which svdfuse cannot read; expected one of F64, F32"):
        merge([finetune(base, 0), path], base_file)


# ---------------------------------------------------------------------------------------------
# Files and directories that cannot be read


def test_unreadable_file_names_source_and_file(tmp_path, base_file):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    pattern = r"source 0 \('garbage\.safetensors'\): cannot read '.*garbage\.safetensors' as safetensors \(.+\); is it truncated or corrupt\?"
    with pytest.raises(SourceError, match=pattern):
        merge([garbage], base_file)
    with pytest.raises(SourceError, match=r"^base \('garbage\.safetensors'\): cannot read"):
        merge([base_file], garbage)


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_file_fails_at_open_naming_source_and_file(where, tmp_path, base, base_file, good_file):
    whole = good_file.read_bytes()
    header_end = 8 + struct.unpack("<Q", whole[:8])[0]
    cut = header_end + (len(whole) - header_end) // 2 if where == "data" else header_end // 2
    assert 8 < cut < len(whole)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(whole[:cut])
    pattern = r"source 1 \('cut\.safetensors'\): cannot read '.*cut\.safetensors' as safetensors \(.+\); is it truncated or corrupt\?"
    # Detected when the file is opened, before any tensor is read: safetensors checks that the
    # header's offsets cover the file exactly.
    with pytest.raises(SourceError, match=pattern):
        open_source(truncated, "source 1")
    with pytest.raises(SourceError, match=pattern):
        merge([good_file, truncated], base_file)


def test_truncated_model_safetensors_in_a_hf_directory(tmp_path, base, base_file):
    directory = write_hf_dir(finetune(base, 1), tmp_path / "ft1-hf")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SourceError, match=r"source 0 \('ft1-hf'\): cannot read '.*ft1-hf/model\.safetensors' as safetensors"):
        merge([directory], base_file)


def test_nonexistent_path_is_named(tmp_path, base_file, good_file):
    with pytest.raises(SourceError, match=r"source 1 \('nope\.safetensors'\): '.*nope\.safetensors' does not exist"):
        merge([good_file, tmp_path / "nope.safetensors"], base_file)
    with pytest.raises(SourceError, match=r"^base \('missing-dir'\): '.*missing-dir' does not exist"):
        merge([base_file], tmp_path / "missing-dir")


def test_bin_file_that_is_not_a_directory_is_refused(tmp_path, base, base_file):
    weights = tmp_path / "pytorch_model.bin"
    torch.save(finetune(base, 0), weights)
    with pytest.raises(SourceError, match=r"source 0 \('pytorch_model\.bin'\): expected a \.safetensors file, found '.*pytorch_model\.bin'"):
        merge([weights], base_file)


def test_hf_directory_without_weights_is_named(tmp_path, base_file):
    directory = tmp_path / "empty-hf"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    with pytest.raises(SourceError, match=r"source 0 \('empty-hf'\): directory '.*empty-hf' holds no model\.safetensors"):
        merge([directory], base_file)


def test_hf_directory_with_corrupt_pytorch_model_bin(tmp_path, base_file):
    directory = tmp_path / "bin-hf"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(os.urandom(512))
    with pytest.raises(SourceError, match=r"source 0 \('bin-hf'\): cannot read '.*bin-hf/pytorch_model\.bin' as a torch checkpoint"):
        merge([directory], base_file)


@pytest.mark.parametrize(
    "index, pattern",
    [
        ("{not json", r" is not a safetensors index: expected JSON with a 'weight_map' .*JSONDecodeError"),
        ('{"metadata": {}}', r" is not a safetensors index: expected JSON with a 'weight_map' .*KeyError"),
        ('{"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}', r", for 'a\.weight', names 'model-00001-of-00002\.safetensors', which does not exist in '.*sharded-hf'"),
    ],
)
def test_hf_directory_with_bad_shard_index(index, pattern, tmp_path, base_file):
    directory = tmp_path / "sharded-hf"
    directory.mkdir()
    (directory / "model.safetensors.index.json").write_text(index)
    with pytest.raises(SourceError, match=r"source 0 \('sharded-hf'\): '.*model\.safetensors\.index\.json'" + pattern):
        merge([directory], base_file)


def test_objects_that_are_not_models(base, base_file):
    with pytest.raises(SourceError, match=r"source 1: expected an nn\.Module, a state dict, a \.safetensors file .* found int"):
        merge([finetune(base, 0), 3], base_file)
    bad = {**finetune(base, 0), ATTN: [[1.0]]}
    with pytest.raises(SourceError, match=r"source 0: expected a mapping of name -> Tensor, 'blocks\.0\.attn\.weight' is list"):
        merge([bad], base_file)


# ---------------------------------------------------------------------------------------------
# Saving: never overwrite, never leave partial output


@pytest.fixture
def result(base, base_file):
    return merge([finetune(base, 0), finetune(base, 1)], base_file)


@pytest.fixture
def hf_result(tmp_path, base):
    base_dir = write_hf_dir(base, tmp_path / "base-hf")
    return merge([finetune(base, 0), finetune(base, 1)], base_dir)


def test_save_refuses_an_existing_file_and_leaves_it_untouched(tmp_path, result):
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    before = listing(out.parent)
    with pytest.raises(FileExistsError, match=r"output path '.*merged\.safetensors' already exists; svdfuse never overwrites"):
        result.save(out)
    assert listing(out.parent) == before


@pytest.mark.parametrize("format", ["auto", "hf", "safetensors"])
def test_save_refuses_an_existing_directory_and_leaves_it_untouched(format, tmp_path, hf_result):
    out = tmp_path / "out" / "merged-hf"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"precious")
    before = listing(tmp_path / "out")
    with pytest.raises(FileExistsError, match=r"output path '.*merged-hf' already exists"):
        hf_result.save(out, format=format)
    assert listing(tmp_path / "out") == before


def test_hf_format_needs_a_hf_base_and_creates_nothing(tmp_path, result):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"cannot write '.*merged-hf' as a Hugging Face directory: the base was not given as one"):
        result.save(out / "merged-hf")
    assert listing(out) == {}


def _fail_writes(error: BaseException, monkeypatch) -> None:
    real = os.pwrite

    def pwrite_midway(fd, data, offset):
        # Write part of the tensor, as a real failure (disk full, interrupt) would, then fail.
        real(fd, bytes(data[: len(data) // 2]), offset)
        raise error

    monkeypatch.setattr(svdfuse.sinks.os, "pwrite", pwrite_midway)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_safetensors_save_leaves_no_file_and_no_temp_file(error, tmp_path, result, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "other.txt").write_text("kept")
    before = listing(out_dir)
    _fail_writes(error, monkeypatch)
    with pytest.raises(type(error)):
        result.save(out_dir / "merged.safetensors")
    assert listing(out_dir) == before


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_hf_save_leaves_no_directory_and_no_temp_directory(error, tmp_path, hf_result, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _fail_writes(error, monkeypatch)
    with pytest.raises(type(error)):
        hf_result.save(out_dir / "merged-hf")
    assert listing(out_dir) == {}


def test_the_save_failure_is_real(tmp_path, result, hf_result):
    # Without the injected failure the same calls write exactly the expected files.
    out_dir = tmp_path / "out"
    result.save(out_dir / "merged.safetensors")
    hf_result.save(out_dir / "merged-hf")
    assert sorted(listing(out_dir)) == ["merged-hf", "merged-hf/README.md", "merged-hf/config.json", "merged-hf/model.safetensors", "merged.safetensors"]


def test_hf_save_inside_the_base_directory_copies_no_temp_directory(tmp_path, hf_result):
    base_dir = tmp_path / "base-hf"
    before = listing(base_dir)
    hf_result.save(base_dir / "merged")
    assert sorted(listing(base_dir / "merged")) == ["README.md", "config.json", "model.safetensors"]  # README.md: the model card
    assert sorted(listing(base_dir)) == sorted([*before, "merged", "merged/README.md", "merged/config.json", "merged/model.safetensors"])
    merged = open_source(base_dir / "merged", "merged")
    torch.testing.assert_close(merged.get(ATTN), hf_result.state_dict()[ATTN])


# ---------------------------------------------------------------------------------------------
# Inputs that used to pass silently


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"include": ["nothing.*"]}, ValueError, r"include=\['nothing.\*'\] and exclude=\['\*embed\*'\] leave no weight"),
        ({"exclude": ["*"]}, ValueError, r"include=None and exclude=\['\*'\] leave no weight with 2 or more dims"),
        ({"include": "blocks.0.attn.weight"}, TypeError, r"include takes a list of glob patterns, found a str; write include=\[.blocks\.0\.attn\.weight.\]"),
    ],
)
def test_patterns_that_select_no_matrix_are_refused(kwargs, error, pattern, base):
    with pytest.raises(error, match=pattern):
        merge([finetune(base, 0), finetune(base, 1)], base, **kwargs)


def test_integer_tensors_that_differ_between_sources_are_refused(base):
    other = finetune(base, 1)
    other["step"] = torch.tensor(8)
    with pytest.raises(SourceError, match=r"source 1: integer tensor 'step' \(\) torch.int64 differs from the base's"):
        merge([finetune(base, 0), other], base)


def test_a_merged_value_that_overflows_its_dtype_is_an_error(base):
    half = {k: v.half() if v.is_floating_point() else v for k, v in base.items()}
    sources = []
    for i in range(2):
        src = {k: v.half() if v.is_floating_point() else v for k, v in finetune(base, i).items()}
        src[NORM] = torch.full((6,), 60000.0, dtype=torch.float16)  # finite; their sum is not
        sources.append(src)
    with pytest.raises(ValueError, match=r"'norm.weight' \(6,\): the merged value overflows torch.float16 in 6 entries .* though every input is finite"):
        svdfuse.merge(sources, base=half, method="task_arithmetic", scaling=1.0, device="cpu")
    allowed = svdfuse.merge(sources, base=half, method="task_arithmetic", scaling=1.0, device="cpu", allow_non_finite=True)
    assert allowed.state_dict()[NORM].isinf().all()


def test_non_finite_values_outside_matrices_merge_when_allowed(base):
    """A float mask stored as -inf is merged (elementwise) when the user allows it, refused otherwise."""
    masked = dict(base, mask=torch.tensor([0.0, float("-inf"), 0.0]))
    sources = [dict(finetune(base, i), mask=masked["mask"].clone()) for i in range(2)]
    with pytest.raises(SourceError, match=r"'mask'"):
        merge(sources, masked)
    result = merge(sources, masked, allow_non_finite=True).state_dict()
    assert torch.equal(result["mask"], masked["mask"]) and all(torch.isfinite(result[k]).all() for k in base if base[k].is_floating_point())


def test_a_tensor_in_two_shards_without_an_index_entry_for_it_is_refused(tmp_path, base):
    directory = tmp_path / "two-shards"
    directory.mkdir()
    save_file(base, str(directory / "model-00001-of-00002.safetensors"))
    save_file({NORM: base[NORM]}, str(directory / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {key: "model-00001-of-00002.safetensors" for key in base}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    # the index names the first shard: the stray copy in the second is never read
    assert torch.equal(open_source(directory, "source 0").get(NORM), base[NORM])
    # without an index, which copy is the model's is unknown: refused, not guessed
    with pytest.raises(SourceError, match=r"source 0: tensor 'norm.weight' is stored in two shards and no index says which one holds it"):
        svdfuse.sources.SafetensorsSource("source 0", sorted(directory.glob("*.safetensors")))
