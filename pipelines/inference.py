"""Batch inference: score files of texts with a classifier on Ray Data, one output per input file.

    python -m jobs.predict --model models:/perceiver-imdb@champion \\
        --input s3://bucket/reviews/ --output s3://bucket/scored/

Inputs are what a data source takes (``pipelines.data.sources.list_files``): files, folders and
globs, local, ``s3://`` or ``hf://``, in parquet or JSON lines (optionally gzipped). Each input file
gets one output, ``OUTPUT/<its path below its input>.parquet``, with a row per input row: ``row``
(its position in the input file), the id column when one is named, ``label`` and ``score`` (the
label's probability; a regression model's value), both null where the text is null.

A file is the unit of work and of restart. Ray Data hands each file to an actor of a pool
(``map_batches`` with a callable class: the model is built once per actor, on a GPU when the actors
are given one), which reads the file, classifies its texts in batches of similar length, and writes
the output whole (``pipelines.storage.write_bytes``), so an interrupted run leaves only complete
outputs. A re-run skips every input whose output exists and was made by the same model with the
same settings (their digest is in the output's parquet metadata); an output made otherwise is an
error, never overwritten.

The driver resolves the model once (registry, run, folder or Hub) and puts its weights in Ray's
object store: every actor, on any node, builds the model from there, so the run uses one version
even if an alias moves meanwhile, and no node downloads the model again.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.data.readers import read_batches
from pipelines.data.sources import FileRef, list_files
from pipelines.errors import UserError, user_error
from pipelines.tracking.models import LoadedModel, load_model

log = logging.getLogger(__name__)

# Parquet key-value metadata of every output.
META_DIGEST = b"perceiver.predict_digest"
META_MODEL = b"perceiver.model"
META_INPUT = b"perceiver.input"
_OUTPUT_COLUMNS = ("row", "label", "score")
_READ_BATCH_BYTES = 16 << 20


class OutputConflictError(UserError):
    """An output exists that another model or other settings made."""


@dataclass(frozen=True)
class PredictSettings:
    """What decides an output's contents besides the model and the input file."""

    text_column: str = "text"
    pair_column: str | None = None
    id_column: str | None = None
    batch_size: int = 32
    long_text: str | None = None  # None: the model's own setting (perceiver_core.predict)

    def __post_init__(self) -> None:
        named = [c for c in (self.text_column, self.pair_column, self.id_column) if c]
        if clash := sorted(set(named) & set(_OUTPUT_COLUMNS)):
            raise UserError(f"column {clash[0]!r}: an output column has that name; rename it")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {self.batch_size!r}")


@dataclass(frozen=True)
class Resources:
    """The actor pool: ``actors`` (default: as many as the cluster's CPUs, or GPUs when
    ``gpus_per_actor`` is set, allow, and never more than files to score), each with
    ``cpus_per_actor`` CPUs (its torch threads) and ``gpus_per_actor`` GPUs."""

    actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise UserError(f"actors must be at least 1, got {self.actors}")

    def pool_size(self, files: int) -> int:
        import ray

        if self.actors is not None:
            return min(self.actors, files)
        available = ray.cluster_resources()
        if self.gpus_per_actor:
            fit = int(available.get("GPU", 0) // self.gpus_per_actor)
            if fit < 1:
                raise UserError(
                    f"{self.gpus_per_actor} GPU per actor asked, but the cluster has "
                    f"{available.get('GPU', 0):g} GPUs"
                )
        else:
            fit = int(available.get("CPU", 1) // self.cpus_per_actor)
        return max(1, min(fit, files))


@dataclass(frozen=True)
class FileJob:
    """One input file and where its output goes."""

    ref: FileRef
    output: str


@dataclass(frozen=True)
class BatchResult:
    output: str
    files: int  # input files in all
    skipped: int  # whose output was already there
    rows: int  # rows scored in this run
    seconds: float  # from the start of scoring to the last output written
    model_digest: str

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        return (
            f"scored {self.rows:,} rows of {self.files - self.skipped} files "
            f"({self.skipped} already scored) in {self.seconds:.1f} s, {rate:,.0f} rows/s: "
            f"{self.output}"
        )


def predict_files(
    model: str,
    inputs: Sequence[str],
    output: str,
    settings: PredictSettings | None = None,
    resources: Resources | None = None,
    *,
    tracking_uri: str | None = None,
    progress: Callable[[str], None] = log.info,
) -> BatchResult:
    """Score every file of ``inputs`` with the classifier ``model`` into ``output`` (see the module
    docstring). Ray must be running."""
    settings = settings or PredictSettings()
    resources = resources or Resources()
    # Absolute: the actors do not share the driver's working directory.
    output = storage.resolve(output, Path.cwd())
    jobs = plan(inputs, output)  # a missing input fails before the model is fetched
    loaded = load_model(model, device="cpu", tracking_uri=tracking_uri, expect="classifier")
    digest = _run_digest(loaded, settings)
    todo = [job for job in jobs if not _already_done(job, digest, model)]
    skipped = len(jobs) - len(todo)
    if skipped:
        progress(f"predict: {skipped} of {len(jobs)} files already scored by this model: skipped")
    if not todo:
        return BatchResult(output, len(jobs), skipped, 0, 0.0, digest)
    rows, seconds = _score(loaded, model, digest, todo, settings, resources, progress)
    return BatchResult(output, len(jobs), skipped, rows, seconds, digest)


def plan(inputs: Sequence[str], output: str) -> list[FileJob]:
    """Every input file with its output location; two inputs that would share one is an error."""
    if not inputs:
        raise UserError("no inputs: give files, folders or globs to score")
    jobs: dict[str, FileJob] = {}
    for source in inputs:
        for ref in list_files(source):
            if ref.format == "text":
                raise UserError(f"{ref.url}: plain text has no columns; give parquet or JSON lines")
            target = storage.join(output, _output_name(ref.relpath))
            if target in jobs:
                raise UserError(
                    f"{ref.url} and {jobs[target].ref.url} would both be scored into {target}: "
                    "give them in separate runs or rename one"
                )
            jobs[target] = FileJob(ref, target)
    return list(jobs.values())


def _output_name(relpath: str) -> str:
    name = relpath.removesuffix(".gz")
    stem, suffix = posixpath.splitext(name)
    return f"{stem if suffix else name}.parquet"


def _run_digest(loaded: LoadedModel, settings: PredictSettings) -> str:
    """The model's files (config and weights, whatever source they came from) and the settings."""
    h = hashlib.sha256()
    for path in sorted(p for p in loaded.resolved.hf_dir.iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    h.update(json.dumps(settings.__dict__, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _already_done(job: FileJob, digest: str, model: str) -> bool:
    fs, path = storage.filesystem(job.output)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return False
    try:
        meta = pq.read_metadata(path, filesystem=fs).metadata or {}
    except (OSError, pa.ArrowInvalid) as error:
        raise OutputConflictError(
            f"{job.output}: exists but is not a readable parquet file ({error}); delete it"
        ) from None
    if meta.get(META_DIGEST, b"").decode() == digest:
        return True
    made_by = meta.get(META_MODEL, b"an unknown model").decode()
    raise OutputConflictError(
        f"{job.output}: already made by another model or with other settings (by {made_by}; "
        f"this run: {model}): give another --output, or delete the old outputs"
    )


def _score(
    loaded: LoadedModel,
    model: str,
    digest: str,
    todo: list[FileJob],
    settings: PredictSettings,
    resources: Resources,
    progress: Callable[[str], None],
) -> tuple[int, float]:
    import ray

    actors = resources.pool_size(len(todo))
    weights = ray.put((loaded.model.config.to_dict(), loaded.model.state_dict()))
    items = [{"url": j.ref.url, "format": j.ref.format, "output": j.output} for j in todo]
    meta = {META_DIGEST: digest.encode(), META_MODEL: model.encode()}
    scored = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        FileScorer,
        fn_constructor_kwargs={
            "weights": [weights],
            "settings": settings,
            "metadata": meta,
            "threads": resources.cpus_per_actor,
        },
        batch_size=1,
        concurrency=actors,
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor or None,
    )
    each = f"{resources.cpus_per_actor} CPU"
    if resources.gpus_per_actor:
        each += f", {resources.gpus_per_actor:g} GPU"
    progress(f"predict: scoring {len(todo)} files with {actors} actors ({each} each)")
    start = time.perf_counter()
    rows = 0
    try:
        for done, result in enumerate(scored.iter_rows(), 1):
            rows += int(result["rows"])
            elapsed = time.perf_counter() - start
            progress(
                f"predict: {done}/{len(todo)} files, {rows:,} rows, {rows / elapsed:,.0f} rows/s "
                f"({result['output']})"
            )
    except Exception as error:
        failure = user_error(error)
        if failure is None:
            raise
        message = str(failure)
    else:
        return rows, time.perf_counter() - start
    # A failed execution sits in reference cycles (Ray Data's and its errors' tracebacks) that keep
    # the actor pool, and the pool's CPUs, until the garbage collector next runs: in a driver that
    # lives on (the scheduler, a notebook, a test session) later work found no free CPU and waited
    # for ever. So the bad input is raised as a fresh error, holding nothing of the execution,
    # after the execution has been collected and its actors released.
    del scored
    gc.collect()
    raise UserError(message)


class FileScorer:
    """A Ray Data actor: builds the classifier once, then scores one input file per call."""

    def __init__(
        self,
        weights: list[Any],
        settings: PredictSettings,
        metadata: dict[bytes, bytes],
        threads: int,
    ) -> None:
        import ray
        import torch

        from perceiver_core.config import PerceiverConfig
        from perceiver_core.model import PerceiverForSequenceClassification
        from pipelines.console import quiet

        quiet()
        config, state = ray.get(weights[0])  # wrapped in a list: Ray passes it unresolved
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = PerceiverForSequenceClassification(PerceiverConfig.from_dict(config))
        self.model.load_state_dict(state)
        self.model.eval().to(self.device)
        self.settings = settings
        self.metadata = metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        url, fmt, output = (str(batch[key][0]) for key in ("url", "format", "output"))
        table = self._scored(url, fmt)
        table = table.replace_schema_metadata({**self.metadata, META_INPUT: url.encode()})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(output, sink.getvalue())
        return {"output": [output], "rows": [table.num_rows]}

    def _scored(self, url: str, fmt: str) -> pa.Table:
        from perceiver_core.predict import classify

        s = self.settings
        texts_col = [c for c in (s.text_column, s.pair_column) if c]
        columns = [*texts_col, *([s.id_column] if s.id_column else [])]
        ref = FileRef(url=url, relpath=posixpath.basename(url), format=fmt, size=0, version="")
        parts = list(read_batches(ref, columns, texts_col, batch_bytes=_READ_BATCH_BYTES))
        if parts:
            table = pa.concat_tables([p.table for p in parts])
            rows = np.concatenate([p.rows for p in parts])
        else:
            table = pa.table({c: pa.array([], pa.large_binary()) for c in columns})
            rows = np.zeros(0, np.int64)
        texts = _decoded(table.column(s.text_column))
        pairs = _decoded(table.column(s.pair_column)) if s.pair_column else None
        present = [
            i
            for i, t in enumerate(texts)
            if t is not None and (pairs is None or pairs[i] is not None)
        ]
        labels: list[str | None] = [None] * len(texts)
        scores: list[float | None] = [None] * len(texts)
        predictions = classify(
            self.model,
            [texts[i] for i in present],
            pairs=None if pairs is None else [pairs[i] for i in present],
            batch_size=s.batch_size,
            long_text=s.long_text,
        )
        for i, prediction in zip(present, predictions, strict=True):
            labels[i], scores[i] = prediction.label, prediction.score
        out = {"row": pa.array(rows, pa.int64())}
        if s.id_column:
            out[s.id_column] = table.column(s.id_column)
        out["label"] = pa.array(labels, pa.string())
        out["score"] = pa.array(scores, pa.float64())
        return pa.table(out)


def _decoded(column: pa.ChunkedArray) -> list[str | None]:
    """Text as ``str``: the readers give bytes exactly as stored; bytes that are not UTF-8 become
    U+FFFD, as ``jobs.predict`` and transformers' tokenizers read them."""
    return [None if b is None else b.decode("utf-8", errors="replace") for b in column.to_pylist()]


__all__ = [
    "BatchResult",
    "FileJob",
    "OutputConflictError",
    "PredictSettings",
    "Resources",
    "plan",
    "predict_files",
]
