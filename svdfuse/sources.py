"""Models as lazily read sources of named tensors.

A source is an `nn.Module`, a state dict, a `.safetensors` file or a Hugging Face model
directory. Tensors are read one key at a time (safetensors files are memory-mapped), so a merge
holds only the layers it is working on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import stat
import struct
import threading
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from svdfuse import _native

ModelLike = Union[nn.Module, Mapping[str, Tensor], str, os.PathLike]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):  # torch >= 2.7
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


class SourceError(ValueError):
    """A source cannot be read or does not fit the base; the message names source and tensor."""


class Source:
    """Named tensors of one model, read on demand.

    Attributes:
        label: how errors name this source, e.g. "source 3 ('ft-cars.safetensors')".
        directory: the Hugging Face model directory it came from, if any (its config is reused on save).
        derived: whether it stands for another model (a component cache, for the source it was
            decomposed from; a peft adapter, for the model it makes of its base): such a source is
            compared with the others by `fingerprint`.
        fingerprints: what `fingerprint` digests: a model's tensors ("tensors") or an adapter's
            factors ("lora"); two sources of different kinds are never compared. None: either (a
            cache answers with its source's).
        copy_reason: why a derived source equal to another is the same model, for the error.
    """

    derived = False
    fingerprints: str | None = "tensors"
    copy_reason = ""
    # whether `read` fills an `out` of any dtype itself (a factored source forms W0 + ΔW in it)
    reads_any_dtype = False

    def __init__(self, label: str, directory: Path | None = None) -> None:
        self.label = label
        self.directory = directory
        self._digests: dict[tuple, str] = {}

    def digest(self, keys: Iterable[str] | None = None, *, quick: bool = False) -> str:
        """SHA-256 of the names, shapes, dtypes and bytes of `keys` (default: all), the same
        however the tensors are stored (file, shards, state dict). `quick`: of each tensor's first
        and last row only, a few kilobytes per tensor: unequal quick digests are unequal models,
        equal ones must be confirmed by the full digest."""
        keys = tuple(sorted(self.keys() if keys is None else keys))
        if (keys, quick) not in self._digests:
            self._digests[keys, quick] = _digest(self, keys, quick)
        return self._digests[keys, quick]

    def fingerprint(self, *, quick: bool = False) -> str:
        """What makes two sources the same model: the digest of its tensors. A source derived from
        a model (a component cache) answers with that model's digest, recorded when it was made."""
        return self.digest(quick=quick)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of `key` without reading its data."""
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        raise NotImplementedError

    def read(self, key: str, start: int, stop: int, out: Tensor) -> None:
        """Copy rows [start, stop) of `key` (its first dim) into `out`, converting to `out`'s dtype."""
        t = self.get(key)
        out.copy_((t.reshape(1) if t.dim() == 0 else t[start:stop]).reshape(out.shape))

    def extents(self, key: str, start: int, stop: int) -> list[tuple[str, int, int]]:
        """(file, offset, length) of the bytes of rows [start, stop) of `key`, for read-ahead
        (`advise`); empty for sources that are not files."""
        return []


class MappingSource(Source):
    """An in-memory state dict (or an `nn.Module`'s)."""

    def __init__(self, label: str, tensors: Mapping[str, Tensor]) -> None:
        super().__init__(label)
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise SourceError(f"{label}: expected a mapping of name -> Tensor, {bad[0]!r} is {type(tensors[bad[0]]).__name__}")
        empty = [k for k, v in tensors.items() if v.is_meta]
        if empty:
            raise SourceError(
                f"{label}: tensor {empty[0]!r} {tuple(tensors[empty[0]].shape)} is on the meta device and holds no data "
                f"({len(empty)} such tensors); load the weights first (e.g. from_pretrained without device_map='meta')"
            )
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensors[key]
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> Tensor:
        return self._tensors[key].detach()


def _header(path: Path) -> tuple[int, dict]:
    """A safetensors file's data start and header: name -> {"dtype", "shape", "data_offsets"}."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > min(_MAX_HEADER, os.fstat(f.fileno()).st_size - 8):  # else a hostile size is allocated
            raise ValueError(f"its header claims {size} bytes, more than the file or safetensors' limit holds")
        header = untrusted_json(f.read(size))
    return 8 + size, header


def untrusted_json(text: str | bytes) -> object:
    """JSON that came with a model (a header, an index, a config, metadata): a ValueError for
    any text that is not JSON, nesting too deep for the parser included (a RecursionError
    otherwise, which no caller would take for bad input)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply (a model's files nest a few levels)") from None


_MAX_HEADER = 100_000_000  # safetensors' own limit


_DIGEST_BLOCK = 64 << 20  # bytes hashed per read: a large tensor is never held whole


def _digest(source: Source, keys: Sequence[str], quick: bool) -> str:
    items: list[bytes | tuple[str, int, int, int]] = []  # each key's description, then its (key, start, stop, bytes) read
    for key in keys:
        shape, dtype = source.meta(key)
        items.append(json.dumps([key, list(shape), str(dtype)]).encode())
        rows, row_bytes = (shape[0], torch.Size(shape[1:]).numel() * dtype.itemsize) if shape else (1, dtype.itemsize)
        if not rows or not row_bytes:
            continue
        step = max(1, _DIGEST_BLOCK // row_bytes)
        spans = sorted({(0, 1), (rows - 1, rows)}) if quick else [(a, min(a + step, rows)) for a in range(0, rows, step)]
        items += [(key, start, stop, (stop - start) * row_bytes) for start, stop in spans]
    # items of up to _DIGEST_BLOCK bytes of reads at a time: read together, then hashed in order
    h = hashlib.sha256()
    buffer = torch.empty(0, dtype=torch.uint8)  # one for every group: fresh memory costs its page faults each time
    group: list[bytes | tuple[str, int, int, int]] = []
    size = 0
    for item in [*items, None]:
        nbytes = _aligned(item[3]) if isinstance(item, tuple) else 0
        if item is None or (group and size + nbytes > _DIGEST_BLOCK):
            buffer = buffer if buffer.numel() >= size else torch.empty(size, dtype=torch.uint8)
            _hash_group(h, source, group, buffer)
            group, size = [], 0
        if item is not None:
            group.append(item)
            size += nbytes
    return h.hexdigest()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 8) * 8  # each read 8-byte aligned in a group's buffer, for any dtype's view


def _hash_group(h: "hashlib._Hash", source: Source, group: list[bytes | tuple[str, int, int, int]], buffer: Tensor) -> None:
    """Hash `group`'s descriptions and reads in order, the reads made together into `buffer`
    (from a file straight to their place in it: a thousand adapters' digests are 56 000 reads)."""
    direct = Batch.available() and isinstance(source, SafetensorsSource)
    pieces: list[tuple[int, int]] = []
    with Batch() as batch:
        at = 0
        for item in group:
            if isinstance(item, bytes):
                continue
            key, start, stop, nbytes = item
            if direct:
                batch.read_span(source, key, *source.span(key, start, stop), buffer.data_ptr() + at)
            else:
                shape, dtype = source.meta(key)
                source.read(key, start, stop, buffer[at : at + nbytes].view(dtype).view((stop - start, *shape[1:]) if shape else ()))
            pieces.append((at, nbytes))
            at += _aligned(nbytes)
    raw = memoryview(buffer.numpy()) if pieces else None
    places = iter(pieces)
    for item in group:
        if isinstance(item, bytes):
            h.update(item)
        else:
            at, nbytes = next(places)
            h.update(raw[at : at + nbytes])


class _OpenFiles:
    """File descriptors of the source files, at most `limit` open at once (least recently used
    closed first): a merge of hundreds of sharded sources would otherwise exhaust the process's
    descriptors, one per shard per source. A descriptor being read is never closed: a block's
    reads of many files run together (`Reader.read_rows`), and a closed number may be reused by
    another file mid-read. Safe across threads (`advise` runs beside the merge's reads): a
    descriptor is taken and marked read under one lock."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit or _descriptors_to_keep()
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._reading: Counter[str] = Counter()
        self._lock = threading.RLock()

    @contextmanager
    def reading(self, path: str) -> Iterator[int]:
        """An open descriptor of `path`, kept open until the block ends."""
        with self._lock:
            fd = self.fd(path)
            self._reading[path] += 1
        try:
            yield fd
        finally:
            with self._lock:
                self._reading[path] -= 1
                if not self._reading[path]:
                    del self._reading[path]
                if len(self._fds) > self.limit:  # more files were read at once than may stay open
                    self._close_idle(self.limit)

    def fd(self, path: str) -> int:
        """An open descriptor of `path`, which opening other files may close (`reading` holds it)."""
        with self._lock:
            if path in self._fds:
                self._fds.move_to_end(path)
                return self._fds[path]
            self._close_idle(self.limit - 1)
            self._fds[path] = fd = os.open(path, os.O_RDONLY)
            return fd

    def _close_idle(self, keep: int) -> None:
        """Close the least recently used descriptors that no read holds until at most `keep` are open."""
        if len(self._fds) <= keep:
            return
        for path in list(self._fds):  # the least recently used first
            if len(self._fds) <= keep:
                return
            if path not in self._reading:
                os.close(self._fds.pop(path))


def _descriptors_to_keep() -> int:
    """Half the process's descriptors, 64 to 4096: a merge of a thousand adapters keeps every
    adapter's file open across its matrices instead of opening each once a matrix (28 000 opens
    for 1000 adapters of 4 Llama layers) where the limit allows (Linux's default soft limit, 1024:
    512 files)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 4096 if soft == resource.RLIM_INFINITY else max(64, min(4096, soft // 2))


_FILES = _OpenFiles()


class SafetensorsSource(Source):
    """One or more `.safetensors` files (shards), read by row ranges with `pread`.

    Reading copies straight from the page cache into the merge's buffers: no file is mapped, so
    the process's resident memory is its buffers alone, however much of the sources it has read.
    """

    def __init__(self, label: str, files: list[Path], directory: Path | None = None, index: Mapping[str, Path] | None = None) -> None:
        super().__init__(label, directory)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        # key -> (file, absolute offset of its first byte); the file's name a str, a cheap key per read
        self._where: dict[str, tuple[str, int]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            try:
                start, header = _header(file)  # first: Python's open says why a file cannot be opened
                safe_open(str(file), framework="pt")  # validates the header against the file size
            except PermissionError:
                raise SourceError(f"{label}: cannot read {str(file)!r}: permission denied") from None
            except (SafetensorError, OSError, ValueError, struct.error) as err:
                raise SourceError(f"{label}: cannot read {str(file)!r} as safetensors ({err}); is it truncated or corrupt?") from err
            metadata = header.pop("__metadata__", None) or {}
            name = os.fspath(file)
            self.metadata = self.metadata or metadata
            for key, info in header.items():
                if index is not None and index.get(key, file) != file:
                    continue  # the index names another shard for this key: that shard's copy is the model's
                if key in self._where:
                    raise SourceError(f"{label}: tensor {key!r} is stored in two shards and no index says which one holds it")
                self._meta[key] = (tuple(info["shape"]), info["dtype"])
                self._where[key] = (name, start + info["data_offsets"][0])
        # A key the index names but its shard lacks is a lost tensor; keys a listed shard holds that
        # the index omits are read from that shard, as transformers loads every tensor of a shard.
        lost = [key for key in index or () if key not in self._where]
        if lost:
            raise SourceError(
                f"{label}: the shard index names {len(lost)} tensors that their shard does not hold "
                f"(e.g. {lost[0]!r} in {str(index[lost[0]])!r}); is a shard missing or from another save?"
            )

    def keys(self) -> list[str]:
        return list(self._meta)

    def layout(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Every tensor's name, shape and stored dtype as the headers give them, in their order:
        files of equal layouts differ in their values alone."""
        return tuple((key, shape, dtype) for key, (shape, dtype) in self._meta.items())

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, name = self._meta[key]
        if name not in SAFETENSORS_DTYPES:
            raise SourceError(
                f"{self.label}: {key!r} has safetensors dtype {name}, which svdfuse cannot read; "
                f"expected one of {', '.join(SAFETENSORS_DTYPES)}"
            )
        return shape, SAFETENSORS_DTYPES[name]

    def span(self, key: str, start: int, stop: int) -> tuple[str, int, int]:
        """(file, offset, length) of the bytes of rows [start, stop) of `key`."""
        shape, dtype = self.meta(key)
        row = torch.Size(shape[1:]).numel() * dtype.itemsize
        file, offset = self._where[key]
        return file, offset + start * row, (stop - start) * row

    def extents(self, key: str, start: int, stop: int) -> list[tuple[str, int, int]]:
        return [self.span(key, start, stop)]

    def ends_early(self, key: str) -> SourceError:
        """The error of a read of `key` that found fewer bytes than the header promised."""
        shape, dtype = self.meta(key)
        return SourceError(f"{self.label}: tensor {key!r} {shape} {dtype} ends early: the file was truncated after it was opened")

    def read(self, key: str, start: int, stop: int, out: Tensor) -> None:
        shape, dtype = self.meta(key)
        file, offset, length = self.span(key, start, stop)
        direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        staging = out if direct else torch.empty(out.shape, dtype=dtype)
        view = memoryview(staging.view(-1).view(torch.uint8).numpy()) if length else memoryview(b"")
        done = 0
        with _FILES.reading(file) as fd:
            while done < length:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise self.ends_early(key)
                done += n
        if not direct:
            out.copy_(staging)

    def get(self, key: str) -> Tensor:
        shape, dtype = self.meta(key)
        out = torch.empty(shape, dtype=dtype)
        self.read(key, 0, shape[0] if shape else 1, out)
        return out


CACHE_FORMAT = "svdfuse.components/2"  # /1 recorded no digests: such a cache is refused, it cannot be checked


class ComponentCache(Source):
    """A decomposed source (`svdfuse.decompose`): the top-`rank` factors of each task matrix
    `Δ = W − W0` against its base, and the source's other tensors as they are.

    Its matrices can only feed methods that need per-source truncated SVDs (AXIS, TSV-M); reading
    one as a dense tensor is an error that says so. It records the digest of the base matrices it
    was decomposed against (a merge on another base is refused) and its source's fingerprint (the
    source itself beside its cache is the same source twice).

    Attributes:
        rank: components stored per matrix; svd: the `SVDOptions` fields they were computed with.
    """

    derived = True
    fingerprints = None
    copy_reason = "a component cache stands for the source it was decomposed from"

    def __init__(self, label: str, store: Source, info: Mapping[str, str]) -> None:
        super().__init__(label, store.directory)
        self._store = store
        if info.get("svdfuse") != CACHE_FORMAT:
            raise SourceError(
                f"{label}: is a component cache in format {short_repr(info.get('svdfuse'))}, this svdfuse reads {CACHE_FORMAT!r} "
                "(which records the base it was decomposed against, so that a merge can check it); decompose the source again"
            )
        try:
            self.rank = info["rank"]  # as given to decompose: an int, or a fraction of min(m, n)
            self.svd: dict = _json(info, "svd", dict)
            self.base_label: str = info["base"]
            self._base_digest, self._origin = info["base_sha256"], (info["source_sha256"], info["source_sample_sha256"])
            self._meta = {str(key): (tuple(int(d) for d in shape), SAFETENSORS_DTYPES[dtype]) for key, (shape, dtype) in _json(info, "tensors", dict).items()}
            self.matrices = {str(key) for key in _json(info, "matrices", list)}
        except (ValueError, KeyError, TypeError) as err:
            raise SourceError(f"{label}: its component-cache metadata is damaged ({type(err).__name__}: {err}); decompose the source again") from None
        self._check_store()

    def _check_store(self) -> None:
        """The stored tensors are the ones the metadata lists: U (m, r), S (r,), V (n, r) per matrix."""
        for key, (shape, dtype) in self._meta.items():
            if key not in self.matrices:
                expected = {key: shape}
            elif len(shape) < 2:
                raise SourceError(f"{self.label}: its metadata lists {key!r} {shape} as a matrix; decompose the source again")
            else:
                r = self._store.meta(f"{key}.S")[0][0] if f"{key}.S" in self._store else 0
                expected = {f"{key}.S": (r,), f"{key}.U": (shape[0], r), f"{key}.V": (math.prod(shape[1:]), r)}
            for name, want in expected.items():
                if name not in self._store:
                    raise SourceError(f"{self.label}: holds no {name!r}, which its metadata lists; the cache is damaged, decompose the source again")
                found, stored = self._store.meta(name)
                if found != want or not (stored.is_floating_point if name != key else stored == dtype):
                    raise SourceError(
                        f"{self.label}: {name!r} is {found} {stored}, its metadata says {want}"
                        + ("" if name != key else f" {dtype}") + "; the cache is damaged, decompose the source again"
                    )

    @staticmethod
    def info(rank: int | float, svd: Mapping, base: Source, source: Source, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], matrices: list[str]) -> dict[str, str]:
        """The metadata a cache file carries (safetensors `__metadata__` values are strings),
        with the digests of `base`'s `matrices` and of `source` (reads both once)."""
        names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
        return {
            "svdfuse": CACHE_FORMAT, "rank": str(rank), "svd": json.dumps(dict(svd)), "base": base.label,
            "base_sha256": base.digest(matrices), "source_sha256": source.fingerprint(), "source_sample_sha256": source.fingerprint(quick=True),
            "tensors": json.dumps({key: [list(shape), names[dtype]] for key, (shape, dtype) in tensors.items()}),
            "matrices": json.dumps(matrices),
        }

    def fingerprint(self, *, quick: bool = False) -> str:
        return self._origin[1 if quick else 0]

    def check_base(self, base: Source) -> None:
        """Refuse a base other than the one this cache was decomposed against (by the content of its
        matrices: the factors of `W − W0` mean nothing against another `W0`)."""
        missing = sorted(self.matrices - set(base.keys()))
        if missing or base.digest(self.matrices) != self._base_digest:
            found = f"has no {missing[0]!r}" if missing else f"differs in the {len(self.matrices)} matrices it was decomposed against"
            raise SourceError(
                f"{self.label}: was decomposed against another base (recorded as {self.base_label}): {base.label} {found}; "
                "decompose the source against this base"
            )

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._meta[key]

    def _whole(self, key: str) -> str:
        if key in self.matrices:
            raise SourceError(
                f"{self.label}: holds only the top-{self.rank} factors of {key!r}, not the weights; a method that needs "
                "the full task matrices must merge the source itself"
            )
        return key

    def read(self, key: str, start: int, stop: int, out: Tensor) -> None:
        self._store.read(self._whole(key), start, stop, out)

    def extents(self, key: str, start: int, stop: int) -> list[tuple[str, int, int]]:
        return [] if key in self.matrices else self._store.extents(key, start, stop)

    def get(self, key: str) -> Tensor:
        return self._store.get(self._whole(key))

    def stored_rank(self, key: str) -> int:
        """Components stored for matrix `key`."""
        return self._store.meta(f"{key}.S")[0][0]

    def factors(self, key: str, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """The top-`rank` factors of `key`'s task matrix: U (m, rank), S (rank,), V (n, rank)."""
        if self.stored_rank(key) < rank:
            raise SourceError(f"{self.label}: {key!r} is cached at rank {self.stored_rank(key)}, the merge needs {rank} components per source")
        U, S, V = (self._store.get(f"{key}.{part}")[..., :rank] for part in "USV")
        for part, t in zip("USV", (U, S, V)):
            if not torch.isfinite(t).all():
                raise SourceError(
                    f"{self.label}: the cached {key}.{part} {tuple(t.shape)} holds {int(torch.isnan(t).sum())} NaN and "
                    f"{int(torch.isinf(t).sum())} Inf values; expected finite factors: the cache is damaged, decompose the source again"
                )
        stored = self._store.get(f"{key}.S")
        if bool((stored < 0).any()) or bool((stored[1:] > stored[:-1]).any()):  # else the first `rank` are not the top ones
            raise SourceError(
                f"{self.label}: the cached {key}.S {tuple(stored.shape)} is no spectrum, found {short_repr([round(v, 6) for v in stored[:8].tolist()])}; "
                "expected non-negative values in non-increasing order: the cache is damaged, decompose the source again"
            )
        return U, S, V


def _json(info: Mapping[str, str], name: str, kind: type) -> object:
    """Metadata entry `name`, JSON of a `kind` (a dict, a list)."""
    value = untrusted_json(info[name])
    if not isinstance(value, kind):
        raise TypeError(f"{name!r} holds a {type(value).__name__}, expected a {kind.__name__}")
    return value


def model_file(directory: Path, name: object, label: str, what: str) -> Path:
    """`directory / name` for a file name that a model directory's own files give (`what` names
    the giver: the directory, its shard index): such names come with the model, from anywhere. Only
    a relative name that stays inside the directory after symbolic links and names a regular file
    is taken, never a path that would open another file of the machine."""
    if not isinstance(name, str):
        raise SourceError(f"{label}: {what} names {type(name).__name__} {short_repr(name)}, expected a file name (a string)")
    relative = Path(name)
    if not name or "\0" in name or relative.is_absolute() or ".." in relative.parts:
        raise SourceError(f"{label}: {what} names {short_repr(name)}, expected a relative file name inside the model directory (no absolute path, no '..', no NUL)")
    path = directory / relative
    try:
        mode, real = path.stat().st_mode, path.resolve(strict=True)  # stat first: resolve meets a loop as RuntimeError
    except FileNotFoundError:
        raise SourceError(f"{label}: {what} names {name!r}, which does not exist in {str(directory)!r}") from None
    except OSError as err:  # a symbolic link loop, permission denied on a directory, ...
        raise SourceError(f"{label}: {what} names {name!r}, which cannot be read ({err.strerror})") from None
    if not any(real.is_relative_to(root) for root in model_roots(directory)):
        raise SourceError(f"{label}: {what} names {name!r}, which links to {str(real)!r} outside the model directory; svdfuse reads only files inside it")
    if not stat.S_ISREG(mode):
        raise SourceError(f"{label}: {what} names {name!r}, which is not a regular file")
    return path


def model_roots(directory: Path) -> list[Path]:
    """Where the files of a model directory may really be: inside it, and for a snapshot of the
    Hugging Face hub cache (`models--org--name/snapshots/REVISION`), in that repository's blobs."""
    real = directory.resolve()
    hub = real.parent.parent if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--") else None
    return [real] if hub is None else [real, hub / "blobs"]


def short_repr(value: object) -> str:
    """`value` for a message about untrusted input: its repr, cut to 200 characters."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _hf_weight_files(directory: Path, label: str) -> tuple[list[Path], dict[str, Path] | None] | None:
    """The weight files of a Hugging Face directory and its index's name -> shard map (None: one file)."""
    if os.path.lexists(directory / "model.safetensors"):
        return [model_file(directory, "model.safetensors", label, "the model directory")], None
    if not os.path.lexists(directory / "model.safetensors.index.json"):
        return None
    index = model_file(directory, "model.safetensors.index.json", label, "the model directory")
    if index.stat().st_size > _MAX_HEADER:  # an index lists names: megabytes at most, never a file to read whole
        raise SourceError(f"{label}: {str(index)!r} holds {index.stat().st_size} bytes, more than a shard index ({_MAX_HEADER} at most)")
    try:
        weight_map = dict(untrusted_json(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # UnicodeDecodeError is a ValueError
        raise SourceError(
            f"{label}: {str(index)!r} is not a safetensors index: expected JSON with a 'weight_map' of "
            f"name -> shard file ({type(err).__name__}: {err})"
        ) from err
    shards: dict[str, Path] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or name not in shards:
            shards[name] = model_file(directory, name, label, f"{str(index)!r}, for {key!r},")
    resolved = {key: shards[name] for key, name in weight_map.items()}
    return sorted(set(resolved.values())), resolved


# Directories that hold another kind of source than a model, tried in order before a Hugging Face
# model directory: (directory, label, base) -> a Source, or None when the directory is not of that
# kind. Source kinds built on this module register here (`svdfuse.adapters`: peft adapters), so
# that this module never imports them.
DIRECTORY_KINDS: list[Callable[[Path, str, Source | None], Source | None]] = []


def open_source(model: ModelLike, label: str, base: Source | None = None) -> Source:
    """Wrap `model` as a `Source`; `label` names it in errors ("source 2", "base"). A peft adapter
    directory is read as the model it makes of `base`."""
    if isinstance(model, Source):
        return model
    if isinstance(model, nn.Module):
        return MappingSource(label, model.state_dict())
    if isinstance(model, Mapping):
        return MappingSource(label, model)
    if not isinstance(model, (str, os.PathLike)):
        raise SourceError(
            f"{label}: expected an nn.Module, a state dict, a .safetensors file or a Hugging Face model directory, "
            f"found {type(model).__name__}"
        )
    path = Path(model)
    label = f"{label} ({path.name!r})"
    try:
        path.stat()
    except PermissionError:
        raise SourceError(f"{label}: cannot read {str(path)!r}: permission denied (on it or a directory above it)") from None
    except FileNotFoundError:
        raise SourceError(f"{label}: {str(path)!r} does not exist" + (" (a broken symbolic link)" if path.is_symlink() else "")) from None
    except OSError as err:  # a symbolic link loop, a name too long, ...
        raise SourceError(f"{label}: cannot read {str(path)!r}: {err.strerror}") from None
    if path.is_dir():
        for opens in DIRECTORY_KINDS:
            source = opens(path, label, base)
            if source is not None:
                return source
        found = _hf_weight_files(path, label)
        if found is not None:
            return SafetensorsSource(label, found[0], directory=path, index=found[1])
        if os.path.lexists(path / "pytorch_model.bin"):
            bin_file = model_file(path, "pytorch_model.bin", label, "the model directory")
            if not zipfile.is_zipfile(bin_file):
                raise SourceError(
                    f"{label}: cannot read {str(bin_file)!r} as a torch checkpoint: it is not a zip archive (torch.save's "
                    "format since torch 1.6, the only one read lazily); save a legacy checkpoint again with torch.save, or as safetensors"
                )
            try:
                state = torch.load(bin_file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... on bad files
                raise SourceError(f"{label}: cannot read {str(bin_file)!r} as a torch checkpoint ({type(err).__name__}: {err})") from err
            if not isinstance(state, Mapping):
                raise SourceError(f"{label}: {str(bin_file)!r} holds a {type(state).__name__}, expected a state dict")
            source = MappingSource(label, state)
            source.directory = path
            return source
        raise SourceError(f"{label}: directory {str(path)!r} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SourceError(f"{label}: expected a .safetensors file, found {str(path)!r}")
        source = SafetensorsSource(label, [path])
        if source.metadata.get("svdfuse", "").startswith("svdfuse.components/"):
            return ComponentCache(label, source, source.metadata)
        return source
    raise SourceError(f"{label}: {str(path)!r} is neither a .safetensors file nor a model directory")


def _identity(model: ModelLike) -> tuple:
    """What makes two arguments the same model: the file or directory (device and inode, so links
    and other spellings of a path agree), or the very object."""
    if isinstance(model, (str, os.PathLike)):
        try:
            stat = os.stat(model)
        except OSError:
            return ("path", os.fspath(model))  # opening it says what is wrong
        return ("file", stat.st_dev, stat.st_ino)
    return ("object", id(model))


def open_sources(
    models: Sequence[ModelLike] | Mapping[str, ModelLike], base: ModelLike | None = None, base_source: Source | None = None
) -> list[Source]:
    """Open source models labelled "source 2" (a list) or "source 2 ('cars')" (a name -> model
    mapping). The same model twice (also as its own component cache), or the base among them, is
    refused: its components would count twice, or it adds nothing. Adapters are read against
    `base_source`."""
    single = (str, bytes, os.PathLike, torch.nn.Module, Source)
    is_state_dict = isinstance(models, Mapping) and any(isinstance(v, Tensor) for v in models.values())
    if isinstance(models, single) or is_state_dict:
        raise TypeError(
            f"models must be a list of source models (or a name -> model mapping), found a single "
            f"{type(models).__name__}; wrap one model in a list: merge([model], ...)"
        )
    named = list(models.items()) if isinstance(models, Mapping) else [(None, model) for model in models]
    labels = [f"source {i}" + (f" ({name!r})" if name is not None else "") for i, (name, _) in enumerate(named)]
    seen: dict[tuple, str] = {} if base is None else {_identity(base): "the base"}
    for label, (_, model) in zip(labels, named):
        first = seen.setdefault(_identity(model), label)
        if first != label:
            what = f" ({os.fspath(model)!r})" if isinstance(model, (str, os.PathLike)) else ""
            raise SourceError(f"{label} is the same model as {first}{what}; give each source once (its components would count twice)"
                              if first != "the base" else f"{label} is the base itself{what}; a source must be a model fine-tuned from it")
    sources = [open_source(model, label, base_source) for label, (_, model) in zip(labels, named)]
    if any(source.derived for source in sources):
        _refuse_copies(sources)
    return sources


def _refuse_copies(sources: list[Source]) -> None:
    """Refuse a model given twice where one of the two is derived (the source beside its cache, two
    caches of one source, two copies of one adapter): compared by fingerprint, the quick one first,
    so that only a likely copy is read whole; an adapter and a full model are never compared (nor
    read for it). Models given as they are were told apart by `_identity`, before any was read."""
    caches = any(source.fingerprints is None for source in sources)
    seen: dict[str, list[Source]] = {}  # quick fingerprint -> the sources before this one: a thousand adapters, not a million pairs
    for source in sources:
        if not (source.derived or caches):
            continue
        earlier = seen.setdefault(source.fingerprint(quick=True), [])
        for other in earlier:
            kinds = {source.fingerprints, other.fingerprints} - {None}
            if (source.derived or other.derived) and len(kinds) <= 1 and source.fingerprint() == other.fingerprint():
                why = other if other.fingerprints is None else source  # a cache explains the pair, else two adapters
                raise SourceError(
                    f"{source.label} is the same model as {other.label} ({why.copy_reason}); give each source once (its components would count twice)"
                )
        earlier.append(source)


# Threads that read a batch at once: one thread copies from the page cache at 12 GB/s, two at
# 19 GB/s (13 MiniLM fp32 files in 1 MiB blocks, 2-core machine, 2026-12-07).
_READERS = 4
_PARALLEL_BYTES = 1 << 20  # a smaller batch is read on one thread: starting the others costs more


def advise(spans: Iterable[tuple[str, int, int]]) -> None:
    """Ask the kernel to start reading the (file, offset, length) spans into the page cache (where
    it takes advice), each file held open meanwhile: the disk works while the caller computes. A
    large request may be held until most of it is queued: advice of many megabytes goes on a thread
    of its own (`Compute._advise`)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        for file, offset, length in spans:
            with _FILES.reading(file) as fd:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advice only: the read itself names what is wrong with the file


class Batch:
    """Plain copies from safetensors files (rows of a tensor into a CPU tensor that holds them as
    stored), collected and made together by the extension (`_native.read_ranges`) when the batch
    closes: on several threads where they are large, in one call where they are many (a Python
    read costs ~20 µs; a thousand adapters' factors are 100k reads). A batch holds at most
    `open_files` files open: reading one more first makes the reads it has. The tensors read into
    must stay alive until then.

        with Batch() as batch:
            for source, out in ...:
                batch.read(source, key, 0, rows, out) if Batch.takes(source, key, out) else source.read(key, 0, rows, out)
    """

    def __init__(self, open_files: int = 64) -> None:
        self.open_files = open_files
        self._files = ExitStack()
        self._held: dict[str, int] = {}  # file -> its descriptor, kept open until the reads are made
        self._reads: list[tuple[SafetensorsSource, str]] = []
        self._ranges: list[tuple[int, int, int, int]] = []
        self._bytes = 0

    @staticmethod
    def available() -> bool:
        """Whether batches are made (by the compiled extension) rather than refused by `takes`."""
        return _native.LOAD_ERROR is None

    @staticmethod
    def takes(source: Source, key: str, out: Tensor) -> bool:
        """Whether reading `key` of `source` into `out` is a plain copy a batch makes."""
        return (
            Batch.available() and isinstance(source, SafetensorsSource)
            and out.dtype == source.meta(key)[1] and out.is_contiguous() and out.device.type == "cpu"
        )  # fmt: skip

    def read(self, source: SafetensorsSource, key: str, start: int, stop: int, out: Tensor) -> None:
        """Rows [start, stop) of `key` into `out`, when the batch closes (`takes` must hold)."""
        file, offset, length = source.span(key, start, stop)
        assert out.nbytes >= length, (out.shape, length)
        self.read_span(source, key, file, offset, length, out.data_ptr())

    def read_span(self, source: SafetensorsSource, key: str, file: str, offset: int, length: int, address: int) -> None:
        """`length` bytes of `file` from `offset` (`source.span` of `key`) to `address`, when the batch
        closes: for callers that make thousands of reads into one buffer (`adapters.stack_factors`),
        which hold the spans and compute the addresses."""
        fd = self._held.get(file)
        if fd is None:
            if len(self._held) >= self.open_files:
                self.flush()
            fd = self._held[file] = self._files.enter_context(_FILES.reading(file))
        self._reads.append((source, key))
        self._ranges.append((fd, offset, length, address))
        self._bytes += length

    def flush(self) -> None:
        """Make the reads collected so far."""
        reads, ranges = self._reads, self._ranges
        try:
            threads = min(_READERS, torch.get_num_threads(), len(ranges)) if self._bytes >= _PARALLEL_BYTES else 1
            done = _native.read_ranges(ranges, threads) if ranges else []
        finally:
            self._files.close()
            self._held, self._reads, self._ranges, self._bytes = {}, [], [], 0
        for (source, key), (_, _, length, _), n in zip(reads, ranges, done):
            if n < length:
                raise source.ends_early(key)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is None:
            self.flush()
        else:  # nothing more is read into buffers the error leaves behind
            self._files.close()


class Reader:
    """Reads row blocks of one tensor from the base and every source into the merge's buffers.

    Values are cast first to the merge's `dtype` when one is given (so a cast that overflows is
    seen as such), then to the buffer's dtype. `prefetch` asks the kernel to start reading a block
    from disk while the current one is computed.
    """

    def __init__(self, base: Source, sources: list[Source], dtype: torch.dtype | None) -> None:
        self.base, self.sources, self.dtype = base, sources, dtype
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def _staging(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        # One buffer, grown as needed, for every read that converts: a fresh one per read would
        # cost its page faults every time (a bf16 row block is tens of MiB).
        nbytes = shape.numel() * dtype.itemsize
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        return self._scratch[:nbytes].view(dtype).view(shape)

    def _stored(self, source: Source, key: str, out: Tensor) -> torch.dtype:
        """The dtype `source` gives `key` in: as stored, or formed in the wider of out's and the
        merge's dtype where the source computes it (an adapter's rows), rounded once."""
        if source.reads_any_dtype:
            return out.dtype if self.dtype is None or self.dtype.itemsize >= out.dtype.itemsize else self.dtype
        return source.meta(key)[1]

    def _direct(self, source: Source, key: str, out: Tensor) -> bool:
        """Whether `key` goes from `source` into `out` unconverted."""
        stored = self._stored(source, key, out)
        return (self.dtype is None or self.dtype == stored) and out.dtype == stored and out.is_contiguous() and out.device.type == "cpu"

    def _read(self, source: Source, key: str, start: int, stop: int, out: Tensor) -> None:
        if self._direct(source, key, out):
            source.read(key, start, stop, out)
            return
        stored = self._stored(source, key, out)
        staging = self._staging(out.shape, stored)
        source.read(key, start, stop, staging)
        # a cast to the merge's dtype first: an overflow is the cast's, and says so
        out.copy_(staging.to(self.dtype) if self.dtype is not None and self.dtype != stored else staging)

    def read_rows(self, key: str, start: int, stop: int, outs: Sequence[tuple[int, Tensor]]) -> None:
        """Rows [start, stop) of `key` of the models `outs` names (0: the base, i + 1: source i)
        into their tensors (any shapes holding them); the plain copies from files together, on
        several threads for a large block (`Batch`). Every read of a merge comes through here."""
        models = (self.base, *self.sources)
        with Batch() as batch:
            for i, out in outs:
                if self._direct(models[i], key, out) and Batch.takes(models[i], key, out):
                    batch.read(models[i], key, start, stop, out)
                else:
                    self._read(models[i], key, start, stop, out)

    def base_rows(self, key: str, start: int, stop: int, out: Tensor) -> Tensor:
        """Rows [start, stop) of the base's `key` into `out` (any shape holding them)."""
        self.read_rows(key, start, stop, [(0, out)])
        return out

    def source_rows(self, i: int, key: str, start: int, stop: int, out: Tensor) -> Tensor:
        """Rows [start, stop) of source i's `key` into `out`."""
        self.read_rows(key, start, stop, [(i + 1, out)])
        return out

    def prefetch(self, key: str, start: int, stop: int) -> None:
        """Start reading rows [start, stop) of `key` of every file-backed model into the page cache."""
        advise(span for source in (self.base, *self.sources) if key in source for span in source.extents(key, start, stop) if span[2])

    def non_finite(self, key: str, start: int, stop: int, shape: tuple[int, ...]) -> str | None:
        """Why rows [start, stop) of `key` are not finite in some model, or None: read again, only
        to explain a merged value that is not finite."""
        for source in (self.base, *self.sources):
            stored = source.meta(key)[1]
            raw = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=stored)
            source.read(key, start, stop, raw)
            cast = raw if self.dtype is None else raw.to(self.dtype)
            if not torch.isfinite(cast).all():
                nan, inf = int(torch.isnan(cast).sum()), int(torch.isinf(cast).sum())
                after = f" after casting from {stored} to {cast.dtype}" if cast.dtype != stored else ""
                rows = "" if (start, stop) == (0, shape[0] if shape else 1) else f" in rows {start}:{stop}"
                return (
                    f"{source.label}: {key!r} of shape {tuple(shape)} holds {nan} NaN and {inf} Inf values{after}{rows} "
                    f"(of {cast.numel()}); expected finite values"
                )
        return None
