"""The test suite's own rules: a missing ../shared/data is a visible skip locally and a failure under CI,
and no test hides an import error of anetrain's own modules behind a skip."""

from __future__ import annotations

import ast
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


def _classes(package: Path) -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [(path.name, node) for node in tree.body if isinstance(node, ast.ClassDef)]
    return found


def test_train_classes_are_short_and_make_their_attributes_in_init():
    """The trainer is components (issue: no class in train/ longer than about 300 lines), and every attribute
    a class gives itself is made in its __init__ (or declared on the class), so reading __init__ tells what an
    object holds."""
    for name, cls in _classes(REPO / "src" / "anetrain" / "train"):
        assert cls.end_lineno - cls.lineno < 300, f"{name}: {cls.name} is {cls.end_lineno - cls.lineno} lines"
        declared = {
            t.id
            for node in cls.body
            if isinstance(node, ast.AnnAssign | ast.Assign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }
        made: dict[str, set[str]] = {}
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    targets = (
                        node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                    )
                    for t in targets:
                        if (
                            isinstance(t, ast.Attribute)
                            and isinstance(t.value, ast.Name)
                            and t.value.id == "self"
                        ):
                            made.setdefault(fn.name, set()).add(t.attr)
        in_init = made.pop("__init__", set()) | declared
        for method, attrs in made.items():
            assert attrs <= in_init, f"{name}: {cls.name}.{method} makes {sorted(attrs - in_init)}"
