"""Pretraining on a real three-node Ray cluster on this machine, with its documents, run storage
and checkpoints in a bucket on an S3-compatible server and the tracking server's artifacts there
too; surviving the loss of the driver and of a node, with every crop trained exactly once.

Both runs use the same training settings (fp32, so that runs of different world sizes can be
compared closely; two workers, the second run elastic between one and two) and are
``python -m jobs.pretrain`` subprocesses connected to the cluster:

1. the driver is SIGKILLed mid-run and the job submitted again: it resumes from the committed
   checkpoint in the bucket, in the same MLflow run; then a checkpoint with a payload planted in
   it is refused before anything is unpickled;
2. a worker node's raylet is SIGKILLed mid-run: the elastic run goes on with one worker, grows
   back to two when the node returns, and every global step trains the same crops, in the same
   order, as the first run; the loss curves agree.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fixtures_cluster import LocalCluster, node_env
from fixtures_s3 import BUCKET
from fixtures_train import REPO, TINY_CONFIG

from pipelines.train import storage

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

STEPS = 40
CROPS_PER_STEP = 64  # the tiny config's global batch, whatever the number of workers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server) -> Iterator[LocalCluster]:
    rig = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


def wait_for(predicate, timeout_s: float, what: str, job: subprocess.Popen | None = None) -> None:
    """Until ``predicate()``; fails at once if ``job`` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if job is not None and job.poll() is not None:
            tail = job_logs[job.pid].read_text()[-3000:]
            raise AssertionError(f"the job ended (exit {job.returncode}) before {what}:\n{tail}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def run_args(name: str, data: str, tracking_uri: str, folder: Path, *extra: str) -> list[str]:
    """The settings both runs share, so that either is the other's reference."""
    return [
        f"--set=run.name={name}",
        f"--set=run.storage_path=s3://{BUCKET}/cluster-runs",
        f"--set=data.data_dir={data}",
        f"--set=tracking.tracking_uri={tracking_uri}",
        "--set=tracking.experiment=cluster",
        f"--set=train.steps={STEPS}",
        "--set=train.log_every=1",
        "--set=train.precision=fp32",
        "--set=train.zero_stage=0",  # an elastic group: ZeRO-1-3 shards cannot change size
        "--set=train.elastic_resize_s=5",
        "--set=train.worker_resources.trainer=1",  # one worker per worker node
        "--set=eval.every=20",
        "--set=checkpoint.every=5",
        "--set=debug.pause_s=120",
        f"--set=debug.marker_dir={folder / 'markers'}",
        f"--set=debug.samples_dir={folder / 'samples'}",
        *extra,
    ]


job_logs: dict[int, Path] = {}  # the output file of each job started, by PID


def start_job(cluster: LocalCluster, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "jobs.pretrain", "--config", str(TINY_CONFIG), *args]
    env = {**node_env(), "RAY_ADDRESS": cluster.address}
    with open(log, "ab") as out:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    job_logs[job.pid] = log
    return job


def committed(name: str, step: int) -> bool:
    text = storage.read_text(f"s3://{BUCKET}/cluster-runs/{name}/checkpoint_manager_snapshot.json")
    return text is not None and f"checkpoint_{step:08d}" in text


def sample_records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()]


def final_steps(folder: Path) -> dict[int, dict]:
    """What each global step trained on in the end: the records of the last worker group
    (attempt) that ran it, a step run again after a restart replacing the one rolled back."""
    records = sample_records(folder)
    started: dict[str, float] = {}
    for r in records:
        started[r["attempt"]] = min(started.get(r["attempt"], r["time"]), r["time"])
    steps: dict[int, dict] = {}
    for step in sorted({r["step"] for r in records}):
        ran = [r for r in records if r["step"] == step]
        last = max({r["attempt"] for r in ran}, key=started.__getitem__)
        final = sorted((r for r in ran if r["attempt"] == last), key=lambda r: r["positions"][0])
        steps[step] = {
            "positions": sorted(p for r in final for p in r["positions"]),
            "sample_ids": [i for r in final for i in r["sample_ids"]],
            "world_size": final[0]["world_size"],
        }
    return steps


def assert_every_crop_once(steps: dict[int, dict]) -> None:
    assert sorted(steps) == list(range(1, STEPS + 1))
    for step, trained in steps.items():
        first = (step - 1) * CROPS_PER_STEP
        assert trained["positions"] == list(range(first, first + CROPS_PER_STEP)), step


def metric(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def resumed_job(cluster, s3_data, mlflow_server, tmp_path_factory):
    """Run 1: the driver killed at step 15 (after checkpoint 10 is committed), then resubmitted."""
    from mlflow import MlflowClient

    name, folder = "driver-lost", tmp_path_factory.mktemp("driver-lost")
    # A fixed group: an elastic one resubmitted after its driver died would wait out the dead
    # driver's resource reservation in Ray Train's autoscaling coordinator (180 s in Ray 2.60).
    args = run_args(
        name, s3_data, mlflow_server.uri, folder,
        "--set=train.num_workers=2", "--set=debug.pause_after_steps=15",
    )  # fmt: skip
    log = folder / "job.log"
    first = start_job(cluster, args, log)
    try:
        wait_for(lambda: committed(name, 10), 400, "checkpoint 10 in the bucket", first)
        wait_for((folder / "markers" / "rank0-of-2.pid").exists, 120, "step 15", first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert not committed(name, STEPS)
    second = start_job(cluster, args, log)
    assert second.wait(timeout=500) == 0, log.read_text()[-3000:]
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("cluster").experiment_id],
        filter_string=f"attributes.run_name = '{name}'",
    )
    return name, folder, log.read_text(), runs


def test_driver_lost_job_resubmitted_resumes_from_the_bucket(
    cluster, resumed_job, s3_data, mlflow_server, s3_server, tmp_path
) -> None:
    import pyarrow.fs
    import torch
    from mlflow import MlflowClient

    name, folder, output, runs = resumed_job
    restored = [int(x.split()[0]) for x in output.split("restored step ")[1:]]
    assert restored and restored[0] in (10, 15)
    assert len(runs) == 1  # the same MLflow run continued
    client = MlflowClient(mlflow_server.uri)
    run_id = runs[0].info.run_id
    assert sorted(metric(client, run_id, "train/loss")) == list(range(1, STEPS + 1))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_every_crop_once(final_steps(folder / "samples"))
    final = f"s3://{BUCKET}/cluster-runs/{name}/checkpoint_{STEPS:08d}"
    state = json.loads(storage.read_text(f"{final}/state.json"))
    assert state["task"]["consumed"] == STEPS * CROPS_PER_STEP
    # The model is registered, its files in the tracking server's bucket.
    assert client.search_model_versions(f"run_id = '{run_id}'")
    fs = s3_server.filesystem()
    stored = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/mlflow", recursive=True))
    assert any(i.path.endswith("model.safetensors") for i in stored)

    # Someone with write access to the bucket plants code in the checkpoint a resume reads.
    marker = tmp_path / "payload-ran"
    planted = f"{final}/engine/step_{STEPS:08d}/mp_rank_00_model_states.pt".split("://", 1)[1]
    payload = io.BytesIO()
    torch.save({"module": Payload(marker)}, payload)
    with fs.open_output_stream(planted) as f:
        f.write(payload.getvalue())
    args = run_args(
        name, s3_data, mlflow_server.uri, folder,
        "--set=train.num_workers=2", "--set=run.max_failures=0",
    )  # fmt: skip
    third = start_job(cluster, args, tmp_path / "planted.log")
    assert third.wait(timeout=300) == 2
    lines = (tmp_path / "planted.log").read_text().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines[-20:]
    assert "mp_rank_00_model_states.pt" in errors[0] and "nothing was loaded" in errors[0]
    assert not marker.exists()


class Payload:
    """Creates ``marker`` when unpickled (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def node_of(cluster: LocalCluster, pid: int):
    """The worker node whose processes include ``pid``."""
    for node in cluster.workers:
        tree = psutil.Process(node.process.pid).children(recursive=True)
        if any(p.pid == pid for p in tree):
            return node
    raise LookupError(f"process {pid} runs on no worker node")


def test_node_lost_run_shrinks_regrows_and_trains_every_crop_once(
    cluster, resumed_job, s3_data, mlflow_server, tmp_path
) -> None:
    from mlflow import MlflowClient

    name = "node-lost"
    args = run_args(
        name,
        s3_data,
        mlflow_server.uri,
        tmp_path,
        "--set=train.num_workers=[1, 2]",
        # Each group pauses 8 steps after it starts: the two workers at step 8, and the one left
        # after the node is lost (from checkpoint 5) at step 13, past checkpoint 10.
        "--set=debug.pause_after_steps=8",
        "--set=run.max_failures=3",
    )
    log = tmp_path / "job.log"
    job = start_job(cluster, args, log)
    try:
        markers = tmp_path / "markers"
        wait_for((markers / "rank1-of-2.pid").exists, 400, "both workers at step 8", job)
        wait_for(lambda: committed(name, 5), 60, "checkpoint 5 to be committed", job)
        lost = node_of(cluster, int((markers / "rank1-of-2.pid").read_text()))
        lost.kill_raylet()
        cluster.wait_for_nodes(2, 120)
        # The run goes on with the worker that is left, past its own checkpoint...
        wait_for((markers / "rank0-of-1.pid").exists, 300, "one worker at step 13", job)
        wait_for(lambda: committed(name, 10), 60, "checkpoint 10 to be committed", job)
        lost.stop()
        lost.start()  # ...and the node comes back: the group grows again, from checkpoint 10
        cluster.wait_for_nodes(3, 120)
        assert job.wait(timeout=500) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()

    steps = final_steps(tmp_path / "samples")
    assert_every_crop_once(steps)
    sizes = [steps[s]["world_size"] for s in sorted(steps)]
    assert sizes == [2] * 5 + [1] * 5 + [2] * (STEPS - 10), sizes  # shrank, then grew back
    # The same crops, in the same global order, as the run that lost its driver.
    reference = final_steps(resumed_job[1] / "samples")
    for step in steps:
        assert steps[step]["sample_ids"] == reference[step]["sample_ids"], step

    client = MlflowClient(mlflow_server.uri)
    run_id = client.search_runs(
        [client.get_experiment_by_name("cluster").experiment_id],
        filter_string=f"attributes.run_name = '{name}'",
    )[0].info.run_id
    ours = metric(client, run_id, "train/loss")
    theirs = metric(client, resumed_job[3][0].info.run_id, "train/loss")
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4), step
