"""Peak memory of a merge is O(sources × one layer group), never O(sources × model).

A base and T = 6 sources of a many-layer model are written as .safetensors files; each merge runs
in a fresh subprocess that samples its own anonymous RSS (`RssAnon` in /proc/self/status) every
millisecond from a background thread. Anonymous memory is what the merge allocates (torch CPU
tensors are invisible to tracemalloc); the memory-mapped source files are file-backed and do not
count. glibc is told to serve every allocation of 128 KiB or more with its own mmap
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS at once and RssAnon tracks live bytes rather
than what the allocator keeps cached. The group buffers stay allocated through the whole SVD of
a group, and the SVD's own large temporaries recur several times per group, so a 1 ms sampler
catches the peak in every run (8 / 48 layers: +43.7 / +47.4 MiB over repeated runs, also with
both cores busy).

A 48-layer merge must peak no higher than an 8-layer one (plus the merged factors, which are
O(model) but small), and the probe must see a merge that holds all sources at once: the same
48-layer model with a group budget large enough for every layer. (Checked by hand as well: a
source that copies every tensor at open, or a merge loop that keeps each group's data, makes the
48-layer peak ~4-5x the 8-layer one and fails the first test.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import svdfuse

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "RssAnon" not in Path("/proc/self/status").read_text(),
    reason="needs Linux /proc/self/status RssAnon",
)

T, DIM, K = 6, 512, 16
LAYERS_SMALL, LAYERS_LARGE = 8, 48
MATRIX_BYTES = DIM * DIM * 4
# A group holds G same-shape matrices of the base and every source: G * (T + 1) matrices.
GROUP_LAYERS = 3
GROUP_BYTES = GROUP_LAYERS * (T + 1) * MATRIX_BYTES
SOURCE_BYTES_LARGE = T * LAYERS_LARGE * (MATRIX_BYTES + DIM * 4)  # ~290 MB

_PROBE = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(1)
import svdfuse

def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")

directory, k, group_bytes, sources = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = [f"{directory}/source{i}.safetensors" for i in range(sources)]

# Warm up torch's lazily created state (LAPACK workspaces, thread pool) outside the measurement.
g = torch.Generator().manual_seed(0)
w = {"a.weight": torch.randn(64, 64, generator=g), "a.bias": torch.zeros(64)}
svdfuse.merge([{n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in w.items()} for _ in range(2)], 8, base=w, device="cpu")

before = peak = rss_anon()
samples = 0
done = threading.Event()

def sample():
    global peak, samples
    while not done.is_set():
        peak = max(peak, rss_anon())
        samples += 1
        time.sleep(0.001)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
result = svdfuse.merge(files, k, base=f"{directory}/base.safetensors", device="cpu", group_bytes=group_bytes)
seconds = time.perf_counter() - start
done.set()
thread.join()
peak = max(peak, rss_anon())
result_bytes = sum(sum(t.numel() * t.element_size() for t in f) for f in result.components.values())
result_bytes += sum(t.numel() * t.element_size() for t in result.tensors.values())
print(json.dumps({
    "peak_delta": peak - before, "before": before, "result_bytes": result_bytes, "seconds": seconds,
    "samples": samples, "groups": len(result._plan.groups), "matrices": len(result.components),
}))
"""


def _write_models(directory: Path, layers: list[dict[str, torch.Tensor]], sources: list[list[dict[str, torch.Tensor]]]) -> Path:
    directory.mkdir()
    save_file({k: v for layer in layers for k, v in layer.items()}, str(directory / "base.safetensors"))
    for i, source in enumerate(sources):
        save_file({k: v for layer in source for k, v in layer.items()}, str(directory / f"source{i}.safetensors"))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Iterator[dict[int, Path]]:
    """Base + T sources with 48 and 8 layers of DIM×DIM fp32 + bias (the 8-layer model is the first 8)."""
    root = tmp_path_factory.mktemp("memory")
    g = torch.Generator().manual_seed(0)
    base = [
        {f"blocks.{i}.linear.weight": torch.randn(DIM, DIM, generator=g) / DIM**0.5, f"blocks.{i}.linear.bias": torch.zeros(DIM)}
        for i in range(LAYERS_LARGE)
    ]
    sources = []
    for _ in range(T):
        source = []
        for layer in base:
            delta = torch.randn(DIM, 4, generator=g) @ torch.randn(4, DIM, generator=g) / DIM
            source.append({name: t + (delta if t.dim() == 2 else 1e-2 * torch.randn(DIM, generator=g)) for name, t in layer.items()})
        sources.append(source)
    paths = {
        LAYERS_LARGE: _write_models(root / f"L{LAYERS_LARGE}", base, sources),
        LAYERS_SMALL: _write_models(root / f"L{LAYERS_SMALL}", base[:LAYERS_SMALL], [s[:LAYERS_SMALL] for s in sources]),
    }
    del base, sources
    yield paths
    shutil.rmtree(root, ignore_errors=True)  # ~400 MB; pytest would keep it for three runs


def _probe(directory: Path, group_bytes: int) -> dict:
    """Run one merge in a fresh process and return its peak anonymous-memory growth and more."""
    repo = str(Path(svdfuse.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])]),
        # One compute thread: on a loaded 2-core machine OpenMP spinning makes a merge 10x slower.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    }
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(directory), str(K), str(group_bytes), str(T)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, f"probe failed:\n{out.stderr[-4000:]}"
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{directory.name}: group_bytes {group_bytes / 2**20:.1f} MiB, {measured['groups']} groups: peak anon +"
        f"{measured['peak_delta'] / 2**20:.1f} MiB (result {measured['result_bytes'] / 2**20:.2f} MiB), "
        f"{measured['seconds']:.2f} s, {measured['samples']} samples"
    )
    return measured


def test_peak_memory_grows_with_one_layer_group_not_with_the_model(models):
    small = _probe(models[LAYERS_SMALL], GROUP_BYTES)
    large = _probe(models[LAYERS_LARGE], GROUP_BYTES)
    # The probe merged what was intended: every layer, GROUP_LAYERS layers at a time.
    assert (small["matrices"], small["groups"]) == (LAYERS_SMALL, -(-LAYERS_SMALL // GROUP_LAYERS))
    assert (large["matrices"], large["groups"]) == (LAYERS_LARGE, LAYERS_LARGE // GROUP_LAYERS)
    numbers = (
        f"8 layers: +{small['peak_delta'] / 2**20:.1f} MiB, 48 layers: +{large['peak_delta'] / 2**20:.1f} MiB "
        f"(result {large['result_bytes'] / 2**20:.2f} MiB), group budget {GROUP_BYTES / 2**20:.1f} MiB, "
        f"48-layer sources {SOURCE_BYTES_LARGE / 2**20:.0f} MiB"
    )
    # 6x the layers, same peak: only the result (merged factors, averaged biases) grows with the model.
    assert large["peak_delta"] < 1.5 * small["peak_delta"] + large["result_bytes"], numbers
    # Far below the sources, and a small multiple of the group budget the caller gave: the group
    # itself plus SVD workspace (measured ~1.4x the budget).
    assert large["peak_delta"] < 0.25 * SOURCE_BYTES_LARGE, numbers
    assert large["peak_delta"] < 2 * GROUP_BYTES + large["result_bytes"], numbers


def test_the_probe_sees_a_merge_that_holds_every_source_at_once(models):
    # With a budget for the whole model there is one group: every layer of every source is copied
    # into memory together, as a merge that materialized all sources up front would do. The probe
    # must see it, or the test above proves nothing. (Merely opening every tensor would not count:
    # safetensors hands out tensors backed by the file mapping, which is file-backed memory.)
    whole = _probe(models[LAYERS_LARGE], 1 << 40)
    assert whole["groups"] == 1
    numbers = f"one group of 48 layers: +{whole['peak_delta'] / 2**20:.1f} MiB, sources {SOURCE_BYTES_LARGE / 2**20:.0f} MiB"
    assert whole["peak_delta"] > 0.9 * SOURCE_BYTES_LARGE, numbers
