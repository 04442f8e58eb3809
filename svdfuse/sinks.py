"""Where merged tensors go: safetensors files and Hugging Face directories, written as they come.

The writer is told every tensor's name, shape and dtype before any is computed (the plan knows
them), so it lays out the files at the start: shards of at most `shard_size` in model order, each
with its header written and its size reserved. A tensor, or a row block of one, is then written at
its place the moment it is computed, by whichever process computed it, and nothing is held back in
memory. Everything is written under a temporary name beside the target and renamed into place at
the end, so a failure never leaves a partial output and an existing path is never overwritten.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import secrets
import socket
from glob import escape as glob_escape
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import Tensor

from svdfuse import distributed
from svdfuse.sources import SAFETENSORS_DTYPES
from svdfuse.templates import Template

__all__ = ["LowRank", "SafetensorsWriter", "check_output", "discard", "publish", "temporary", "parse_size", "save_safetensors", "save_hf_directory", "refuse_existing"]

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_SHARD_SIZE = 5 * 10**9
_OWNER = "svdfuse-"  # temporary outputs are named .NAME.svdfuse-HOST-PID-XXXX.tmp


@dataclass(frozen=True)
class LowRank:
    """A merged matrix kept as factors: `frozen + U diag(S) Vᵀ` in the shape of `frozen`.

    frozen: the part Stage 2 leaves alone, in the model's shape (the base weight, plus the dense
    residual of a method whose merge is not rank k, then in the accumulation dtype), or None
    where the sink takes the update alone (a LoRA output: the base is not read); U (m, k), S (k,),
    V (n, k) in the accumulation dtype.
    """

    frozen: Tensor | None
    U: Tensor
    S: Tensor
    V: Tensor

    def dense(self, dtype: torch.dtype) -> Tensor:
        """The merged weight, rounded once to `dtype`."""
        acc = self.U.dtype
        delta = ((self.U * self.S) @ self.V.T).reshape(self.frozen.shape)
        return delta.add_(self.frozen.to(acc)).to(dtype)


def parse_size(size: int | str, what: str) -> int:
    """Bytes in `size`: an int, or a string such as "4GB" (10⁹), "512MiB" (2²⁰), "1.5GiB"."""
    if isinstance(size, bool):
        raise TypeError(f"{what} must be a size such as 4GB or 512MiB, found {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"{what} must be positive, found {size}")
        return size
    text = str(size).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{what} must be a size such as 4GB, 512MiB or a number of bytes, found {size!r}") from None
    if not value >= 1:
        raise ValueError(f"{what} must be at least one byte, found {size!r}")
    if value == float("inf"):
        raise ValueError(f"{what} must be a finite size, found {size!r}")
    return int(value)


def refuse_existing(path: Path) -> None:
    """Raise FileExistsError if `path` exists: svdfuse never overwrites."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"output path {str(path)!r} already exists; svdfuse never overwrites, choose a new path")


def check_output(path: str | os.PathLike, nbytes: int = 0) -> Path:
    """Refuse, before any work, an output `path` that cannot be written: one with a NUL byte or a
    name too long for its file system, one that exists, whose parent is not a writable directory,
    or that needs more than the free space (`nbytes`). Returns it as a Path."""
    if "\0" in os.fspath(path):
        raise ValueError(f"output path {os.fspath(path)!r} holds a NUL byte, which no file name can")
    path = Path(path)
    parent = path.absolute().parent
    while not _exists(parent, path):  # the writer creates missing parents; the first existing one decides
        parent = parent.parent
    longest = os.pathconf(parent, "PC_NAME_MAX")
    for name in path.absolute().relative_to(parent).parts:
        if len(os.fsencode(name)) > longest:
            raise ValueError(
                f"output path {_shorten(str(path))!r}: the name {_shorten(name)!r} is too long, {len(os.fsencode(name))} bytes; "
                f"this file system allows {longest}"
            )
    if len(os.fsencode(str(path.absolute()))) >= os.pathconf(parent, "PC_PATH_MAX"):
        raise ValueError(f"output path {_shorten(str(path))!r} is too long, {len(os.fsencode(str(path.absolute())))} bytes; this system allows {os.pathconf(parent, 'PC_PATH_MAX') - 1}")
    refuse_existing(path)
    if not parent.is_dir():
        raise NotADirectoryError(f"output path {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output path {str(path)!r}: directory {str(parent)!r} is not writable")
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"output needs {_human(nbytes)} but {str(parent)!r} has {_human(free)} free", str(path))
    return path


def _exists(directory: Path, output: Path) -> bool:
    try:
        directory.lstat()
        return True
    except FileNotFoundError:
        return False
    except OSError as err:  # a loop of links, no permission: say which, on one line
        if err.errno == errno.ENAMETOOLONG:
            return False  # cannot exist; its name is refused next
        raise OSError(err.errno, f"output path {_shorten(str(output))!r}: cannot look at {_shorten(str(directory))!r}: {err.strerror}") from None


def _shorten(text: str, keep: int = 60) -> str:
    return text if len(text) <= keep else text[: keep - 3] + "..."


def _human(nbytes: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} bytes"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _header(entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header for `entries` in order, and each tensor's offset after it."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offsets, at = {}, 0
    for name, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        meta[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        offsets[name] = at
        at += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data that follows starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, {name: len(text) + 8 + off for name, off in offsets.items()}


class SafetensorsWriter:
    """Writes a new `.safetensors` file, or a new Hugging Face directory, tensor by tensor.

    Args:
        path: a `.safetensors` file (one file, whatever its size) or a directory (HF layout:
            `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards of at most
            `shard_size` bytes with `model.safetensors.index.json`).
        tensors: (name, shape, dtype) of every tensor, in model order.
        shard_size: bytes per shard of a directory (a tensor larger than it gets a shard alone).
        template: a Hugging Face directory whose non-weight files (config, tokenizer) are copied,
            or a `svdfuse.templates.Template` (a config from a transformers module, too); a file
            it cannot copy (a broken link, a loop) is refused before anything is written.
        metadata: extra string entries of every file's `__metadata__`.

    Under torch.distributed every process creates the writer with the same arguments and writes
    its own tensors; rank 0 lays out the files and publishes the output after all are done
    (`commit`); a failure on any process is raised on all (`distributed.Group.settle`) and
    removes the output. Used as a context manager, leaving with an exception removes everything
    written; an exception while it is being created leaves nothing either.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        template: str | os.PathLike | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.single = self.path.suffix == ".safetensors"
        self._group = distributed.current()
        self._fds: dict[str, int] = {}
        self._tmp: Path | None = None
        with self._group.together():
            check_output(self.path, sum(_nbytes(shape, dtype) for _, shape, dtype in tensors))
        self._shapes = {name: (tuple(shape), dtype) for name, shape, dtype in tensors}
        self._shards = self._layout(tensors, shard_size)
        self._headers: dict[str, bytes] = {}
        self._where: dict[str, tuple[str, int]] = {}  # name -> (file, offset of its first byte)
        for file, entries in self._shards.items():
            self._headers[file], offsets = _header(entries, dict(metadata or {}))
            self._where.update({name: (file, offset) for name, offset in offsets.items()})
        self._written: dict[str, int] = {}  # name -> bytes written so far
        try:  # from here on, whatever happens removes what was laid out
            with self._group.together():
                if self._group.rank == 0:
                    self._tmp = self._create(template)
            self._tmp = Path(self._group.broadcast(None if self._tmp is None else str(self._tmp)))
            with self._group.together(undo=self.abort):
                for file in self._shards:  # every process opens its files now: one that cannot write fails before any work
                    self._fds[file] = os.open(self._tmp if self.single else self._tmp / file, os.O_WRONLY)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()

    def _layout(self, tensors, shard_size: int) -> dict[str, list]:
        shards: list[list] = [[]]
        size = 0
        for entry in tensors:
            nbytes = _nbytes(entry[1], entry[2])
            if not self.single and shards[-1] and size + nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        # Within a file, wider dtypes first keep every tensor aligned to its element size.
        shards = [sorted(entries, key=lambda e: -e[2].itemsize) for entries in shards]
        if self.single:
            return {self.path.name: shards[0]}
        if len(shards) == 1:
            return {"model.safetensors": shards[0]}
        return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": entries for i, entries in enumerate(shards)}

    def _create(self, template: str | os.PathLike | Template | None) -> Path:
        if template is not None and not isinstance(template, Template):
            template = Template(directory=Path(template))
        skip = {self.path.absolute()}
        copies = template.files(skip) if template is not None and not self.single else []  # refused here, before anything exists
        tmp = temporary(self.path, directory=not self.single)
        try:
            if template is not None and not self.single:
                template.write(tmp, copies)
            for name in self._shards:
                with open(tmp if self.single else tmp / name, "r+b" if self.single else "xb") as f:
                    f.write(self._headers[name])
                    _reserve(f.fileno(), len(self._headers[name]) + sum(_nbytes(s, d) for _, s, d in self._shards[name]), self.path)
        except BaseException:
            discard(tmp)
            raise
        return tmp

    def write(self, name: str, value: Tensor, start: int = 0) -> None:
        """Write `value`, the rows [start, start + len) of tensor `name` (all of it by default)."""
        shape, dtype = self._shapes[name]
        if value.dtype != dtype or (shape and tuple(value.shape[1:]) != shape[1:]):
            raise ValueError(f"writer: {name!r} is {shape} {dtype}, given a block {tuple(value.shape)} {value.dtype}")
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        row = torch.Size(shape[1:]).numel() * dtype.itemsize
        file, at = self._where[name]
        offset = at + start * row
        fd, done = self._fds[file], 0
        try:
            while done < len(data):
                done += os.pwrite(fd, memoryview(data)[done:], offset + done)
        except OSError as err:  # pwrite's error names no file: a full disk, a quota, an I/O error
            raise OSError(err.errno, f"cannot write {name!r} into the output: {err.strerror}", str(self.path)) from None
        self._written[name] = self._written.get(name, 0) + len(data)

    def commit(self, expected: Iterable[str], files: Mapping[str, str] | None = None) -> None:
        """Check that this process wrote all of `expected`; once every process has, publish,
        with `files` (name -> text, e.g. a model card) added to a directory output."""
        if files and self.single:
            raise ValueError(f"writer: {str(self.path)!r} is one file; {', '.join(files)} can only go into a directory")
        with self._group.together(undo=self.abort):  # every rank's bytes are on disk before rank 0 publishes
            missing = [name for name in expected if self._written.get(name, 0) != _nbytes(*self._shapes[name])]
            if missing:
                raise RuntimeError(f"writer: {len(missing)} tensors were not written completely (e.g. {', '.join(map(repr, missing[:3]))})")
            self._close(sync=True)
        with self._group.together(undo=self.abort):
            if self._group.rank == 0:
                if not self.single and len(self._shards) > 1:
                    total = sum(_nbytes(s, d) for s, d in self._shapes.values())
                    weight_map = {name: file for file, entries in self._shards.items() for name, _, _ in entries}
                    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                    (self._tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
                for name, text in (files or {}).items():
                    (self._tmp / name).write_text(text)  # replaces the base's copy (its README.md)
                tmp, self._tmp = self._tmp, None
                publish(tmp, self.path)

    def _close(self, sync: bool = False) -> None:
        fds, self._fds = self._fds, {}
        try:
            for fd in fds.values():
                if sync:
                    os.fsync(fd)
        except OSError as err:
            raise OSError(err.errno, f"cannot flush the output to disk: {err.strerror}", str(self.path)) from None
        finally:
            for fd in fds.values():
                os.close(fd)

    def abort(self) -> None:
        """Remove everything written (every process calls it; rank 0 removes); again, it does nothing."""
        self._close()
        if self._group.rank == 0 and self._tmp is not None:
            discard(self._tmp)
            self._tmp = None


def temporary(path: Path, *, directory: bool) -> Path:
    """A new empty temporary file or directory beside the output `path`, named so that the next
    writer beside it removes it should this process die (`.NAME.svdfuse-HOST-PID-XXXXXXXX.tmp`).
    It gets the permissions the umask gives a new file or directory, which the output keeps.
    Parents it creates are removed with it (`discard`) unless the output is published."""
    missing = [parent for parent in path.absolute().parents if not os.path.lexists(parent)]
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    prefix = f"{_temp_start(path)}{os.getpid()}-"
    while True:
        tmp = path.parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        try:
            if directory:
                os.mkdir(tmp, 0o777)  # the umask applies, as for any new directory (tempfile's would be 0700)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            _CREATED[tmp] = missing
            return tmp
        except FileExistsError:
            continue


def _temp_start(path: Path) -> str:
    """`.NAME.svdfuse-HOST-`, the start of every temporary name for the output `path` (then
    `PID-XXXXXXXX.tmp`), NAME cut so that the whole fits the file system's name limit."""
    owner = f".{_OWNER}{socket.gethostname()}-"
    room = os.pathconf(path.parent, "PC_NAME_MAX") - len(os.fsencode(owner)) - len(".") - len("4294967295-XXXXXXXX.tmp")
    name = os.fsencode(path.name)[: max(room, 1)].decode(errors="ignore")
    return f".{name}{owner}"


def _reserve(fd: int, size: int, path: Path) -> None:
    """Give the file `fd` its final `size` with its blocks allocated, so that a full disk fails
    here, before any work, rather than in the middle of the merge."""
    os.ftruncate(fd, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left for the output ({_human(size)} to reserve)", str(path)) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without it: sparse file
            raise


def _sweep_stale(path: Path) -> None:
    """Remove the temporary outputs for `path` left by svdfuse processes of this host that died
    without cleaning up (killed with SIGKILL, a power cut): their names carry host and pid."""
    start = _temp_start(path)
    for stale in path.parent.glob(f"{glob_escape(start)}*.tmp"):
        pid = stale.name[len(start) :].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            _remove(stale)


# A temporary output -> the missing parents `temporary` created for it, deepest first.
_CREATED: dict[Path, list[Path]] = {}


def discard(tmp: Path) -> None:
    """Remove the temporary output `tmp` and the parents created for it that are still empty:
    a failed write leaves nothing on disk."""
    _remove(tmp)
    for parent in _CREATED.pop(tmp, []):
        try:
            parent.rmdir()
        except OSError:  # holds something now (the published output, another process's file)
            break


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path` unless something exists there, atomically (Linux renameat2); where
    the file system lacks it, a hard link (files) or an exclusive mkdir first (directories)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(path))
    if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(code, os.strerror(code), str(path))
    if tmp.is_dir():
        os.mkdir(path)  # raises FileExistsError if anything is there; the empty directory is ours
        os.rename(tmp, path)
    else:
        os.link(tmp, path)


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`, never replacing what appeared there meanwhile; `tmp` is gone after.
    Its data reach the disk before the rename, and the rename after it: a crash leaves the old
    state or the whole output, never a renamed output with missing data."""
    # Never replace a path created while we wrote (os.rename would replace a file or an empty directory).
    try:
        _sync(tmp)
        _rename_noreplace(tmp, path)
        _sync(path.parent, tree=False)  # its entry alone: the parent holds the user's other files
    except FileExistsError:
        raise FileExistsError(f"output path {str(path)!r} appeared while writing; svdfuse never overwrites, nothing was written") from None
    finally:
        discard(tmp)


def _sync(path: Path, *, tree: bool = True) -> None:
    """fsync `path`, and with `tree` everything in it if it is a directory (the directory's entries last)."""
    if tree and path.is_dir():
        for entry in path.iterdir():
            if entry.is_dir() or entry.is_file():
                _sync(entry)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state_dict(
    state: Mapping[str, Tensor], path: str | os.PathLike, *, template=None, shard_size: int = DEFAULT_SHARD_SIZE,
    files: Mapping[str, str] | None = None,
) -> None:
    """Write `state` (name -> tensor) through a `SafetensorsWriter`, all-or-nothing, with `files`
    (name -> text) beside the weights of a directory."""
    items = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    with SafetensorsWriter(path, items, shard_size=shard_size, template=template) as writer:
        for name, t in state.items():
            writer.write(name, t)
        writer.commit(state, files)


def save_safetensors(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write `state` to the new file `path` (temp file, then rename)."""
    write_state_dict(state, path)


def save_hf_directory(state: Mapping[str, Tensor], path: str | os.PathLike, template: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
    """Write a Hugging Face model directory at the new path `path`: every non-weight file of
    `template` (config, tokenizer, ...) plus the weights of `state`, sharded above `shard_size`."""
    write_state_dict(state, path, template=template, shard_size=shard_size)
