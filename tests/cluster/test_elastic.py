"""Pretraining on a real three-node Ray cluster on this machine, with its documents, run storage
and checkpoints in a bucket on an S3-compatible server and the tracking server's artifacts there
too; surviving the loss of a node and of the driver, with every crop trained exactly once.

One elastic run (``python -m jobs.pretrain`` connected to the cluster; fp32, one to two workers,
one per worker node) loses a worker node's raylet (SIGKILL) at step 8, goes on with one worker,
grows back to two when the node returns, then loses its driver (SIGKILL) at step 18 and is
submitted again, resuming from the bucket in the same MLflow run. Every global step trains its
own crops exactly once, and the steps trained twice (before and after a restart, at different
group sizes) trained the same crops in the same order, with the same loss. The model it registers
(its files in the tracking server's bucket) is fine-tuned on the head node, where no pretraining
worker ran. Then a checkpoint with a payload planted in it is refused before anything is
unpickled.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fixtures_cluster import LocalCluster, node_env
from fixtures_s3 import BUCKET
from fixtures_train import REPO, TINY_CONFIG

from pipelines import storage

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

STEPS = 40
CROPS_PER_STEP = 64  # the tiny config's global batch, whatever the number of workers


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


def node_of(cluster: LocalCluster, pid: int):
    """The worker node whose processes include ``pid``."""
    for node in cluster.workers:
        tree = psutil.Process(node.process.pid).children(recursive=True)
        if any(p.pid == pid for p in tree):
            return node
    raise LookupError(f"process {pid} runs on no worker node")


@dataclass
class LostRun:
    name: str
    folder: Path
    output: str  # both jobs' output: every worker group's progress lines
    resumed: str  # the resubmitted job's output
    run_id: str


@pytest.fixture(scope="module")
def lost_run(cluster, s3_data, mlflow_server, tmp_path_factory) -> LostRun:
    """One elastic run (one to two workers) that loses a worker node at step 8, goes on with one
    worker, grows back to two when the node returns, then loses its driver at step 18 and is
    submitted again. Each worker group pauses 8 steps after it starts (a marker file per rank and
    group size), which is when the test strikes."""
    from mlflow import MlflowClient

    name, folder = "lost", tmp_path_factory.mktemp("lost")
    markers, log = folder / "markers", folder / "job.log"
    first = start_job(
        cluster,
        run_args(
            name, s3_data, mlflow_server.uri, folder,
            "--set=train.num_workers=[1, 2]", "--set=debug.pause_after_steps=8",
            "--set=run.max_failures=3",
        ),
        log,
    )  # fmt: skip
    try:
        wait_for((markers / "rank1-of-2.pid").exists, 400, "both workers at step 8", first)
        wait_for(lambda: committed(name, 5), 60, "checkpoint 5 to be committed", first)
        lost = node_of(cluster, int((markers / "rank1-of-2.pid").read_text()))
        lost.kill_raylet()
        cluster.wait_for_nodes(2, 120)
        # The run goes on with the worker that is left (from checkpoint 5), past checkpoint 10...
        wait_for((markers / "rank0-of-1.pid").exists, 300, "one worker at step 13", first)
        wait_for(lambda: committed(name, 10), 60, "checkpoint 10 to be committed", first)
        # ...and the node comes back: the group grows again from checkpoint 10, and pauses at 18.
        for marker in markers.glob("*-of-2.pid"):
            marker.unlink()
        lost.stop()
        lost.start()
        cluster.wait_for_nodes(3, 120)
        wait_for((markers / "rank1-of-2.pid").exists, 300, "two workers again, at step 18", first)
        wait_for(lambda: committed(name, 15), 60, "checkpoint 15 to be committed", first)
    finally:
        first.send_signal(signal.SIGKILL)  # the driver
        first.wait(timeout=30)
    assert not committed(name, STEPS)
    # Submitted again with a fixed group of two: an elastic run resubmitted after its driver died
    # would wait out the dead driver's resource reservation in Ray Train's autoscaling
    # coordinator (180 s in Ray 2.60). The group size is a placement setting, free to change.
    resumed = folder / "resumed.log"
    second = start_job(
        cluster,
        run_args(
            name, s3_data, mlflow_server.uri, folder,
            "--set=train.num_workers=2", "--set=debug.pause_after_steps=8",
        ),
        resumed,
    )  # fmt: skip
    assert second.wait(timeout=500) == 0, resumed.read_text()[-3000:]
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("cluster").experiment_id],
        filter_string=f"attributes.run_name = '{name}'",
    )
    assert len(runs) == 1  # the same MLflow run throughout
    text = resumed.read_text()
    return LostRun(name, folder, log.read_text() + text, text, runs[0].info.run_id)


def attempts(folder: Path) -> dict[int, dict[str, dict]]:
    """By global step, what each worker group (attempt) that ran it trained: world size and the
    sample ids in position order."""
    found: dict[int, dict[str, dict]] = {}
    for r in sample_records(folder):
        entry = found.setdefault(r["step"], {}).setdefault(
            r["attempt"], {"world_size": r["world_size"], "rows": []}
        )
        entry["rows"] += list(zip(r["positions"], r["sample_ids"], strict=True))
    return {
        step: {
            attempt: {
                "world_size": e["world_size"],
                "sample_ids": [i for _, i in sorted(e["rows"])],
            }
            for attempt, e in by_attempt.items()
        }
        for step, by_attempt in found.items()
    }


def printed_losses(output: str, name: str) -> dict[int, list[float]]:
    """Every loss rank 0 printed, by step (a step trained again after a restart appears twice)."""
    losses: dict[int, list[float]] = {}
    for step, loss in re.findall(rf"\b{name} \| step (\d+)/{STEPS} \| loss (\d+\.\d+)", output):
        losses.setdefault(int(step), []).append(float(loss))
    return losses


def test_node_and_driver_lost_every_crop_trained_once_whatever_the_group_size(
    lost_run: LostRun, mlflow_server, s3_server
) -> None:
    import pyarrow.fs
    from mlflow import MlflowClient

    run = lost_run
    restored = [int(x.split()[0]) for x in run.resumed.split("restored step ")[1:]]
    assert restored and restored[0] == 15, restored  # from the bucket, where the first job left it
    client = MlflowClient(mlflow_server.uri)
    assert sorted(metric(client, run.run_id, "train/loss")) == list(range(1, STEPS + 1))
    assert client.get_run(run.run_id).info.status == "FINISHED"

    steps = final_steps(run.folder / "samples")
    assert_every_crop_once(steps)
    sizes = [steps[s]["world_size"] for s in sorted(steps)]
    assert sizes == [2] * 5 + [1] * 5 + [2] * (STEPS - 10), sizes  # shrank, then grew back

    # Steps trained again after a restart (6-8 by one worker after two had; 11-13 by two after
    # one had; 16-18 by the resubmitted job): the same crops, in the same global order, and the
    # same loss, whatever the group size.
    by_step, losses = attempts(run.folder / "samples"), printed_losses(run.output, run.name)
    again = {step for step, ran in by_step.items() if len(ran) > 1}
    assert {6, 7, 8, 11, 12, 13, 16, 17, 18} <= again, sorted(again)
    for step in again:
        ran = list(by_step[step].values())
        assert all(a["sample_ids"] == ran[0]["sample_ids"] for a in ran), step
        spread = max(losses[step]) - min(losses[step])
        assert spread <= 1.5e-4, (step, losses[step])  # printed to 4 decimals
    assert {a["world_size"] for s in (6, 11) for a in by_step[s].values()} == {1, 2}
    # A group that pauses is stopped before it prints the step it paused at (8, 13, 18).
    assert all(len(losses[s]) == 2 for s in (6, 7, 11, 12, 16, 17)), losses

    final = f"s3://{BUCKET}/cluster-runs/{run.name}/checkpoint_{STEPS:08d}"
    state = json.loads(storage.read_text(f"{final}/state.json"))
    assert state["task"]["consumed"] == STEPS * CROPS_PER_STEP
    # The model is registered, its files in the tracking server's bucket.
    assert client.search_model_versions(f"run_id = '{run.run_id}'")
    fs = s3_server.filesystem()
    stored = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/mlflow", recursive=True))
    assert any(i.path.endswith("model.safetensors") for i in stored)


def test_the_registered_model_is_fine_tuned_on_another_node(
    cluster, lost_run: LostRun, mlflow_server, s3_server, small_imdb_dir: Path, tmp_path: Path
) -> None:
    """``jobs.finetune`` on the cluster, its one worker on the head (the only node with a
    ``finetuner`` slot, and one that never trained): the starting model comes from the registry,
    its files from the bucket, and the result is registered there too."""
    import pyarrow.fs
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    (version,) = client.search_model_versions(f"run_id = '{lost_run.run_id}'")
    init = f"models:/{version.name}/{version.version}"
    args = [
        "--config", str(REPO / "jobs" / "configs" / "finetune_imdb_tiny.yaml"),
        f"--set=init={init}",
        "--set=run.name=cluster-ft",
        f"--set=run.storage_path=s3://{BUCKET}/cluster-runs",
        f"--set=tracking.tracking_uri={mlflow_server.uri}",
        "--set=tracking.experiment=cluster",
        f"--set=data.path={small_imdb_dir}",
        "--set=data.files={split}.parquet",
        "--set=stages.0.epochs=1",
        "--set=data.max_length=128",  # the plumbing across nodes, not accuracy
        "--set=train.num_workers=1",
        "--set=train.worker_resources.finetuner=1",
        "--set=register.name=perceiver-imdb-cluster",
    ]  # fmt: skip
    log = tmp_path / "finetune.log"
    with open(log, "wb") as out:
        job = subprocess.run(
            [sys.executable, "-m", "jobs.finetune", *args],
            cwd=REPO,
            env={**node_env(), "RAY_ADDRESS": cluster.address},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=400,
        )
    assert job.returncode == 0, log.read_text()[-3000:]
    # The summary line; Ray may forward a worker's last lines after it.
    (summary,) = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert summary["model"] == "models:/perceiver-imdb-cluster/1"
    stage = client.search_runs(
        [client.get_experiment_by_name("cluster").experiment_id],
        filter_string="attributes.run_name = 'cluster-ft-classify'",
    )[0]
    assert stage.data.tags["finetune.init"] == init
    assert stage.info.status == "FINISHED"
    source = client.get_model_version("perceiver-imdb-cluster", "1").source  # models:/<model id>
    model_id = source.removeprefix("models:/")
    stored = s3_server.filesystem().get_file_info(
        pyarrow.fs.FileSelector(f"{BUCKET}/mlflow", recursive=True)
    )
    assert any(model_id in i.path and i.path.endswith("model.safetensors") for i in stored)


def test_a_checkpoint_with_planted_code_is_refused_before_anything_is_unpickled(
    cluster, lost_run: LostRun, s3_data, mlflow_server, s3_server, tmp_path
) -> None:
    """Someone with write access to the bucket plants code in the checkpoint a resume reads."""
    import torch

    run = lost_run
    final = f"s3://{BUCKET}/cluster-runs/{run.name}/checkpoint_{STEPS:08d}"
    marker = tmp_path / "payload-ran"
    planted = f"{final}/engine/step_{STEPS:08d}/mp_rank_00_model_states.pt".split("://", 1)[1]
    payload = io.BytesIO()
    torch.save({"module": Payload(marker)}, payload)
    with s3_server.filesystem().open_output_stream(planted) as f:
        f.write(payload.getvalue())
    args = run_args(
        run.name, s3_data, mlflow_server.uri, run.folder,
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
