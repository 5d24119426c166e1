"""scripts/test.sh in CI: a run where no integration test ran is a failure, not a green skip.

test.sh is run for real, in a copy of the repository's scripts with a stand-in set-up and a tiny
test tree (one unit test, one integration test that passes or skips), so what is checked is the
exit code CI sees."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import integration_ran  # noqa: E402

sys.path.remove(str(REPO / "scripts"))

INTEGRATION_PASSES = "def test_containerd():\n    assert True\n"
INTEGRATION_SKIPS = ("import pytest\n\n\ndef test_containerd():\n"
                     "    pytest.skip('containerd 1.6 missing; run scripts/setup.sh')\n")


def tree(tmp_path: Path, integration: str) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    shutil.copy(REPO / "scripts" / "integration_ran.py", repo / "scripts" / "integration_ran.py")
    (repo / "scripts" / "setup.sh").write_text("exit 0\n")  # everything in place
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"  # this venv's python, run by its own path
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    for d in ("tests/unit", "tests/integration"):
        (repo / d).mkdir(parents=True)
        (repo / d / "__init__.py").write_text("")
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "unit" / "test_unit.py").write_text("def test_unit():\n    assert True\n")
    (repo / "tests" / "integration" / "test_integration.py").write_text(integration)
    return repo


def run_test_sh(repo: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(["bash", str(repo / "scripts" / "test.sh"), "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, timeout=120)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the CI rule applies to runs as root")


@needs_root
def test_ci_as_root_fails_when_the_integration_tests_all_skipped(tmp_path):
    r = run_test_sh(tree(tmp_path, INTEGRATION_SKIPS), ci="true")
    assert r.returncode == 6, r.stdout + r.stderr
    assert "no tests.integration test passed (1 collected, none of them passed)" in r.stderr
    assert "1 skipped: containerd 1.6 missing; run scripts/setup.sh" in r.stderr
    assert "CI as root, and no integration test ran: counted as a failure" in r.stderr


@needs_root
def test_ci_as_root_passes_when_an_integration_test_passed(tmp_path):
    r = run_test_sh(tree(tmp_path, INTEGRATION_PASSES), ci="true")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 tests.integration test(s) passed" in r.stdout


def test_outside_ci_skipped_integration_tests_are_not_a_failure(tmp_path):
    repo = tree(tmp_path, INTEGRATION_SKIPS)
    for ci in (None, "false", "0"):
        r = run_test_sh(repo, ci=ci)
        assert r.returncode == 0, (ci, r.stdout + r.stderr)


def junit(tmp_path: Path, cases: str) -> str:
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return str(path)


def test_integration_ran_counts_only_integration_tests_that_passed(tmp_path, capsys):
    cases = ('<testcase classname="tests.unit.test_a" name="test_one"/>'
             '<testcase classname="tests.integration.test_b" name="test_x[containerd-1.6]">'
             '<skipped type="pytest.skip" message="containerd 1.6 missing"/></testcase>'
             '<testcase classname="tests.integration.test_b" name="test_y">'
             '<skipped type="pytest.xfail" message="not yet"/></testcase>'
             '<testcase classname="tests.integration.test_b" name="test_z"><failure message="boom"/></testcase>'
             '<testcase classname="tests.integrationx.test_c" name="test_other"/>')
    assert integration_ran.count(junit(tmp_path, cases), "tests.integration") == (
        0, 3, {"containerd 1.6 missing": 1, "not yet": 1})
    assert integration_ran.main([junit(tmp_path, cases)]) == 1
    cases += '<testcase classname="tests.integration.test_b" name="test_ok"/>'
    assert integration_ran.main([junit(tmp_path, cases)]) == 0
    assert integration_ran.main([str(tmp_path / "missing.xml")]) == 1
    assert "cannot read pytest's report" in capsys.readouterr().err
