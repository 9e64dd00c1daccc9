"""Trained weights out of a run: the run's best weights, and a registered model version with its
lineage. The one path every task's results take to the registry.

Layout of ``<run_dir>/best/`` (a local folder or s3://): ``step_XXXXXXXX/`` (an HF directory plus
``metrics.json``) per improvement, and ``BEST.json`` naming the current one, written last, so the
pointer never names weights that are not all there.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from perceiver_core.hf import save_pretrained
from pipelines import storage
from pipelines.tracking.registry import Lineage, RegisteredModel, register_with_retry

BEST_DIR = "best"
BEST_POINTER = "BEST.json"


def write_best(run_dir: str, step: int, model: nn.Module, metrics: dict[str, float]) -> None:
    """Write the weights to ``best/step_N`` (with their metrics) and point ``BEST.json`` at them."""
    name = f"step_{step:08d}"
    with tempfile.TemporaryDirectory(prefix="best-") as tmp:
        folder = save_pretrained(model, Path(tmp) / name)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        storage.upload(folder, f"{run_dir}/{BEST_DIR}/{name}")
    pointer = {"folder": name, "step": step, "metrics": metrics}
    storage.write_text(f"{run_dir}/{BEST_DIR}/{BEST_POINTER}", json.dumps(pointer))


def best_location(run_dir: str) -> tuple[str, dict[str, Any]]:
    """Where the run's best weights are (a folder or URI), and their ``BEST.json`` (folder, step
    and metrics)."""
    text = storage.read_text(f"{run_dir}/{BEST_DIR}/{BEST_POINTER}")
    if text is None:
        raise FileNotFoundError(f"{run_dir}/{BEST_DIR}: the run recorded no best weights")
    best = json.loads(text)
    return f"{run_dir}/{BEST_DIR}/{best['folder']}", best


def register(
    tracking_uri: str, location: str, name: str, lineage: Lineage, *, timeout_s: float
) -> RegisteredModel:
    """The HF folder at ``location`` (local, or in run storage) logged in the lineage's run and
    registered as a new version of ``name``, with the lineage (run, step, data, config, code,
    parent, task, metrics) as its tags; idempotent per (run, step), retried while the tracking
    server is unreachable, up to ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        hf_dir = storage.local_copy(location, Path(tmp))
        return register_with_retry(tracking_uri, hf_dir, name, lineage, timeout_s=timeout_s)
