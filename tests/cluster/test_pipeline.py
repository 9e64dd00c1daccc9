"""The whole product on the package's three-node cluster, with every training stage's run storage
and checkpoints in a bucket on the S3-compatible server and a tracking server whose artifacts are
there too: the tiny pipeline submitted with ``ray job submit --working-dir . -- ... --storage-path
s3://...``, its driver killed (SIGKILL) once fine-tuning has committed a checkpoint and submitted
again, the champion fetched from the registry in this process; and scheduled retraining, twice on
the same data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_s3 import BUCKET
from fixtures_train import REPO, TEST_REVIEWS, MlflowServer
from local_services import clean_env, run

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

TEXTS = [
    "A wonderful film: moving, funny and beautifully acted. I loved every minute of it.",
    "The worst movie I have seen in years. Dull, badly written and far too long.",
]


def shorter(imdb: Path, epochs: int) -> list[str]:
    """Shorter than the shipped tiny pipeline, on fewer reviews: this checks the plumbing
    (tests/test_finetune.py checks accuracy). The promote stage decides on promotion."""
    data = f"data.path={imdb},'data.files={{split}}.parquet',data.train_windows=1"
    return [
        "--set", f"stages.1.params.overrides=[register.promote=false,stages.0.epochs={epochs},"
        f"train.log_every=10,{data}]",
        "--set", f"stages.2.params.max_rows={TEST_REVIEWS}",
        "--set", "stages.2.params.data.max_length=512",  # two windows of each review, not eight
    ]  # fmt: skip


@dataclass
class Tracking:
    uri: str
    storage: str  # the pipeline's --storage-path: run storage and checkpoints in the bucket


@pytest.fixture(scope="module")
def tracking(cluster, s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracking]:
    """A tracking server of the pipeline's own (its registry starts empty), its artifacts in the
    bucket, on the package's cluster once all three nodes are back from the elastic tests."""
    cluster.wait_for_nodes(3)
    server = MlflowServer(
        tmp_path_factory.mktemp("pipeline-mlflow"), artifacts=f"s3://{BUCKET}/pipeline-mlflow"
    )
    server.start()
    try:
        yield Tracking(server.uri, f"s3://{BUCKET}/pipeline")
    finally:
        server.stop()


def ray_cli() -> str:
    found = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    assert Path(found).exists(), "the ray CLI (ray[default]) is not installed"
    return found


def submit(
    cluster,
    job_id: str,
    tracking: Tracking,
    shared_data: Path,
    cache: Path,
    module: str = "jobs.pipeline",
    config: str = "jobs/configs/demo.yaml",
    extra: tuple[str, ...] = (),
) -> None:
    """``ray job submit --working-dir .`` from the repository, as a user does (without waiting)."""
    runtime_env = {
        "env_vars": {
            "DATA_DIR": str(shared_data),
            "MLFLOW_TRACKING_URI": tracking.uri,
            "PERCEIVER_CODE_VERSION": "test",
            "PERCEIVER_MODEL_CACHE": str(cache),
            "RAY_AUTH_MODE": "disabled",
        }
    }
    command = [
        ray_cli(), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
        "--submission-id", job_id, "--no-wait", "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", module, "--config", config, "--storage-path", tracking.storage, *extra,
    ]  # fmt: skip
    result = run(command, cwd=REPO, env=clean_env(RAY_AUTH_MODE="disabled"), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


def job_client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard)


def wait(cluster, job_id: str, timeout_s: float = 900) -> str:
    """The job's final status (SUCCEEDED, FAILED, STOPPED) and its logs."""
    client = job_client(cluster)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status.rsplit(".", 1)[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status.rsplit(".", 1)[-1]
        time.sleep(3)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s")


def logs(cluster, job_id: str) -> str:
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
    pretrain_run: object  # the pretraining stage's MLflow run, as the killed job left it
    cache: Path  # the jobs' model cache (PERCEIVER_MODEL_CACHE)


@pytest.fixture(scope="module")
def submitted(
    cluster,
    tracking: Tracking,
    s3_server,
    shared_data: Path,
    small_imdb_dir: Path,
    tmp_path_factory,
) -> Submitted:
    """The tiny pipeline submitted, its driver killed once fine-tuning has committed a
    checkpoint to the bucket, and submitted again."""
    from mlflow import MlflowClient

    cache = Path(tmp_path_factory.mktemp("model-cache"))
    extra = (
        "--set", "stages.0.params.overrides=[train.steps=40,eval.every=20,checkpoint.every=20]",
        *shorter(small_imdb_dir, epochs=2),  # killed after the first, resumed for the second
    )  # fmt: skip
    submit(cluster, "pipeline-1", tracking, shared_data, cache, extra=extra)
    _wait_for_finetuning_checkpoint(s3_server, cluster, "pipeline-1")
    driver = job_client(cluster).get_job_info("pipeline-1").driver_info
    os.kill(int(driver.pid), signal.SIGKILL)  # the node's own process table: one machine
    assert wait(cluster, "pipeline-1", 120) == "FAILED"
    pretrain = _stage_run(MlflowClient(tracking.uri), "pretrain")
    assert pretrain.info.status == "FINISHED"

    submit(cluster, "pipeline-2", tracking, shared_data, cache, extra=extra)
    status = wait(cluster, "pipeline-2")
    text = logs(cluster, "pipeline-2")
    assert status == "SUCCEEDED", text[-5000:]
    return Submitted(text, pretrain, cache)


def test_submitted_pipeline_registers_a_champion_that_predicts(submitted, tracking, s3_server):
    import pyarrow.fs

    from perceiver_core.predict import classify
    from pipelines.tracking.models import load_model

    for stage in ("pretrain", "finetune-imdb", "evaluate", "promote", "showcase"):
        assert f"{stage}" in submitted.logs
    assert "fill-mask:" in submitted.logs and "MLflow" in submitted.logs  # where to look
    # A quiet console: no library's progress bars, no notes on what fine-tuning expects.
    for noise in ("Downloading artifacts", "it/s]", "newly initialised"):
        assert noise not in submitted.logs, noise
    loaded = load_model(
        "models:/perceiver-imdb@champion", tracking_uri=tracking.uri, expect="classifier"
    )
    predictions = classify(loaded.model, TEXTS)
    assert {p.label for p in predictions} <= {"neg", "pos"}
    assert all(0.5 <= p.score <= 1.0 for p in predictions)
    # Both models' files are in the tracking server's bucket, every checkpoint in the run storage.
    fs = s3_server.filesystem()
    stored = [
        i.path
        for i in fs.get_file_info(pyarrow.fs.FileSelector(BUCKET, recursive=True))
        if i.path.startswith((f"{BUCKET}/pipeline-mlflow/", f"{BUCKET}/pipeline/"))
    ]
    assert sum(p.endswith("model.safetensors") for p in stored if "/pipeline-mlflow/" in p) >= 2
    assert any("/pipeline/" in p and "/checkpoint_" in p for p in stored)


def test_killed_during_finetuning_resumes_without_redoing_anything(submitted, tracking) -> None:
    """The driver killed while fine-tuning and the job submitted again: pretraining is not redone,
    fine-tuning resumes from its checkpoint in the bucket, and the registry holds what one
    uninterrupted run registers (one version of each model, champions)."""
    from mlflow import MlflowClient

    assert "skip" in submitted.logs.lower()
    assert "restored step " in submitted.logs  # fine-tuning, from the bucket
    again = _stage_run(MlflowClient(tracking.uri), "pretrain")
    assert again.info.run_id == submitted.pretrain_run.info.run_id
    assert again.info.end_time == submitted.pretrain_run.info.end_time  # not run a second time
    state = registry_state(tracking.uri)
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


def _wait_for_finetuning_checkpoint(s3_server, cluster, job_id: str, timeout_s: float = 600):
    """Until the fine-tuning stage has committed a checkpoint to the bucket (its Ray Train run's
    snapshot names one)."""
    import pyarrow.fs

    fs = s3_server.filesystem()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = fs.get_file_info(
            pyarrow.fs.FileSelector(f"{BUCKET}/pipeline", recursive=True, allow_not_found=True)
        )
        for info in found:
            if "finetune" in info.path and info.path.endswith("checkpoint_manager_snapshot.json"):
                with fs.open_input_stream(info.path) as f:
                    if b"checkpoint_" in f.read():
                        return
        status = str(job_client(cluster).get_job_status(job_id))
        assert not status.endswith(("FAILED", "SUCCEEDED")), logs(cluster, job_id)[-3000:]
        time.sleep(2)
    raise TimeoutError("fine-tuning committed no checkpoint")


def test_retraining_promotes_only_a_better_model_and_repeats_as_a_no_op(
    submitted, cluster, tracking, shared_data, small_imdb_dir
) -> None:
    from mlflow import MlflowClient

    before = registry_state(tracking.uri)
    retrain = {
        "module": "jobs.retrain",
        "config": "jobs/configs/retrain_tiny.yaml",
        "extra": tuple(shorter(small_imdb_dir, epochs=1)),
    }
    submit(cluster, "retrain-1", tracking, shared_data, submitted.cache, **retrain)
    status = wait(cluster, "retrain-1")
    assert status == "SUCCEEDED", logs(cluster, "retrain-1")[-5000:]
    after = registry_state(tracking.uri)
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
    client = MlflowClient(tracking.uri, registry_uri=tracking.uri)
    parent = client.get_model_version("perceiver-imdb", version).tags["lineage.parent"]
    assert parent.startswith("models:/perceiver-mlm/")

    submit(cluster, "retrain-2", tracking, shared_data, submitted.cache, **retrain)
    status = wait(cluster, "retrain-2")
    text = logs(cluster, "retrain-2")
    assert status == "SUCCEEDED", text[-5000:]
    assert registry_state(tracking.uri) == after  # the same data: nothing changes
