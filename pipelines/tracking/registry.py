"""Logging trained models to MLflow and registering them, with lineage on every version, and
promoting versions with registry aliases.

A model is logged from a Hugging Face format directory (``perceiver_core.hf.save_pretrained``)
through ``mlflow.transformers``: a masked-language model as a ``fill-mask`` pipeline, a classifier
as a ``text-classification`` one (chosen from the config's architecture), so that
``mlflow.transformers.load_model("models:/perceiver-mlm/3")`` gives a working pipeline and
``mlflow.pyfunc`` / ``mlflow models serve`` can serve it. The registered version carries the
lineage as tags set when the version is created (not afterwards, so a version never exists without
them): run id, step, data fingerprint, config hash, code version, and where known the parent model,
the task and the evaluation metrics. Registration is idempotent per (run, step): a retried export
finds its version instead of creating a second one.

Promotion uses aliases (``champion``, ``challenger``), never the deprecated stages: ``promote``
compares a candidate's metric tag with the champion's and records its decision on the candidate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Requirements written next to the model: the packages that load it. Listed explicitly because
# MLflow's inference tries to pin torchvision, which this project does not use.
PIP_REQUIREMENTS = ("torch", "transformers", "safetensors", "numpy")

# config.json architecture (a transformers class) -> the mlflow.transformers pipeline task.
TASKS = {
    "PerceiverForMaskedLM": "fill-mask",
    "PerceiverForSequenceClassification": "text-classification",
}
CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class Lineage:
    """Where a model version came from; each field becomes a version tag.

    parent: registry URI of the model it was trained from (``models:/perceiver-mlm/3``).
    task: what it was trained for (``mlm``, ``imdb``, ``glue/sst2``, ``files``).
    metrics: evaluation results, tagged ``metric.<name>``; ``promote`` compares these.
    """

    run_id: str
    step: int
    data_fingerprint: str
    config_hash: str
    code_version: str
    parent: str | None = None
    task: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        tags = {
            "lineage.run_id": self.run_id,
            "lineage.step": str(self.step),
            "lineage.data_fingerprint": self.data_fingerprint,
            "lineage.config_hash": self.config_hash,
            "lineage.code_version": self.code_version,
        }
        if self.parent:
            tags["lineage.parent"] = self.parent
        if self.task:
            tags["lineage.task"] = self.task
        for name, value in sorted(self.metrics.items()):
            tags[f"metric.{name}"] = repr(float(value))  # repr: the float reads back exactly
        return tags


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


def pipeline_task(hf_dir: Path) -> tuple[str, str]:
    """``(transformers class name, pipeline task)`` of a HF directory, from its architecture."""
    architectures = json.loads((Path(hf_dir) / "config.json").read_text()).get("architectures")
    for architecture in architectures or []:
        if architecture in TASKS:
            return architecture, TASKS[architecture]
    raise ValueError(
        f"{hf_dir}: architectures {architectures} name no model this project logs ({sorted(TASKS)})"
    )


def inference_config(task: str) -> dict[str, Any]:
    """Arguments MLflow passes to the pipeline on every ``pyfunc`` / ``mlflow models serve`` call,
    recorded with the logged model: texts longer than the model's positions are truncated to them
    (the tokenizer's ``model_max_length`` is the model's ``max_position_embeddings``), as
    ``jobs.predict`` and ``perceiver_core.predict`` do; without it such a text fails with
    ``IndexError`` in the position embeddings."""
    if task == "text-classification":
        return {"truncation": True}
    if task == "fill-mask":
        return {"tokenizer_kwargs": {"truncation": True}}
    raise ValueError(f"no inference config for task {task!r}")


def signature(task: str) -> Any:
    """The model signature: a column of strings in; the filled-in text, or label and score, out.

    mlflow.transformers infers the same for these tasks today; it is written out so that the
    logged MLmodel always has one (serving validates requests against it).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    if task == "text-classification":
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
    elif task == "fill-mask":
        outputs = Schema([ColSpec("string")])
    else:
        raise ValueError(f"no signature for task {task!r}")
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=outputs)


def log_and_register(
    tracking_uri: str,
    hf_dir: Path,
    registered_name: str,
    lineage: Lineage,
    *,
    artifact_name: str = "model",
) -> RegisteredModel:
    """Log the HF directory in the lineage's run (a fill-mask or text-classification model, from
    its config's architecture) and register a new version of ``registered_name``."""
    import mlflow
    import transformers

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    existing = find_version(client, registered_name, lineage.run_id, lineage.step)
    if existing is not None:
        log.info("model %s v%s already registered for this step", registered_name, existing.version)
        return RegisteredModel(registered_name, str(existing.version), existing.source)
    class_name, task = pipeline_task(hf_dir)
    model = getattr(transformers, class_name).from_pretrained(hf_dir)
    tokenizer = transformers.PerceiverTokenizer.from_pretrained(hf_dir)
    # Folders exported before the tokenizer carried the model's limit say 2048.
    tokenizer.model_max_length = model.config.max_position_embeddings
    # The fluent API (which mlflow.transformers uses) logs to the process's current URI.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=lineage.run_id, nested=mlflow.active_run() is not None):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name=f"{artifact_name}-step{lineage.step}",
            task=task,
            signature=signature(task),
            model_config=inference_config(task),
            pip_requirements=list(PIP_REQUIREMENTS),
            step=lineage.step,
            tags=lineage.tags(),
        )
        if lineage.metrics:
            # On the logged model (which the registry shows for a version) and on its run, under
            # the names training logs them by: a recipe's run holds its stages' results this way.
            mlflow.log_metrics(
                {f"val/{k}": float(v) for k, v in lineage.metrics.items()},
                step=lineage.step,
                model_id=info.model_id,
                synchronous=True,
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


# -- aliases and promotion -------------------------------------------------------------------------


def default_model_name(task: str) -> str:
    """Registered name for a task: ``imdb`` -> ``perceiver-imdb``, ``glue/sst2`` ->
    ``perceiver-sst2``, ``files`` -> ``perceiver-files``, ``mlm`` -> ``perceiver-mlm``."""
    short = task.strip().strip("/").rsplit("/", 1)[-1].lower()
    short = re.sub(r"[^a-z0-9]+", "-", short).strip("-")
    if not short:
        raise ValueError(f"task {task!r} gives no model name")
    return f"perceiver-{short}"


def set_alias(client: Any, name: str, alias: str, version: str | int) -> None:
    client.set_registered_model_alias(name, alias, str(version))


def get_alias(client: Any, name: str, alias: str) -> str | None:
    """The version ``alias`` points to, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool  # the candidate is the champion now
    candidate: str  # its version
    champion_before: str | None
    candidate_score: float
    champion_score: float | None


def metric_tag(client: Any, name: str, version: str, metric: str) -> float | None:
    value = client.get_model_version(name, version).tags.get(f"metric.{metric}")
    return None if value is None else float(value)


def promote(
    client: Any,
    name: str,
    version: str | int,
    *,
    metric: str,
    higher_is_better: bool,
    scores: tuple[float, float | None] | None = None,
) -> PromotionDecision:
    """Make ``version`` the champion if it scores at least as well as the current one on
    ``metric`` (its ``metric.<metric>`` tag), else the challenger; the decision is recorded on it.

    Tags are written before the alias moves: a promotion interrupted between the two, run again,
    finds the same champion, takes the same decision and completes it. Promoting the champion
    again changes nothing. Two promotions of the same model at once are not serialised (MLflow
    has no compare-and-set on aliases); run them from one scheduler.
    """
    version = str(version)
    # scores: (candidate, champion) measured together on one fixed evaluation set (the
    # retraining pipeline's evaluate stage) instead of the metrics tagged at registration.
    score = scores[0] if scores is not None else metric_tag(client, name, version, metric)
    if score is None or math.isnan(score):
        raise ValueError(
            f"models:/{name}/{version} has no usable tag metric.{metric} ({score}); register it "
            "with Lineage(metrics=...)"
        )
    champion = get_alias(client, name, CHAMPION)
    if scores is not None:
        champion_score = scores[1] if champion is not None else None
    else:
        champion_score = None if champion is None else metric_tag(client, name, champion, metric)
    if champion == version:
        return PromotionDecision(True, version, champion, score, champion_score)
    if champion is not None and champion_score is None:
        log.warning(
            "champion v%s of %s has no metric.%s: the candidate wins", champion, name, metric
        )
    promoted = champion_score is None or (
        score >= champion_score if higher_is_better else score <= champion_score
    )
    decision = CHAMPION if promoted else CHALLENGER
    tags = {
        "promotion.decision": decision,
        "promotion.metric": metric,
        "promotion.challenger_score": repr(score),
        "promotion.champion_score": "none" if champion_score is None else repr(champion_score),
        "promotion.previous_champion": champion or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    set_alias(client, name, decision, version)
    if promoted and get_alias(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)  # it is no longer challenging
    log.info(
        "%s v%s (%s=%s) is now %s (champion before: %s, %s)",
        name,
        version,
        metric,
        score,
        decision,
        champion,
        champion_score,
    )
    return PromotionDecision(promoted, version, champion, score, champion_score)


def parse_version_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME/VERSION`` -> (NAME, VERSION); other forms are refused (an alias moves)."""
    body = uri.removeprefix("models:/")
    name, _, version = body.rpartition("/")
    if not uri.startswith("models:/") or not name or not version.isdigit():
        raise ValueError(f"{uri!r} is not a registered version URI (models:/NAME/VERSION)")
    return name, version
