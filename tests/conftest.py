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


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray runtime (2 CPUs, no dashboard) shared by all tests that take it.

    Started on first use and shut down at the end of the session. If Ray is already running
    (another plugin or fixture started it), that runtime is used and left running.
    """
    import logging

    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


# Fixtures of the training and tracking tests (tests/fixtures_train.py): a real MLflow server,
# the tiny config's data index, tiny pretraining configs; and an S3-compatible server with the
# sample data in a bucket (tests/fixtures_s3.py).
pytest_plugins = ["fixtures_train", "fixtures_s3"]
