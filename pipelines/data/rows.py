"""Labelled rows held in memory without their padding: what a classify worker trains on
(``pipelines.train.classify``) and what an evaluation set scores (``pipelines.workflow.evaluate``).

Rows come from ``pipelines.data.finetune`` right-padded to ``max_length``; a batch is padded again
only to its own longest row. A module of its own because it needs torch, which ``finetune``'s Ray
Data tasks run without.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class LabelledRows:
    """Rows of byte ids without padding: row ``i`` is ``ids[offsets[i]:offsets[i+1]]``; a text
    cut into several windows (``data.train_windows``) is consecutive rows, ``window`` 0, 1, ..."""

    ids: np.ndarray  # uint16, all rows concatenated
    offsets: np.ndarray  # int64, (n + 1,)
    labels: np.ndarray  # int64 (classes) or float32 (regression)
    window: np.ndarray  # uint16, (n,): which window of its text each row is

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_batches(cls, batches: Iterable[dict[str, np.ndarray]]) -> LabelledRows:
        """Compact batches of ``pipelines.data.finetune`` rows (right-padded to max_length)."""
        ids, lengths, labels, window = [], [], [], []
        for batch in batches:
            mask = batch["attention_mask"].astype(bool)
            ids.append(batch["input_ids"][mask].astype(np.uint16))
            lengths.append(mask.sum(axis=1))
            labels.append(batch["label"])
            window.append(batch.get("window", np.zeros(len(mask), np.uint16)))
        if not labels:
            empty = np.zeros(0, np.uint16)
            return cls(empty, np.zeros(1, np.int64), np.zeros(0, np.int64), empty)
        offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return cls(np.concatenate(ids), offsets, np.concatenate(labels), np.concatenate(window))

    @classmethod
    def from_shard(cls, shard: Any, batch_size: int = 1024) -> LabelledRows:
        """All rows of a Ray Data shard (a DataIterator from ``ray.train.get_dataset_shard``)."""
        return cls.from_batches(shard.iter_batches(batch_size=batch_size, batch_format="numpy"))

    def head(self, n: int) -> LabelledRows:
        """The first ``n`` rows."""
        end = self.offsets[n]
        return LabelledRows(self.ids[:end], self.offsets[: n + 1], self.labels[:n], self.window[:n])

    def texts(self) -> np.ndarray:
        """The first row of each text (int64, ascending)."""
        return np.flatnonzero(self.window == 0)

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
