"""Shared fixtures: where the sample data lives, and how its absence is handled.

Tests that read ``../shared/data`` take the ``shared_data`` fixture. Without the folder they skip
with a reason on a developer's machine, and fail in CI (``CI=true``), where a skip would hide a
broken checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$PERCEIVER_SHARED_DATA`` if set, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("PERCEIVER_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        message = (
            f"sample data not found at {path} (set PERCEIVER_SHARED_DATA or check out ../shared)"
        )
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    return path
