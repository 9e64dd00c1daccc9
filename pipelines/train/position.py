"""Where a run is in its pretraining stream, and where a restarted stream starts.

``streaming_split`` hands blocks to whichever worker asks first, so which worker trains on which
crop is not reproducible, and a Ray Data iterator has no state to save. What a checkpoint records
instead is the set of stream positions trained on, as a ``DataPosition``: every position below a
watermark, plus the few above it that one worker consumed while another was still behind. On
resume the stream restarts at (or before) the watermark and each worker drops the rows the
checkpoint records, so the run that survives a failure trains on every crop once.

The stream of a restarted worker group is built by the controller before the workers restore
their checkpoint, so it starts at a watermark stored beside the checkpoints, the ``ResumePointer``:
that of the checkpoint before the latest one. Ray Train commits a reported checkpoint when its
controller next polls the workers (every 2 s), and a failure before that restores the previous
one, so the latest watermark could be ahead of the restored checkpoint; the one before it is
committed (a whole checkpoint interval has passed since its report) and never ahead. Rows between
it and the restored checkpoint's watermark are read and dropped: at most one checkpoint interval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.train import storage

POINTER_FILE = "resume_pointer.json"


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


class ResumePointer:
    """The watermark a restarted stream starts from, in the run's storage folder."""

    def __init__(self, run_dir: str) -> None:
        self.location = f"{run_dir.rstrip('/')}/{POINTER_FILE}"

    def read(self) -> int:
        text = storage.read_text(self.location)
        return 0 if text is None else int(json.loads(text)["watermark"])

    def write(self, watermark: int) -> None:
        storage.write_text(self.location, json.dumps({"watermark": watermark}))
