"""Logging trained models to MLflow and registering them, with lineage on every version.

A model is logged from a Hugging Face format directory (``perceiver_core.hf.save_pretrained``)
through ``mlflow.transformers`` as a ``fill-mask`` pipeline, so that
``mlflow.transformers.load_model("models:/perceiver-mlm/3")`` gives a working pipeline and
``mlflow.pyfunc`` can serve it. The registered version carries the lineage as tags set when the
version is created (not afterwards, so a version never exists without them): run id, step, data
fingerprint, config hash, code version. Registration is idempotent per (run, step): a retried
export finds its version instead of creating a second one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Requirements written next to the model: the packages that load it. Listed explicitly because
# MLflow's inference tries to pin torchvision, which this project does not use.
PIP_REQUIREMENTS = ("torch", "transformers", "safetensors", "numpy")


@dataclass(frozen=True)
class Lineage:
    run_id: str
    step: int
    data_fingerprint: str
    config_hash: str
    code_version: str

    def tags(self) -> dict[str, str]:
        return {
            "lineage.run_id": self.run_id,
            "lineage.step": str(self.step),
            "lineage.data_fingerprint": self.data_fingerprint,
            "lineage.config_hash": self.config_hash,
            "lineage.code_version": self.code_version,
        }


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    model_uri: str  # the logged model (models:/m-...)

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def code_version(repo: Path | None = None) -> str:
    """The commit of the code (``+dirty`` with local changes), or ``PERCEIVER_CODE_VERSION``.

    A job submitted with ``--working-dir`` runs in an upload without ``.git``; its submitter sets
    the environment variable instead. "unknown" when neither is available.
    """
    env = os.environ.get("PERCEIVER_CODE_VERSION")
    if env:
        return env
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def find_version(client: Any, name: str, run_id: str, step: int) -> Any | None:
    """The version of ``name`` registered from ``run_id`` at ``step``, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    except Exception as error:  # a registered model that does not exist yet
        log.debug("search_model_versions(%s): %s", name, error)
        return None
    for version in versions:
        if version.tags.get("lineage.step") == str(step):
            return version
    return None


def log_and_register(
    tracking_uri: str,
    hf_dir: Path,
    registered_name: str,
    lineage: Lineage,
    *,
    artifact_name: str = "model",
) -> RegisteredModel:
    """Log the HF directory as a fill-mask model in the lineage's run and register a new version."""
    import mlflow
    import transformers

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    existing = find_version(client, registered_name, lineage.run_id, lineage.step)
    if existing is not None:
        log.info("model %s v%s already registered for this step", registered_name, existing.version)
        return RegisteredModel(registered_name, str(existing.version), existing.source)
    model = transformers.PerceiverForMaskedLM.from_pretrained(hf_dir)
    tokenizer = transformers.PerceiverTokenizer.from_pretrained(hf_dir)
    # The fluent API (which mlflow.transformers uses) logs to the process's current URI.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=lineage.run_id, nested=mlflow.active_run() is not None):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name=f"{artifact_name}-step{lineage.step}",
            task="fill-mask",
            pip_requirements=list(PIP_REQUIREMENTS),
            step=lineage.step,
            tags=lineage.tags(),
        )
    try:
        client.create_registered_model(registered_name)
    except Exception as error:  # it exists (the common case) or a real failure, raised below
        log.debug("create_registered_model(%s): %s", registered_name, error)
    version = client.create_model_version(
        registered_name,
        source=info.model_uri,
        run_id=lineage.run_id,
        tags=lineage.tags(),
        model_id=info.model_id,
    )
    log.info(
        "registered %s version %s from step %d", registered_name, version.version, lineage.step
    )
    return RegisteredModel(registered_name, str(version.version), info.model_uri)


def register_with_retry(
    tracking_uri: str,
    hf_dir: Path,
    registered_name: str,
    lineage: Lineage,
    *,
    timeout_s: float,
) -> RegisteredModel:
    """``log_and_register``, retried while the server is unreachable, up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay = 2.0
    while True:
        try:
            return log_and_register(tracking_uri, hf_dir, registered_name, lineage)
        except Exception as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("model registration failed (%s); retrying in %.0f s", error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def version_tags(client: Any, name: str, version: str) -> Mapping[str, str]:
    return client.get_model_version(name, version).tags
