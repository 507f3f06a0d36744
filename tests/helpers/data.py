"""The shared test data: ``../shared/data`` next to the repository (see its PROVENANCE.md).

A test that needs a file from it and does not find it is skipped, with a one-line summary at the end of the
run ("N tests skipped: ../shared/data not found"); under CI (``CI=true``) it fails instead, so a CI machine
without the data cannot pass by skipping a quarter of the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
#: the start of the skip reason the summary counts
MISSING = "../shared/data not found"


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def shared_file(name: str) -> Path:
    """A file from ../shared/data; absent: the test is skipped (a failure under CI)."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{MISSING}: {path} is not present (see shared/data/PROVENANCE.md)"
        if under_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return path
