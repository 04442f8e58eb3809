"""CI's skip policy (tests/conftest.py): under SVDFUSE_REQUIRE_TEST_EXTRA=1, which .ci/run sets, a test
that would skip because a package of the `test` extra does not import fails instead, whether it
asks at collection (test_export.py, test_mergekit.py) or inside a test; skips by capability stay
skips, and a package of the extra that is not installed at all stops the run before it starts. Each
case runs pytest in a subprocess with the package hidden (`sys.modules[name] = None`) or its
distribution made to look uninstalled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _pytest(
    args: list[str], *, hide: tuple[str, ...] = (), require: bool, env: dict[str, str] | None = None, prelude: str = ""
) -> subprocess.CompletedProcess:
    """pytest `args` in a fresh process whose `hide` modules do not import, after `prelude`."""
    code = "\n".join(["import sys", f"sys.modules.update(dict.fromkeys({hide!r}))", prelude, "import pytest", f"sys.exit(pytest.main({args!r}))"])
    environ = {key: value for key, value in os.environ.items() if key != "SVDFUSE_REQUIRE_TEST_EXTRA"}
    environ.update({"PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {})})
    if require:
        environ["SVDFUSE_REQUIRE_TEST_EXTRA"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


def test_hidden_test_extra_packages_skip_their_modules_only_where_ci_does_not_require_them():
    # Both modules ask for their package at collection: without it nothing of them runs.
    args = [str(TESTS / "test_export.py"), str(TESTS / "test_mergekit.py"), "-q", "-p", "no:cacheprovider"]
    quiet = _pytest(args, hide=("peft", "mergekit"), require=False)
    assert quiet.returncode == pytest.ExitCode.NO_TESTS_COLLECTED and "2 skipped" in quiet.stdout, quiet.stdout[-2000:]
    required = _pytest(args, hide=("peft", "mergekit"), require=True)
    assert required.returncode == pytest.ExitCode.INTERRUPTED and "2 errors" in required.stdout, required.stdout[-2000:]
    for package in ("peft", "mergekit"):
        assert f"'{package}' is in the `test` extra, which SVDFUSE_REQUIRE_TEST_EXTRA=1 requires" in required.stdout, required.stdout[-2000:]


def test_inside_a_test_too_and_capability_skips_stay_skips(tmp_path):
    (tmp_path / "test_policy.py").write_text(
        "import pytest\n"
        "def test_needs_peft():\n    pytest.importorskip('peft')\n"
        "def test_needs_the_extension():\n    pytest.importorskip('svdfuse._C', reason='the compiled extension svdfuse._C is not built')\n"
        "def test_needs_a_package_outside_the_extra():\n    pytest.importorskip('svdfuse_no_such_package')\n"
        "def test_needs_cuda(cuda):\n    pass\n"
    )
    # The project's conftest as a plugin: its fixtures (cuda) and its importorskip.
    args = [str(tmp_path), "-q", "-rfs", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir", str(tmp_path)]
    env = {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    quiet = _pytest(args, hide=("peft", "svdfuse._C"), require=False, env=env)
    assert "4 skipped" in quiet.stdout, quiet.stdout[-2000:]
    required = _pytest(args, hide=("peft", "svdfuse._C"), require=True, env=env)
    assert "1 failed, 3 skipped" in required.stdout, required.stdout[-2000:]
    # The summary line is "FAILED <node id> - <message>", its message cut to the terminal's width.
    failed = [line.split(" - ")[0] for line in required.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].endswith("::test_needs_peft"), failed
    assert "'peft' is in the `test` extra" in required.stdout, required.stdout[-2000:]


def test_an_uninstalled_test_extra_package_is_a_usage_error_where_ci_requires_the_extra(tmp_path):
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    uninstalled = (
        "import importlib.metadata as m; real = m.version; "
        "m.version = lambda name: (_ for _ in ()).throw(m.PackageNotFoundError(name)) if name == 'peft' else real(name)"
    )
    args = [str(tmp_path), "-q", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir", str(tmp_path)]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    assert _pytest(args, require=False, env=env, prelude=uninstalled).returncode == pytest.ExitCode.OK
    required = _pytest(args, require=True, env=env, prelude=uninstalled)
    assert required.returncode == pytest.ExitCode.USAGE_ERROR, required.stdout[-2000:] + required.stderr[-2000:]
    assert re.search(r"the `test` extra is not installed as pyproject.toml asks: peft\S* \(not installed\)", required.stderr), required.stderr[-2000:]
