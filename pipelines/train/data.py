"""The training side of the data stream: where it starts, what each worker feeds the model, and
the bookkeeping that lets a resumed run continue exactly where its checkpoint left off.

pipelines.data builds the stream (``pretraining_dataset(cfg, index, start=k)``: crop k onwards,
each row carrying its stream ``position``). Ray Train splits it across workers with
``streaming_split``, which hands blocks to whichever worker asks first, so which worker trains on
which crop is not reproducible, and a DataIterator has no state to save. What is recorded instead
is the set of stream positions that have been trained on, as ``DataPosition``: every position below
a watermark, plus the few above it that some worker already consumed while another was still
behind. At a checkpoint the workers pool their consumed positions; on resume the stream restarts
at (or before) the watermark and each worker drops rows that the checkpoint says were consumed, so
the run that survives a failure trains on every crop of the stream once: none twice, none skipped.

The stream a restarted worker group reads is built by ``TrainStreamFactory``, which Ray Train calls
each time it starts workers (a callable in ``TorchTrainer(datasets=...)``). It starts the stream at
the watermark recorded in a small pointer file beside the checkpoints (see
``pipelines.train.checkpoint.ResumePointer``): the watermark of the checkpoint before the latest
one. Ray Train commits a reported checkpoint when its controller next polls the workers (every
2 s), and a failure before that restores the previous one (seen in the failure tests), so the
latest watermark could be ahead of the restored checkpoint; the one before it is committed (a
whole checkpoint interval has passed since its report) and so never ahead. Rows between it and the
restored checkpoint's watermark are read and dropped: at most one checkpoint interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.data.pretrain import crops_to_torch

if TYPE_CHECKING:
    import ray.data

    from pipelines.data.index import DataIndex
    from pipelines.data.pretrain import PretrainDataConfig
    from pipelines.train.checkpoint import ResumePointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPosition:
    """Stream positions trained on: all of ``[0, watermark)``, plus the half-open ranges ``extra``
    above it (sorted, disjoint, not touching the watermark). Ranges keep this small: a worker
    consumes whole blocks of consecutive positions."""

    watermark: int = 0
    extra: tuple[tuple[int, int], ...] = ()

    @property
    def consumed(self) -> int:
        return self.watermark + sum(b - a for a, b in self.extra)

    def advance(self, positions: np.ndarray) -> DataPosition:
        """This position plus newly consumed ``positions``; the watermark moves over every
        position that is now contiguous with it."""
        ranges = sorted([*self.extra, *_runs(np.unique(positions.astype(np.int64)))])
        watermark, merged = self.watermark, []
        for a, b in ranges:
            b = max(b, a)
            if a <= watermark:  # touches or overlaps [0, watermark)
                watermark = max(watermark, b)
            elif merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        # The watermark may now reach ranges that were above it.
        while merged and merged[0][0] <= watermark:
            watermark = max(watermark, merged.pop(0)[1])
        return DataPosition(watermark, tuple(merged))

    def seen(self, positions: np.ndarray) -> np.ndarray:
        """Boolean mask of ``positions`` already trained on."""
        done = positions < self.watermark
        if self.extra:
            starts = np.array([a for a, _ in self.extra], dtype=np.int64)
            ends = np.array([b for _, b in self.extra], dtype=np.int64)
            i = np.searchsorted(starts, positions, side="right") - 1
            done |= (i >= 0) & (positions < ends[np.maximum(i, 0)])
        return done

    def to_dict(self) -> dict[str, Any]:
        return {"watermark": self.watermark, "extra": [list(r) for r in self.extra]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        return cls(int(data["watermark"]), tuple((int(a), int(b)) for a, b in data["extra"]))


def _runs(sorted_positions: np.ndarray) -> list[tuple[int, int]]:
    """Half-open ranges of consecutive values in a sorted, unique array."""
    if len(sorted_positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
    starts = sorted_positions[np.r_[0, breaks]]
    ends = sorted_positions[np.r_[breaks - 1, len(sorted_positions) - 1]] + 1
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


@dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, labels
    real_bytes: int  # non-padding bytes
    masked: int  # positions with a label
    decoded: int  # positions the MLM decoder evaluates per crop (the batch's largest count)


class MicroBatches:
    """Exactly ``size`` crops at a time from a worker's stream shard, skipping crops a checkpoint
    records as trained on, and recording the positions it hands out and the time spent waiting."""

    def __init__(
        self,
        batches: Iterator[dict[str, np.ndarray]],
        size: int,
        skip: DataPosition,
        device: torch.device | None = None,
    ) -> None:
        self._batches = batches
        self.size = size
        self.skip = skip
        self.device = device
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._consumed: list[np.ndarray] = []
        self.wait_s = 0.0
        self.skipped = 0

    def next(self) -> MicroBatch:
        start = time.perf_counter()
        while self._pending_rows < self.size:
            batch = next(self._batches, None)
            if batch is None:
                raise EOFError(
                    "the training stream ended before the last step: make it longer "
                    "(data.mixture.stopping_strategy: cycle with max_crops) or train fewer steps"
                )
            keep = ~self.skip.seen(batch["position"])
            if not keep.all():
                self.skipped += int((~keep).sum())
                batch = {k: v[keep] for k, v in batch.items()}
            if len(batch["position"]):
                self._pending.append(batch)
                self._pending_rows += len(batch["position"])
        rows = self._take(self.size)
        self.wait_s += time.perf_counter() - start
        self._consumed.append(rows["position"])
        masked_per_row = rows["masked"].astype(np.int64)
        return MicroBatch(
            inputs=crops_to_torch(rows, self.device),
            real_bytes=int(rows["length"].astype(np.int64).sum()),
            masked=int(masked_per_row.sum()),
            decoded=max(1, int(masked_per_row.max(initial=0))),
        )

    def _take(self, n: int) -> dict[str, np.ndarray]:
        parts, taken = [], 0
        while taken < n:
            head = self._pending[0]
            rows = len(head["position"])
            if taken + rows <= n:
                parts.append(self._pending.pop(0))
                taken += rows
            else:
                k = n - taken
                parts.append({key: v[:k] for key, v in head.items()})
                self._pending[0] = {key: v[k:] for key, v in head.items()}
                taken = n
        self._pending_rows -= n
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def drain_consumed(self) -> np.ndarray:
        """Positions handed out since the last call."""
        out = np.concatenate(self._consumed) if self._consumed else np.zeros(0, dtype=np.int64)
        self._consumed = []
        return out


def iterate_rows(
    shard: Any, batch_size: int, prefetch_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """NumPy batches of a Ray Data shard (DataIterator)."""
    return iter(
        shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches
        )
    )


def load_rows(shard: Any, limit: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The first ``limit`` rows of a shard, in batches of ``batch_size`` (for validation)."""
    out, count = [], 0
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        batch = {k: v[: limit - count] for k, v in batch.items()}
        out.append(batch)
        count += len(batch["position"])
        if count >= limit:
            break
    return out


class TrainStreamFactory:
    """Builds the training stream from the resume pointer's position (see the module docstring).

    Called by Ray Train in its controller each time it starts a worker group; must be picklable.

    The stream is cut at ``needed + slack`` crops from its start: what the whole run trains on,
    plus room for the crops a resumed run reads and drops (at most one checkpoint interval, and
    the blocks some worker took ahead of the others) and for the blocks the workers still hold
    when training ends. A stream that ends lets Ray Data's executor finish; one that goes on
    past the run keeps it polling at full speed (about one core) while it waits for the workers.
    """

    def __init__(
        self,
        data: PretrainDataConfig,
        index: DataIndex,
        pointer: ResumePointer,
        needed: int,
        slack: int,
    ) -> None:
        self.data = data
        self.index = index
        self.pointer = pointer
        self.needed = needed
        self.slack = slack

    def __call__(self) -> ray.data.Dataset:
        from pipelines.data.pretrain import pretraining_dataset

        start = self.pointer.read()
        if start:
            log.info("training stream starts at crop %d (resume)", start)
        ds = pretraining_dataset(self.data, self.index, split="train", start=start)
        ds = bounded_blocks(ds, self.data).limit(max(0, self.needed - start) + self.slack)
        return ds


def bounded_blocks(ds: ray.data.Dataset, data: PretrainDataConfig) -> ray.data.Dataset:
    """Cap the dataset's blocks near ``data.block_crops`` rows.

    Ray Data merges what a task yields into blocks of up to ``target_max_block_size`` (128 MiB):
    a whole task's crops, hundreds of thousands at short crop lengths. ``streaming_split`` then
    divides such a block between workers, so one worker trains far ahead of the other in the
    stream, and the consumed positions stop being close to a prefix. Small blocks keep the
    workers side by side (and start training sooner). Sets the dataset's own context only.
    """
    target = block_bytes(data)
    current = ds.context.target_max_block_size
    if current is None or current > target:
        ds.context.target_max_block_size = target
    return ds


def block_bytes(data: PretrainDataConfig) -> int:
    """Target size of a stream block: ``block_crops`` rows, at least 1 MiB."""
    row_bytes = 4 * data.packing.crop_len + 64  # uint16 ids and int16 labels, plus the scalars
    return max(1 << 20, data.block_crops * row_bytes)


def stream_slack(data: PretrainDataConfig, crops_per_checkpoint: int, world_size: int) -> int:
    """Crops beyond the run's need that its stream keeps (see ``TrainStreamFactory``).

    Generous on purpose: ``streaming_split`` gives every worker the same number of rows, and the
    rows a resumed worker drops need not be spread evenly, so each worker's share of the slack
    covers a whole checkpoint interval; a too-short stream would end the run with an error, an
    over-long one only costs the production of its tail.
    """
    rows_per_block = block_bytes(data) // (4 * data.packing.crop_len + 64) + 1
    return world_size * (crops_per_checkpoint + 4 * rows_per_block)


def validation_dataset(data: PretrainDataConfig, index: DataIndex, crops: int) -> ray.data.Dataset:
    """The first ``crops`` crops of the held-out split (the same crops at every validation)."""
    from pipelines.data.pretrain import pretraining_dataset

    return pretraining_dataset(data, index, split="validation").limit(crops)
