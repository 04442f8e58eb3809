"""Reading untrusted model files: the names a model directory gives (its shard index) never open a
file outside it, and what cannot be read is a one-line error naming the source."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import svdfuse
from svdfuse import sources as sources_module
from svdfuse.cli import main
from svdfuse.sources import SourceError, open_source

_OPENED: list[str] | None = None  # paths opened while `opened()` records


def _audit(event: str, args: tuple) -> None:
    # builtins.open and os.open raise the "open" audit event: every open by Python code
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextlib.contextmanager
def opened(monkeypatch):
    """The real paths of the files opened inside the block (by Python or by safetensors)."""
    global _OPENED
    _OPENED = paths = []
    real_safe_open = sources_module.safe_open

    def safe_open(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(sources_module, "safe_open", safe_open)
    try:
        yield paths
    finally:
        _OPENED = None


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(6, 4, generator=gen), "b.weight": torch.randn(5, 4, generator=gen), "b.bias": torch.randn(5, generator=gen)}


def _sharded(directory: Path, tensors: dict, weight_map: dict) -> Path:
    """A Hugging Face directory: tensors "a.*" in shard 1, the others in shard 2, and `weight_map` as its index."""
    directory.mkdir(parents=True)
    save_file({k: v for k, v in tensors.items() if k.startswith("a.")}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("a.")}, str(directory / "model-00002-of-00002.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _map(tensors: dict, prefix: str = "") -> dict:
    return {k: f"{prefix}model-0000{1 if k.startswith('a.') else 2}-of-00002.safetensors" for k in tensors}


def test_shard_names_as_transformers_writes_and_reads_them_load(tmp_path):
    tensors = _tensors()
    for prefix in ("", "./"):
        source = open_source(_sharded(tmp_path / f"m{prefix[:1]}", tensors, _map(tensors, prefix)), "source 0")
        assert sorted(source.keys()) == sorted(tensors)
        assert all(torch.equal(source.get(k), v) for k, v in tensors.items())


@pytest.mark.parametrize(
    "hostile, message",
    [
        ("{outside}", r"names '.*outside\.safetensors', expected a relative file name inside the model directory \(no absolute path, no '\.\.', no NUL\)"),
        ("../outside.safetensors", r"names '\.\./outside\.safetensors', expected a relative file name inside the model directory"),
        ("sub/../../outside.safetensors", r"names 'sub/\.\./\.\./outside\.safetensors', expected a relative file name"),
        ("link.safetensors", r"names 'link\.safetensors', which links to '.*outside\.safetensors' outside the model directory; svdfuse reads only files inside it"),
        ("model-00002-of-00002.safetensors\0.txt", r"names 'model-00002-of-00002\.safetensors\\x00\.txt', expected a relative file name"),
        ("", r"names '', expected a relative file name"),
        (3, r"names int 3, expected a file name \(a string\)"),
        (["model-00002-of-00002.safetensors"], r"names list \['model-00002-of-00002\.safetensors'\], expected a file name \(a string\)"),
        ("fifo", r"names 'fifo', which is not a regular file"),
        ("loop.safetensors", r"names 'loop\.safetensors', which cannot be read \(Too many levels of symbolic links\)"),
    ],
)
def test_a_shard_index_never_opens_a_file_outside_the_model(hostile, message, tmp_path, monkeypatch):
    outside = tmp_path / "outside.safetensors"
    save_file(_tensors(1), str(outside))  # a readable model: only the refusal keeps it from being read
    tensors = _tensors()
    directory = _sharded(tmp_path / "model", tensors, {})
    (directory / "link.safetensors").symlink_to(outside)
    (directory / "loop.safetensors").symlink_to(directory / "loop.safetensors")
    os.mkfifo(directory / "fifo")  # opening it for reading would wait forever
    weight_map = {**_map(tensors), "b.weight": str(outside) if hostile == "{outside}" else hostile}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pattern = r"^source 0 \('model'\): '.*model/model\.safetensors\.index\.json', for 'b\.weight', " + message
    with opened(monkeypatch) as paths:
        with pytest.raises(SourceError, match=pattern):
            open_source(directory, "source 0")
    inside, here = str(directory.resolve()) + os.sep, str(tmp_path.resolve()) + os.sep
    assert any(path.startswith(inside) for path in paths)  # the recorder sees the index being read
    assert not [path for path in paths if path.startswith(here) and not path.startswith(inside)]
    # the command line: exit 2 with that line, before anything is opened outside
    with opened(monkeypatch) as paths:
        assert main(["inspect", str(directory)]) == 2
    assert not [path for path in paths if path.startswith(here) and not path.startswith(inside)]


def test_model_safetensors_linking_outside_the_directory_is_refused(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere.safetensors"
    save_file(_tensors(1), str(outside))
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(outside)
    with opened(monkeypatch) as paths:
        with pytest.raises(SourceError, match=r"^base \('model'\): the model directory names 'model\.safetensors', which links to '.*elsewhere\.safetensors' outside"):
            open_source(directory, "base")
    assert str(outside.resolve()) not in paths
    # a file the user names is the user's choice: read wherever it is
    assert sorted(open_source(directory / "model.safetensors", "base").keys()) == sorted(_tensors())


def test_a_hub_cache_snapshot_reads_its_blobs(tmp_path):
    # huggingface_hub's cache: snapshots/REV/NAME are links to ../../blobs/HASH
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    tensors = _tensors()
    _sharded(tmp_path / "plain", tensors, _map(tensors))
    snapshot.mkdir(parents=True)
    for file in (tmp_path / "plain").iterdir():
        file.rename(repo / "blobs" / file.name.replace(".", "-"))
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name.replace(".", "-"))
    source = open_source(snapshot, "base")
    assert all(torch.equal(source.get(k), v) for k, v in tensors.items())


def test_a_tensor_the_index_omits_is_read_not_dropped(tmp_path):
    # transformers loads every tensor of the shards its index lists: so does svdfuse
    tensors, base = _tensors(0), _tensors(1)
    omitted = {k: v for k, v in _map(tensors).items() if k != "b.bias"}
    directory = _sharded(tmp_path / "ft", tensors, omitted)
    source = open_source(directory, "source 0")
    assert "b.bias" in source.keys() and torch.equal(source.get("b.bias"), tensors["b.bias"])
    merged = svdfuse.merge([directory, _tensors(2)], k=2, base=base, device="cpu").state_dict()
    torch.testing.assert_close(merged["b.bias"], (tensors["b.bias"] + _tensors(2)["b.bias"]) / 2)


def test_a_tensor_the_index_names_but_its_shard_lacks_is_an_error(tmp_path):
    tensors = _tensors()
    weight_map = {**_map(tensors), "b.bias": "model-00001-of-00002.safetensors"}  # it is in shard 2
    with pytest.raises(SourceError, match=r"^source 0 \('ft'\): the shard index names 1 tensors that their shard does not hold \(e\.g\. 'b\.bias' in '.*ft/model-00001-of-00002\.safetensors'\)"):
        open_source(_sharded(tmp_path / "ft", tensors, weight_map), "source 0")


def test_a_symlink_loop_as_a_source_names_the_source(tmp_path):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(SourceError, match=r"^source 1 \('loop\.safetensors'\): cannot read '.*loop\.safetensors': Too many levels of symbolic links$"):
        svdfuse.merge([_tensors(1), loop], k=2, base=_tensors(0), device="cpu")
    assert main(["inspect", str(loop)]) == 2


def _as_another_user(call) -> str:
    """The message of the SourceError that `call()` raises, as this user, or (root reads any file)
    in a child process as the user nobody."""
    if os.geteuid() != 0:
        with pytest.raises(SourceError) as caught:
            call()
        return str(caught.value)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            call()
            message = "no error"
        except BaseException as err:  # noqa: BLE001 - reported to the parent, whatever it is
            message = f"{type(err).__name__}: {err}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    assert message.startswith("SourceError: "), message
    return message.removeprefix("SourceError: ")


def test_an_unreadable_file_says_permission_denied():
    root = Path(tempfile.mkdtemp())  # not under pytest's tmp_path: its parents are private to this user
    try:
        root.chmod(0o755)
        file = root / "secret.safetensors"
        save_file(_tensors(), str(file))
        directory = root / "secret-hf"
        directory.mkdir(mode=0o755)
        save_file(_tensors(), str(directory / "model.safetensors"))
        for path in (file, directory / "model.safetensors"):
            path.chmod(0)
        assert re.fullmatch(r"source 0 \('secret\.safetensors'\): cannot read '.*secret\.safetensors': permission denied",
                            _as_another_user(lambda: open_source(file, "source 0")))
        assert re.fullmatch(r"source 0 \('secret-hf'\): cannot read '.*secret-hf/model\.safetensors': permission denied",
                            _as_another_user(lambda: open_source(directory, "source 0")))
    finally:
        shutil.rmtree(root)


def test_a_legacy_pytorch_model_bin_is_refused_with_what_to_do(tmp_path):
    directory = tmp_path / "legacy"
    directory.mkdir()
    torch.save(_tensors(), directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    pattern = (r"^source 0 \('legacy'\): cannot read '.*legacy/pytorch_model\.bin' as a torch checkpoint: it is not a zip archive "
               r"\(torch\.save's format since torch 1\.6, the only one read lazily\); save a legacy checkpoint again with torch\.save, or as safetensors$")
    with pytest.raises(SourceError, match=pattern):
        open_source(directory, "source 0")
    # saved again as it says: read
    torch.save(_tensors(), directory / "pytorch_model.bin")
    assert sorted(open_source(directory, "source 0").keys()) == sorted(_tensors())


def test_a_hostile_header_size_is_refused_without_allocating_it(tmp_path):
    file = tmp_path / "huge.safetensors"
    file.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(SourceError, match=r"^source 0 \('huge\.safetensors'\): cannot read '.*huge\.safetensors' as safetensors \(its header claims 4611686018427387904 bytes"):
        open_source(file, "source 0")


def test_a_huge_shard_index_is_refused_unread(tmp_path, monkeypatch):
    tensors = _tensors()
    directory = _sharded(tmp_path / "model", tensors, _map(tensors))
    os.truncate(directory / "model.safetensors.index.json", 100_000_001)  # sparse: no disk used
    with opened(monkeypatch) as paths:
        with pytest.raises(SourceError, match=r"^source 0 \('model'\): '.*model\.safetensors\.index\.json' holds 100000001 bytes, more than a shard index \(100000000 at most\)$"):
            open_source(directory, "source 0")
    assert not paths


_DEEP = "[" * 100_000  # Python's JSON parser meets it as a RecursionError


def _deep_index(directory: Path) -> Path:
    tensors = _tensors()
    _sharded(directory, tensors, _map(tensors))
    (directory / "model.safetensors.index.json").write_text('{"weight_map": ' + _DEEP)
    return directory


def _deep_header(directory: Path) -> Path:
    directory.mkdir()
    header = _DEEP.encode()
    (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return directory / "model.safetensors"


def _deep_cache(directory: Path) -> Path:
    directory.mkdir()
    metadata = {"svdfuse": sources_module.CACHE_FORMAT, "rank": "2", "svd": _DEEP}
    save_file(_tensors(), str(directory / "c.svd.safetensors"), metadata=metadata)
    return directory / "c.svd.safetensors"


def _deep_adapter_config(directory: Path) -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"peft_type": ' + _DEEP)
    save_file(_tensors(), str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize("make", [_deep_index, _deep_header, _deep_cache, _deep_adapter_config], ids=["index", "header", "cache", "adapter"])
def test_json_nested_past_the_parser_is_a_one_line_error_naming_the_source(make, tmp_path, capsys):
    model = make(tmp_path / "model")
    assert main(["inspect", str(model)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"svdfuse inspect: error: model ('{model.name}'): "), err
    assert "JSON nested too deeply" in err and "internal error" not in err and "RecursionError" not in err, err


def test_inspect_of_a_path_it_cannot_look_at_names_the_model(tmp_path, capsys, monkeypatch):
    # As another user: a directory above the model without search permission (root reads anything).
    model = tmp_path / "closed" / "model.safetensors"
    model.parent.mkdir()
    save_file(_tensors(), str(model))
    real = os.stat

    def stat(path, *args, **kwargs):
        if os.fspath(path) == str(model):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert main(["inspect", str(model)]) == 2
    err = capsys.readouterr().err
    assert err == f"svdfuse inspect: error: model ('model.safetensors'): cannot read '{model}': permission denied (on it or a directory above it)\n"
