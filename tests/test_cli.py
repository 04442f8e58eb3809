"""The `svdfuse` command line and the package's import surface."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse.cli import main


@pytest.fixture
def model_files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(20, 12, generator=gen), "layer.bias": torch.randn(20, generator=gen)}
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i in range(3):
        src = {key: value + 0.1 * torch.randn(value.shape, generator=gen) for key, value in base.items()}
        save_file(src, tmp_path / f"ft{i}.safetensors")
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
    return tmp_path, paths


def test_cli_merge_writes_the_same_model_as_the_api(model_files, capsys):
    tmp_path, sources = model_files
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "-k", "4", "-o", str(out), "--quiet", *sources]) == 0
    printed = capsys.readouterr().out
    assert "ft1.safetensors" in printed and "1 matrices merged" in printed and f"wrote {out}" in printed
    expected = svdfuse.merge(sources, k=4, base=tmp_path / "base.safetensors").state_dict()
    written = load_file(out)
    assert written.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], atol=0, rtol=0)


def test_cli_merge_reports_errors_without_traceback_or_output(model_files, capsys):
    tmp_path, sources = model_files
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "-k", "13", "-o", str(out), "--quiet", *sources]) == 2
    err = capsys.readouterr().err
    assert "k=13 is larger than min(m, n)" in err and "'layer.weight' 20x12" in err
    assert not out.exists()
    out.write_text("keep me")
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "-k", "2", "-o", str(out), *sources]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"


def test_cli_merge_runs_any_method_with_its_parameters(model_files, capsys):
    tmp_path, sources = model_files
    out = tmp_path / "ties.safetensors"
    args = ["merge", "--base", str(tmp_path / "base.safetensors"), "--method", "ties", "--density", "0.5", "--scaling", "0.8"]
    assert main([*args, "-o", str(out), "--quiet", *sources]) == 0
    assert "merged by ties" in capsys.readouterr().out
    expected = svdfuse.merge(sources, base=tmp_path / "base.safetensors", method="ties", density=0.5, scaling=0.8).state_dict()
    torch.testing.assert_close(load_file(out)["layer.weight"], expected["layer.weight"], atol=0, rtol=0)
    wrong = ["merge", "--base", str(tmp_path / "base.safetensors"), "--method", "ties", "--drop-rate", "0.5"]
    assert main([*wrong, "-o", str(tmp_path / "x.safetensors"), *sources]) == 2
    assert "method 'ties' does not take --drop-rate" in capsys.readouterr().err
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "-o", str(tmp_path / "y.safetensors"), *sources]) == 2
    assert "method 'axis' needs k" in capsys.readouterr().err


def test_cli_rejects_a_malformed_k_in_one_line(model_files, capsys):
    tmp_path, sources = model_files
    with pytest.raises(SystemExit) as exit:
        main(["merge", "--base", str(tmp_path / "base.safetensors"), "-k", "ten", "-o", "x.safetensors", *sources])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "svdfuse merge: error: argument -k/--rank: expected an int (components) or a float fraction, found 'ten' (see svdfuse merge --help)\n"


def _one_line_refusal(argv, capsys, *expected):
    """`svdfuse argv` exits 2 with one line on stderr holding each of `expected`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(e in err for e in expected), err
    return err


@pytest.mark.parametrize("size", ["1e400", "1e400GB", "inf", "nan", "-5", "0"])
def test_sizes_that_are_not_a_finite_number_of_bytes_are_one_line_errors(size, model_files, capsys, no_work):
    tmp_path, sources = model_files
    base, out = str(tmp_path / "base.safetensors"), tmp_path / "out.safetensors"
    _one_line_refusal(["merge", "--base", base, "-k", "2", "-o", str(out), f"--max-memory={size}", *sources], capsys, "--max-memory must be", repr(size))
    _one_line_refusal(["merge", "--base", base, "-k", "2", "-o", str(tmp_path / "dir"), f"--shard-size={size}", *sources], capsys, "--shard-size must be")
    _one_line_refusal(["decompose", sources[0], "--base", base, "-r", "2", "-o", str(out), f"--max-memory={size}"], capsys, "--max-memory must be")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "ft0.safetensors", "ft1.safetensors", "ft2.safetensors"]


def test_hostile_config_files_are_one_line_errors(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefghi", "bcdefghij")))
    deep = tmp_path / "deep.yaml"
    deep.write_text("k: " + "[" * 10_000 + "]" * 10_000)
    for path, expected in (("/dev/zero", "a regular YAML text file"), (str(bomb), "expand to more than 100000 values"), (str(deep), "nested more than")):
        _one_line_refusal(["merge", "--config", path, "-o", str(tmp_path / "out")], capsys, f"svdfuse merge: error: {path}: ", expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [(["-k", "0"], "k must be positive, found 0"), (["-n", "0"], "n must be positive, found 0"),
     (["-k", "4", "-n", "8"], "n=8 trains 8 singular values of layer 1 (256x64), but k=4 keeps 4; give n <= k"),
     (["-k", "100"], "k=100 keeps 100 components of layer 1 (256x64), which has 64"), (["-k", "0.1", "-n", "0.2"], "give n <= k")],
)
def test_demo_refuses_k_and_n_before_any_training(flags, message, capsys, monkeypatch):
    import svdfuse.demo

    monkeypatch.setattr(svdfuse.demo, "_train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
    _one_line_refusal(["demo", *flags, "--device", "cpu"], capsys, "svdfuse demo: error: ", message)


def test_demo_runs_end_to_end_and_stage2_helps(capsys):
    assert main(["demo", "--epochs", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for stage in ("build sources", "merge (AXIS)", "adapt (Stage 2)", "serve (low-rank vs dense)"):
        assert stage in printed
    accuracy = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1]) for line in printed.splitlines() if line.startswith("  AXIS")}
    assert accuracy["AXIS + Stage 2"] > accuracy["AXIS merge"]


def test_import_stays_lean():
    # Heavy optional dependencies load only when a feature needs them.
    code = "import sys, svdfuse; print(sorted(m for m in ('triton', 'transformers', 'open_clip', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_functions_are_not_shadowed_by_their_modules():
    # `import svdfuse.merge` used to load a module whose name the function then hid; every public
    # function now lives in a module of another name, so imports say what they give.
    import importlib

    for name in ("merge", "adapt", "atlas", "decompose"):
        assert callable(getattr(svdfuse, name))
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"svdfuse.{name}")


def test_study_sources_flag_picks_the_lora_track(tmp_path, monkeypatch):
    import svdfuse.study

    seen = []
    monkeypatch.setattr(svdfuse.study, "run_study", lambda config, out, log: seen.append((config, out)))
    assert main(["study", "--quick", "--sources", "lora", "--cache", str(tmp_path), "-o", str(tmp_path / "out")]) == 0
    assert main(["study", "--quick", "--cache", str(tmp_path), "-o", str(tmp_path / "out")]) == 0
    assert [config.sources for config, _ in seen] == ["lora", "finetune"]
    assert seen[0][0].modalities == ("vision",) and seen[0][1] == tmp_path / "out"
