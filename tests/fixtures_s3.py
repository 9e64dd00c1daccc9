"""An S3-compatible server on 127.0.0.1 (moto's standalone server, a real HTTP server speaking the
S3 protocol) and the sample data copied into a bucket on it. Loaded from conftest.py.

The server runs as a subprocess in its own session and is stopped by signalling that process
group, never by name. Clients find it through ``AWS_ENDPOINT_URL`` and test credentials. Those
are set when the session starts (the port chosen then, the server started only when a test asks
for it), so that every Ray runtime the tests start, whenever that is, hands them to its workers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_train import free_port, stop_group

BUCKET = "perceiver-test"


ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update({**ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})


class S3Server:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client of this server needs in its environment."""
        return {**ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout_s: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (closed with the process)
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"S3 server exited: {(self.root / 'server.log').read_text()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2),
            ):
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"S3 server did not start in {timeout_s} s")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_group(self.process, grace_s=10)
        self.process = None

    def filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key="testing",
            secret_key="testing",
            allow_bucket_creation=True,
        )

    def upload(self, local: Path, key: str) -> str:
        """Copy a local folder to ``s3://BUCKET/key`` and return that URL."""
        import pyarrow.fs

        fs = self.filesystem()
        fs.create_dir(f"{BUCKET}/{key}", recursive=True)
        pyarrow.fs.copy_files(str(local), f"{BUCKET}/{key}", pyarrow.fs.LocalFileSystem(), fs)
        return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="the S3-compatible test server needs moto[server]")
    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = S3Server(tmp_path_factory.mktemp("s3-server"), port)
    try:
        server.start()
        server.filesystem().create_dir(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_data(s3_server: S3Server, shared_data: Path) -> str:
    """The sample data in the bucket: ``s3://BUCKET/data`` laid out as ../shared/data."""
    return s3_server.upload(shared_data, "data")
