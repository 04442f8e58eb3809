"""LoRA merges from a `--config` file: adapter directories as sources, and the LoRA output's keys
(`format: lora`, `for: vllm`, `drop_full_modules`, `rank`) run exactly the merge the API and the
flags run; bad values refused by the schema, naming the file and the key, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import svdfuse
from svdfuse.cli import main
from svdfuse.config import ConfigError, load_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _adapters import _adapter  # noqa: E402


@pytest.fixture(scope="module")
def adapters(minilm_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("config-adapters")
    return [
        _adapter(minilm_dir, root / "plain", 0, r=4, lora_alpha=8, target_modules=["query", "value"]),
        _adapter(minilm_dir, root / "rslora", 1, r=4, lora_alpha=4, use_rslora=True, target_modules=["query", "key"]),
        _adapter(minilm_dir, root / "saved", 2, r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["pooler.dense"]),
    ]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def test_keys_become_the_merge_arguments(tmp_path):
    path = _write(tmp_path, "base: b\nsources: [a]\nmethod: task_arithmetic\nformat: lora\nfor: vllm\ndrop_full_modules: true\nrank: 8\n")
    kwargs = load_config(path).kwargs
    assert (kwargs["save_format"], kwargs["serve"], kwargs["drop_full_modules"], kwargs["k"]) == ("lora", "vllm", True, 8)
    kwargs = load_config(_write(tmp_path, "base: b\nsources: [a]\nk: 3\n")).kwargs
    assert (kwargs["save_format"], kwargs["serve"], kwargs["drop_full_modules"], kwargs["k"]) == ("auto", None, False, 3)
    assert load_config(_write(tmp_path, "base: b\nsources: [a]\nrank: 0.5\nformat: model\n")).kwargs["k"] == 0.5


def _same_adapter(ours: Path, theirs: Path) -> None:
    a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(theirs / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert json.loads((ours / "adapter_config.json").read_text()) == json.loads((theirs / "adapter_config.json").read_text())


def test_adapters_in_a_lora_out_as_the_api_merges_them(minilm_dir, adapters, tmp_path):
    path = _write(tmp_path, (
        f"base: {minilm_dir}\nsources: [{adapters[0]}, {{model: {adapters[1]}, name: second}}]\nmethod: axis\nk: 6\n"
        f"svd: {{method: exact}}\nformat: lora\noutput: {tmp_path / 'from-config'}\n"
    ))  # fmt: skip
    svdfuse.merge_config(path, device="cpu", progress=False)
    svdfuse.merge({str(adapters[0]): adapters[0], "second": adapters[1]}, 6, base=minilm_dir, svd="exact", device="cpu",
                  save_format="lora", output=tmp_path / "from-api", progress=False)  # fmt: skip
    _same_adapter(tmp_path / "from-config", tmp_path / "from-api")
    assert json.loads((tmp_path / "from-config" / "adapter_config.json").read_text())["r"] == 6


def test_task_arithmetic_for_vllm_at_a_rank(minilm_dir, adapters, tmp_path):
    path = _write(tmp_path, (
        f"base: {minilm_dir}\nsources: [{adapters[0]}, {adapters[1]}]\nmethod: task_arithmetic\nparameters: {{scaling: 1.0}}\n"
        f"rank: 5\nformat: lora\nfor: vllm\noutput: {tmp_path / 'from-config'}\n"
    ))  # fmt: skip
    assert main(["merge", "--config", str(path), "--device", "cpu", "--quiet"]) == 0
    svdfuse.merge([adapters[0], adapters[1]], 5, base=minilm_dir, method="task_arithmetic", scaling=1.0, device="cpu",
                  save_format="lora", serve="vllm", output=tmp_path / "from-api", progress=False)  # fmt: skip
    _same_adapter(tmp_path / "from-config", tmp_path / "from-api")
    assert json.loads((tmp_path / "from-config" / "adapter_config.json").read_text())["r"] == 8  # 5, padded to vLLM's next rank


def test_drop_full_modules(minilm_dir, adapters, tmp_path, capsys):
    text = f"base: {minilm_dir}\nsources: [{adapters[2]}]\nmethod: task_arithmetic\nformat: lora\nfor: vllm\noutput: {tmp_path / 'out'}\n"
    assert main(["merge", "--config", str(_write(tmp_path, text)), "--device", "cpu", "--quiet"]) == 2
    assert "pooler.dense" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="pooler.dense"):
        svdfuse.merge_config(_write(tmp_path, text + "drop_full_modules: true\n"), device="cpu", progress=False)
    assert not any("pooler" in k for k in load_file(str(tmp_path / "out" / "adapter_model.safetensors")))


@pytest.mark.parametrize(
    "extra, message",
    [
        ("format: safetensors", "format: Input should be 'model' or 'lora', found 'safetensors'"),
        ("for: sglang\nformat: lora", "for: Input should be 'vllm', found 'sglang'"),
        ("for: vllm", "for: shapes a LoRA output; add format: lora"),
        ("drop_full_modules: true\nformat: lora", "drop_full_modules: is for `for: vllm`; a plain adapter keeps whole modules in modules_to_save"),
        ("drop_full_modules: 'yes'", "drop_full_modules: Input should be a valid boolean, found 'yes'"),
        ("rank: true", "rank: expected an int (components) or a float fraction of min(m, n), found bool True"),
        ("rank: 4\nk: 4", "give k or rank (its other name, as the CLI's -k/--rank), not both"),
        ("format: lora\noutput: out.safetensors", "output: format: lora writes a new adapter directory, found 'out.safetensors'"),
    ],
    ids=["format", "for-value", "for-without-lora", "drop-without-for", "drop-type", "rank-type", "rank-and-k", "lora-to-a-file"],
)
def test_bad_lora_keys_refused_naming_file_and_key(tmp_path, capsys, extra, message):
    path = _write(tmp_path, f"base: b\nsources: [a]\nmethod: task_arithmetic\n{extra}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"svdfuse merge: error: {path}: {message}\n" and not (tmp_path / "out").exists()


def test_axis_needs_k_or_rank(tmp_path):
    with pytest.raises(ConfigError, match="method 'axis' needs k"):
        load_config(_write(tmp_path, "base: b\nsources: [a]\n"))
    assert load_config(_write(tmp_path, "base: b\nsources: [a]\nrank: 4\n")).kwargs["k"] == 4
