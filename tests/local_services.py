"""Helpers for tests that drive infra/local/start.sh and stop.sh, or submit real Ray jobs: free
ports, a clean environment, running the scripts, and reading the exports they print."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL = REPO_ROOT / "infra" / "local"


def run(command: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("0.0.0.0", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray or MLflow settings a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    return {**env, **extra}


def script(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = clean_env(PYTHON=sys.executable)
    return run(["bash", str(LOCAL / name), *args], env=env, timeout=timeout)


def exports(state: Path) -> dict[str, str]:
    text = (state / "env.sh").read_text()
    return dict(re.findall(r"^export (\w+)=(\S+)", text, re.M))
