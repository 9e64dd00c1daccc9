"""Deterministic interleaving of several sources, and the plan that cuts the stream into tasks.

The schedule: source weights become integer quanta q_s, and the number of crops of source s among
the first P positions of the stream is, for the first source, round(P * q_0 / Q) (Q the sum of the
quanta), for the second the same rule applied to the positions the first did not take, and so on
(the last takes the rest). Each count grows by 0 or 1 per position and the counts sum to P, so
every position has exactly one source, computable in closed form from P alone: any worker can
place any crop without seeing the others, and over any window of W positions each source has
W * w_s crops, give or take 2 (0.2 points of a 1,000-crop window).

Weights are shares of *bytes*: with ``balance: bytes`` the quanta are corrected by each source's
mean real bytes per crop from the index (C4's groups of 10 short documents end in more partly
filled crops than Wikipedia's), so byte shares match the weights; ``balance: crops`` uses the raw
weights as shares of crops.

When a source runs out (``stopping_strategy``):
- ``all_exhausted`` (default): a source that ends early starts a new pass over its units (in a new
  order, with new masks: the mask epoch is the pass number), so the weights hold for the whole
  stream, which ends when every source has been read once; like HF ``interleave_datasets``.
- ``first_exhausted``: the stream ends when the first source runs out; nothing is repeated.
- ``cycle``: every source repeats without end; ``max_crops`` sets the length (a training run).
In none of them does the stream go on with fewer sources than configured, so the byte shares are
kept from the first crop to the last.

The plan: the stream [start, length) is cut into Ray tasks at unit boundaries. A cut inside a
unit of another source makes two tasks read that unit's first part (one to use it, one to skip
it), so a cut is taken only where that re-read is at most ``task_crops`` crops, and cuts are at
least ``task_crops`` apart. Which cuts are taken changes the work, never the crops.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.data.config import MAX_POSITION, MixtureConfig
from pipelines.data.index import DataIndex
from pipelines.data.readers import DataError

_QUANTUM_SCALE = 1 << 16  # weight resolution: 1 / 65536


class Schedule:
    """Which source each stream position takes, from integer quanta (see the module docstring)."""

    def __init__(self, quanta: Sequence[int]) -> None:
        if not quanta or any(int(q) < 1 for q in quanta):
            raise ValueError(f"quanta must be positive integers, got {list(quanta)}")
        self.quanta = tuple(int(q) for q in quanta)

    @classmethod
    def from_weights(cls, weights: Sequence[float]) -> Schedule:
        total = float(sum(weights))
        return cls([max(1, round(w / total * _QUANTUM_SCALE)) for w in weights])

    @property
    def weights(self) -> np.ndarray:
        return np.array(self.quanta, dtype=np.float64) / sum(self.quanta)

    def counts(self, positions: np.ndarray | int) -> np.ndarray:
        """(S, n) int64: crops of each source among the first P positions, for each P."""
        rest = np.atleast_1d(np.asarray(positions, dtype=np.int64)).copy()
        out = np.empty((len(self.quanta), len(rest)), dtype=np.int64)
        q_rest = sum(self.quanta)
        for s, q in enumerate(self.quanta[:-1]):
            out[s] = (2 * rest * q + q_rest) // (2 * q_rest)  # round half up, in integers
            rest -= out[s]
            q_rest -= q
        out[-1] = rest
        return out

    def sources(self, start: int, stop: int) -> np.ndarray:
        """Source of each position in [start, stop) (int64)."""
        counts = self.counts(np.arange(start, stop + 1))
        return np.argmax(np.diff(counts, axis=1), axis=0)

    def positions(self, source: int, local: np.ndarray | int) -> np.ndarray:
        """Stream position of the ``local``-th crop of ``source`` (vectorised binary search)."""
        need = np.atleast_1d(np.asarray(local, dtype=np.int64)) + 1
        q, total, n = self.quanta[source], sum(self.quanta), len(self.quanta)
        lo = np.ones_like(need)
        # The count of ``source`` reaches ``need`` by ``hi``; the cap keeps counts() in int64.
        hi = np.minimum((need + n + 1) * total // q + n + 2, MAX_POSITION)
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            ok = self.counts(mid)[source] >= need
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid + 1)
        if np.any(self.counts(lo)[source] < need):
            raise ValueError(f"stream positions beyond {MAX_POSITION} are not supported")
        return lo - 1


class EmptySourceError(DataError):
    """A source that gives no crops (its files empty, or all skipped)."""


@dataclass(frozen=True)
class Segment:
    """Crops [lo, hi) of one unit (``file``, parquet row group ``unit`` or -1) in pass ``epoch``."""

    source: int
    file: int
    unit: int
    epoch: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Task:
    """Stream positions [start, stop) and, per source in order, the unit pieces they consist of."""

    start: int
    stop: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Plan:
    """The stream for one split: schedule, length, and the tasks covering [start, length)."""

    schedule: Schedule
    length: int
    start: int
    tasks: tuple[Task, ...]
    crops_per_pass: tuple[int, ...]


class _SourceUnits:
    """A source's non-empty units for one split, and their order in each pass."""

    def __init__(self, index: DataIndex, source: int, split: str, cfg: MixtureConfig) -> None:
        s = index.sources[source]
        crops = s.crops(split)
        keep = crops > 0
        self.files, self.units, self.crops = (
            s.units["file"][keep],
            s.units["unit"][keep],
            crops[keep],
        )
        self.total = int(self.crops.sum())
        if self.total == 0:
            raise EmptySourceError(
                f"source {s.name!r} has no {split} crops: every file of it is empty or was "
                f"skipped as unreadable (data.read.on_bad_file: skip); {len(s.files)} file(s), "
                f"first {s.files[0].url if s.files else 'none'}"
            )
        self.source, self.cfg = source, cfg
        self._keys = [
            f"{s.files[f].relpath}\0{u}" for f, u in zip(self.files, self.units, strict=True)
        ]
        self._passes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit order of a pass and the cumulative crops along it (length units + 1)."""
        if epoch not in self._passes:
            if self.cfg.shuffle_units:
                # Hash of (seed, pass, file path, row group): stable across NumPy versions and
                # machines, unlike a seeded generator's permutation.
                salt = f"{self.cfg.seed}\0{self.source}\0{epoch}\0"
                keys = [
                    hashlib.blake2b((salt + k).encode(), digest_size=8).digest() for k in self._keys
                ]
                order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
            else:
                order = np.arange(len(self.crops))
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.crops[order], out=cum[1:])
            self._passes[epoch] = (order, cum)
        return self._passes[epoch]

    def boundaries(self, a: int, b: int) -> np.ndarray:
        """Local crop indices in (a, b) where a unit starts."""
        out = []
        for epoch in range(a // self.total, (max(b, 1) - 1) // self.total + 1):
            starts = epoch * self.total + self.order(epoch)[1][:-1]
            out.append(starts[(starts > a) & (starts < b)])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def prefix(self, local: np.ndarray) -> np.ndarray:
        """Crops of its unit that come before each local index (0 at a unit start)."""
        epoch, rest = np.divmod(local, self.total)
        out = np.zeros_like(local)
        for e in np.unique(epoch).tolist():
            cum = self.order(e)[1]
            sel = epoch == e
            k = np.searchsorted(cum, rest[sel], side="right") - 1
            out[sel] = rest[sel] - cum[k]
        return out

    def segments(self, a: int, b: int) -> list[Segment]:
        """The unit pieces holding local crops [a, b), in order."""
        out = []
        j = a
        while j < b:
            epoch, r = divmod(j, self.total)
            order, cum = self.order(epoch)
            k = int(np.searchsorted(cum, r, side="right")) - 1
            u = int(order[k])
            lo, hi = r - int(cum[k]), min(int(cum[k + 1]), r + b - j) - int(cum[k])
            out.append(Segment(self.source, int(self.files[u]), int(self.units[u]), epoch, lo, hi))
            j += hi - lo
        return out


def plan(
    index: DataIndex,
    split: str,
    weights: Sequence[float],
    cfg: MixtureConfig,
    *,
    start: int = 0,
    task_crops: int = 16384,
) -> Plan:
    """Plan the stream of ``split`` from position ``start`` (see the module docstring)."""
    sources = [_SourceUnits(index, s, split, cfg) for s in range(len(index.sources))]
    totals = np.array([s.total for s in sources], dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if cfg.balance == "bytes":
        tokens = np.array([s.totals(split)["tokens"] for s in index.sources], dtype=np.float64)
        w = w * totals / np.maximum(tokens, 1.0)  # weight per crop = weight per byte / fill
    schedule = Schedule.from_weights(w)
    length = _length(schedule, [s.total for s in sources], cfg)
    if not 0 <= start <= length:
        raise ValueError(f"start={start} is outside the stream of {length} crops")
    cuts = _cuts(schedule, sources, start, length, task_crops)
    tasks = []
    for a, b in itertools.pairwise(cuts):
        n = schedule.counts(np.array([a, b]))
        segments = [
            seg for s in sources for seg in s.segments(int(n[s.source, 0]), int(n[s.source, 1]))
        ]
        tasks.append(Task(a, b, tuple(segments)))
    return Plan(schedule, length, start, tuple(tasks), tuple(s.total for s in sources))


def _length(schedule: Schedule, totals: Sequence[int], cfg: MixtureConfig) -> int:
    if cfg.stopping_strategy == "cycle":
        assert cfg.max_crops is not None  # checked by MixtureConfig
        return cfg.max_crops
    ends = [int(schedule.positions(s, n - 1)[0]) + 1 for s, n in enumerate(totals)]
    if cfg.stopping_strategy == "first_exhausted":
        # The stream stops just before the first position that would need a missing crop.
        length = min(int(schedule.positions(s, n)[0]) for s, n in enumerate(totals))
    else:
        length = max(ends)
    return min(length, cfg.max_crops) if cfg.max_crops is not None else length


def _cuts(
    schedule: Schedule, sources: list[_SourceUnits], start: int, length: int, task_crops: int
) -> list[int]:
    """Task boundaries: unit boundaries at least ``task_crops`` apart with a small re-read."""
    n = schedule.counts(np.array([start, length]))
    candidates = [
        schedule.positions(s.source, s.boundaries(int(n[s.source, 0]), int(n[s.source, 1])))
        for s in sources
    ]
    points = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
    points = points[(points > start) & (points < length)]
    if len(points) == 0:
        return [start, length]
    local = schedule.counts(points)
    reread = sum(s.prefix(local[s.source]) for s in sources)
    cuts = [start]
    for p, cost in zip(points.tolist(), reread.tolist(), strict=True):
        if p - cuts[-1] >= task_crops and cost <= task_crops:
            cuts.append(p)
    return [*cuts, length]
