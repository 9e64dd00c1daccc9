"""Fixtures of the training and tracking tests: a real ``mlflow server`` on 127.0.0.1, the shared
data index built once, and tiny pretraining configs. Loaded from conftest.py (``pytest_plugins``).

The server runs as a subprocess in its own session; it is stopped by signalling that process
group (the server and the web workers it forks), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "jobs" / "configs" / "pretrain_tiny.yaml"


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_single_process_script(script: str, *args: str) -> Any:
    """Run ``script`` (Python that prints ``RESULT<json>``) in a fresh process set up as a
    one-rank torch.distributed job, and return the JSON. DeepSpeed's communication setup is once
    per process and must not leak into the test session's Ray driver."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """Stop the process group ``process`` leads (started with ``start_new_session``): SIGTERM,
    ``grace_s`` to exit, then SIGKILL for it and any helper that outlived it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


class MlflowServer:
    """``mlflow server`` with an SQLite backend, on a fixed port so that it can be stopped and
    started again at the same address. Artifacts go to ``artifacts`` (a local folder by default,
    or an ``s3://`` URL), proxied by the server: clients never talk to the store themselves."""

    def __init__(self, root: Path, port: int | None = None, artifacts: str | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.artifacts = artifacts or str(root / "artifacts")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            self.artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.root / 'server.log').read_text()}"
                )
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server did not start in {timeout_s} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        stop_group(self.process, grace_s=5)
        self.process = None
        # The port must be free before a restart can bind it again.
        deadline = time.monotonic() + 20
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server) -> Iterator[MlflowServer]:
    """The tracking server of the tests, its artifacts (every registered model) in a bucket on the
    S3-compatible server."""
    from fixtures_s3 import BUCKET

    server = MlflowServer(
        tmp_path_factory.mktemp("mlflow-server"), artifacts=f"s3://{BUCKET}/mlflow"
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


# The reviews of the IMDB sample that tests checking fine-tuning's plumbing (not its accuracy) train
# and evaluate on: the first of each split (the sample's rows are shuffled).
TRAIN_REVIEWS, TEST_REVIEWS = 1024, 512


@pytest.fixture(scope="session")
def small_imdb_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``train.parquet`` and ``test.parquet``: the first ``TRAIN_REVIEWS`` and
    ``TEST_REVIEWS`` rows of the sample's."""
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("imdb-small")
    for split, rows in (("train", TRAIN_REVIEWS), ("test", TEST_REVIEWS)):
        table = pq.read_table(shared_data / "imdb" / f"{split}.parquet").slice(0, rows)
        pq.write_table(table, folder / f"{split}.parquet")
    return folder


@pytest.fixture(scope="session")
def tiny_data_index(ray_session, shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny config's data index over ../shared/data, built once for all training tests."""
    from pipelines.config import load_config
    from pipelines.data.index import INDEX_FILE, build_index
    from pipelines.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, TINY_CONFIG, [f"data.data_dir={shared_data}"])
    path = tmp_path_factory.mktemp("index") / INDEX_FILE
    build_index(cfg.data).save(path)
    return path


def tiny_config(
    shared_data: Path | str,
    storage: Path | str,
    tracking_uri: str,
    name: str,
    overrides: Sequence[str] = (),
    index: Path | None = None,
):
    """The shipped tiny config, pointed at test data and storage (folders or ``s3://`` URLs), a
    test server and a run name; with the session's prebuilt data index copied into a local run
    folder (what a resumed run would reuse)."""
    from pipelines.config import load_config
    from pipelines.train.config import PretrainConfig

    base = [
        f"run.name={name}",
        f"run.storage_path={storage}",
        f"data.data_dir={shared_data}",
        f"tracking.tracking_uri={tracking_uri}",
        "tracking.experiment=tests",
        "tracking.close_timeout_s=60",
    ]
    cfg = load_config(PretrainConfig, TINY_CONFIG, [*base, *overrides])
    if index is not None:
        run_dir = Path(storage) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / index.name).write_text(index.read_text())  # the run's saved index
    return cfg


# The session's pretraining run (``pretrained_run``): its steps, and when it evaluates.
PRETRAIN_STEPS, PRETRAIN_EVAL_EVERY = 100, 25


def cpus_freed(ray, cpus: float, within_s: float = 20.0) -> bool:
    """Whether ``cpus`` CPUs of the Ray runtime are free within ``within_s`` seconds (the actors of
    finished work give theirs back asynchronously)."""
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0.0) < cpus:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="session")
def pretrained_run(ray_session, s3_data, mlflow_server, tmp_path_factory):
    """The shipped tiny pretraining config, shortened, run once for every test that needs a
    pretrained model: real Ray Train with 2 workers under DeepSpeed ZeRO-3 (the stage that
    shards weights as well), its documents, run storage and checkpoints in a bucket on the
    S3-compatible server; registered as perceiver-mlm, its files in the tracking server's
    bucket. ``(config, result, a local copy of the final checkpoint)``."""
    from fixtures_s3 import BUCKET

    from pipelines import storage as run_storage
    from pipelines.train import run_pretraining

    storage = f"s3://{BUCKET}/runs"
    cfg = tiny_config(
        s3_data,
        storage,
        mlflow_server.uri,
        "tiny-zero3",
        [
            "train.zero_stage=3",
            f"train.steps={PRETRAIN_STEPS}",
            "train.log_every=5",
            f"eval.every={PRETRAIN_EVAL_EVERY}",
            "checkpoint.every=50",
        ],
    )
    # Two 0.5-CPU workers and a 1-CPU crop task: every CPU of the session's runtime. One kept by
    # an earlier test's leftovers would stall the crop stream until Ray Data gives up (30 min).
    total = ray_session.cluster_resources()["CPU"]
    assert cpus_freed(ray_session, total), (
        f"only {ray_session.available_resources().get('CPU', 0.0)} of the session's {total} CPUs "
        "are free: an earlier test left actors or tasks running"
    )
    result = run_pretraining(cfg)
    assert result.checkpoint_path.startswith(f"{storage}/tiny-zero3/")
    assert result.registered_model is not None
    scratch = tmp_path_factory.mktemp("checkpoint")
    return cfg, result, run_storage.local_copy(result.checkpoint_path, scratch)


@pytest.fixture(scope="session")
def pretrained(pretrained_run) -> str:
    """The registry URI of the session's pretrained model (``models:/perceiver-mlm/N``)."""
    return pretrained_run[1].registered_model.registry_uri
