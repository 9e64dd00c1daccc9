"""How long a two-node pretraining run waits for its data when the documents are on object storage.

A Ray head and one worker node started here with ``ray start`` on 127.0.0.1 (one ``trainer`` slot
each, so the run's two workers land one per node), moto's S3 server (``benchmarks/s3_reads.py``)
with the sample data copied into a bucket, and ``python -m jobs.pretrain`` connected to the
cluster: the tiny config, 2 workers, run storage in the bucket. It runs twice, documents on
``s3://`` and on local disk. The training loop measures the share of each logged interval that
rank 0 spent waiting for its next micro-batch (``perf/data_wait_fraction``); reported is its mean
over the logged intervals after the first (which holds the stream's start), and the job's wall time.
Everything started here is stopped by its process group, never ``ray stop``.

    python benchmarks/cluster_data_wait.py [--data-dir ../shared/data] [--steps 60]

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe
from s3_reads import BUCKET, Server, free_port, log

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "jobs" / "configs" / "pretrain_tiny.yaml"


def start_node(args: list[str], temp: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    ports = [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    return subprocess.Popen(
        [shutil.which("ray") or "ray", "start", "--block", f"--temp-dir={temp}", *ports, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float = 120) -> None:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        if out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise SystemExit(f"{count} Ray nodes did not come up at {address}")


def run_job(side: str, data_dir: str, args, env: dict[str, str], store: str) -> dict:
    command = [
        sys.executable, "-m", "jobs.pretrain", "--config", str(TINY),
        f"--set=run.name=wait-{side}",
        f"--set=run.storage_path=s3://{BUCKET}/runs",
        f"--set=data.data_dir={data_dir}",
        f"--set=tracking.tracking_uri={store}",
        "--set=tracking.experiment=data-wait",
        f"--set=train.steps={args.steps}",
        "--set=train.log_every=5",
        "--set=train.worker_resources.trainer=1",
        f"--set=eval.every={args.steps}",
        f"--set=checkpoint.every={args.steps}",
    ]  # fmt: skip
    started = time.monotonic()
    out = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if out.returncode != 0:
        raise SystemExit(f"the {side} run failed:\n{out.stderr[-3000:]}")
    (summary,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    from mlflow import MlflowClient

    history = MlflowClient(store).get_metric_history(summary["run_id"], "perf/data_wait_fraction")
    fractions = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    result = {
        "wall_s": round(wall, 1),
        "data_wait_fraction": round(sum(fractions) / max(len(fractions), 1), 4),
        "max_interval_fraction": round(max(fractions, default=0.0), 4),
        "intervals": len(fractions),
    }
    log(f"{side}: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"sample data not found at {args.data_dir} (pass --data-dir)")

    scratch = Path(tempfile.mkdtemp(prefix="wait-bench-", dir="/tmp"))  # short: Ray's sockets
    server = Server(scratch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(REPO_ROOT),
    )
    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        import pyarrow.fs

        fs = pyarrow.fs.S3FileSystem(endpoint_override=server.endpoint, allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        pyarrow.fs.copy_files(
            str(args.data_dir), f"{BUCKET}/data", pyarrow.fs.LocalFileSystem(), fs
        )
        port = free_port()
        address = f"127.0.0.1:{port}"
        slot = '--resources={"trainer": 1}'
        nodes.append(
            start_node(
                ["--head", f"--port={port}", "--num-cpus=2", slot, "--include-dashboard=false",
                 f"--ray-client-server-port={free_port()}"],
                scratch / "head", env,
            )
        )  # fmt: skip
        wait_for_nodes(address, 1, env)
        nodes.append(
            start_node([f"--address={address}", "--num-cpus=1", slot], scratch / "worker", env)
        )
        wait_for_nodes(address, 2, env)
        log(f"cluster of 2 nodes at {address}; S3 at {server.endpoint}")
        job_env = {**env, "RAY_ADDRESS": address}
        store = f"sqlite:///{scratch / 'mlflow.db'}"
        sides = {
            "s3": run_job("s3", f"s3://{BUCKET}/data", args, job_env, store),
            "local": run_job("local", str(args.data_dir.resolve()), args, job_env, store),
        }

        summary = {
            "benchmark": "two-node pretraining, data wait",
            "preset": "tiny",
            "steps": args.steps,
            "workers": 2,
            **sides,
            "machine": describe(),
        }
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(node.pid, signal.SIGKILL)
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
