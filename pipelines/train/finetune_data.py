"""The worker side of fine-tuning data: every worker holds the task's rows compactly and deals
itself its share of each global batch, in an order fixed by (seed, epoch).

Fine-tuning sets are small next to pretraining streams: QQP, the largest GLUE training set, is
364k pairs of about 120 bytes, under 50 MB as byte ids. So each worker reads the whole split
through Ray Data (tokenized in Ray Data tasks, ``pipelines.data.finetune``) and keeps the ids
without their padding. What that buys over ``streaming_split``:

- a true shuffle per epoch (the IMDB files are sorted by label: a windowed shuffle would train on
  one label at a time), with the order a function of (seed, epoch) only;
- global batch ``b`` of an epoch is the same examples whatever the number of workers, and rank
  ``r`` trains on its contiguous slice of it, so a run resumed at step ``k`` of an epoch continues
  with exactly the batches an uninterrupted run would have seen;
- batches are padded to their longest row rather than to ``max_length`` (SST-2 sentences average
  53 bytes of a 2048-byte input). Padded positions are masked out of the encoder's attention, so
  the outputs are the same as with full padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LabelledRows:
    """Rows of byte ids without padding: row ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # uint16, all rows concatenated
    offsets: np.ndarray  # int64, (n + 1,)
    labels: np.ndarray  # int64 (classes) or float32 (regression)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_batches(cls, batches: Iterable[dict[str, np.ndarray]]) -> LabelledRows:
        """Compact batches of ``pipelines.data.finetune`` rows (right-padded to max_length)."""
        ids, lengths, labels = [], [], []
        for batch in batches:
            mask = batch["attention_mask"].astype(bool)
            ids.append(batch["input_ids"][mask].astype(np.uint16))
            lengths.append(mask.sum(axis=1))
            labels.append(batch["label"])
        if not labels:
            return cls(np.zeros(0, np.uint16), np.zeros(1, np.int64), np.zeros(0, np.int64))
        offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return cls(np.concatenate(ids), offsets, np.concatenate(labels))

    def batch(
        self, indices: np.ndarray, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Rows ``indices`` right-padded to the longest of them: input_ids, attention_mask, labels."""
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        width = int((ends - starts).max(initial=1))
        input_ids = np.zeros((len(indices), width), dtype=np.int64)
        attention_mask = np.zeros((len(indices), width), dtype=np.int64)
        for row, (a, b) in enumerate(zip(starts, ends, strict=True)):
            input_ids[row, : b - a] = self.ids[a:b]
            attention_mask[row, : b - a] = 1
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(self.labels[indices]),
        }
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def real_bytes(self, indices: np.ndarray) -> int:
        return int((self.offsets[indices + 1] - self.offsets[indices]).sum())


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` rows that epoch ``epoch`` trains in."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Whole global batches per epoch; the remainder rows (different ones each epoch, as the order
    changes) wait for the next epoch, so every step has the same size on every rank."""
    return n // batch_size


def rank_slice(
    order: np.ndarray, step: int, batch_size: int, rank: int, world_size: int
) -> np.ndarray:
    """Rank ``rank``'s rows of global batch ``step`` of an epoch."""
    per_rank = batch_size // world_size
    start = step * batch_size + rank * per_rank
    return order[start : start + per_rank]


def eval_batches(n: int, batch_size: int, rank: int, world_size: int) -> Iterator[np.ndarray]:
    """Rank ``rank``'s share of an evaluation pass: rows ``rank, rank + W, ...`` in batches. Every
    rank yields the same number of batches (the last ones may be empty), because a forward pass
    under ZeRO-3 is a collective."""
    mine = np.arange(rank, n, world_size)
    rounds = -(-((n + world_size - 1) // world_size) // batch_size)
    for r in range(rounds):
        yield mine[r * batch_size : (r + 1) * batch_size]


def read_rows(shard: object, batch_size: int = 1024) -> LabelledRows:
    """All rows of a Ray Data shard (a DataIterator from ``ray.train.get_dataset_shard``)."""
    return LabelledRows.from_batches(
        shard.iter_batches(batch_size=batch_size, batch_format="numpy")  # type: ignore[attr-defined]
    )
