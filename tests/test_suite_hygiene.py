"""The test suite's own rules: a missing ../shared/data is a visible skip locally and a failure under CI,
and no test hides an import error of anetrain's own modules behind a skip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers.data import REPO

NEEDS_DATA = """
from helpers.data import shared_file

def test_needs_a_shared_file():
    assert shared_file("no-such-file.bin").exists()

def test_needs_nothing():
    assert True
"""


def _suite_without_shared_data(tmp_path: Path) -> Path:
    """A copy of tests/conftest.py and tests/helpers/ in a repository whose ../shared does not exist."""
    tests = tmp_path / "repo" / "tests"
    shutil.copytree(
        REPO / "tests" / "helpers", tests / "helpers", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "test_needs_data.py").write_text(NEEDS_DATA, encoding="utf-8")
    return tests


def _pytest(tests: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        cwd=tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_shared_data_is_a_summarized_skip_locally_and_a_failure_under_ci(tmp_path):
    tests = _suite_without_shared_data(tmp_path)
    local = _pytest(tests, None)
    assert local.returncode == 0, local.stdout
    lines = local.stdout.strip().splitlines()
    assert lines[-2] == "1 tests skipped: ../shared/data not found", local.stdout
    assert re.match(r"1 passed, 1 skipped", lines[-1]), local.stdout
    ci = _pytest(tests, "true")
    assert ci.returncode == 3, ci.stdout
    assert "CI=true but the shared test data is not there" in ci.stdout + ci.stderr
    assert str(tmp_path / "shared" / "data") in ci.stdout + ci.stderr


def test_no_test_skips_on_an_import_of_anetrain_itself():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if re.search(r"importorskip\(\s*['\"]anetrain", text):
            offenders.append(path.name)
    assert offenders == []
