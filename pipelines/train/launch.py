"""Starting a training run on the driver, the same way for every task: its MLflow run, then its
Ray Train run (``TorchTrainer`` running ``pipelines.train.core`` on every worker).

Resuming needs nothing but the same run name and storage: the MLflow run of that name is reopened
and Ray Train restores the latest checkpoint of the Ray Train run of that name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ray.data
import ray.train
from ray.data import ExecutionOptions
from ray.train.torch import TorchTrainer

from pipelines.config import to_dict, to_yaml
from pipelines.console import train_logging
from pipelines.errors import user_error
from pipelines.tracking import registry, runs
from pipelines.train.core import train_loop_per_worker
from pipelines.train.job import WorkerJob

log = logging.getLogger(__name__)

# Driver settings every worker needs too: DeepSpeed's op build cache and the tracking server's
# credentials (a server with authentication refuses workers without them).
PASSED_ENV = (
    "TORCH_EXTENSIONS_DIR",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def open_run(
    target: runs.TrackingTarget,
    experiment: str,
    run_name: str,
    config: Any,
    *,
    tags: Mapping[str, str],
    sources: Iterable[runs.DataSource] = (),
) -> tuple[Any, str]:
    """``(client, run_id)`` of the MLflow run ``run_name`` (reopened when it exists), with the
    config as parameters and as ``config/resolved.yaml``, and the data sources as its inputs."""
    client = runs.client_for(target)
    experiment_id = runs.experiment_id(client, experiment, target.artifact_location)
    run_id, resumed = runs.start_or_resume_run(client, experiment_id, run_name, tags)
    describe_run(client, run_id, config, tags=tags if resumed else {}, sources=sources)
    return client, run_id


def describe_run(
    client: Any,
    run_id: str,
    config: Any,
    *,
    tags: Mapping[str, str],
    sources: Iterable[runs.DataSource] = (),
) -> None:
    """Log the config (parameters, ``config/resolved.yaml``), set ``tags`` (saying which changed
    since the run began), and record the data sources on an existing run."""
    before = client.get_run(run_id).data.tags
    for key, value in tags.items():
        if before.get(key) not in (None, value):
            log.warning(
                "run %s resumed with a changed %s (%s -> %s)", run_id, key, before[key], value
            )
        client.set_tag(run_id, key, value)
    runs.log_params(client, run_id, runs.flatten(to_dict(config)))
    client.log_text(run_id, to_yaml(config), "config/resolved.yaml")
    sources = list(sources)
    if sources:
        runs.log_data_sources(client, run_id, sources)


def fit(
    job: WorkerJob,
    *,
    datasets: Mapping[str, ray.data.Dataset],
    keep: int,
    max_failures: int,
) -> Any:
    """Run (or resume) the Ray Train run ``job.run_dir``; its ``Result``. Every worker reads each
    of ``datasets`` whole and in order (a task deals itself its share), without progress bars
    (the training loop prints progress; bars redrawn by every executor would bury it). A failure
    that a worker raised for a reason the user can fix (a checkpoint, the data, the starting
    model) is re-raised as that error."""
    e = job.engine
    storage_path, _, name = job.run_dir.rpartition("/")
    for dataset in datasets.values():
        dataset.context.enable_progress_bars = False
    env = {**job.tracking.worker_env(), "PERCEIVER_CODE_VERSION": registry.code_version()}
    env.update({name: os.environ[name] for name in PASSED_ENV if name in os.environ})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": ray.put(job)},  # by reference (see train_loop_per_worker)
        scaling_config=ray.train.ScalingConfig(
            num_workers=e.workers if e.elastic else e.workers[0],
            elastic_resize_monitor_interval_s=e.elastic_resize_s,
            use_gpu=e.use_gpu,
            resources_per_worker={
                "CPU": e.cpus_per_worker,
                **({"GPU": 1} if e.use_gpu else {}),
                **e.worker_resources,
            },
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            worker_runtime_env={"env_vars": env},
            logging_config=train_logging(),
        ),
        datasets=dict(datasets),
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        cause = user_error(error)  # the lowest failed rank's, when it names what to fix
        if cause is not None:
            raise cause from error
        raise
