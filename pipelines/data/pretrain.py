"""The pretraining stream: a lazy Ray Dataset of masked 2048-byte crops, deterministic and resumable.

    index = build_index(cfg)                     # a run keeps its own (run_index)
    ds = pretraining_dataset(cfg, index)         # lazy; pass to TorchTrainer(datasets=...)
    ds = pretraining_dataset(cfg, index, start=k)  # resume: exactly the crops from position k on

Each Ray task covers a range of stream positions (see ``mixture.plan``). It opens the units of each
source that hold its crops, packs them (``perceiver_core.packing``), masks them
(``perceiver_core.masking``, keyed by stable sample ids and the source's pass number) and merges
the sources in schedule order. Every crop is a function of the index and the config alone, and the
dataset keeps task order (``preserve_order`` on this dataset's own context), so the same config
gives the same sequence whatever the number of tasks or workers.

Resume at k costs: planning (milliseconds), then reading, for each source, the one unit that
contains k from its start up to k (a parquet row group, or the head of a JSON file, which gzip
cannot seek into), packing it and dropping the crops before k. No other file before k is opened,
and crops before k are never masked.

Rows (compact: the training worker makes tensors, see ``crops_to_torch``):

    input_ids (crop_len,) uint16   masked ids      labels (crop_len,) int16   -100 = not a target
    length    uint16   real tokens (right padded)  masked uint16   target positions in the crop
    position  int64    place in the stream          source uint8   index of the source in config
    sample_id uint64   mask key                     epoch uint32   pass over the source (mask epoch)
    file uint32, row int64, crop uint32: file index in the source, file row of the first document
        of the crop's group, crop index within the group
"""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from perceiver_core.masking import IGNORE_INDEX, MaskingConfig, mask_batch
from perceiver_core.packing import PackingConfig
from pipelines.data.config import PretrainDataConfig
from pipelines.data.index import DataIndex
from pipelines.data.mixture import Plan, Schedule, Segment, plan
from pipelines.data.readers import DataError
from pipelines.data.sources import FileRef, SourceConfig
from pipelines.data.units import (
    SPLITS,
    TRAIN,
    CropChunk,
    SplitConfig,
    file_key,
    pack_chunk,
    sample_ids,
    unit_documents,
)

if TYPE_CHECKING:
    import ray.data
    import torch


@dataclass(frozen=True)
class _StreamContext:
    """What a crop task needs besides its spec; shipped once with the map function."""

    files: tuple[tuple[FileRef, ...], ...]
    sources: tuple[SourceConfig, ...]
    packing: PackingConfig
    masking: MaskingConfig
    split_cfg: SplitConfig
    split: str
    chunk_bytes: int
    block_crops: int
    quanta: tuple[int, ...]


def plan_stream(
    cfg: PretrainDataConfig, index: DataIndex, split: str = TRAIN, start: int = 0
) -> Plan:
    """The plan of the stream (length, tasks) without building a dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    index.check_matches(cfg)
    weights = [s.weight for s in cfg.sources]
    return plan(index, split, weights, cfg.mixture, start=start, task_crops=cfg.task_crops)


def pretraining_dataset(
    cfg: PretrainDataConfig, index: DataIndex, *, split: str = TRAIN, start: int = 0
) -> ray.data.Dataset:
    """Lazy Ray Dataset of masked crops at stream positions [start, length) of ``split``."""
    import ray.data

    stream = plan_stream(cfg, index, split, start)
    ctx = _stream_context(cfg, index, split, stream)
    specs = [{"spec": _task_json(t.start, t.stop, t.segments)} for t in stream.tasks]
    if not specs:  # start == length: a dataset with no rows
        specs = [{"spec": _task_json(start, start, ())}]
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    ds = ds.map_batches(_crop_batch, batch_size=1, fn_kwargs={"ctx": ctx})
    # Output order = task order = stream order. This is the dataset's own context (a copy made when
    # it was created), so no global setting changes.
    ds.context.execution_options.preserve_order = True
    # Ray Data merges what a task yields into blocks of up to ``target_max_block_size`` (128 MiB):
    # a whole task's crops, hundreds of thousands at short crop lengths. ``streaming_split`` then
    # divides such a block between workers, so one worker trains far ahead of the other in the
    # stream and the consumed positions stop being close to a prefix. Blocks of ``block_crops``
    # rows keep the workers side by side (and start training sooner).
    current = ds.context.target_max_block_size
    if current is None or current > block_bytes(cfg):
        ds.context.target_max_block_size = block_bytes(cfg)
    return ds


def block_bytes(cfg: PretrainDataConfig) -> int:
    """Target size of a stream block: ``block_crops`` rows, at least 1 MiB."""
    return max(1 << 20, cfg.block_crops * row_bytes(cfg))


def row_bytes(cfg: PretrainDataConfig) -> int:
    """Bytes of one crop row: uint16 ids and int16 labels, plus the scalar columns."""
    return 4 * cfg.packing.crop_len + 64


def local_crops(
    cfg: PretrainDataConfig, index: DataIndex, *, split: str = TRAIN, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """The same blocks as ``pretraining_dataset``, computed in this process without Ray.

    For debugging, tests and benchmarks: one task after another, same code as the Ray tasks.
    """
    stream = plan_stream(cfg, index, split, start)
    ctx = _stream_context(cfg, index, split, stream)
    for task in stream.tasks:
        yield from crop_task(ctx, task.start, task.stop, list(task.segments))


def _stream_context(
    cfg: PretrainDataConfig, index: DataIndex, split: str, stream: Plan
) -> _StreamContext:
    return _StreamContext(
        files=tuple(tuple(s.files) for s in index.sources),
        sources=tuple(cfg.sources),
        packing=cfg.packing,
        masking=cfg.masking,
        split_cfg=cfg.split,
        split=split,
        chunk_bytes=cfg.read.chunk_bytes,
        block_crops=cfg.block_crops,
        quanta=stream.schedule.quanta,
    )


def _task_json(start: int, stop: int, segments: tuple[Segment, ...]) -> str:
    return json.dumps({"start": start, "stop": stop, "segments": [asdict(s) for s in segments]})


def _crop_batch(batch: dict[str, np.ndarray], ctx: _StreamContext) -> Iterator[dict[str, Any]]:
    for spec in batch["spec"]:
        task = json.loads(spec)
        segments = [Segment(**s) for s in task["segments"]]
        yield from crop_task(ctx, task["start"], task["stop"], segments)


def crop_task(
    ctx: _StreamContext, start: int, stop: int, segments: list[Segment]
) -> Iterator[dict[str, np.ndarray]]:
    """The crops of positions [start, stop) in blocks of ``ctx.block_crops`` (what a task runs)."""
    schedule = Schedule(ctx.quanta)
    buffers = [
        _Buffer(_source_crops(ctx, [g for g in segments if g.source == s]))
        for s in range(len(ctx.sources))
    ]
    with contextlib.ExitStack() as stack:
        for buf in buffers:
            stack.callback(buf.close)
        for a in range(start, stop, ctx.block_crops):
            b = min(stop, a + ctx.block_crops)
            src = schedule.sources(a, b)
            out: dict[str, np.ndarray] = {}
            for s, buf in enumerate(buffers):
                at = np.flatnonzero(src == s)
                part = buf.take(len(at))
                for key, value in part.items():
                    if key not in out:
                        out[key] = np.empty((b - a, *value.shape[1:]), dtype=value.dtype)
                    out[key][at] = value
            out["position"] = np.arange(a, b, dtype=np.int64)
            yield out


class _Buffer:
    """Takes exact numbers of rows from one source's stream of column dicts."""

    def __init__(self, chunks: Iterator[dict[str, np.ndarray]]) -> None:
        self.chunks = chunks
        self.pending: collections.deque[dict[str, np.ndarray]] = collections.deque()
        self.size = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        while self.size < n:
            chunk = next(self.chunks, None)
            if chunk is None:  # only if the files changed after indexing (checked per unit too)
                raise DataError(f"a source ended {n - self.size} crops early: rebuild the index")
            self.pending.append(chunk)
            self.size += len(chunk["length"])
        self.size -= n
        return take_rows(self.pending, n)

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


def take_rows(pending: collections.deque[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows of a queue of column batches (which holds at least that many), taken
    off the queue: whole batches where they fit, the head of the next one split."""
    parts, taken = [], 0
    while taken < n:
        head = pending[0]
        rows = len(next(iter(head.values())))
        if taken + rows <= n:
            parts.append(pending.popleft())
            taken += rows
        else:
            k = n - taken
            parts.append({key: v[:k] for key, v in head.items()})
            pending[0] = {key: v[k:] for key, v in head.items()}
            taken = n
    if len(parts) <= 1:
        return parts[0] if parts else {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _source_crops(ctx: _StreamContext, segments: list[Segment]) -> Iterator[dict[str, np.ndarray]]:
    """Masked crops of one source's segments, in order."""
    for seg in segments:
        ref = ctx.files[seg.source][seg.file]
        source = ctx.sources[seg.source]
        key = file_key(source.name, ref.relpath)
        seen = 0
        chunks = unit_documents(
            ref,
            seg.unit,
            text_column=source.text_column,
            sample_by=source.sample_by,
            splits=(ctx.split,),
            split_cfg=ctx.split_cfg,
            group_size=ctx.packing.group_size,
            chunk_bytes=ctx.chunk_bytes,
        )
        with contextlib.closing(chunks):
            for _, docs in chunks:
                packed = pack_chunk(docs, ctx.packing)
                lo, hi = max(seg.lo - seen, 0), min(seg.hi - seen, len(packed))
                seen += len(packed)
                if lo < hi:
                    yield from mask_crops(
                        packed.slice(lo, hi),
                        ctx.masking,
                        key=key,
                        source=seg.source,
                        file=seg.file,
                        epoch=seg.epoch,
                        block_crops=ctx.block_crops,
                    )
                if seen >= seg.hi:
                    break
        if seen < seg.hi:
            raise DataError(
                f"{ref.url} (row group {seg.unit}) gave {seen} crops, the index says at least "
                f"{seg.hi}: the file changed since the index was built; rebuild the index"
            )


def mask_crops(
    crops: CropChunk,
    cfg: MaskingConfig,
    *,
    key: int,
    source: int,
    file: int,
    epoch: int,
    block_crops: int = 256,
) -> Iterator[dict[str, np.ndarray]]:
    """Mask packed crops of one file in blocks; yields the compact output columns (no position).

    ``key`` is the file's ``units.file_key``; ``epoch`` the source's pass, which makes each pass
    draw new masks. Blocks of ``block_crops`` keep masking's per-word arrays small.
    """
    for a in range(0, len(crops), block_crops):
        part = crops.slice(a, a + block_crops)
        ids = sample_ids(key, part.rows, part.crops)
        masked, labels = mask_batch(part.input_ids, ids, epoch, cfg)
        n = len(part)
        yield {
            "input_ids": masked,
            "labels": labels,
            "length": part.lengths.astype(np.uint16),
            # Summing a uint8 view with a uint16 accumulator: 3x faster than a bool -> int64 sum.
            "masked": (labels != IGNORE_INDEX).view(np.uint8).sum(axis=1, dtype=np.uint16),
            "source": np.full(n, source, dtype=np.uint8),
            "sample_id": ids,
            "epoch": np.full(n, epoch, dtype=np.uint32),
            "file": np.full(n, file, dtype=np.uint32),
            "row": part.rows.astype(np.int64),
            "crop": part.crops.astype(np.uint32),
        }


def crops_to_torch(batch: dict[str, np.ndarray], device: Any = None) -> dict[str, torch.Tensor]:
    """Model inputs from a batch of crop rows: int64 ids and labels, bool attention mask."""
    import torch

    ids = torch.as_tensor(batch["input_ids"].astype(np.int64), device=device)
    labels = torch.as_tensor(batch["labels"].astype(np.int64), device=device)
    lengths = torch.as_tensor(batch["length"].astype(np.int64), device=device)
    attention = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


@dataclass
class CropCounters:
    """Running totals over crop batches, for logging: crops, padding, masking, per-source shares.

    Feed it the numpy batches a consumer sees (``update``), read ``as_dict``. The document-level
    counters (documents, bytes, skipped null/empty texts and bad files) are the index's:
    ``DataIndex.counters(split)``.
    """

    crop_len: int
    source_names: tuple[str, ...]
    crops: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)
    masked: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.source_names)
        self.crops, self.tokens, self.masked = (np.zeros(n, dtype=np.int64) for _ in range(3))

    def update(self, batch: dict[str, np.ndarray]) -> None:
        n = len(self.source_names)
        source = batch["source"].astype(np.int64)
        self.crops += np.bincount(source, minlength=n)
        self.tokens += np.bincount(source, weights=batch["length"], minlength=n).astype(np.int64)
        self.masked += np.bincount(source, weights=batch["masked"], minlength=n).astype(np.int64)

    def as_dict(self) -> dict[str, Any]:
        crops, tokens, masked = (
            int(self.crops.sum()),
            int(self.tokens.sum()),
            int(self.masked.sum()),
        )
        per_source = {
            name: {
                "crops": int(self.crops[i]),
                "tokens": int(self.tokens[i]),
                "byte_share": round(float(self.tokens[i]) / max(1, tokens), 5),
            }
            for i, name in enumerate(self.source_names)
        }
        return {
            "crops": crops,
            "tokens": tokens,
            "padding_fraction": round(1.0 - tokens / max(1, crops * self.crop_len), 5),
            "masked_fraction": round(masked / max(1, tokens), 5),
            "sources": per_source,
        }
