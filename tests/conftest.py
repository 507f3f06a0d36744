"""Session-wide checks of the shared test data; the helpers themselves live in tests/helpers/."""

from __future__ import annotations

from typing import Any

import pytest

from helpers.data import MISSING, REPO, SHARED_DATA, shared_file, under_ci

__all__ = ["REPO", "SHARED_DATA", "shared_file"]  # tests written as `from conftest import shared_file`


def pytest_sessionstart(session: pytest.Session) -> None:
    if under_ci() and not SHARED_DATA.is_dir():
        pytest.exit(
            f"CI=true but the shared test data is not there: {SHARED_DATA} (../shared/data next to the "
            "repository, see its PROVENANCE.md); without it a quarter of the suite cannot run",
            returncode=3,
        )


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # around pytest's short summary: printed after it
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> Any:
    yield
    missing = [r for r in terminalreporter.stats.get("skipped", []) if MISSING in str(r.longrepr)]
    if missing:
        terminalreporter.write_line(f"{len(missing)} tests skipped: {MISSING}", yellow=True, bold=True)
