"""Streamed merges: output written piece by piece, sharded like the Hub, identical to the in-memory
merge, on one process or many (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse.cli import main

METHODS = [
    ("axis", {"k": 6}), ("ties", {"density": 0.3, "k": 4}), ("ties", {"density": 0.3, "k": 4, "trim_scope": "model", "trim_keep": "inclusive"}),
    ("dare", {"drop_rate": 0.5}), ("task_arithmetic", {}), ("tsv_m", {}), ("iso_c", {}),
]  # fmt: skip


def _model(gen: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {
        "embed_tokens.weight": torch.randn(300, 32, generator=gen).to(dtype),
        "layers.0.q.weight": torch.randn(32, 32, generator=gen).to(dtype),
        "layers.0.mlp.weight": torch.randn(48, 32, generator=gen).to(dtype),
        "layers.0.norm.weight": torch.randn(32, generator=gen).to(dtype),
        "layers.1.q.weight": torch.randn(32, 32, generator=gen).to(dtype),
        "layers.1.mlp.weight": torch.randn(48, 32, generator=gen).to(dtype),
        "layers.1.norm.weight": torch.randn(32, generator=gen).to(dtype),
        "steps": torch.tensor([3]),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, list[str]]:
    """A bf16 base and 5 fine-tuned sources as safetensors files, each source sharded in two like the Hub."""
    root = tmp_path_factory.mktemp("stream")
    gen = torch.Generator().manual_seed(0)
    base = _model(gen, torch.bfloat16)
    save_file(base, root / "base.safetensors")
    paths = []
    for i in range(5):
        src = {k: (v + 0.05 * torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else v for k, v in base.items()}
        d = root / f"ft{i}"
        d.mkdir()
        keys = list(src)
        shards = {"model-00001-of-00002.safetensors": keys[:4], "model-00002-of-00002.safetensors": keys[4:]}
        for name, part in shards.items():
            save_file({k: src[k] for k in part}, d / name)
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        paths.append(str(d))
    return root, paths


@pytest.mark.parametrize("method,params", METHODS, ids=[m + ("-model" if "trim_scope" in p else "") for m, p in METHODS])
def test_streamed_output_equals_the_in_memory_merge(method, params, files, tmp_path):
    root, sources = files
    base = root / "base.safetensors"
    expected = svdfuse.merge(sources, base=base, method=method, device="cpu", **params).state_dict()
    # 200 kB: the embedding table (300 x 32, fp32 in the pieces, ~1.2 kB a row over 6 models) takes two row blocks.
    report = svdfuse.merge(sources, base=base, method=method, device="cpu", output=tmp_path / "out.safetensors", max_memory="200KB", **params)
    assert report.output == str(tmp_path / "out.safetensors")
    written = load_file(tmp_path / "out.safetensors")
    assert list(written) == sorted(expected) or set(written) == set(expected)
    for key, value in expected.items():
        assert written[key].dtype == value.dtype, key
        if method == "ties" and key.endswith("q.weight") or method == "ties" and key.endswith("mlp.weight"):
            # In memory, TIES's matrices pass through their top-k SVD split (for Stage 2): rounding.
            torch.testing.assert_close(written[key].float(), value.float(), atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(written[key], value), key


def test_a_directory_output_is_sharded_like_the_hub_and_loads_back(files, tmp_path):
    root, sources = files
    out = tmp_path / "merged"
    svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu", output=out, shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    loaded = {}
    for shard in shards:
        part = load_file(out / shard)
        assert not loaded.keys() & part.keys()
        loaded.update(part)
        # every shard holds at most shard_size, unless one tensor alone is larger
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 8000 or len(part) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    expected = svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu").state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    # The output is itself a valid source: sharded directories are read through their index.
    again = svdfuse.sources.open_source(out, "merged")
    assert torch.equal(again.get("layers.1.mlp.weight"), expected["layers.1.mlp.weight"])
    single = tmp_path / "single"
    svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu", output=single)
    assert sorted(p.name for p in single.iterdir()) == ["README.md", "model.safetensors"]  # README.md: the model card


def test_bad_sizes_and_an_existing_output_are_refused_before_any_work(files, tmp_path):
    root, sources = files
    base = root / "base.safetensors"
    with pytest.raises(ValueError, match=r"shard_size must be a size such as 4GB, 512MiB or a number of bytes, found 'big'"):
        svdfuse.merge(sources, k=4, base=base, device="cpu", output=tmp_path / "o", shard_size="big")
    with pytest.raises(ValueError, match=r"max_memory must be positive, found -1"):
        svdfuse.merge(sources, k=4, base=base, device="cpu", output=tmp_path / "o", max_memory=-1)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        svdfuse.merge(sources, k=4, base=base, device="cpu", output=tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failure_midway_leaves_no_output_and_no_temporary(error, files, tmp_path, monkeypatch):
    root, sources = files
    import svdfuse.pipeline

    real = svdfuse.pipeline.Compute._factors
    calls = []

    def fail_on_second_group(self, task):
        calls.append(task)
        if len(calls) == 2:
            raise error
        yield from real(self, task)

    monkeypatch.setattr(svdfuse.pipeline.Compute, "_factors", fail_on_second_group)
    with pytest.raises(type(error)):
        svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu", output=tmp_path / "out", max_memory="60KB")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_cli_streams_with_a_budget_and_shards(files, tmp_path, capsys):
    root, sources = files
    out = tmp_path / "cli-out"
    args = ["merge", "--base", str(root / "base.safetensors"), "-k", "4", "-o", str(out), "--max-memory", "64KB", "--shard-size", "8KB"]
    assert main([*args, "--quiet", *sources]) == 0
    printed = capsys.readouterr().out
    assert "memory budget 0.00 GiB" in printed and "peak RSS" in printed and f"wrote {out}" in printed
    assert (out / "model.safetensors.index.json").is_file()
    assert main([*args[:-4], "--max-memory", "lots", "-o", str(tmp_path / "x"), *sources]) == 2
    assert "--max-memory must be a size" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}", "-m", "svdfuse", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "method,params", [("axis", ["-k", "4"]), ("ties", ["--density", "0.3"]), ("ties", ["--density", "0.3", "--trim-scope", "model"])], ids=["axis", "ties", "ties-model"]
)
def test_torchrun_two_processes_write_the_same_bytes_as_one(method, params, files, tmp_path):
    root, sources = files
    args = ["merge", "--base", str(root / "base.safetensors"), "--method", method, *params, "--max-memory", "64KB", "--shard-size", "8KB", "--quiet", "--device", "cpu"]
    one, two = tmp_path / "one" / "merged", tmp_path / "two" / "merged"  # one name: the model card is titled by it
    assert main([*args, "-o", str(one), *sources]) == 0
    run = _torchrun([*args, "-o", str(two), *sources], 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for file in one.iterdir():
        assert file.read_bytes() == (two / file.name).read_bytes(), file.name


def test_torchrun_a_failing_rank_fails_every_rank_and_leaves_nothing(files, tmp_path):
    root, sources = files
    bad = tmp_path / "bad"
    bad.mkdir()
    # A source whose last tensor holds a NaN: whichever rank merges it fails, every rank exits non-zero.
    src = load_file(Path(sources[0]) / "model-00002-of-00002.safetensors")
    src["steps"] = src["steps"]
    state = {**load_file(Path(sources[0]) / "model-00001-of-00002.safetensors"), **src}
    state["layers.1.norm.weight"] = state["layers.1.norm.weight"].clone()
    state["layers.1.norm.weight"][3] = float("nan")
    save_file(state, bad / "model.safetensors")
    out = tmp_path / "out"
    run = _torchrun(["merge", "--base", str(root / "base.safetensors"), "-k", "4", "--quiet", "--device", "cpu", "-o", str(out), *sources[1:], str(bad)], 2)
    assert run.returncode != 0
    assert "'layers.1.norm.weight'" in run.stderr and "NaN" in run.stderr
    # both ranks say why: the one that failed, and the other with the failing rank's message
    assert run.stderr.count("holds 1 NaN") >= 2 and "merge failed on another process: rank" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_temporary_output_left_by_a_killed_merge_is_swept_by_the_next(files, tmp_path):
    # A merge killed with SIGKILL cannot clean up: its temporary output stays. The next merge to
    # the same path removes those of dead processes on this host, and only those.
    root, sources = files
    out = tmp_path / "merged"
    script = (
        "import os, signal, svdfuse.sinks as s\n"
        f"w = s.SafetensorsWriter({str(out)!r}, [('a', (4,), __import__('torch').float32)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.svdfuse-")]
    assert len(stale) == 1 and stale[0].is_dir()
    alive = tmp_path / f".merged.svdfuse-{socket.gethostname()}-{os.getpid()}-x.tmp"
    alive.mkdir()  # a merge still running here (this process): never touched
    svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu", output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", alive.name])


def test_many_source_files_share_a_bounded_set_of_descriptors(files, monkeypatch):
    # 11 files (a base and 5 sources of 2 shards), at most 3 open at once: same merge.
    root, sources = files
    from svdfuse import sources as sources_module

    expected = svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu").state_dict()
    bounded = sources_module._OpenFiles(limit=3)
    monkeypatch.setattr(sources_module, "_FILES", bounded)
    got = svdfuse.merge(sources, k=4, base=root / "base.safetensors", device="cpu").state_dict()
    assert all(torch.equal(got[key], value) for key, value in expected.items())
    assert len(bounded._fds) <= 3


@pytest.mark.parametrize("soft,kept", [(1024, 512), (20000, 4096), (100, 64)])
def test_the_files_kept_open_are_half_the_descriptor_limit_within_bounds(monkeypatch, soft, kept):
    from svdfuse import sources as sources_module

    monkeypatch.setattr(sources_module.resource, "getrlimit", lambda which: (soft, 1 << 20))
    assert sources_module._OpenFiles().limit == kept


def test_read_ahead_asks_for_the_bytes_of_the_rows_it_names(files, monkeypatch):
    root, sources = files
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((fd, offset, length)))
    base = svdfuse.sources.open_source(root / "base.safetensors", "base")
    reader = svdfuse.sources.Reader(base, [svdfuse.sources.open_source(sources[0], "source 0")], None)
    reader.prefetch("embed_tokens.weight", 7, 19)
    assert len(calls) == 2  # the base's file and the source's shard
    expected = [base.get("embed_tokens.weight")[7:19], reader.sources[0].get("embed_tokens.weight")[7:19]]
    for (fd, offset, length), rows in zip(calls, expected):
        assert length == rows.numel() * rows.element_size()
        assert os.pread(fd, length, offset) == rows.contiguous().view(torch.uint8).numpy().tobytes()


def test_the_descriptor_cache_closes_the_least_recently_used(files, monkeypatch):
    root, sources = files
    from svdfuse import sources as sources_module

    shards = sorted(Path(sources[0]).glob("*.safetensors"))
    paths = [root / "base.safetensors", *shards]
    closed = []
    real_close = os.close
    monkeypatch.setattr(sources_module.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    cache = sources_module._OpenFiles(limit=2)
    first = cache.fd(paths[0])
    second = cache.fd(paths[1])
    assert cache.fd(paths[0]) == first  # used again: now the second is the least recently used
    cache.fd(paths[2])
    assert closed == [second] and cache.fd(paths[0]) == first and len(cache._fds) == 2
    for fd in cache._fds.values():
        real_close(fd)


_needs_threads = pytest.mark.skipif(
    svdfuse._native.LOAD_ERROR is not None or torch.get_num_threads() < 2, reason="the extension reads a block's files together on 2 or more threads"
)


def _reads_together(monkeypatch) -> list[tuple[int, int]]:
    """(threads, files) of each call that reads a block's files together, from here on."""
    calls = []
    real = svdfuse._native.read_ranges

    def recording(ranges, threads):
        calls.append((threads, len(ranges)))
        return real(ranges, threads)

    monkeypatch.setattr(svdfuse._native, "read_ranges", recording)
    return calls


def _evicted(path: Path) -> bool:
    """Drop `path`'s clean pages from the page cache; whether a read that may not wait for the disk now fails."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return False
    except (BlockingIOError, AttributeError):
        return True  # AttributeError: no RWF_NOWAIT here, the pages may still be cached: read either way
    finally:
        os.close(fd)


@pytest.mark.skipif(svdfuse._native.LOAD_ERROR is not None, reason="reads ranges with the extension")
@pytest.mark.parametrize("threads", [1, 2])
def test_ranges_the_page_cache_lacks_in_whole_or_part_are_read_from_the_disk(threads, tmp_path):
    # read_ranges copies what the page cache holds, then reads the rest from the disk many at a
    # time: 8 MiB dropped from the cache, a range's first half read back into it, every range's
    # bytes the file's, a range past the end short
    data = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "cold.bin"
    path.write_bytes(data.numpy().tobytes())
    if not _evicted(path):
        pytest.skip("this filesystem keeps the file's pages cached (tmpfs): nothing is read from a disk")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 1 << 20, 3 << 20)  # [3 MiB, 4 MiB) cached again: the range over 3.5-4.5 MiB is half in the cache
        spans = [(0, 4096), (12345, 300_000), (7 << 19, 1 << 20), (5 << 20, 3 << 20), ((8 << 20) - 100, 1000)]
        out = torch.zeros(sum(n for _, n in spans), dtype=torch.uint8)
        at, ranges = 0, []
        for offset, length in spans:
            ranges.append((fd, offset, length, out.data_ptr() + at))
            at += length
        done = svdfuse._native.read_ranges(ranges, threads)
    finally:
        os.close(fd)
    assert done == [4096, 300_000, 1 << 20, 3 << 20, 100]
    at = 0
    for (offset, length), n in zip(spans, done):
        assert torch.equal(out[at : at + n], data[offset : offset + n]), (offset, length)
        at += length


@_needs_threads
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_blocks_files_are_read_together_on_several_threads(method, tmp_path, monkeypatch):
    # 5 files of 2000 x 64 fp32 (512 KB each): a row block of all of them is read in one call, on
    # every thread torch has (up to 4); the output is the in-memory merge's, byte for byte
    base, paths = _table_files(tmp_path, 2000, 64, 4, 1.0)
    expected = svdfuse.merge(paths, base=base, method=method, device="cpu").state_dict()
    calls = _reads_together(monkeypatch)
    svdfuse.merge(paths, base=base, method=method, device="cpu", output=tmp_path / "out.safetensors")
    assert torch.equal(load_file(tmp_path / "out.safetensors")["table.weight"], expected["table.weight"])
    assert (min(4, torch.get_num_threads()), 5) in calls, calls


@_needs_threads
def test_files_being_read_together_keep_their_descriptors_however_few_may_be_open(tmp_path, monkeypatch):
    # at most 2 descriptors open, 5 files read at once: the cache may not close one being read
    # (its number would be reused by the next file opened, and read as that file)
    from svdfuse import sources as sources_module

    base, paths = _table_files(tmp_path, 2000, 64, 4, 1.0)
    expected = svdfuse.merge(paths, base=base, method="task_arithmetic", device="cpu").state_dict()
    calls = _reads_together(monkeypatch)
    bounded = sources_module._OpenFiles(limit=2)
    monkeypatch.setattr(sources_module, "_FILES", bounded)
    svdfuse.merge(paths, base=base, method="task_arithmetic", device="cpu", output=tmp_path / "out.safetensors")
    assert calls
    assert torch.equal(load_file(tmp_path / "out.safetensors")["table.weight"], expected["table.weight"])
    assert len(bounded._fds) <= 2 and not bounded._reading


@pytest.mark.parametrize("together", [True, False], ids=["together", "cast one at a time"])
def test_a_file_cut_short_during_the_merge_is_named_and_nothing_is_written(together, tmp_path, monkeypatch):
    # read as stored, the block's files are read together by the extension; cast to float64 first, one by one
    base, paths = _table_files(tmp_path, 2000, 64, 4, 1.0)
    if together and (svdfuse._native.LOAD_ERROR is not None or torch.get_num_threads() < 2):
        pytest.skip("the extension reads a block's files together on 2 or more threads")
    calls = _reads_together(monkeypatch)
    read_rows = svdfuse.sources.Reader.read_rows

    def cutting(self, key, start, stop, outs):  # source 2's file loses its last rows once opened
        with open(paths[2], "r+b") as f:
            f.truncate(os.path.getsize(paths[2]) - 1000)
        read_rows(self, key, start, stop, outs)

    monkeypatch.setattr(svdfuse.sources.Reader, "read_rows", cutting)
    with pytest.raises(svdfuse.SourceError, match=r"^source 2 \('s2\.safetensors'\): tensor 'table\.weight' \(2000, 64\) torch\.float32 ends early: the file was truncated after it was opened$"):
        svdfuse.merge(paths, base=base, method="task_arithmetic", device="cpu", output=tmp_path / "out.safetensors", dtype=None if together else "float64")
    assert bool(calls) == together
    assert not (tmp_path / "out.safetensors").exists()


def test_read_ahead_asks_for_the_next_block_not_the_one_being_read(files, monkeypatch):
    # a small budget cuts the embedding (300 rows) into row blocks: while one block is read and
    # merged, the kernel has been asked for the next, in windows of several blocks (one advice
    # per file a window, not per block)
    root, sources = files
    events = []
    reader_type = svdfuse.sources.Reader
    monkeypatch.setattr(reader_type, "prefetch", lambda self, key, start, stop: events.append(("prefetch", key, start, stop)))
    read_rows = reader_type.read_rows

    def reading(self, key, start, stop, outs):
        if any(i == 0 for i, _ in outs):  # the base's rows, read with the sources'
            events.append(("read", key, start, stop))
        read_rows(self, key, start, stop, outs)

    monkeypatch.setattr(reader_type, "read_rows", reading)
    svdfuse.merge(sources, base=root / "base.safetensors", method="task_arithmetic", device="cpu", max_memory="64KiB")
    key = "embed_tokens.weight"
    blocks = [(start, stop) for kind, k, start, stop in events if kind == "read" and k == key]
    assert len(blocks) > 4 and blocks[0][0] == 0 and blocks[-1][1] == 300
    asked = [(i, start, stop) for i, (kind, k, start, stop) in enumerate(events) if kind == "prefetch" and k == key]
    assert 1 < len(asked) < len(blocks) - 1, (asked, blocks)
    for start, stop in blocks[1:]:
        read_at = events.index(("read", key, start, stop))
        before = [i for i, a, b in asked if a <= start and stop <= b and i < read_at]
        assert before, (start, stop, asked)
        # asked for while earlier rows were read (computed), not just before its own read
        assert any(event[0] == "read" for event in events[before[0] + 1 : read_at]), (start, stop)


def _rows_read(monkeypatch) -> dict[tuple[int, str], int]:
    """Counts the rows each source's tensors are read, (source, key) -> rows, from here on."""
    counts: dict[tuple[int, str], int] = {}
    read_rows = svdfuse.sources.Reader.read_rows

    def counting(self, key, start, stop, outs):
        for i, _ in outs:
            if i > 0:
                counts[i - 1, key] = counts.get((i - 1, key), 0) + stop - start
        read_rows(self, key, start, stop, outs)

    monkeypatch.setattr(svdfuse.sources.Reader, "read_rows", counting)
    return counts


def _table_files(tmp_path: Path, rows: int, cols: int, sources: int, row_scales: float) -> tuple[Path, list[Path]]:
    """A base with one fp32 table and `sources` fine-tunes of it whose rows change by scales 10^±row_scales."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(rows, cols, generator=gen)
    save_file({"table.weight": base}, tmp_path / "base.safetensors")
    paths = []
    for i in range(sources):
        scale = 10 ** (row_scales * (2 * torch.rand(rows, 1, generator=gen) - 1))
        save_file({"table.weight": base + 0.01 * scale * torch.randn(rows, cols, generator=gen)}, tmp_path / f"s{i}.safetensors")
        paths.append(tmp_path / f"s{i}.safetensors")
    return tmp_path / "base.safetensors", paths


@pytest.mark.parametrize("row_scales", [0.0, 1.0], ids=["alike-rows", "rows-10x-apart"])
def test_ties_reads_a_tensor_larger_than_a_block_twice_and_a_sample_of_its_rows(row_scales, tmp_path, monkeypatch):
    # The trim's bracket pass and the merge's pass read every row; the bracket's sample reads at
    # most an eighth of them. A sample taken by a pass of its own would read the rows 3 times, a
    # bracket that misses (rows of different scales: the sample's rows are clusters) 5 times.
    rows = 4000
    base, paths = _table_files(tmp_path, rows, 64, 4, row_scales)
    expected = svdfuse.merge(paths, base=base, method="ties", density=0.2, device="cpu").state_dict()
    reads = _rows_read(monkeypatch)
    svdfuse.merge(paths, base=base, method="ties", density=0.2, device="cpu", output=tmp_path / "out.safetensors", max_memory="8MB")
    assert torch.equal(load_file(tmp_path / "out.safetensors")["table.weight"], expected["table.weight"])
    for i in range(len(paths)):
        assert 2 * rows < reads[i, "table.weight"] <= 2 * rows + rows // 8, (i, reads[i, "table.weight"])


def _bf16_table_files(tmp_path: Path, rows: int, cols: int, sources: int) -> tuple[torch.Tensor, list[Path]]:
    """A bf16 base table and fine-tunes that change it by ~3e-3: most entries by 0 or one unit in the
    last place, so |τ| takes few values. Returns the base tensor and the sources' files."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    save_file({"table.weight": base}, tmp_path / "base.safetensors")
    paths = []
    for i in range(sources):
        save_file({"table.weight": (base.float() + 3e-3 * torch.randn(rows, cols, generator=gen)).to(torch.bfloat16)}, tmp_path / f"s{i}.safetensors")
        paths.append(tmp_path / f"s{i}.safetensors")
    return base, paths


def test_ties_of_bf16_sources_whose_threshold_is_equalled_by_millions_of_entries(tmp_path, monkeypatch):
    """bf16 fine-tunes change most entries by 0 or one unit in the last place: |τ| takes few values,
    and the threshold falls on one that far more entries equal than survive. Those are counted per
    unit in the bracket pass, not gathered, and the cutoff's unit read again: still two reads, and
    exactly the entries a sort keeps (ties to the first in row-major order, mergekit's count)."""
    rows, cols, T = 4000, 64, 4
    base, paths = _bf16_table_files(tmp_path, rows, cols, T)
    reads = _rows_read(monkeypatch)
    svdfuse.merge(paths, base=tmp_path / "base.safetensors", method="ties", density=0.2, device="cpu", output=tmp_path / "out.safetensors", max_memory="8MB")
    merged = load_file(tmp_path / "out.safetensors")["table.weight"]
    for i in range(T):
        # two passes, the sample, and the rows of the one unit (2^16 entries) the cutoff falls in
        assert 2 * rows < reads[i, "table.weight"] <= 2 * rows + rows // 8 + (1 << 16) // cols + 1, (i, reads[i, "table.weight"])
    # the oracle: each source's keep-mask by a stable sort, then TIES in float64
    tau = torch.stack([load_file(p)["table.weight"].float() - base.float() for p in paths]).reshape(T, -1).double()
    keep = torch.zeros_like(tau, dtype=torch.bool)
    for i in range(T):
        order = torch.sort(-tau[i].abs(), stable=True).indices[: int(0.2 * rows * cols)]
        keep[i, order] = True
    assert (tau.abs()[keep.logical_not()].max() == tau.abs()[keep].min()), "the threshold is tied across the cut"
    t = tau * keep
    elected = t.sum(0).sign()
    agree = (t * elected) > 0
    expected = (t * agree).sum(0) / agree.sum(0).clamp(min=1) + base.double().reshape(-1)
    assert torch.equal(merged.reshape(-1), expected.to(torch.bfloat16))


def test_whole_model_ties_of_bf16_sources_reads_only_the_cutoffs_units_again(tmp_path, monkeypatch):
    """With `trim_scope="model"` the thresholds span every tensor; where one falls on a value many
    entries share, each source's cutoff unit is read again from its tensor's rows, not found by a
    pass over the model up to it (one such pass per source would read the model T times more)."""
    gen = torch.Generator().manual_seed(6)
    shapes = {"a.weight": (3000, 64), "b.weight": (2000, 64), "c.weight": (64,)}
    base = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(base, tmp_path / "base.safetensors")
    T, paths = 4, []
    for i in range(T):
        save_file({k: (v.float() + 3e-3 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in base.items()}, tmp_path / f"s{i}.safetensors")
        paths.append(tmp_path / f"s{i}.safetensors")
    params = {"method": "ties", "density": 0.2, "trim_scope": "model", "device": "cpu"}
    expected = svdfuse.merge(paths, base=tmp_path / "base.safetensors", **params).state_dict()
    reads = _rows_read(monkeypatch)
    svdfuse.merge(paths, base=tmp_path / "base.safetensors", output=tmp_path / "out.safetensors", max_memory="8MB", **params)
    merged = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(merged[k], expected[k]) for k in shapes)
    unit_rows = (1 << 16) // 64 + 1
    for i in range(T):
        # the model trim's sample and bracket passes, the merge's pass, and one unit's rows
        read = reads[i, "a.weight"] + reads[i, "b.weight"]
        assert read <= 3 * 5000 + unit_rows, (i, read)


def test_inclusive_ties_reads_no_cutoff_unit_again(tmp_path, monkeypatch):
    """`trim_keep="inclusive"` keeps every entry equal to the threshold: where the threshold is a
    bound many entries share, there is no cutoff to find, and no unit is read a second time."""
    rows, cols, T = 4000, 64, 4
    base, paths = _bf16_table_files(tmp_path, rows, cols, T)
    params = {"method": "ties", "density": 0.2, "trim_keep": "inclusive", "device": "cpu"}
    expected = svdfuse.merge(paths, base=tmp_path / "base.safetensors", **params).state_dict()
    reads = _rows_read(monkeypatch)
    svdfuse.merge(paths, base=tmp_path / "base.safetensors", output=tmp_path / "out.safetensors", max_memory="8MB", **params)
    assert torch.equal(load_file(tmp_path / "out.safetensors")["table.weight"], expected["table.weight"])
    for i in range(T):
        assert 2 * rows < reads[i, "table.weight"] <= 2 * rows + rows // 8, (i, reads[i, "table.weight"])


def test_the_descriptor_cache_hands_each_thread_its_own_files_descriptor(tmp_path):
    # `advise` takes descriptors on a thread of its own while the merge reads: under the cache's
    # lock a descriptor is the named file's and stays open while held, however the threads interleave
    import sys
    import threading

    from svdfuse.sources import _OpenFiles

    paths = []
    for i in range(12):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes([i]) * 16)
    files, wrong = _OpenFiles(limit=2), []

    def work(offset: int) -> None:
        for n in range(3000):
            i = (n * 7 + offset) % len(paths)
            try:
                with files.reading(str(paths[i])) as fd:
                    got = os.pread(fd, 1, 0)
            except Exception as err:  # noqa: BLE001 - a closed descriptor or the cache's own bookkeeping torn: both wrong
                got = repr(err)
            if got != bytes([i]):
                wrong.append((i, got))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: races show
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, wrong[:5]
