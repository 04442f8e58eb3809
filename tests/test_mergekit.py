"""svdfuse runs mergekit 0.1.5 configs with mergekit's results: both tools on the same tiny Llama
saved by transformers (mergekit reads HF directories). Skipped where mergekit is not installed
(it is in the `test` extra; it keeps the installed torch)."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

import svdfuse

from _helpers import mergekit_ties, tiny_llama_dirs

mergekit = pytest.importorskip("mergekit", reason="mergekit 0.1.5 is in the test extra")
pytestmark = pytest.mark.slow


def run_mergekit(text: str, out) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(allow_crimes=True, copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options=options)
    return load_file(out / "model.safetensors")


def config(method: str, base, sources, weights, density=None, extra: str = "") -> str:
    models = "".join(
        f"  - model: {s}\n    parameters: {{weight: {w}{'' if density is None else f', density: {density}'}}}\n" for s, w in zip(sources, weights)
    )
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}dtype: float32\n{extra}"


def differing(ours: dict, theirs: dict) -> int:
    assert ours.keys() == theirs.keys()
    return sum(int((ours[k] != theirs[k]).sum()) for k in theirs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_dirs(tmp_path_factory.mktemp("llama"), 3)


@pytest.mark.parametrize("method, density", [("task_arithmetic", None), ("ties", 0.2), ("dare_linear", 1.0)])
def test_svdfuse_runs_mergekit_configs_bit_identically(llama, tmp_path, method, density):
    base, sources = llama
    text = config(method, base, sources, [0.7, 0.5, 1.3], density, "parameters:\n  lambda: 0.9\n")
    (tmp_path / "merge.yml").write_text(text)
    theirs = run_mergekit(text, tmp_path / "mergekit")
    ours = svdfuse.merge_config(tmp_path / "merge.yml", device="cpu").state_dict()
    assert differing(ours, theirs) == 0


def test_mergekit_linear_within_rounding(llama, tmp_path):
    base, sources = llama
    text = config("linear", base, sources, [0.7, 0.5, 1.3], None, "parameters:\n  weight: 0.25\n")
    (tmp_path / "merge.yml").write_text(text)
    theirs = run_mergekit(text, tmp_path / "mergekit")
    ours = svdfuse.merge_config(tmp_path / "merge.yml", device="cpu").state_dict()
    inputs = [load_file(p / "model.safetensors") for p in (base, *sources)]
    eps = torch.finfo(torch.float32).eps
    for key, value in theirs.items():
        scale = torch.stack([m[key].abs() for m in inputs]).amax(0)
        # each tool rounds T + 2 times (products, sums, one division) values bounded by the largest input
        assert bool(((ours[key] - value).abs() <= 2 * (len(inputs) + 2) * eps * scale).all()), key


def test_ties_differs_from_mergekit_only_in_which_tied_magnitudes_it_keeps(tmp_path):
    """On the bf16 grid many |τ| tie at the trimming threshold: mergekit keeps whichever entries
    torch.argsort puts first, svdfuse the first in row-major order. Keeping those rules, each
    tool is mergekit's TIES formula exactly."""
    base, sources = tiny_llama_dirs(tmp_path / "grid", 3, grid=True)
    text = config("ties", base, sources, [1.0, 1.0, 1.0], 0.2)
    (tmp_path / "merge.yml").write_text(text)
    theirs = run_mergekit(text, tmp_path / "mergekit")
    ours = svdfuse.merge_config(tmp_path / "merge.yml", device="cpu").state_dict()
    assert differing(ours, theirs) > 0  # the grid makes threshold ties common
    W0 = load_file(base / "model.safetensors")
    W = [load_file(p / "model.safetensors") for p in sources]

    assert differing(mergekit_ties(W0, W, 0.2, lambda a: torch.argsort(a, descending=True)), theirs) == 0
    assert differing(mergekit_ties(W0, W, 0.2, lambda a: torch.sort(a, descending=True, stable=True).indices), ours) == 0
