"""Merges over many processes (torchrun, gloo on the CPU): every rank agrees on the request before
any work, a failure on one rank is every rank's (exit 2, the failing rank's own message, nothing
left on disk), the commit waits for the slowest rank, and the partition shares the bytes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from svdfuse.distributed import partition


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, list[str]]:
    """A base and three fine-tuned sources as small safetensors files."""
    root = tmp_path_factory.mktemp("ranks")
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(24, 16, generator=gen) for i in range(4)}
    base.update({f"layers.{i}.bias": torch.randn(24, generator=gen) for i in range(4)})
    save_file(base, root / "base.safetensors")
    sources = []
    for i in range(3):
        save_file({key: value + 0.1 * torch.randn(value.shape, generator=gen) for key, value in base.items()}, root / f"s{i}.safetensors")
        sources.append(str(root / f"s{i}.safetensors"))
    return root, sources


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs `svdfuse` under torchrun with each rank's own command line, after each rank's own set-up
# code (a failure planted on one rank): argv[1] is a JSON list of [setup, argv] per rank.
_RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    setup, argv = json.loads(sys.argv[1])[int(os.environ["RANK"])]
    exec(setup)
    from svdfuse.cli import main
    sys.exit(main(argv))
    """
)


def _torchrun(tmp_path: Path, ranks: list[tuple[str, list[str]]]) -> subprocess.CompletedProcess:
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}", str(script), json.dumps(ranks)]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def _merge_args(root: Path, output: Path, sources: list[str]) -> list[str]:
    return ["merge", "--base", str(root / "base.safetensors"), "-k", "3", "--quiet", "--device", "cpu", "-o", str(output), *sources]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("svdfuse merge: ")]


def test_ranks_given_different_sources_refuse_on_every_rank_before_any_work(files, tmp_path):
    root, (s0, s1, s2) = files
    out = tmp_path / "out"
    # The merge would fail loudly if any rank reached the work: Compute.run raises on both ranks.
    no_work = "import svdfuse.pipeline as p\ndef run(*a, **k):\n    raise AssertionError('work started')\np.Compute.run = run\n"
    run = _torchrun(tmp_path, [(no_work, _merge_args(root, out, [s0, s1])), (no_work, _merge_args(root, out, [s0, s2]))])
    assert run.returncode != 0, run.stderr[-3000:]
    errors = _errors(run.stderr)
    assert len(errors) == 2 and errors[0] == errors[1], run.stderr[-3000:]
    assert errors[0].startswith("svdfuse merge: error: the processes of this merge were given different requests: rank 1 and rank 0 differ in sources (sources[1]:")
    assert "s2.safetensors" in errors[0] and "s1.safetensors" in errors[0] and "work started" not in run.stderr
    assert run.stderr.count("exitcode  : 2") == 2, run.stderr[-3000:]  # torchrun's report of each rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.py"]


def test_ranks_whose_files_differ_at_the_same_path_refuse_before_any_work(files, tmp_path):
    # Rank 1 reads another copy of s1 (as on a machine whose local disk holds an older fine-tune).
    root, sources = files
    out = tmp_path / "out"
    other_copy = (
        "import svdfuse.sources as s\nreal = s.SafetensorsSource.read\n"
        "def read(self, key, start, stop, out):\n"
        "    real(self, key, start, stop, out)\n"
        "    if 's1.safetensors' in self.label:\n"
        "        out.add_(1)\n"
        "s.SafetensorsSource.read = read\n"
        "s.Batch.available = staticmethod(lambda: False)\n"  # every read through `read`, none batched
        "import svdfuse.pipeline as p\ndef run(*a, **k):\n    raise AssertionError('work started')\np.Compute.run = run\n"
    )
    run = _torchrun(tmp_path, [("", _merge_args(root, out, sources)), (other_copy, _merge_args(root, out, sources))])
    errors = _errors(run.stderr)
    assert len(errors) == 2 and errors[0] == errors[1], run.stderr[-3000:]
    assert "rank 1 and rank 0 differ in source contents (source contents[1]: source 1 ('s1.safetensors'): " in errors[0]
    assert "work started" not in run.stderr and run.stderr.count("exitcode  : 2") == 2, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.py"]


def test_ranks_given_different_options_refuse_naming_the_option(files, tmp_path):
    root, sources = files
    out = tmp_path / "out"
    run = _torchrun(tmp_path, [("", _merge_args(root, out, sources)), ("", [*_merge_args(root, out, sources), "--max-memory", "1GB"])])
    errors = _errors(run.stderr)
    assert run.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], run.stderr[-3000:]
    assert "rank 1 and rank 0 differ in max_memory (max_memory: '1GB' on rank 1, None on rank 0)" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.py"]


# Failures planted on rank 1 alone, at each point where a rank writes: its output check, opening
# the files rank 0 laid out, writing a tensor, and flushing them to disk at the commit.
_CANNOT_WRITE = {
    "check": (
        "import os\nreal = os.access\n"
        "os.access = lambda path, mode, **kw: False if str(path) == OUT_PARENT else real(path, mode, **kw)\n",
        "is not writable",
    ),
    "open": (
        "import os, errno\nreal = os.open\n"
        "def fail(path, flags, *a, **kw):\n"
        "    if '.svdfuse-' in str(path) and flags & os.O_WRONLY:\n"
        "        raise PermissionError(errno.EACCES, 'Permission denied', str(path))\n"
        "    return real(path, flags, *a, **kw)\n"
        "os.open = fail\n",
        "Permission denied",
    ),
    "write": (
        "import os, errno\n"
        "def fail(*a):\n    raise OSError(errno.EDQUOT, 'Disk quota exceeded')\n"
        "os.pwrite = fail\n",
        "Disk quota exceeded",
    ),
    "fsync": (
        "import os, errno\nreal = os.fsync\n"
        "def fail(fd):\n    raise OSError(errno.EIO, 'Input/output error')\n"
        "os.fsync = fail\n",
        "Input/output error",
    ),
}


@pytest.mark.parametrize("where", list(_CANNOT_WRITE))
def test_a_rank_that_cannot_write_fails_every_rank_with_its_message_and_leaves_nothing(where, files, tmp_path):
    root, sources = files
    out = tmp_path / "out" / "merged"
    (tmp_path / "out").mkdir()
    setup, message = _CANNOT_WRITE[where]
    setup = f"OUT_PARENT = {str(out.parent)!r}\n" + setup
    run = _torchrun(tmp_path, [("", _merge_args(root, out, sources)), (setup, _merge_args(root, out, sources))])
    errors = _errors(run.stderr)
    assert len(errors) == 2, run.stderr[-3000:]
    assert all(line.startswith("svdfuse merge: error: ") and message in line for line in errors), errors
    assert "internal error" not in run.stderr and "gloo" not in " ".join(errors)
    assert run.stderr.count("exitcode  : 2") == 2, run.stderr[-3000:]
    assert list((tmp_path / "out").iterdir()) == []


# The commit's first barrier: rank 1 is slow to write its tensors; rank 0 must not publish the
# output before rank 1's bytes are in it (it checks at the moment of publishing).
_SLOW_RANK = textwrap.dedent(
    """
    import os, sys, time, torch, torch.distributed as dist
    from safetensors.torch import load_file
    import svdfuse.sinks as sinks
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    out = sys.argv[1]
    tensors = [("a", (4, 4), torch.float32), ("b", (4, 4), torch.float32)]
    values = {"a": torch.full((4, 4), 1.0), "b": torch.full((4, 4), 2.0)}
    mine = ["a", "b"][rank]
    published = []
    real = sinks.publish
    def publish(tmp, path):
        published.append(torch.equal(load_file(tmp)["b"], values["b"]))
        real(tmp, path)
    sinks.publish = publish
    with sinks.SafetensorsWriter(out, tensors) as writer:
        if rank == 1:
            time.sleep(2)
        writer.write(mine, values[mine])
        writer.commit([mine])
    if rank == 0:
        assert published == [True], "rank 0 published before rank 1 had written"
        assert all(torch.equal(load_file(out)[k], v) for k, v in values.items())
    dist.destroy_process_group()
    """
)


def test_the_commit_waits_for_the_slowest_rank_before_publishing(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_RANK)
    out = tmp_path / "out.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}", str(script), str(out)]
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "slow.py"]


def test_the_partition_shares_the_bytes_between_the_ranks():
    sizes = [100, 90, 60, 40, 30, 20, 10, 5, 5, 1]
    for world in (2, 3, 4):
        parts = partition(sizes, world)
        assert sorted(i for part in parts for i in part) == list(range(len(sizes)))  # each task once
        loads = [sum(sizes[i] for i in part) for part in parts]
        # Greedy largest-first onto the least-loaded rank: no rank is more than one task above another.
        assert max(loads) - min(loads) <= max(sizes), (world, loads)
        assert all(parts), (world, parts)
    # By hand: 100 -> 0, 90 -> 1, 60 -> 1 (150), 40 -> 0 (140), 30 -> 0 (170), 20 -> 1 (170), 10 -> 0 (a tie
    # goes to the lower rank, 180), 5 -> 1 (175), 5 -> 1 (180), 1 -> 0 (181).
    assert partition(sizes, 2) == [[0, 3, 4, 6, 9], [1, 2, 5, 7, 8]]
