"""MLflow runs of training jobs: where they are stored, and how a resubmitted job finds its run.

A run is identified by its name within the experiment: a job submitted again with the same run
name continues the same MLflow run (same run id, metrics continue), which is what resuming from a
checkpoint needs. Everything here is called on the job's driver, before workers start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

log = logging.getLogger(__name__)

_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a parameter value
_PARAMS_PER_REQUEST = 100  # MLflow's limit on parameters per log_batch


@dataclass(frozen=True)
class TrackingTarget:
    """A resolved tracking location: the URI every process uses, and where a new experiment
    keeps its artifacts (None: the server decides)."""

    tracking_uri: str
    artifact_location: str | None


def resolve_tracking(configured: str | None, workdir: Path | None = None) -> TrackingTarget:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else an SQLite store in ``workdir``.

    The embedded default uses absolute paths: Ray workers run in other directories than the driver
    and must open the same store.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if (
        uri
        and _is_file_store(uri)
        and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true"
    ):
        where = "tracking.tracking_uri" if configured else "MLFLOW_TRACKING_URI"
        raise TrackingStoreError(
            f"{where}: {uri!r} is an MLflow file store, which this MLflow no longer opens; use "
            "sqlite:///<folder>/mlflow.db or a server's http:// URL (or set "
            "MLFLOW_ALLOW_FILE_STORE=true to keep the file store)"
        )
    if uri and uri.startswith("sqlite:///"):
        # A local store: artifacts beside the database, not in whatever directory a process
        # happens to run in (MLflow's default, ./mlruns, differs between driver and workers).
        db = Path(uri[len("sqlite:///") :])
        return TrackingTarget(uri, (db.parent / "mlartifacts").resolve().as_uri())
    if uri:
        return TrackingTarget(uri, None)
    base = (workdir or Path.cwd()).resolve()
    return TrackingTarget(f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri())


class TrackingStoreError(UserError):
    """A tracking URI that MLflow would refuse with a traceback."""


def _is_file_store(uri: str) -> bool:
    """A ``file:`` URI or a bare path (``./mlruns``): MLflow's file store."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return scheme in ("", "file") and not uri.startswith(("databricks", "uc:"))


def client_for(target: TrackingTarget) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise ValueError(
                f"tracking.experiment: experiment {name!r} is deleted in MLflow; restore it or "
                "choose another name"
            )
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_run(client: Any, experiment: str, run_name: str) -> Any | None:
    """The most recent run of ``experiment`` named ``run_name``, or None."""
    escaped = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment],
        filter_string=f"attributes.run_name = '{escaped}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def start_or_resume_run(
    client: Any, experiment: str, run_name: str, tags: Mapping[str, str]
) -> tuple[str, bool]:
    """``(run_id, resumed)``: the existing run of that name reopened, or a new run."""
    run = find_run(client, experiment, run_name)
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        log.info("resuming MLflow run %s (%s)", run_name, run.info.run_id)
        return run.info.run_id, True
    run = client.create_run(experiment, run_name=run_name, tags=dict(tags))
    log.info("created MLflow run %s (%s)", run_name, run.info.run_id)
    return run.info.run_id, False


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values; lists of sections get their index (``sources.0.name``)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            out[name] = text[:_PARAM_VALUE_LIMIT]
    return out


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log parameters not yet on the run. MLflow refuses to change a parameter's value; a resumed
    run whose config changed keeps its first values, and the change is logged (the resolved
    config artifact and the config hash tag have the new values)."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("config changed since the run started; parameters kept: %s", changed[:10])
    new = [Param(k, v) for k, v in sorted(params.items()) if k not in existing]
    for i in range(0, len(new), _PARAMS_PER_REQUEST):
        client.log_batch(run_id, params=new[i : i + _PARAMS_PER_REQUEST])


@dataclass(frozen=True)
class DataSource:
    """One training input as MLflow records it: a name, a location, and a content digest."""

    name: str
    uri: str
    digest: str
    context: str = "train"


def log_data_sources(client: Any, run_id: str, sources: Iterable[DataSource]) -> None:
    """Record the inputs on the run (the MLflow UI's Datasets column), each with its digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for source in sources:
        source_type = source.uri.split("://", 1)[0] if "://" in source.uri else "local"
        dataset = Dataset(
            name=source.name,
            digest=source.digest,
            source_type=source_type,
            source=json.dumps({"uri": source.uri}),
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", source.context)]))
    client.log_inputs(run_id, datasets=inputs)


def finish_run(client: Any, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)
