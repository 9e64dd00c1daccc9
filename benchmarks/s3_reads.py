"""Reading documents from object storage: the crop pipeline from an S3-compatible server on
127.0.0.1 against the same files on local disk, and the requests each read costs.

(a) Requests: every sample data file read once, whole, through the pipeline's reader
    (``open_binary``: an 8 MiB read-ahead buffer over pyarrow's S3 client) against the same client
    without the buffer (what ``fsspec``'s pyarrow wrapper gives, and what the pipeline used
    before). The server's access log counts the GET requests; reported per MB of file bytes.
(b) The pipeline: ``build_index`` and then the stream from files to masked crops read to the end
    (``--crops`` crops), once with ``data_dir`` on local disk and once on ``s3://``, in the same Ray
    runtime; seconds and GETs of each, and the ratio of the times.

The server is moto's standalone server (``pip install 'moto[server]'``), started here on a free
port and stopped at the end; it adds no network latency, so (b) measures the client's overhead,
and on a real object store every request saved is worth a round trip more.

    python benchmarks/s3_reads.py [--data-dir ../shared/data] [--crops 4000]

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine import describe

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "pipelines" / "data" / "configs" / "shared_data.yaml"
BUCKET = "bench"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """moto's S3 server on a free port; its access log has one line per request."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.log_path = folder / "s3.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(self.log_path, "wb"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(
                        f"S3 server did not start: {self.log_path.read_text()}"
                    ) from None
                time.sleep(0.3)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self) -> int:
        time.sleep(0.3)  # the server writes its log line after the response
        return sum(f'"GET /{BUCKET}/' in line for line in self.log_path.open(errors="replace"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def read_whole(files: list, buffered: bool) -> int:
    from pipelines.data.sources import filesystem, open_binary

    size = 0
    for ref in files:
        if buffered:
            f = open_binary(ref.url)
        else:
            fs, path = filesystem(ref.url)
            f = fs.open(path, "rb")
        with f:
            while chunk := f.read(64 << 10):  # what a reader's small reads look like
                size += len(chunk)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--crops", type=int, default=4000, help="crops streamed per side")
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"sample data not found at {args.data_dir} (pass --data-dir)")

    scratch = Path(tempfile.mkdtemp(prefix="s3-bench-"))
    server = Server(scratch)
    os.environ.update(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    import pyarrow
    import pyarrow.fs
    import ray

    from pipelines.config import load_config
    from pipelines.data import MixtureConfig, PretrainDataConfig, build_index
    from pipelines.data.index import list_source_files
    from pipelines.data.pretrain import pretraining_dataset

    try:
        fs = pyarrow.fs.S3FileSystem(endpoint_override=server.endpoint, allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        pyarrow.fs.copy_files(
            str(args.data_dir), f"{BUCKET}/data", pyarrow.fs.LocalFileSystem(), fs
        )
        remote_dir = f"s3://{BUCKET}/data"
        configs = {
            side: load_config(PretrainDataConfig, CONFIG, [f"data_dir={d}"])
            for side, d in (("local", args.data_dir.resolve()), ("s3", remote_dir))
        }
        files = [ref for refs in list_source_files(configs["s3"]) for ref in refs]
        mb = sum(ref.size for ref in files) / 1e6
        summary: dict[str, object] = {"benchmark": "s3_reads", "file_mb": round(mb, 2)}
        for name, buffered in (("read_ahead", True), ("unbuffered", False)):
            before = server.gets()
            start = time.perf_counter()
            read_whole(files, buffered)
            seconds = time.perf_counter() - start
            gets = server.gets() - before
            log(f"{name}: {len(files)} files, {mb:.1f} MB, {gets} GETs in {seconds:.2f} s")
            summary[f"{name}_gets_per_mb"] = round(gets / mb, 1)
            summary[f"{name}_s"] = round(seconds, 2)

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        build_index(configs["local"])  # warm-up: starts the workers, imports the pipeline
        for side, cfg in configs.items():
            before = server.gets()
            start = time.perf_counter()
            index = build_index(cfg)
            index_s = time.perf_counter() - start
            cfg.mixture = MixtureConfig(stopping_strategy="cycle", max_crops=args.crops)
            start = time.perf_counter()
            n = 0
            for batch in pretraining_dataset(cfg, index).iter_batches(
                batch_size=256, batch_format="numpy"
            ):
                n += len(batch["length"])
            stream_s = time.perf_counter() - start
            gets = server.gets() - before
            log(f"{side}: index {index_s:.2f} s, {n} crops in {stream_s:.2f} s, {gets} GETs")
            summary[f"{side}_index_s"] = round(index_s, 2)
            summary[f"{side}_stream_s"] = round(stream_s, 2)
            summary[f"{side}_gets"] = gets
        summary["crops"] = args.crops
        summary["s3_over_local_time"] = round(
            (summary["s3_index_s"] + summary["s3_stream_s"])
            / (summary["local_index_s"] + summary["local_stream_s"]),
            2,
        )
        summary["machine"] = describe()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
