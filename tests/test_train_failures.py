"""Surviving failures: a worker process killed mid-run, and a whole job killed and resubmitted.

Real processes are killed (SIGKILL by PID): the worker's PID comes from the marker file the loop
writes at ``debug.pause_at_step``; the job is a ``python -m jobs.pretrain`` subprocess connected to
the test session's Ray cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_train import REPO, TINY_CONFIG, tiny_config

from pipelines.train import run_pretraining

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

CROPS_PER_STEP = 64  # the tiny config: 2 workers x 32 crops


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def logged_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def consumed_crops(checkpoint: Path) -> int:
    return json.loads((checkpoint / "state.json").read_text())["task"]["consumed"]


def cfg_run_dir(cfg) -> Path:
    return Path(cfg.run.storage_path) / cfg.run.name


def test_killed_worker_is_replaced_and_training_continues(
    ray_session, shared_data, mlflow_server, tiny_data_index, tmp_path
) -> None:
    from mlflow import MlflowClient

    markers = tmp_path / "markers"
    steps = 40
    cfg = tiny_config(
        shared_data,
        tmp_path / "runs",
        mlflow_server.uri,
        "tiny-worker-killed",
        [
            f"train.steps={steps}",
            "train.log_every=1",
            "eval.every=20",
            "checkpoint.every=10",
            "run.max_failures=1",
            "debug.pause_at_step=25",
            "debug.pause_s=120",
            f"debug.marker_dir={markers}",
            f"debug.samples_dir={tmp_path / 'samples'}",
        ],
        index=tiny_data_index,
    )
    outcome: dict[str, object] = {}

    def drive() -> None:
        try:
            outcome["result"] = run_pretraining(cfg)
        except BaseException as error:
            outcome["error"] = error

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    marker = markers / "rank1.pid"
    wait_for(marker.exists, 300, "rank 1 to reach step 25")
    # Ray Train commits a reported checkpoint when its controller next polls the workers (every
    # 2 s); a failure before that falls back to the previous one. Either is correct; waiting for
    # the commit makes the restart resume from step 20.
    snapshot = cfg_run_dir(cfg) / "checkpoint_manager_snapshot.json"
    wait_for(
        lambda: snapshot.exists() and "checkpoint_00000020" in snapshot.read_text(),
        60,
        "checkpoint 20 to be committed",
    )
    os.kill(int(marker.read_text()), signal.SIGKILL)
    driver.join(timeout=400)
    assert not driver.is_alive(), "the run did not finish after the worker was replaced"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]

    client = MlflowClient(mlflow_server.uri)
    # Exactly one value per step, although steps 21-25 ran twice (before and after the restart).
    assert logged_steps(client, result.run_id, "train/loss") == list(range(1, steps + 1))
    assert logged_steps(client, result.run_id, "val/loss") == [20, steps]
    # Steps 21-25 ran twice; what each step finally trained on is exactly its crops, the same as
    # an uninterrupted run's: step k the stream positions [64 (k - 1), 64 k).
    assert consumed_crops(Path(result.checkpoint_path)) == steps * CROPS_PER_STEP
    trained = trained_positions(tmp_path / "samples")
    assert sorted(trained) == list(range(1, steps + 1))
    for step, positions in trained.items():
        assert positions == list(range((step - 1) * CROPS_PER_STEP, step * CROPS_PER_STEP)), step
    assert executions(tmp_path / "samples", 22) == 2  # before the kill and after the restart
    assert result.registered_model is not None


def sample_records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()]


def trained_positions(folder: Path) -> dict[int, list[int]]:
    """The stream positions each step trained on in the end: of every (step, micro-batch, rank),
    the last execution (a step run again after a restart replaces the one rolled back)."""
    last: dict[tuple[int, int, int], dict] = {}
    for record in sorted(sample_records(folder), key=lambda r: r["time"]):
        last[(record["step"], record["micro"], record["positions"][0])] = record
    steps: dict[int, list[int]] = {}
    for (step, _, _), record in last.items():
        steps.setdefault(step, []).extend(record["positions"])
    return {step: sorted(positions) for step, positions in steps.items()}


def executions(folder: Path, step: int) -> int:
    """How many times a step's first micro-batch of rank 0 was trained on."""
    first = (step - 1) * CROPS_PER_STEP
    return sum(r["positions"][0] == first for r in sample_records(folder))


def run_job(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "jobs.pretrain", "--config", str(TINY_CONFIG), *args]
    with open(log, "ab") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_killed_job_resubmitted_resumes_in_the_same_run(
    ray_session, shared_data, mlflow_server, tiny_data_index, tmp_path
) -> None:
    from mlflow import MlflowClient

    steps, name = 40, "tiny-job-killed"
    storage = tmp_path / "runs"
    tiny_config(shared_data, storage, mlflow_server.uri, name, index=tiny_data_index)
    args = [
        f"--set=run.name={name}",
        f"--set=run.storage_path={storage}",
        f"--set=data.data_dir={shared_data}",
        f"--set=tracking.tracking_uri={mlflow_server.uri}",
        "--set=tracking.experiment=tests",
        f"--set=train.steps={steps}",
        "--set=train.log_every=1",
        "--set=eval.every=20",
        "--set=checkpoint.every=10",
        # The first job waits at step 15 (so that it cannot finish before it is killed); the
        # resubmitted one passes (the hook fires once per run).
        "--set=debug.pause_at_step=15",
        "--set=debug.pause_s=120",
        f"--set=debug.marker_dir={tmp_path / 'markers'}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "job.log"
    client = MlflowClient(mlflow_server.uri)

    def run_id() -> str | None:
        runs = client.search_runs(
            [client.get_experiment_by_name("tests").experiment_id],
            filter_string=f"attributes.run_name = '{name}'",
        )
        return runs[0].info.run_id if runs else None

    first = run_job(args, env, log)
    snapshot = storage / name / "checkpoint_manager_snapshot.json"
    try:
        # Past the first checkpoint, once Ray Train has committed it, then kill the driver.
        wait_for(
            lambda: snapshot.exists() and "checkpoint_00000010" in snapshot.read_text(),
            300,
            "the first job's step-10 checkpoint to be committed",
        )
        wait_for((tmp_path / "markers" / "rank0.pid").exists, 120, "the first job at step 15")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    killed_run = run_id()
    assert (storage / name / "checkpoint_00000010" / "state.json").exists()
    assert not (storage / name / f"checkpoint_{steps:08d}").exists()

    second = run_job(args, env, log)
    assert second.wait(timeout=400) == 0, log.read_text()[-3000:]
    output = log.read_text()
    restored = [int(x.split()[0]) for x in output.split("restored step ")[1:]]
    assert restored and restored[0] in (10, 20)

    assert run_id() == killed_run  # the same MLflow run continued
    assert (
        len(
            client.search_runs(
                [client.get_experiment_by_name("tests").experiment_id],
                filter_string=f"attributes.run_name = '{name}'",
            )
        )
        == 1
    )
    assert logged_steps(client, killed_run, "train/loss") == list(range(1, steps + 1))
    final = storage / name / f"checkpoint_{steps:08d}"
    assert consumed_crops(final) == steps * CROPS_PER_STEP
    assert client.get_run(killed_run).info.status == "FINISHED"

    # Someone with write access to the storage plants code in the checkpoint a resume reads.
    import torch

    marker = tmp_path / "payload-ran"
    planted = final / "engine" / f"step_{steps:08d}" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, planted)
    # No retry: a checkpoint that fails its check fails the same way on every attempt.
    third = run_job([*args, "--set=run.max_failures=0"], env, tmp_path / "planted.log")
    assert third.wait(timeout=300) == 2
    lines = (tmp_path / "planted.log").read_text().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and planted.name in errors[0] and "nothing was loaded" in errors[0]
    assert not marker.exists()


class Payload:
    """Creates ``marker`` when unpickled (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))
