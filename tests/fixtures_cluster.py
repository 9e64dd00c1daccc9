"""A real multi-node Ray cluster on this machine: a head and two worker nodes, each started with
``ray start --block`` in its own process group, with its own resources and temp folder. Clients
reach it at 127.0.0.1 (the nodes advertise the machine's address: Ray maps a loopback
``--node-ip-address`` to it, so that other machines could reach them).

Nodes are stopped by signalling the process group each leads, never with ``ray stop`` (which
kills every Ray process on the machine, the test session's own runtime included). A node is
"lost" by SIGKILLing its raylet; started again with the same arguments, it rejoins as a new node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from fixtures_train import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def node_env() -> dict[str, str]:
    """This environment without a developer's Ray settings, and without token authentication
    (loopback only; production clusters use tokens)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {
        **env,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Every worker's line reaches the driver's output (the tests read the progress lines).
        "RAY_DEDUP_LOGS": "0",
        # Right after a node is lost, Ray Train still counts its resources and asks for a group
        # of the old size; it tries a smaller one once that start times out (60 s by default).
        # The timeout covers only the wait for the group's placement (instant when it fits).
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
        # The head declares a silent node dead after 5 failed health checks: 3 s apart by
        # default, 1 s here (a loopback cluster has no network to be patient with).
        "RAY_health_check_period_ms": "1000",
    }


class RayNode:
    def __init__(self, name: str, root: Path, args: list[str]) -> None:
        self.name = name
        self.root = root
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{self.name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            [RAY, "start", "--block", *self.args],
            env=node_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def raylet(self) -> psutil.Process:
        assert self.process is not None, f"{self.name} is not running"
        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "raylet" or "raylet" in " ".join(child.cmdline()[:1]):
                    return child
        raise LookupError(f"{self.name} has no raylet")

    def kill_raylet(self) -> None:
        """Lose the node the way a crashed machine does: its raylet dies without a word."""
        self.raylet().send_signal(signal.SIGKILL)

    def stop(self) -> None:
        """Every process of the node at once (SIGKILL to its group): a SIGTERM would have it
        drain for up to 30 s first, and a test node has nothing to hand over."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None


class LocalCluster:
    """Head (2 CPUs for the driver's data tasks, no ``trainer`` slot) and two worker nodes with one
    CPU and one ``trainer`` slot each, so a job that asks for ``{"trainer": 1}`` per worker gets
    one worker per worker node. The head's one ``finetuner`` slot puts a worker on the head, a
    node where no pretraining worker ran."""

    def __init__(self, root: Path) -> None:
        # Node temp folders under a short path: Ray's sockets live there, and a Unix socket's
        # path may not exceed 107 bytes (pytest's temp folders are deeper than that allows).
        self.root = Path(tempfile.mkdtemp(prefix="perceiver-rc-", dir="/tmp"))
        self.logs = root
        self.port, self.dashboard_port = free_port(), free_port()
        head = [
            "--head",
            f"--port={self.port}",
            "--num-cpus=2",
            '--resources={"finetuner": 1}',
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.root / 'head'}",
            # Ports of the head's agents: free ones, not the defaults another Ray may hold.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ]
        self.head = RayNode("head", root, head)
        self.workers = [
            RayNode(
                f"worker{i}",
                root,
                [
                    f"--address=127.0.0.1:{self.port}",
                    "--num-cpus=1",
                    '--resources={"trainer": 1}',
                    f"--temp-dir={self.root / f'worker{i}'}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                ],
            )
            for i in (1, 2)
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def alive_nodes(self) -> list[dict]:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/nodes?view=summary", timeout=5) as r:
                summary = json.loads(r.read())["data"]["summary"]
        except (OSError, KeyError, ValueError):
            return []
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) == count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes not alive after {timeout_s} s: {self.root}")

    def start(self) -> None:
        self.head.start()
        self.wait_for_nodes(1)
        for worker in self.workers:
            worker.start()
        self.wait_for_nodes(3)

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
