"""The training stream served by position, on the Ray Data side of a masked-LM run.

``CropFeed`` (a Ray actor, one per worker group) reads the crop stream once, in order, from the
restored position, and hands each range of positions to the rank that asks for it;
``held_out_batches`` reads the validation crops once for a whole run. Both run in processes of
their own, so this module imports neither torch nor the training core: those processes start in
a second rather than the five that importing torch takes.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.data import ExecutionResources

from pipelines.console import quiet
from pipelines.data.config import PretrainDataConfig
from pipelines.data.index import DataIndex
from pipelines.data.pretrain import pretraining_dataset


@dataclass(frozen=True)
class StreamSpec:
    """What a feed reads: the training split of ``index`` under ``data``'s settings, up to
    ``crops`` positions, at most ``buffer_mb`` of object-store memory ahead of training."""

    data: PretrainDataConfig
    index: DataIndex
    crops: int
    prefetch_batches: int
    buffer_mb: int


class CropFeed:
    """The training stream from ``start`` on, read once and in order, served by position: each
    position to the one rank that asks for it. Runs as a Ray actor (one per worker group).

    Blocks are kept until all their rows are served; ranks are at most a step or so apart (each
    step ends in a collective), so that is about two steps of crops.
    """

    def __init__(self, stream: StreamSpec) -> None:
        quiet()
        self.stream = stream
        self.origin = 0
        self.blocks: StreamWindow | None = None

    def open(self, start: int) -> None:
        """Start the stream at position ``start`` (the restored one, which every rank knows).
        Rank 0 calls it early so that the stream reads ahead; each ``take`` calls it too, since
        calls from different ranks arrive in no fixed order."""
        if self.blocks is not None:
            if start != self.origin:
                raise RuntimeError(f"the feed is open at {self.origin}, not {start} (a bug)")
            return
        self.origin = start
        spec = self.stream
        ds = pretraining_dataset(spec.data, spec.index, split="train", start=start)
        ds = ds.limit(max(0, spec.crops - start))
        ds.context.enable_progress_bars = False
        ds.context.execution_options.resource_limits = ExecutionResources(
            object_store_memory=spec.buffer_mb * 2**20
        )
        batches = ds.iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=spec.prefetch_batches
        )
        self.blocks = StreamWindow(iter(batches), start)

    def take(self, origin: int, start: int, size: int) -> dict[str, np.ndarray]:
        self.open(origin)
        assert self.blocks is not None
        return self.blocks.take(start, size)


class StreamWindow:
    """Column batches of consecutive stream positions, handed out by position range."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], start: int) -> None:
        self.batches = batches
        self.pending: collections.deque[list[Any]] = collections.deque()  # [first, rows, served]
        self.first = self.end = start  # positions [first, end) are held
        self.failure: BaseException | None = None

    def take(self, start: int, size: int) -> dict[str, np.ndarray]:
        if start < self.first:
            raise RuntimeError(f"stream positions {start}.. were served already (a bug)")
        while self.end < start + size:
            if self.failure is not None:
                # A failed iterator says only that it has ended: the other ranks are told why.
                raise RuntimeError(
                    f"the training stream failed at position {self.end}: {self.failure}"
                ) from self.failure
            try:
                batch = next(self.batches, None)
            except Exception as error:
                self.failure = error
                raise
            if batch is None:
                raise EOFError(f"the training stream ended at position {self.end}")
            n = len(batch["position"])
            if n and int(batch["position"][0]) != self.end:
                raise RuntimeError(f"the stream skipped from {self.end} to {batch['position'][0]}")
            self.pending.append([self.end, batch, 0])
            self.end += n
        parts = []
        for entry in self.pending:
            first, rows, _ = entry
            lo, hi = max(start, first) - first, min(start + size, first + len(rows["position"]))
            if hi - first > lo:
                parts.append({k: v[lo : hi - first] for k, v in rows.items()})
                entry[2] += hi - first - lo
        while self.pending and self.pending[0][2] == len(self.pending[0][1]["position"]):
            self.first += len(self.pending.popleft()[1]["position"])
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if not np.array_equal(out["position"], np.arange(start, start + size)):
            raise RuntimeError(f"stream positions {start}..{start + size} are not all there")
        return out


def held_out_batches(dataset: Any, limit: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The first ``limit`` rows of ``dataset`` in order, in batches of ``batch_size``: the crops
    every validation of a run reads. Run as a Ray task (``held_out.remote``)."""
    quiet()
    dataset.context.enable_progress_bars = False
    out, count = [], 0
    for batch in dataset.limit(limit).iter_batches(batch_size=batch_size, batch_format="numpy"):
        out.append(batch)
        count += len(batch["position"])
        if count >= limit:
            break
    return out


held_out = ray.remote(num_cpus=0)(held_out_batches)
