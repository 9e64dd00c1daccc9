"""The entry points' fast failures, as a user meets them: run as processes, they stop at once with
one clear line and exit code 2, before starting Ray or training."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fixtures_train import REPO, free_port

DEMO = REPO / "jobs" / "configs" / "demo.yaml"


def run_job(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    import os

    environ = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "HF_ENDPOINT")}
    environ.update(env, PYTHONPATH=str(REPO))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    return result, time.monotonic() - started


def test_offline_without_local_data_stops_at_once(tmp_path: Path) -> None:
    # No ../shared/data beside this folder, and a Hub endpoint where nothing listens.
    unreachable = f"http://127.0.0.1:{free_port()}"
    result, elapsed = run_job(
        ["jobs.pipeline", "--config", str(DEMO)], tmp_path, HF_ENDPOINT=unreachable
    )
    assert result.returncode == 2, result.stderr
    assert "no local data" in result.stderr and "not reachable" in result.stderr
    assert unreachable in result.stderr
    assert elapsed < 30


def test_a_data_dir_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    result, _ = run_job(
        ["jobs.pipeline", "--config", str(DEMO)], tmp_path, DATA_DIR=str(tmp_path / "nowhere")
    )
    assert result.returncode == 2 and "is not a folder" in result.stderr


def test_config_mistakes_name_the_key(tmp_path: Path) -> None:
    finetune = REPO / "jobs" / "configs" / "finetune_imdb_tiny.yaml"
    result, _ = run_job(
        ["jobs.finetune", "--config", str(finetune), "--set", "stages.0.epoch=3"], tmp_path
    )
    assert result.returncode == 2 and "stages.0.epoch: unknown key" in result.stderr
    # A file store, which this MLflow refuses with a traceback of its own.
    store = (tmp_path / "mlruns").as_uri()
    result, _ = run_job(
        ["jobs.finetune", "--config", str(finetune), "--set", f"tracking.tracking_uri={store}"],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: tracking.tracking_uri: {store!r} is an MLflow file store, which this MLflow no "
        "longer opens; use sqlite:///<folder>/mlflow.db or a server's http:// URL (or set "
        "MLFLOW_ALLOW_FILE_STORE=true to keep the file store)"
    ]
    result, _ = run_job(
        ["jobs.pipeline", "--config", str(DEMO), "--set", "stages.1.inputs.init_model=x.y"],
        REPO,
    )
    assert result.returncode == 2 and "stages.1" in result.stderr


def test_retraining_without_a_champion_stops_before_training(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    result, elapsed = run_job(
        ["jobs.retrain", "--config", "jobs/configs/retrain_tiny.yaml"],
        REPO,
        MLFLOW_TRACKING_URI=store,
    )
    assert result.returncode == 2, result.stderr
    assert "models:/perceiver-mlm@champion does not exist" in result.stderr
    assert elapsed < 60


def test_without_ray_address_a_job_starts_a_private_ray_on_loopback(tmp_path: Path) -> None:
    # What every job's start_ray does: a new Ray (never one /tmp/ray names) on 127.0.0.1 only.
    import os

    script = (
        "from jobs import start_ray\n"
        "start_ray()\n"
        "import ray, psutil\n"
        "ctx = ray.get_runtime_context()\n"
        "port = int(ctx.gcs_address.rsplit(':', 1)[1])\n"
        "hosts = {c.laddr.ip for c in psutil.net_connections('tcp')\n"
        "         if c.status == 'LISTEN' and c.laddr.port == port}\n"
        "print('RESULT', ctx.gcs_address, sorted(hosts))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    _, address, hosts = line.split(" ", 2)
    assert address.startswith("127.0.0.1:")
    assert hosts in ("['127.0.0.1']", "['::ffff:127.0.0.1']"), hosts
