"""The safetensors writer's own rules, each tested where a slip would still load: the header's
padding and the dtype order that align every tensor, fsync before the rename, temporary names
that carry the host, the fallback where a file system cannot reserve blocks, the permissions a
new output gets, the template files it copies, names refused before any work, and a merge that
is the same bytes whatever torch's thread count."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
import svdfuse.merging
import svdfuse.sinks as sinks
from svdfuse.cli import main


@pytest.fixture
def files(tmp_path) -> tuple[Path, list[str]]:
    """A base as a Hugging Face directory (weights, config, tokenizer, a sentence-transformers
    module folder, a .git folder) and three fine-tuned sources as files."""
    root = tmp_path / "models"
    base_dir = root / "base"
    (base_dir / "1_Pooling").mkdir(parents=True)
    (base_dir / ".git").mkdir()
    gen = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(20, 12, generator=gen), "layer.bias": torch.randn(20, generator=gen)}
    save_file(base, base_dir / "model.safetensors")
    (base_dir / "config.json").write_text('{"model_type": "bert"}')
    (base_dir / "tokenizer.json").write_text("{}")
    (base_dir / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (base_dir / ".git" / "HEAD").write_text("ref: refs/heads/main")
    sources = []
    for i in range(3):
        save_file({key: value + 0.1 * torch.randn(value.shape, generator=gen) for key, value in base.items()}, root / f"ft{i}.safetensors")
        sources.append(str(root / f"ft{i}.safetensors"))
    return base_dir, sources


def merge_to(files, output, **kwargs):
    base, sources = files
    return svdfuse.merge(sources, k=4, base=base, device="cpu", output=output, **kwargs)


def _mixed() -> dict[str, torch.Tensor]:
    """Odd element counts of every width, narrowest first in model order."""
    gen = torch.Generator().manual_seed(1)
    return {
        "flag": torch.rand(3, generator=gen) > 0.5,
        "byte": torch.randint(0, 9, (5,), generator=gen, dtype=torch.int8),
        "half": torch.randn(7, generator=gen).to(torch.bfloat16),
        "single": torch.randn(3, 3, generator=gen),
        "count": torch.randint(0, 9, (5,), generator=gen, dtype=torch.int64),
        "double": torch.randn(1, generator=gen, dtype=torch.float64),
        "short": torch.randint(0, 9, (3,), generator=gen, dtype=torch.int16),
    }


def _layout(file: Path) -> tuple[int, list[tuple[int, int, str]]]:
    """The header's length and (absolute data offset, element size, name) of each tensor, by offset."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    sizes = {"BOOL": 1, "I8": 1, "BF16": 2, "I16": 2, "F32": 4, "I64": 8, "F64": 8}
    return length, sorted((8 + length + info["data_offsets"][0], sizes[info["dtype"]], name) for name, info in header.items())


@pytest.mark.parametrize("output", ["one.safetensors", "sharded"])
def test_the_header_is_padded_and_dtypes_laid_out_widest_first_so_every_tensor_is_aligned(output, tmp_path):
    state = _mixed()
    sinks.write_state_dict(state, tmp_path / output, shard_size=60)
    written = [tmp_path / output] if output.endswith(".safetensors") else sorted((tmp_path / output).glob("*.safetensors"))
    assert len(written) == (1 if output.endswith(".safetensors") else 2)
    loaded = {}
    for file in written:
        length, entries = _layout(file)
        assert length % 8 == 0, f"{file.name}: header of {length} bytes; the data must start 8-byte aligned"
        for offset, size, name in entries:
            assert offset % size == 0, f"{file.name}: {name!r} ({size}-byte elements) starts at {offset}"
        widths = [size for _, size, _ in entries]
        assert widths == sorted(widths, reverse=True), f"{file.name}: element sizes {widths} in file order, not widest first"
        loaded.update(load_file(file))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_everything_is_flushed_to_disk_before_the_rename_and_the_rename_after(files, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, sinks._rename_noreplace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(tmp, path):
        events.append(("rename", str(tmp)))
        real_rename(tmp, path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(sinks, "_rename_noreplace", rename)
    out = tmp_path / "merged"
    merge_to(files, out, shard_size="1KB")
    (at,) = [i for i, (what, _) in enumerate(events) if what == "rename"]
    tmp = events[at][1]
    before = {path for what, path in events[:at] if what == "fsync"}
    expected = {str(p).replace(str(out), tmp) for p in [out, *out.rglob("*")]}
    assert len(expected) > 5 and expected <= before, sorted(expected - before)
    # the directory that now holds the output's name, alone: never the sources beside it (tmp_path/models)
    assert [event for event in events[at + 1 :] if event[0] == "fsync"] == [("fsync", str(tmp_path))]
    one = tmp_path / "one.safetensors"
    events.clear()
    merge_to(files, one)
    (at,) = [i for i, (what, _) in enumerate(events) if what == "rename"]
    assert ("fsync", events[at][1]) in events[:at] and [event for event in events[at + 1 :] if event[0] == "fsync"] == [("fsync", str(tmp_path))]


def test_each_process_flushes_the_files_it_wrote_before_closing_them(files, tmp_path, monkeypatch):
    # Under torchrun on several machines the publishing rank's fsync cannot flush another
    # machine's page cache: every process syncs its own descriptors at the commit.
    opened, synced, closed_unsynced = set(), set(), []
    real_open, real_fsync, real_close = os.open, os.fsync, os.close

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if ".svdfuse-" in os.fspath(path) and flags & os.O_WRONLY:
            opened.add(fd)
        return fd

    def fsync(fd):
        synced.add(fd)
        real_fsync(fd)

    def close(fd):
        if fd in opened:
            opened.discard(fd)
            if fd not in synced:
                closed_unsynced.append(fd)
        synced.discard(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "close", close)
    merge_to(files, tmp_path / "merged", shard_size="1KB")
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file() and not opened and not closed_unsynced


def test_the_sweep_leaves_another_hosts_live_temporary_alone(files, tmp_path, monkeypatch):
    # On a shared file system a merge on another machine writes beside ours; its pid means nothing
    # here. Its temporary name, made as that machine makes it, must survive our merge's sweep.
    out = tmp_path / "merged"
    with monkeypatch.context() as other:
        other.setattr(socket, "gethostname", lambda: "node-17")
        other.setattr(os, "getpid", lambda: 4_000_000)  # no such process here
        theirs = sinks.temporary(out, directory=True)
    assert "node-17" in theirs.name and not __import__("psutil").pid_exists(4_000_000)
    merge_to(files, out)
    assert theirs.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["models", "merged", theirs.name])


def test_a_file_system_without_fallocate_still_gets_the_whole_output(files, tmp_path, monkeypatch):
    expected = merge_to(files, tmp_path / "plain.safetensors") and load_file(tmp_path / "plain.safetensors")

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    for output in ("sparse.safetensors", "sparse-dir"):
        merge_to(files, tmp_path / output, shard_size="1KB")
    got = load_file(tmp_path / "sparse.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert (tmp_path / "sparse.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    shards = {}
    for shard in (tmp_path / "sparse-dir").glob("*.safetensors"):
        shards.update(load_file(shard))
    assert shards.keys() == expected.keys() and all(torch.equal(shards[k], v) for k, v in expected.items())


@pytest.mark.parametrize("umask,directory,file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_outputs_get_the_permissions_the_umask_gives_new_files(umask, directory, file, files, tmp_path):
    old = os.umask(umask)
    try:
        merge_to(files, tmp_path / "merged", shard_size="1KB")
        merge_to(files, tmp_path / "one.safetensors")
    finally:
        os.umask(old)
    out = tmp_path / "merged"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == directory and mode(out / "1_Pooling") == directory
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 4 and {p.name: mode(p) for p in written} == {p.name: file for p in written}
    assert mode(tmp_path / "one.safetensors") == file


@pytest.mark.parametrize("error", [RuntimeError("broke"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("output", ["out.safetensors", "out"])
def test_a_failure_between_laying_out_the_files_and_the_first_tensor_leaves_nothing(error, output, files, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(svdfuse.merging, "tqdm", fail)  # the first thing after the writer exists
    with pytest.raises(type(error)):
        merge_to(files, tmp_path / output)
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]
    monkeypatch.undo()
    monkeypatch.setattr(svdfuse.distributed.Group, "broadcast", fail)  # inside the writer, its files laid out
    with pytest.raises(type(error)):
        merge_to(files, tmp_path / output)
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]


@pytest.mark.parametrize("output", ["new/parents/out.safetensors", "new/parents/out"])
def test_a_failed_merge_removes_the_parents_it_created_and_keeps_those_it_found(output, files, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("broke")

    monkeypatch.setattr(svdfuse.merging.Compute, "run", fail)
    with pytest.raises(RuntimeError):
        merge_to(files, tmp_path / output)
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "kept.txt").write_text("the user's")
    with pytest.raises(RuntimeError):
        merge_to(files, tmp_path / output)
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["kept.txt"]
    monkeypatch.undo()
    merge_to(files, tmp_path / output)  # published: its new parent stays
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["kept.txt", "parents"]


@pytest.mark.parametrize("call, message", [("pwrite", "cannot write 'layer.bias' into the output: Disk quota exceeded"),
                                           ("fsync", "cannot flush the output to disk: Input/output error")])
def test_a_write_the_disk_refuses_names_the_output_on_one_line_and_leaves_nothing(call, message, files, tmp_path, capsys, monkeypatch):
    code = errno.EDQUOT if call == "pwrite" else errno.EIO

    def fail(*args):
        raise OSError(code, os.strerror(code))  # as the kernel's: no file named

    monkeypatch.setattr(os, call, fail)
    base, sources = files
    out = tmp_path / "new" / "merged.safetensors"
    assert main(["merge", "--base", str(base), "-k", "4", "--quiet", "-o", str(out), *sources]) == 2
    assert capsys.readouterr().err == f"svdfuse merge: error: {message}: {out}\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]


def test_only_the_base_directorys_regular_non_weight_files_are_copied(files, tmp_path):
    base, sources = files
    repo = tmp_path / "models" / "models--org--base"  # the Hub's cache: a snapshot's files are links to its blobs
    (repo / "snapshots").mkdir(parents=True)
    (repo / "blobs").mkdir()
    base = base.rename(repo / "snapshots" / "0123abc")
    (repo / "blobs" / "abc123").write_text("[PAD]\n[UNK]\n")
    (base / "vocab.txt").symlink_to(Path("..", "..", "blobs", "abc123"))
    (base / "pytorch_model.bin").write_bytes(b"old weights")
    merge_to((base, sources), tmp_path / "merged")
    copied = sorted(str(p.relative_to(tmp_path / "merged")) for p in (tmp_path / "merged").rglob("*"))
    assert copied == ["1_Pooling", "1_Pooling/config.json", "README.md", "config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]
    assert not (tmp_path / "merged" / "vocab.txt").is_symlink() and (tmp_path / "merged" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"


LINKS = {
    "broken": (lambda base: (base / "tokenizer_config.json").symlink_to(base / "nowhere.json"), "tokenizer_config.json", "a broken symbolic link"),
    "looping": (lambda base: (base / "special_tokens_map.json").symlink_to(base / "special_tokens_map.json"), "special_tokens_map.json", "a symbolic link that loops"),
    "directory loop": (lambda base: (base / "1_Pooling" / "up").symlink_to(base), "1_Pooling/up", "it loops"),
    "fifo": (lambda base: os.mkfifo(base / "pipe"), "pipe", "not a regular file or directory"),
    # a downloaded directory must not carry another file of the machine (a key, /etc/passwd) into the output
    "file outside": (lambda base: (base / "vocab.txt").symlink_to(_outside(base)), "vocab.txt", "it links to '/.+/models/secret.txt', outside"),
    "directory outside": (lambda base: (base / "extra").symlink_to(_outside(base).parent), "extra", "it links to '/.+/models', outside"),
}


def _outside(base: Path) -> Path:
    secret = base.parent / "secret.txt"
    secret.write_text("not the model's")
    return secret


@pytest.mark.parametrize("case", list(LINKS))
def test_a_base_file_that_cannot_be_copied_is_refused_naming_it_and_nothing_is_left(case, files, tmp_path, capsys, no_work):
    base, sources = files
    make, name, what = LINKS[case]
    make(base)
    with pytest.raises(ValueError, match=rf"cannot copy '.*/base/{name}' from the base directory into the output: {what}"):
        merge_to(files, tmp_path / "merged")
    assert main(["merge", "--base", str(base), "-k", "4", "--quiet", "-o", str(tmp_path / "merged"), *sources]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(what, err) and "[" not in err.split(": error: ", 1)[1].split(" from ")[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_an_output_path_with_a_nul_byte_is_refused_naming_it(files, tmp_path, no_work):
    with pytest.raises(ValueError, match=r"output path '.*/bad\\x00name' holds a NUL byte, which no file name can"):
        merge_to(files, str(tmp_path / "bad") + "\0name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.parametrize("where", ["name", "folder"])
def test_an_over_long_name_anywhere_in_the_output_path_is_refused_on_one_line(where, files, tmp_path, capsys, no_work):
    base, sources = files
    long = "n" * 300
    output = tmp_path / long if where == "name" else tmp_path / long / "merged"
    assert main(["merge", "--base", str(base), "-k", "4", "--quiet", "-o", str(output), *sources]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"the name '{'n' * 57}...' is too long, 300 bytes; this file system allows 255" in err and "Errno" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


_THREADS = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import svdfuse
svdfuse.merge(sys.argv[5:], base=sys.argv[2], device="cpu", output=sys.argv[3], **json.loads(sys.argv[4]))
"""


def _merge_at_threads(tmp_path: Path, threads: list[int], env: dict[str, str], options: dict | None = None, rows: int = 384) -> list[bytes]:
    """The bytes of one merge (AXIS, k = 6 unless `options` say otherwise) run at each thread count,
    in a fresh process with `env` added."""
    # Matrices large enough that LAPACK and MKL split their work between threads (at 32 x 32 they do not).
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(rows, 256, generator=gen), "b.weight": torch.randn(256, 384, generator=gen), "a.bias": torch.randn(rows, generator=gen)}
    save_file(base, tmp_path / "base.safetensors")
    sources = []
    for i in range(4):
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}, tmp_path / f"ft{i}.safetensors")
        sources.append(str(tmp_path / f"ft{i}.safetensors"))
    outputs = []
    for threads in threads:
        out = tmp_path / f"threads{threads}.safetensors"
        clean = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")}
        done = subprocess.run([sys.executable, "-c", _THREADS, str(threads), str(tmp_path / "base.safetensors"), str(out), json.dumps(options or {"k": 6}), *sources],
                              env={**clean, **env}, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(out.read_bytes())
    return outputs


def test_a_merge_is_the_same_bytes_on_one_thread_and_on_two(tmp_path):
    one, two = _merge_at_threads(tmp_path, [1, 2], {})
    assert one == two


@pytest.mark.parametrize(
    "options",
    [{"method": "ties", "density": 0.2, "max_memory": "6MB"}, {"method": "ties", "density": 0.2, "trim_scope": "model"},
     {"method": "dare", "drop_rate": 0.5}, {"method": "task_arithmetic"}],
    ids=["ties-in-blocks", "ties-model-scope", "dare", "task-arithmetic"],
)  # fmt: skip
def test_an_elementwise_merge_is_the_same_bytes_at_any_thread_count(tmp_path, options):
    """The compiled kernels split a block into units among torch's threads (2048 × 256 entries:
    eight units a matrix, a trim's sample and bracket across blocks under 6MB)."""
    outputs = _merge_at_threads(tmp_path, [1, 2, 3], {}, options, rows=2048)
    assert outputs[0] == outputs[1] == outputs[2]


def test_with_mkls_strict_mode_a_merge_is_the_same_bytes_at_any_thread_count(tmp_path):
    # README: from three threads up MKL may split a GEMM otherwise; MKL_CBWR=AUTO,STRICT in both runs.
    if not torch.backends.mkl.is_available():
        pytest.skip("torch is not built with MKL: MKL_CBWR does not apply")
    outputs = _merge_at_threads(tmp_path, [1, 3, 4], {"MKL_CBWR": "AUTO,STRICT"})
    assert outputs[0] == outputs[1] == outputs[2]
