"""Outputs that cannot be written are refused before any work, failures leave nothing behind, and
the command line reports every error on one line of its own with a meaningful exit code."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
import svdfuse.sinks
from svdfuse.cli import main
from svdfuse.pipeline import Compute


@pytest.fixture
def files(tmp_path):
    """A base and three fine-tuned sources on disk, in their own folder."""
    root = tmp_path / "models"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(20, 12, generator=gen), "layer.bias": torch.randn(20, generator=gen)}
    save_file(base, root / "base.safetensors")
    sources = []
    for i in range(3):
        save_file({key: value + 0.1 * torch.randn(value.shape, generator=gen) for key, value in base.items()}, root / f"ft{i}.safetensors")
        sources.append(str(root / f"ft{i}.safetensors"))
    return root, sources


def merge_to(files, output, **kwargs):
    root, sources = files
    return svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu", output=output, **kwargs)


def cli(files, output, *extra):
    root, sources = files
    return main(["merge", "--base", str(root / "base.safetensors"), "-k", "4", "-o", str(output), "--quiet", *extra, *sources])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Outputs checked before any work


def test_an_output_under_a_file_is_refused_before_any_work(files, tmp_path, no_work):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"output path '.*plain/out\.safetensors': '.*plain' is a file, not a directory"):
        merge_to(files, tmp_path / "plain" / "out.safetensors")


def test_an_unwritable_output_directory_is_refused_before_any_work(files, tmp_path, monkeypatch, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real(path, mode, **kw))
    with pytest.raises(PermissionError, match=r"output path '.*locked/out': directory '.*locked' is not writable"):
        merge_to(files, locked / "out")


def test_too_little_free_space_is_refused_before_any_work(files, tmp_path, monkeypatch, no_work):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError, match=r"output needs 1\.\d\d kB but '.*' has 100 bytes free") as caught:
        merge_to(files, tmp_path / "out.safetensors")
    assert caught.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == [tmp_path / "models"]


def test_a_full_disk_is_found_when_the_files_are_laid_out_before_any_work(files, tmp_path, monkeypatch, no_work):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    for output in (tmp_path / "out.safetensors", tmp_path / "out-dir"):
        with pytest.raises(OSError, match=r"no space left for the output \(\d+\.\d\d kB to reserve\)"):
            merge_to(files, output)
        assert list(tmp_path.iterdir()) == [tmp_path / "models"]


def test_the_files_are_reserved_on_disk_when_laid_out(files, tmp_path, monkeypatch):
    reserved = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (reserved.append(length), real(fd, offset, length)))
    merge_to(files, tmp_path / "out.safetensors")
    assert reserved == [(tmp_path / "out.safetensors").stat().st_size]


@pytest.mark.parametrize("suffix", [".safetensors", ""])
def test_an_output_name_near_the_limit_gets_a_temporary_name_that_fits(suffix, files, tmp_path):
    name = "m" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(suffix)) + suffix
    merge_to(files, tmp_path / name, shard_size="1KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["models", name])


def test_an_output_name_past_the_limit_is_refused(files, tmp_path, no_work):
    name = "m" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)
    with pytest.raises(ValueError, match=rf"output path '.*\.\.\.': the name 'm+\.\.\.' is too long, {len(name)} bytes; this file system allows {len(name) - 1}"):
        merge_to(files, tmp_path / name)


@pytest.mark.parametrize("appears", ["file", "empty directory", "directory"])
@pytest.mark.parametrize("output", ["out.safetensors", "out"])
def test_an_output_that_appears_while_writing_is_never_replaced(appears, output, files, tmp_path, monkeypatch):
    target = tmp_path / output
    real = svdfuse.sinks.publish

    def someone_else_writes_first(tmp, path):
        if appears == "file":
            target.write_text("theirs")
        else:
            target.mkdir()
            if appears == "directory":
                (target / "theirs").write_text("theirs")
        real(tmp, path)

    monkeypatch.setattr(svdfuse.sinks, "publish", someone_else_writes_first)
    with pytest.raises(FileExistsError, match=r"output path '.*' appeared while writing; svdfuse never overwrites, nothing was written"):
        merge_to(files, target)
    if appears == "file":
        assert target.read_text() == "theirs"
    else:
        assert [p.name for p in target.iterdir()] == ([] if appears == "empty directory" else ["theirs"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["models", output])


def test_publishing_without_renameat2_still_never_replaces(files, tmp_path, monkeypatch):
    """File systems without RENAME_NOREPLACE: a hard link for a file, an exclusive mkdir for a directory."""

    class NoRenameat2:
        def __init__(self, *args, **kwargs):
            pass

        renameat2 = None

    monkeypatch.setattr(svdfuse.sinks.ctypes, "CDLL", NoRenameat2)
    for output in ("a.safetensors", "a-dir"):
        merge_to(files, tmp_path / output)
        (tmp_path / f"{output}.2").mkdir()
        with pytest.raises(FileExistsError):
            svdfuse.sinks.publish(Path(shutil.copytree(tmp_path / "models", tmp_path / "copy")), tmp_path / f"{output}.2")
        assert list((tmp_path / f"{output}.2").iterdir()) == [] and not (tmp_path / "copy").exists()
    assert load_file(tmp_path / "a.safetensors").keys() == load_file(tmp_path / "a-dir" / "model.safetensors").keys()


# ---------------------------------------------------------------------------------------------
# The command line: one line per error, exit codes


def test_cli_errors_are_one_line_with_exit_code_2(files, tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    cases = [
        ([], tmp_path / "plain" / "out.safetensors", "is a file, not a directory"),
        (["--method", "ties", "--density", "2"], tmp_path / "o.safetensors", "density"),
        (["--dtype", "float16", "--max-memory", "1KB"], tmp_path / "o.safetensors", "is smaller than the smallest piece"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], tmp_path / "o.safetensors", "device 'cuda' was asked for"))
    for extra, output, needle in cases:
        assert cli(files, output, *extra) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("svdfuse merge: error: ") and needle in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "plain"]


def test_cli_unreadable_source_says_permission_denied(files, tmp_path, monkeypatch, capsys):
    root, sources = files
    locked = root / "ft1.safetensors"
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    assert cli(files, tmp_path / "o.safetensors") == 2
    line = one_line(capsys.readouterr().err)
    assert "source 1 ('ft1.safetensors'): cannot read" in line and "permission denied" in line


def test_cli_interrupt_exits_130_and_leaves_nothing(files, tmp_path, monkeypatch, capsys):
    def interrupted(self, task, after=None):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(Compute, "run", interrupted)
    for output in ("o.safetensors", "o-dir"):
        assert cli(files, tmp_path / output) == 130
        assert one_line(capsys.readouterr().err) == "svdfuse merge: interrupted; nothing was written"
        assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_cli_bug_is_one_line_with_exit_code_1_and_debug_shows_the_traceback(files, tmp_path, monkeypatch, capsys):
    def broken(self, task, after=None):
        raise RuntimeError("an internal fault")
        yield

    monkeypatch.setattr(Compute, "run", broken)
    assert cli(files, tmp_path / "o.safetensors") == 1
    line = one_line(capsys.readouterr().err)
    assert line == "svdfuse merge: internal error: RuntimeError: an internal fault (rerun with --debug for the traceback)"
    root, sources = files
    with pytest.raises(RuntimeError, match="an internal fault"):
        main(["--debug", "merge", "--base", str(root / "base.safetensors"), "-k", "4", "-o", str(tmp_path / "o.safetensors"), *sources])
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_cli_error_after_a_drawn_progress_bar_starts_its_own_line(files, tmp_path, monkeypatch):
    """A real process whose bar is drawn (forced) when the merge fails: the error is a line of its own."""
    root, sources = files
    code = (
        "import sys, svdfuse.pipeline as p\n"
        "real = p.Compute.run\n"
        "def run(self, task, after=None):\n"
        "    yield from real(self, task, after)\n"
        "    raise ValueError('late failure')\n"
        "p.Compute.run = run\n"
        "from svdfuse.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["merge", "--base", str(root / "base.safetensors"), "-k", "4", "-o", str(tmp_path / "o.safetensors"), *sources]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert any(line.startswith("svdfuse merge: error: late failure") for line in done.stderr.replace("\r", "\n").splitlines()), done.stderr


def test_cli_demo_refuses_zero_epochs_at_once(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--epochs", "0"])
    assert exit.value.code == 2 and "argument --epochs: expected a positive int, found '0'" in capsys.readouterr().err


def test_a_result_in_memory_does_not_depend_on_its_files_after_the_merge(files, tmp_path):
    """The base or a source changed, truncated or removed between merge and save: the saved model
    is the one merged (the result holds its data; nothing is re-read lazily)."""
    root, sources = files
    result = svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu")
    expected = {key: t.clone() for key, t in result.state_dict().items()}
    (root / "base.safetensors").write_bytes((root / "base.safetensors").read_bytes()[:100])
    Path(sources[0]).unlink()
    result.save(tmp_path / "saved.safetensors")
    saved = load_file(tmp_path / "saved.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)


def test_a_broken_link_as_a_source_is_named_as_one(files, tmp_path):
    root, sources = files
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    with pytest.raises(svdfuse.SourceError, match=r"source 1 \('gone\.safetensors'\): '.*gone\.safetensors' does not exist \(a broken symbolic link\)"):
        svdfuse.merge([sources[0], tmp_path / "gone.safetensors"], k=4, base=root / "base.safetensors", device="cpu")
