"""The whole product on a real local cluster: a Ray head and an MLflow server started by
infra/local/start.sh on 127.0.0.1, the tiny pipeline submitted with ``ray job submit
--working-dir .``, stopped while fine-tuning and submitted again, the champion fetched from the
registry in this process; and scheduled retraining, twice on the same data."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_train import REPO, TEST_REVIEWS
from local_services import clean_env, exports, free_ports, run, script

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

TEXTS = [
    "A wonderful film: moving, funny and beautifully acted. I loved every minute of it.",
    "The worst movie I have seen in years. Dull, badly written and far too long.",
]


def shorter(imdb: Path, epochs: int) -> list[str]:
    """Shorter than the shipped tiny pipeline, on fewer reviews: this checks the plumbing
    (tests/test_finetune.py checks accuracy). The promote stage decides on promotion."""
    data = f"data.path={imdb},'data.files={{split}}.parquet'"
    return [
        "--set", f"stages.1.params.overrides=[register.promote=false,stages.0.epochs={epochs},"
        f"train.log_every=10,{data}]",
        "--set", f"stages.2.params.max_rows={TEST_REVIEWS}",
    ]  # fmt: skip


@dataclass
class Cluster:
    dashboard: str
    tracking_uri: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = Path(tmp_path_factory.mktemp("cluster"))
    ray_port, dashboard, client, agent, mlflow_port = free_ports(5)
    start = script(
        "start.sh",
        "--state-dir",
        str(state),
        "--ray-port",
        str(ray_port),
        "--dashboard-port",
        str(dashboard),
        "--ray-client-port",
        str(client),
        "--dashboard-agent-port",
        str(agent),
        "--mlflow-port",
        str(mlflow_port),
        "--num-cpus",
        "2",
        "--no-auth",  # a loopback-only test machine; start.sh's own tests cover tokens
        "--timeout",
        "150",
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield Cluster(
            f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{mlflow_port}", exports(state)
        )
    finally:
        script("stop.sh", "--state-dir", str(state), "--grace", "5", timeout=120)
        shutil.rmtree(f"/tmp/perceiver-ray-{os.getuid()}-{ray_port}", ignore_errors=True)


def ray_cli() -> str:
    found = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    assert Path(found).exists(), "the ray CLI (ray[default]) is not installed"
    return found


def submit(
    cluster: Cluster,
    job_id: str,
    tracking_uri: str,
    storage: Path,
    shared_data: Path,
    module: str = "jobs.pipeline",
    config: str = "jobs/configs/demo.yaml",
    extra: tuple[str, ...] = (),
) -> None:
    """``ray job submit --working-dir .`` from the repository, as a user does (without waiting)."""
    runtime_env = {
        "env_vars": {
            "DATA_DIR": str(shared_data),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "PERCEIVER_CODE_VERSION": "test",
            "PERCEIVER_MODEL_CACHE": str(storage / "model-cache"),
            "RAY_AUTH_MODE": "disabled",
        }
    }
    command = [
        ray_cli(), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
        "--submission-id", job_id, "--no-wait", "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", module, "--config", config, "--storage-path", str(storage), *extra,
    ]  # fmt: skip
    result = run(command, cwd=REPO, env=clean_env(RAY_AUTH_MODE="disabled"), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


def job_client(cluster: Cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard)


def wait(cluster: Cluster, job_id: str, timeout_s: float = 900) -> str:
    """The job's final status (SUCCEEDED, FAILED, STOPPED) and its logs."""
    client = job_client(cluster)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status.rsplit(".", 1)[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status.rsplit(".", 1)[-1]
        time.sleep(3)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s")


def logs(cluster: Cluster, job_id: str) -> str:
    return job_client(cluster).get_job_logs(job_id)


def registry_state(tracking_uri: str) -> dict[str, dict]:
    """Every registered model's versions (with their metric tags and lineage parents by version
    number) and aliases: what two runs of the same pipeline must agree on."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    state = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        state[model.name] = {
            "aliases": dict(sorted(model.aliases.items())),
            "versions": {
                v.version: {
                    k: val
                    for k, val in v.tags.items()
                    if k.startswith(("metric.", "promotion.", "lineage.task", "lineage.parent"))
                }
                for v in versions
            },
        }
    return state


@dataclass
class Submitted:
    logs: str  # of the job that finished
    storage: str
    pretrain_run: object  # the pretraining stage's MLflow run, as the stopped job left it


@pytest.fixture(scope="module")
def submitted(
    cluster: Cluster, shared_data: Path, small_imdb_dir: Path, tmp_path_factory
) -> Submitted:
    """The tiny pipeline submitted, stopped while fine-tuning, and submitted again."""
    from mlflow import MlflowClient

    storage = Path(tmp_path_factory.mktemp("pipeline-storage"))
    extra = (
        "--set", "stages.0.params.overrides=[train.steps=60,eval.every=30,checkpoint.every=30]",
        *shorter(small_imdb_dir, epochs=3),
    )  # fmt: skip
    submit(cluster, "pipeline-1", cluster.tracking_uri, storage, shared_data, extra=extra)
    client = MlflowClient(cluster.tracking_uri)
    _wait_for_finetuning(client, cluster, "pipeline-1")
    job_client(cluster).stop_job("pipeline-1")
    assert wait(cluster, "pipeline-1", 120) == "STOPPED"
    pretrain = _stage_run(client, "pretrain")
    assert pretrain.info.status == "FINISHED"

    submit(cluster, "pipeline-2", cluster.tracking_uri, storage, shared_data, extra=extra)
    status = wait(cluster, "pipeline-2")
    text = logs(cluster, "pipeline-2")
    assert status == "SUCCEEDED", text[-5000:]
    return Submitted(text, str(storage), pretrain)


def test_submitted_pipeline_registers_a_champion_that_predicts(submitted, cluster) -> None:
    from perceiver_core.predict import classify
    from pipelines.tracking.models import load_model

    for stage in ("pretrain", "finetune-imdb", "evaluate", "promote", "showcase"):
        assert f"{stage}" in submitted.logs
    assert "fill-mask:" in submitted.logs and "MLflow" in submitted.logs  # where to look
    # A quiet console: no library's progress bars, no notes on what fine-tuning expects.
    for noise in ("Downloading artifacts", "it/s]", "newly initialised"):
        assert noise not in submitted.logs, noise
    loaded = load_model(
        "models:/perceiver-imdb@champion", tracking_uri=cluster.tracking_uri, expect="classifier"
    )
    predictions = classify(loaded.model, TEXTS)
    assert {p.label for p in predictions} <= {"neg", "pos"}
    assert all(0.5 <= p.score <= 1.0 for p in predictions)


def test_killed_during_finetuning_resumes_without_redoing_anything(submitted, cluster) -> None:
    """The job stopped while fine-tuning and submitted again: pretraining is not redone, and the
    registry holds what one uninterrupted run registers (one version of each model, champions)."""
    from mlflow import MlflowClient

    assert "skip" in submitted.logs.lower()
    again = _stage_run(MlflowClient(cluster.tracking_uri), "pretrain")
    assert again.info.run_id == submitted.pretrain_run.info.run_id
    assert again.info.end_time == submitted.pretrain_run.info.end_time  # not run a second time
    state = registry_state(cluster.tracking_uri)
    assert sorted(state["perceiver-imdb"]["versions"]) == ["1"]
    assert state["perceiver-imdb"]["aliases"] == {"champion": "1"}
    assert state["perceiver-mlm"]["aliases"] == {"champion": "1"}  # the champion's parent
    tags = state["perceiver-imdb"]["versions"]["1"]
    assert tags["lineage.parent"] == "models:/perceiver-mlm/1"
    assert 0.0 <= float(tags["metric.accuracy"]) <= 1.0


def _stage_run(client, stage: str):
    runs = client.search_runs(
        [client.get_experiment_by_name("perceiver-pipeline").experiment_id],
        filter_string=f"tags.`workflow.stage` = '{stage}'",
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _wait_for_finetuning(client, cluster: Cluster, job_id: str, timeout_s: float = 600) -> None:
    """Until the fine-tuning stage has trained a while (its classify run has logged a loss)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("perceiver-pipeline")
        if experiment is not None:
            found = client.search_runs(
                [experiment.experiment_id],
                filter_string="attributes.run_name LIKE '%finetune-imdb-classify'",
            )
            if found and "train/loss" in found[0].data.metrics:
                return
        status = str(job_client(cluster).get_job_status(job_id))
        assert not status.endswith(("FAILED", "SUCCEEDED")), logs(cluster, job_id)[-3000:]
        time.sleep(2)
    raise TimeoutError("fine-tuning never started")


def test_retraining_promotes_only_a_better_model_and_repeats_as_a_no_op(
    submitted, cluster, shared_data, small_imdb_dir
) -> None:
    from mlflow import MlflowClient

    storage = submitted.storage
    before = registry_state(cluster.tracking_uri)
    retrain = {
        "module": "jobs.retrain",
        "config": "jobs/configs/retrain_tiny.yaml",
        "extra": tuple(shorter(small_imdb_dir, epochs=1)),
    }
    submit(cluster, "retrain-1", cluster.tracking_uri, Path(storage), shared_data, **retrain)
    status = wait(cluster, "retrain-1")
    assert status == "SUCCEEDED", logs(cluster, "retrain-1")[-5000:]
    after = registry_state(cluster.tracking_uri)
    new = set(after["perceiver-imdb"]["versions"]) - set(before["perceiver-imdb"]["versions"])
    assert len(new) == 1
    (version,) = new
    tags = after["perceiver-imdb"]["versions"][version]
    # The decision and both scores, measured on the same evaluation set, are on the new version.
    assert tags["promotion.decision"] in ("champion", "challenger")
    challenger, champion = (
        float(tags[k]) for k in ("promotion.challenger_score", "promotion.champion_score")
    )
    promoted = after["perceiver-imdb"]["aliases"].get("champion") == version
    assert promoted == (challenger >= champion)
    assert promoted == (tags["promotion.decision"] == "champion")
    client = MlflowClient(cluster.tracking_uri, registry_uri=cluster.tracking_uri)
    parent = client.get_model_version("perceiver-imdb", version).tags["lineage.parent"]
    assert parent.startswith("models:/perceiver-mlm/")

    submit(cluster, "retrain-2", cluster.tracking_uri, Path(storage), shared_data, **retrain)
    status = wait(cluster, "retrain-2")
    text = logs(cluster, "retrain-2")
    assert status == "SUCCEEDED", text[-5000:]
    assert registry_state(cluster.tracking_uri) == after  # the same data: nothing changes
