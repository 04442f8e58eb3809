"""svdfuse.compress: a shared basis per matrix and a core per adapter, against float64 truth formed
densely here (ΔWᵢ = s·Bᵢ·Aᵢ from the adapter files, Uᵀ ΔWᵢ V, ‖ΔWᵢ − U Σᵢ Vᵀ‖), and the refusals.

Adapters: peft LoRAs of a small two-block Linear model with random (non-zero) B, written by peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import svdfuse
from svdfuse.bundle import read_bundle
from svdfuse.compress import compress_matrix
from svdfuse.sources import SourceError

from _adapters import peft_deltas

peft = pytest.importorskip("peft")

EPS32 = torch.finfo(torch.float32).eps


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(24, 20), "up": nn.Linear(20, 24)}) for _ in range(2)])
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["up"](torch.tanh(block["q"](x)))
        return self.head(x)


def make_base(root: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    net = Net().eval()
    path = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def make_adapter(base: nn.Module, out: Path, seed: int, r: int = 3, **config) -> Path:
    import copy

    torch.manual_seed(seed)
    config = {"target_modules": ["q", "up"], "lora_alpha": 2 * r, "init_lora_weights": False, **config}
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, **config))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    base, path = make_base(root)
    adapters = [make_adapter(base, root / f"a{i}", seed=i + 1, r=2 + i % 3, use_rslora=i == 3) for i in range(5)]
    return base, path, adapters


@pytest.mark.parametrize("core", ["diagonal", "full"])
@pytest.mark.parametrize("basis", ["stack", "axis"])
def test_cores_and_errors_equal_float64_truth(setup, tmp_path, core, basis):
    base, path, adapters = setup
    report = svdfuse.compress(adapters, k=6, base=path, output=tmp_path / "b.safetensors", core=core, basis=basis)
    bundle = read_bundle(tmp_path / "b.safetensors")
    assert bundle.adapters == [a.name for a in adapters] == report.adapters
    for j, key in enumerate(report.keys):
        U, V = bundle.U[key].double(), bundle.V[key].double()
        assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(V.T @ V, torch.eye(6, dtype=torch.float64), atol=1e-6)
        for i, adapter in enumerate(adapters):
            dW = peft_deltas(adapter)[key]
            full = U.T @ dW @ V
            want = full.diagonal() if core == "diagonal" else full
            got = bundle.cores[key][i].double()
            assert (got - want).abs().max() <= 8 * EPS32 * want.abs().max(), f"{key} adapter {i}: core differs"
            rebuilt = (U * got) @ V.T if core == "diagonal" else U @ got @ V.T
            truth = (torch.linalg.norm(dW - rebuilt) / torch.linalg.norm(dW)).item()
            assert abs(bundle.errors[key][i].item() - truth) <= 1e-6 * max(truth, 1e-3)
            assert report.errors[i, j].item() == bundle.errors[key][i].item()
    assert "mean relative error" in report.table()


def test_stack_basis_keeps_the_most_energy(setup):
    """U of the stack basis spans the top-K eigenvectors of Σᵢ ΔWᵢ ΔWᵢᵀ: no orthonormal K columns
    keep more of Σᵢ ‖Uᵀ ΔWᵢ‖², and the updates' sum would be another (worse) basis."""
    _, _, adapters = setup
    key = "blocks.0.q.weight"
    dW = [peft_deltas(a)[key] for a in adapters]
    dW[1] = -dW[0]  # an update and its opposite: their sum cancels, their basis must not
    U, V, _, _ = compress_matrix([(d, torch.eye(d.shape[1], dtype=torch.float64)) for d in dW], 4)
    gram = sum(d @ d.T for d in dW)
    top = torch.linalg.eigh(gram).eigenvectors[:, -4:]
    projector = lambda Q: Q @ Q.T  # noqa: E731
    assert (projector(U.double()) - projector(top)).abs().max() < 1e-5


def test_axis_basis_spans_the_global_top_components(setup):
    _, _, adapters = setup
    key = "blocks.1.up.weight"
    dW = [peft_deltas(a)[key] for a in adapters]
    svds = [torch.linalg.svd(d, full_matrices=False) for d in dW]
    picks = sorted(((s.item(), i, j) for i, (_, S, _) in enumerate(svds) for j, s in enumerate(S[:6])), reverse=True)[:5]
    want = torch.linalg.qr(torch.stack([svds[i][0][:, j] for _, i, j in picks], 1))[0]
    U, _, _, _ = compress_matrix([(d, torch.eye(d.shape[1], dtype=torch.float64)) for d in dW], 5, basis="axis")
    assert (U.double() @ U.double().T - want @ want.T).abs().max() < 1e-5


def test_k_at_the_whole_span_is_exact(setup, tmp_path):
    base, path, adapters = setup
    two = adapters[:2]  # ranks 2 and 3 at every matrix: K = 5 spans both
    report = svdfuse.compress(two, k=5, base=path, output=tmp_path / "b.safetensors", core="full")
    assert report.errors.max().item() < 1e-5
    diag = svdfuse.compress(two, k=5, base=path, output=tmp_path / "d.safetensors", core="diagonal")
    assert diag.errors.min().item() > 1e-3  # one basis, two updates: no diagonal holds both


def test_full_fine_tunes_and_a_directory_bundle(setup, tmp_path):
    base, path, adapters = setup
    ft = {k: v.clone() for k, v in base.state_dict().items()}
    ft["blocks.0.q.weight"] += 0.01 * torch.randn(20, 24, generator=torch.Generator().manual_seed(3))
    report = svdfuse.compress({"lora": adapters[0], "full": ft}, k=2, base=path, output=tmp_path / "bundle", core="full")  # k <= 2: adapter 0 alone spans blocks.0.up
    bundle = read_bundle(tmp_path / "bundle")
    assert bundle.adapters == ["lora", "full"] and report.keys == list(bundle.shapes)
    assert report.touched[1].tolist() == [key == "blocks.0.q.weight" for key in report.keys]
    U, V = bundle.U["blocks.0.q.weight"].double(), bundle.V["blocks.0.q.weight"].double()
    dW = ft["blocks.0.q.weight"].double() - base.state_dict()["blocks.0.q.weight"].double()
    truth = (U.T @ dW @ V)
    assert (bundle.cores["blocks.0.q.weight"][1].double() - truth).abs().max() <= 8 * EPS32 * truth.abs().max()
    assert bundle.cores["blocks.1.q.weight"][1].abs().max() == 0  # the fine-tune left it alone


def _edit_config(adapter: Path, to: Path, **fields) -> Path:
    import shutil

    shutil.copytree(adapter, to)
    config = json.loads((to / "adapter_config.json").read_text())
    config.update(fields)
    (to / "adapter_config.json").write_text(json.dumps(config))
    return to


@pytest.mark.parametrize(
    "case, expected",
    [
        ("k_too_big", r"k=99 is more than the adapters span at 'blocks.0.q.weight'"),
        ("other_base", r"is an adapter of 'org/other-model'.*a bundle holds adapters of one base"),
        ("modules_to_save", r"replaces 'head.(weight|bias)' whole"),
        ("same_name", r"adapter 1's name 'a0' is also adapter 0's"),
        ("bad_core", r"core must be one of"),
        ("budget", r"needs about .* MiB .* max_memory"),
        ("changed_norm", r"changes 'blocks.0.q.bias' .* no weight matrix"),
    ],
)
def test_refused_with_nothing_written(setup, tmp_path, case, expected):
    base, path, adapters = setup
    kwargs, sources = {"k": 4}, list(adapters[:2])
    if case == "k_too_big":
        kwargs["k"] = 99
    elif case == "other_base":
        sources = [_edit_config(adapters[0], tmp_path / "x0", base_model_name_or_path="org/base-model"),
                   _edit_config(adapters[1], tmp_path / "x1", base_model_name_or_path="org/other-model")]
    elif case == "modules_to_save":
        sources.append(make_adapter(base, tmp_path / "mts", 9, modules_to_save=["head"]))
    elif case == "same_name":
        sources = [adapters[0], _edit_config(adapters[1], tmp_path / "other" / "a0")]
    elif case == "bad_core":
        kwargs["core"] = "tucker"
    elif case == "budget":
        kwargs["max_memory"] = 1000
    elif case == "changed_norm":
        ft = {k: v.clone() for k, v in base.state_dict().items()}
        ft["blocks.0.q.bias"] += 1.0
        sources.append(ft)
    out = tmp_path / "out" / "bundle.safetensors"
    with pytest.raises((ValueError, SourceError), match=expected):
        svdfuse.compress(sources, base=path, output=out, **kwargs)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_compress(setup, tmp_path, capsys):
    from svdfuse.cli import main

    _, path, adapters = setup
    out = tmp_path / "b.safetensors"
    assert main(["compress", *map(str, adapters), "--base", str(path), "-k", "4", "-o", str(out), "--core", "full"]) == 0
    assert read_bundle(out).core == "full" and "mean relative error" in capsys.readouterr().out
    assert main(["compress", *map(str, adapters), "--base", str(path), "-k", "500", "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "k=500 is more than" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


def test_a_failure_midway_leaves_nothing(setup, tmp_path, monkeypatch):
    import sys

    module = sys.modules["svdfuse.compress"]  # the package's `compress` attribute is the function
    _, path, adapters = setup
    real, calls = module.compress_matrix, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "compress_matrix", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        svdfuse.compress(adapters, k=4, base=path, output=tmp_path / "out" / "b.safetensors")
    assert not (tmp_path / "out").exists()  # nor the folder made for the output
