"""YAML merge configs: svdfuse's own keys and mergekit 0.1.5's, checked against mergekit's
documented formulas (merge_methods/generalized_task_arithmetic.py, sparsify.py, linear.py),
written out here independently of svdfuse's methods."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdfuse
from svdfuse.cli import main
from svdfuse.config import ConfigError, load_config

EPS = torch.finfo(torch.float32).eps


@pytest.fixture
def models(tmp_path):
    """A base directory and three fine-tuned directories (fp32), HF layout."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(24, 16, generator=gen),
        "a.bias": torch.randn(24, generator=gen),
        "b.weight": torch.randn(8, 24, generator=gen),
        "step": torch.tensor([3]),
    }
    paths = []
    for name in ("base", "ft0", "ft1", "ft2"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
        (d / "README.md").write_text("the base's own card\n")
        tensors = base if name == "base" else {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()}
        save_file(tensors, d / "model.safetensors")
        paths.append(str(d))
    return tmp_path, paths[0], paths[1:]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _load(paths):
    return [load_file(f"{p}/model.safetensors") for p in paths]


# -- mergekit's formulas, as documented -------------------------------------------------------


def mergekit_magnitude(t, density):
    """sparsify.magnitude: keep the top max(1, int(density * numel)) by |t| (argsort order)."""
    if density >= 1:
        return t
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.argsort(t.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return t * mask.reshape(t.shape)


def mergekit_gta(base, sources, weights, lam, density=None, consensus=False, normalize=False):
    """GeneralizedTaskArithmeticMerge.merge_group for one tensor."""
    deltas = torch.stack([mergekit_magnitude(s - base, density) if density is not None else s - base for s in sources])
    w = torch.tensor(weights, dtype=deltas.dtype).reshape((-1,) + (1,) * base.dim())
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(0) >= 0).to(deltas.dtype) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def _mergekit_yaml(method, base, sources, weights, density=None, extra=""):
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for s, w in zip(sources, weights):
        params = f"weight: {w}" + (f", density: {density}" if density is not None else "")
        lines.append(f"  - model: {s}\n    parameters: {{{params}}}")
    return "\n".join(lines) + "\ndtype: float32\n" + extra


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_mergekit_task_arithmetic_and_ties_configs_follow_mergekits_formula_bit_for_bit(models, method):
    tmp_path, base, sources = models
    weights = [0.7, 0.5, 1.3]
    density = 0.3 if method == "ties" else None
    path = _write(tmp_path, "mk.yml", _mergekit_yaml(method, base, sources, weights, density, "parameters:\n  lambda: 0.9\n"))
    merged = svdfuse.merge_config(path, device="cpu").state_dict()
    b, srcs = _load([base])[0], _load(sources)
    for key, w0 in b.items():
        if not w0.is_floating_point():
            assert torch.equal(merged[key], w0)
            continue
        expected = mergekit_gta(w0, [s[key] for s in srcs], weights, 0.9, density, consensus=method == "ties", normalize=method == "ties")
        torch.testing.assert_close(merged[key], expected, atol=0, rtol=0, msg=key)


def test_ties_zero_sign_positive_is_mergekits_election_where_the_trimmed_values_cancel(tmp_path):
    base = {"w.weight": torch.zeros(4, 4)}
    t0 = torch.zeros(4, 4)
    t0[0, 0], t0[1, 1] = 2.0, 1.0
    t1 = torch.zeros(4, 4)
    t1[0, 0], t1[1, 1] = -2.0, 0.5  # entry (0, 0) sums to exactly 0
    save_file(base, tmp_path / "base.safetensors")
    for i, t in enumerate((t0, t1)):
        save_file({"w.weight": t}, tmp_path / f"ft{i}.safetensors")
    srcs = [str(tmp_path / f"ft{i}.safetensors") for i in range(2)]
    common = dict(base=tmp_path / "base.safetensors", method="ties", density=0.25, weights=[1.0, 1.0], device="cpu")
    positive = svdfuse.merge(srcs, zero_sign="positive", **common).state_dict()["w.weight"]
    expected = mergekit_gta(base["w.weight"], [t0, t1], [1.0, 1.0], 1.0, 0.25, consensus=True, normalize=True)
    torch.testing.assert_close(positive, expected, atol=0, rtol=0)
    assert positive[0, 0] == 2.0  # mergekit elects + and averages the positive value
    assert svdfuse.merge(srcs, **common).state_dict()["w.weight"][0, 0] == 0.0  # svdfuse's default: no sign, the base
    config = _write(tmp_path, "mk.yml", _mergekit_yaml("ties", tmp_path / "base.safetensors", srcs, [1.0, 1.0], 0.25))
    torch.testing.assert_close(svdfuse.merge_config(config, device="cpu").state_dict()["w.weight"], expected, atol=0, rtol=0)


def test_mergekit_linear_config_is_the_weighted_mean_of_the_models_and_base_within_rounding(models):
    tmp_path, base, sources = models
    weights = [0.7, 0.5, 1.3]
    srcs, b = _load(sources), _load([base])[0]
    # base_model is one more input, weighted by parameters.weight, as in mergekit
    path = _write(tmp_path, "lin.yml", _mergekit_yaml("linear", base, sources, weights, extra="parameters:\n  weight: 0.25\n"))
    merged = svdfuse.merge_config(path, device="cpu").state_dict()
    inputs = [(0.25, b)] + list(zip(weights, srcs))
    for key in ("a.weight", "a.bias", "b.weight"):
        expected = sum(w * m[key].double() for w, m in inputs) / sum(w for w, _ in inputs)
        scale = torch.stack([m[key].abs() for _, m in inputs]).amax(0)
        # T + 2 roundings of values bounded by the largest input, in each tool
        assert bool(((merged[key].double() - expected).abs() <= (len(inputs) + 2) * EPS * scale).all()), key
    no_base = _write(tmp_path, "lin2.yml", _mergekit_yaml("linear", base, sources, weights).replace(f"base_model: {base}\n", ""))
    merged = svdfuse.merge_config(no_base, device="cpu").state_dict()
    expected = sum(w * m["a.weight"].double() for w, m in zip(weights, srcs)) / sum(weights)
    assert float((merged["a.weight"].double() - expected).abs().max()) <= 5 * EPS * float(srcs[0]["a.weight"].abs().max() * 2)


def test_mergekit_dare_linear_config_keeps_density_and_says_how_its_rescale_differs(models):
    tmp_path, base, sources = models
    weights = [1.0, 0.5, 2.0]
    full = _write(tmp_path, "d1.yml", _mergekit_yaml("dare_linear", base, sources, weights, 1.0))
    merged = svdfuse.merge_config(full, device="cpu").state_dict()  # density 1: nothing dropped, deterministic
    b, srcs = _load([base])[0], _load(sources)
    expected = mergekit_gta(b["a.weight"], [s["a.weight"] for s in srcs], weights, 1.0)
    torch.testing.assert_close(merged["a.weight"], expected, atol=0, rtol=0)
    half = _write(tmp_path, "d2.yml", _mergekit_yaml("dare_linear", base, sources, [1.0, 1.0, 1.0], 0.5))
    with pytest.warns(UserWarning, match="rescales the survivors by 1/density"):
        request = load_config(half)
    assert request.kwargs["method"] == "dare" and request.kwargs["drop_rate"] == 0.5 and request.kwargs["rescale"] is True


def test_native_config_runs_the_same_merge_as_the_arguments_and_writes_a_card(models):
    tmp_path, base, sources = models
    text = f"""
base: {base}
sources:
  - {sources[0]}
  - {{model: {sources[1]}, name: second, weight: 0.5}}
  - {{model: {sources[2]}, weight: 2.0}}
method: ties
parameters: {{density: 0.4, scaling: 0.8}}
k: 3
include: ["a.*"]
svd: {{method: exact}}
output: {tmp_path / "out"}
"""
    path = _write(tmp_path, "merge.yaml", text)
    report = svdfuse.merge_config(path, device="cpu")
    expected = svdfuse.merge(
        {sources[0]: sources[0], "second": sources[1], sources[2]: sources[2]}, k=3, base=base, method="ties", density=0.4,
        scaling=0.8, weights=[1.0, 0.5, 2.0], include=["a.*"], svd=svdfuse.SVDOptions(method="exact"), device="cpu",
        output=tmp_path / "expected",
    )
    expected, written = load_file(tmp_path / "expected" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], atol=0, rtol=0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "'second'" in report.sources[1] and "second" in card and "density: 0.4" in card and "method: ties" in card


def test_cli_merge_config_equals_the_api_and_refuses_other_merge_flags(models, capsys):
    tmp_path, base, sources = models
    path = _write(tmp_path, "mk.yml", _mergekit_yaml("ties", base, sources, [1, 1, 1], 0.5))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "cli"), "--quiet"]) == 0
    expected = svdfuse.merge_config(path, device="cpu").state_dict()
    written = load_file(tmp_path / "cli" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], atol=0, rtol=0)
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "x"), "--method", "axis"]) == 2
    assert "give --method there, not on the command line" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["merge", "--config", str(path)]) == 2
    assert "no output: give -o PATH" in capsys.readouterr().err


BAD_MERGEKIT = [
    ("slices: []\n", "(top level)|key 'slices' is not supported"),
    ("tokenizer_source: union\n", "key 'tokenizer_source' is not supported"),
    ("parameters:\n  normalize: false\n", "parameters.normalize: svdfuse runs ties with mergekit's default normalize: true only"),
    ("parameters:\n  rescale: true\n", "parameters.rescale: svdfuse runs ties with mergekit's default rescale: false only"),
    ("parameters:\n  gamma: 0.1\n", r"parameters\.gamma: unknown key"),
    ("out_dtype: bfloat16\n", "out_dtype: svdfuse writes in the merge's dtype"),
]


@pytest.mark.parametrize("extra, message", BAD_MERGEKIT)
def test_mergekit_configs_it_cannot_run_are_refused_naming_file_and_key(models, extra, message):
    tmp_path, base, sources = models
    path = _write(tmp_path, "bad.yml", _mergekit_yaml("ties", base, sources, [1, 1, 1], 0.5, extra))
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'bad.yml'}: .*({message})"):
        load_config(path)


def test_mergekit_methods_weights_and_densities_it_cannot_run_are_refused(models):
    tmp_path, base, sources = models
    cases = {
        "merge_method: slerp": "merge_method 'slerp' is not supported .*supported: task_arithmetic, ties, dare_linear, linear",
        "merge_method: dare_ties": "merge_method 'dare_ties' is not supported \\(svdfuse has no method that drops at random",
    }
    for head, message in cases.items():
        path = _write(tmp_path, "m.yml", _mergekit_yaml("ties", base, sources, [1, 1, 1]).replace("merge_method: ties", head))
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    missing = _write(tmp_path, "w.yml", _mergekit_yaml("task_arithmetic", base, sources, [1, 1, 1]).replace("weight: 1", "", 1).replace("{}", "{}"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight: task_arithmetic requires a weight for every model"):
        load_config(missing)
    gradient = _write(tmp_path, "g.yml", _mergekit_yaml("ties", base, sources, [1, 1, 1], 0.5).replace("density: 0.5", "density: [0.1, 0.5]", 1))
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters: density: per-layer gradients .* not supported"):
        load_config(gradient)
    uneven = _write(tmp_path, "u.yml", _mergekit_yaml("ties", base, sources, [1, 1, 1], 0.5).replace("density: 0.5", "density: 0.3", 1))
    with pytest.raises(ConfigError, match=r"svdfuse trims every source to one density, found \[0.3, 0.5\]"):
        load_config(uneven)


def test_native_config_errors_name_the_file_and_key_path(models):
    tmp_path, base, sources = models
    cases = {
        f"base: {base}\nsources: [{sources[0]}]\nmethod: axis\nk: 2\nkk: 3\n": r"kk: unknown key",
        f"base: {base}\nsources: [{{model: {sources[0]}, weight: x}}]\nmethod: ties\n": r"sources\[0\]\.SourceConfig\.weight|sources\[0\].*weight",
        f"base: {base}\nsources: [{sources[0]}]\nmethod: axe\n": r"method: Value error|method: unknown merge method 'axe'",
        f"base: {base}\nsources: [{sources[0]}]\nmethod: ties\nparameters: {{densty: 0.2}}\n": r"method 'ties' has no parameter 'densty'",
        f"base: {base}\nsources: [{{model: {sources[0]}, weight: 2}}]\nmethod: axis\nk: 2\n": r"sources\[0\]\.weight: method 'axis' takes no per-source weights",
        f"base: {base}\nsources: [{sources[0]}]\nmethod: axis\n": r"method 'axis' needs k",
        f"base: {base}\nsources: [{sources[0]}]\nsvd: {{precision: fp8}}\nk: 2\n": r"svd\.precision: Input should be",
        f"base: {base}\nsources: []\n": r"sources: List should have at least 1 item",
    }
    for text, message in cases.items():
        path = _write(tmp_path, "bad.yaml", text)
        with pytest.raises(ConfigError, match=f"{tmp_path / 'bad.yaml'}: .*({message})"):
            load_config(path)
    path = _write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys"):
        load_config(path)


def test_weights_stream_to_files_as_in_memory_and_bad_weights_fail_before_any_work(models):
    tmp_path, base, sources = models
    for method, params in (("task_arithmetic", {"scaling": 0.5}), ("ties", {"density": 0.5}), ("dare", {"drop_rate": 0.5}), ("average", {})):
        out = tmp_path / f"{method}.safetensors"
        # a budget of a few rows: the weighted merge runs in row blocks
        svdfuse.merge(sources, base=base, method=method, weights=[0.3, -1.0, 2.0], device="cpu", output=out, max_memory="16KiB", **params)
        memory = svdfuse.merge(sources, base=base, method=method, weights=[0.3, -1.0, 2.0], device="cpu", **params).state_dict()
        unweighted = svdfuse.merge(sources, base=base, method=method, device="cpu", **params).state_dict()
        written = load_file(out)
        for key in memory:
            torch.testing.assert_close(written[key], memory[key], atol=0, rtol=0)
        assert not torch.equal(memory["a.weight"], unweighted["a.weight"])
    with pytest.raises(ValueError, match="weights must give one number per source: 3 sources, found 2 weights"):
        svdfuse.merge(sources, base=base, method="ties", weights=[1.0, 2.0], output=tmp_path / "no.safetensors")
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite number, found nan"):
        svdfuse.merge(sources, base=base, method="task_arithmetic", weights=[1.0, float("nan"), 1.0])
    with pytest.raises(TypeError, match="method 'axis' has no parameter 'weights'"):
        svdfuse.merge(sources, k=2, base=base, weights=[1.0, 1.0, 1.0])
    assert not (tmp_path / "no.safetensors").exists()


def test_weighted_average_and_task_arithmetic_follow_their_formulas(models):
    tmp_path, base, sources = models
    b, srcs = _load([base])[0], _load(sources)
    w = [0.3, -1.0, 2.0]
    avg = svdfuse.merge(sources, base=base, method="average", weights=w, device="cpu").state_dict()["a.weight"]
    ta = svdfuse.merge(sources, base=base, method="task_arithmetic", weights=w, scaling=0.5, device="cpu").state_dict()["a.weight"]
    taus = [s["a.weight"].double() - b["a.weight"].double() for s in srcs]
    expected_avg = b["a.weight"].double() + sum(wi * t for wi, t in zip(w, taus)) / sum(w)
    expected_ta = b["a.weight"].double() + 0.5 * sum(wi * t for wi, t in zip(w, taus))
    scale = float(torch.stack([s["a.weight"].abs() for s in srcs]).max())
    torch.testing.assert_close(avg.double(), expected_avg, atol=8 * EPS * scale / abs(sum(w)) * 4, rtol=0)
    torch.testing.assert_close(ta.double(), expected_ta, atol=8 * EPS * scale * 4, rtol=0)


def test_cli_weights_flag(models, capsys):
    tmp_path, base, sources = models
    out = tmp_path / "w.safetensors"
    assert main(["merge", "--base", base, "--method", "task_arithmetic", "--weights", "1,0.5,2", "-o", str(out), "--quiet", *sources]) == 0
    expected = svdfuse.merge(sources, base=base, method="task_arithmetic", weights=[1, 0.5, 2], device="cpu").state_dict()
    torch.testing.assert_close(load_file(out)["a.weight"], expected["a.weight"], atol=0, rtol=0)
    with pytest.raises(SystemExit):
        main(["merge", "--base", base, "--method", "ties", "--weights", "1,x", "-o", str(out), *sources])
    assert "expected comma-separated numbers" in capsys.readouterr().err


# -- hostile files: refused naming the file, quickly, in bounded memory ---------------------------

BOMB = "\n".join(
    ["base: b", "sources: [s]", "method: ties", "parameters:", '  density: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
)  # 9**10 strings once expanded, in about 600 bytes


def test_billion_laughs_is_refused_quickly_in_bounded_memory(tmp_path):
    import time
    import tracemalloc

    path = _write(tmp_path, "bomb.yaml", BOMB)
    assert len(BOMB) < 700
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=rf"^{path}: line \d+: its aliases \(\*name\) expand to more than 100000 values") as err:
            load_config(path)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 2 and peak < 10 << 20 and len(str(err.value)) < 300


@pytest.mark.parametrize(
    "text, message",
    [
        ('a: &a "' + "x" * 1000 + '"\nb: [' + ", ".join(["*a"] * 1100) + "]\n", "more than 1048576 characters"),  # 1.1 MB of one string
        ("a: &a " + "[" * 30 + "1" + "]" * 30 + "\nb: [[[[[*a]]]]]\n", "32 levels deep"),  # each part nests less than 32 levels
        ("a: &a [1, *a]\n", "an alias refers to the value that holds it"),
    ],
    ids=["long-string", "deep-through-aliases", "recursive"],
)
def test_aliases_that_expand_past_the_bounds_are_refused(tmp_path, text, message):
    path = _write(tmp_path, "a.yaml", text)
    with pytest.raises(ConfigError, match=rf"^{path}: line \d+: .*{message}"):
        load_config(path)


def test_aliases_and_merge_keys_within_the_bounds_load(tmp_path):
    path = _write(tmp_path, "ok.yaml", "base: b\nsources:\n  - &ft {model: ft0, weight: 0.5}\n  - {<<: *ft, model: ft1}\n  - {<<: *ft, model: ft2, weight: 2}\nmethod: ties\n")
    assert load_config(path).kwargs["weights"] == [0.5, 0.5, 2.0]


def test_deep_nesting_and_too_many_values_are_one_line_errors(tmp_path):
    for depth in (33, 100_000):
        path = _write(tmp_path, "deep.yaml", "k: " + "[" * depth + "]" * depth + "\n")
        with pytest.raises(ConfigError, match=rf"^{path}: line 1: nested more than 32 levels deep"):
            load_config(path)
    path = _write(tmp_path, "many.yaml", "k: [" + "1, " * 100_000 + "]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 1: it holds more than 100000 values"):
        load_config(path)
    path = _write(tmp_path, "ok.yaml", "base: b\nsources: [s]\nk: 2\nexclude: " + "[" * 30 + "]" * 30 + "\n")  # 31 levels: read, then refused by type
    with pytest.raises(ConfigError, match=r"exclude\[0\]: Input should be a valid string"):
        load_config(path)


def test_a_key_given_twice_is_an_error_naming_the_key_and_both_lines(tmp_path):
    path = _write(tmp_path, "dup.yaml", "base: b\nsources: [s]\nk: 2\nk: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 4: key 'k' is given twice in one mapping \(first at line 3\)"):
        load_config(path)
    path = _write(tmp_path, "dup.yaml", "base: b\nsources:\n  - {model: a, weight: 1, weight: 0}\nmethod: ties\n")
    with pytest.raises(ConfigError, match="line 3: key 'weight' is given twice"):
        load_config(path)
    path = _write(tmp_path, "dup.yaml", "merge_method: ties\nbase_model: b\nmodels: []\nmodels: [{model: a}]\n")
    with pytest.raises(ConfigError, match="line 4: key 'models' is given twice"):
        load_config(path)


def _fifo(tmp_path):
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp_path: Path("/dev/zero"), "must be a regular YAML text file, found a device or special file"),
        (lambda tmp_path: tmp_path, "must be a regular YAML text file, found a directory"),
        (_fifo, "must be a regular YAML text file, found a FIFO"),
        (lambda tmp_path: _write(tmp_path, "big.yaml", "base: b\n#" + "x" * (1 << 20)), r"is at most 1048576 bytes \(1 MiB\)"),
        (lambda tmp_path: tmp_path / "bin.yaml", r"must be UTF-8 text, found a binary file \(NUL byte at offset 3\)"),
        (lambda tmp_path: tmp_path / "latin1.yaml", "must be UTF-8 text, found byte 0xe9 at offset 9"),
        (lambda tmp_path: tmp_path / "missing.yaml", "cannot be opened: No such file or directory"),
        (lambda tmp_path: tmp_path / ("x" * 300 + ".yaml"), "cannot be opened: File name too long"),
    ],
    ids=["dev-zero", "directory", "fifo", "too-large", "binary", "latin-1", "missing", "long-name"],
)
@pytest.mark.timeout(20)  # a FIFO opened for reading would wait for a writer forever
def test_a_config_that_is_not_a_regular_utf8_text_file_is_refused_naming_it(tmp_path, make, message):
    (tmp_path / "bin.yaml").write_bytes(b"k: \x00\x01\x02")
    (tmp_path / "latin1.yaml").write_bytes("base: caf\xe9".encode("latin-1"))
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: a configuration {message}"):
        load_config(path)


def test_a_config_path_with_a_nul_character_is_refused():
    with pytest.raises(ConfigError, match=re.escape("'a\\x00b.yaml': a configuration's path cannot hold a NUL character")):
        load_config("a\0b.yaml")


def test_values_in_messages_are_cut_short_and_many_problems_make_one_line(tmp_path):
    long = "x" * 100_000
    cases = {
        f"base: b\nsources: [s]\nmethod: {long}\n": "unknown merge method 'xxx",
        f"base: b\nsources: [s]\nk: 2\n? {long}\n: 1\n": r"xxxxx\.\.\.: unknown key",
        f"base: b\nsources: [s]\nmethod: ties\nparameters: {{density: {long}}}\n": "parameters.density: expected one number",
        f"base: b\nsources: [s]\nmethod: ties\nparameters:\n  ? {long}\n  : 1\n": "method 'ties' has no parameter 'xxx",
        f"base: b\nsources: [{long}]\nk: 2\n": r"sources\[0\]\.model: String should have at most 4096 characters",
        f"base: b\nsources: [s]\nk: 2\nmax_memory: {long}\n": "max_memory: expected a size such as 4GB",
        f"merge_method: {long}\nmodels: [{{model: a}}]\n": "merge_method 'xxx",
        "base: b\nsources: [" + ", ".join(["[1]"] * 10_000) + "]\nk: 2\n": r"sources\[2\]: expected a path .*; and 9997 more problems$",
    }
    for text, message in cases.items():
        path = _write(tmp_path, "long.yaml", text)
        with pytest.raises(ConfigError, match=message) as err:
            load_config(path)
        assert len(str(err.value)) - len(str(path)) < 400 and "\n" not in str(err.value), str(err.value)[:1000]


SWAPPED_TYPES = [
    ("k: true", r"k: expected an int \(components\) or a float fraction of min\(m, n\), found bool True"),
    ("k: '2'", "k: expected an int .* found str '2'"),
    ("k: 2\nallow_non_finite: 1", "allow_non_finite: Input should be a valid boolean, found 1"),
    ("k: 2\nsvd: {seed: true}", r"svd\.seed: Input should be a valid integer, found True"),
    ("k: 2\nmax_memory: 1e400", "max_memory: must be a finite size, found '1e400'"),
    ("k: 2\nshard_size: true", "shard_size: must be a size such as 4GB or 512MiB, found True"),
    ("k: 2\noutput: \"a\\0b\"", "output: a path cannot hold a NUL character"),
    ("method: ties\nparameters: {density: [0.1, 0.2]}", "parameters.density: expected one number, flag or choice, found list"),
    ("method: ties\nparameters: {density: true}", "parameters: ties: density must be float, found bool True"),
    ("method: ties\nparameters: {weights: [1, x]}", r"parameters.weights: expected a list of finite numbers, one per source, found \[1, 'x'\]"),
]


@pytest.mark.parametrize("extra, message", SWAPPED_TYPES)
def test_values_of_another_type_are_refused_as_the_api_refuses_them(tmp_path, extra, message):
    path = _write(tmp_path, "t.yaml", "base: b\nsources: [s]\n" + extra + "\n")
    with pytest.raises(ConfigError, match=f"^{path}: ({message})"):
        load_config(path)


def test_a_nan_weight_is_reported_as_nan(tmp_path):
    path = _write(tmp_path, "nan.yaml", "base: b\nsources: [{model: s, weight: .nan}]\nmethod: ties\n")
    with pytest.raises(ConfigError, match=rf"^{path}: sources\[0\]\.weight: Input should be a finite number, found nan$"):
        load_config(path)
    mergekit = _write(tmp_path, "mk.yaml", "merge_method: ties\nbase_model: b\nmodels: [{model: s, parameters: {weight: .nan}}]\n")
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight: Input should be a finite number, found nan"):
        load_config(mergekit)
    boolean = _write(tmp_path, "mk.yaml", "merge_method: ties\nbase_model: b\nmodels: [{model: s, parameters: {weight: true}}]\n")
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight: Input should be a valid number, found True"):
        load_config(boolean)


def test_a_weight_of_zero_stays_zero(tmp_path):
    native = _write(tmp_path, "n.yaml", "base: b\nsources: [{model: s0, weight: 0}, s1, {model: s2, weight: 2}]\nmethod: task_arithmetic\n")
    assert load_config(native).kwargs["weights"] == [0.0, 1.0, 2.0]
    own = "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - {model: s0, parameters: {weight: 0}}\n  - {model: s1}\n"
    shared_one = _write(tmp_path, "m1.yaml", own + "parameters: {weight: 1}\n")
    assert load_config(shared_one).kwargs["weights"] == [0.0, 1.0]
    shared_zero = _write(tmp_path, "m0.yaml", own.replace("weight: 0", "weight: 3") + "parameters: {weight: 0}\n")
    assert load_config(shared_zero).kwargs["weights"] == [3.0, 0.0]
    linear = _write(tmp_path, "l.yaml", "merge_method: linear\nmodels:\n  - {model: b, parameters: {weight: 1}}\n  - {model: s0, parameters: {weight: 0}}\n  - {model: s1}\nparameters: {weight: 1}\n")
    assert load_config(linear).kwargs["weights"] == [0.0, 0.5]
    nothing = _write(tmp_path, "z.yaml", "merge_method: linear\nmodels:\n  - {model: b}\n  - {model: s0}\nparameters: {weight: 0}\n")
    with pytest.raises(ConfigError, match="linear divides by the sum of the weights, which is 0"):
        load_config(nothing)


def test_yaml_syntax_errors_are_one_line_naming_file_and_place(tmp_path):
    path = _write(tmp_path, "bad.yaml", "base: b\nsources: [s, t\nk: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML: .*at line \d+, column \d+$") as err:
        load_config(path)
    assert "\n" not in str(err.value)
    path = _write(tmp_path, "int.yaml", "base: b\nsources: [s]\nk: 1" + "0" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: a value cannot be read: Exceeds the limit \(4300 digits\)"):
        load_config(path)
