"""The interleaving schedule and the task plan, on synthetic indexes (no files, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.config import MixtureConfig
from pipelines.data.index import DataIndex, SourceIndex
from pipelines.data.mixture import EmptySourceError, Schedule, plan
from pipelines.data.sources import FileRef


def synthetic_index(unit_crops: list[list[int]], fill: list[float] | None = None) -> DataIndex:
    """An index whose source s has one file per unit with the given train crop counts."""
    sources = []
    for s, crops in enumerate(unit_crops):
        n = len(crops)
        crops_arr = np.asarray(crops, dtype=np.int64)
        tokens = (crops_arr * 2048 * (fill[s] if fill else 1.0)).astype(np.int64)
        zeros = np.zeros(n, dtype=np.int64)
        units = {"file": np.arange(n), "unit": np.full(n, -1), "rows": crops_arr * 3}
        units.update(null=zeros, empty=zeros, docs_train=crops_arr, docs_validation=zeros)
        units.update(text_bytes_train=tokens, text_bytes_validation=zeros)
        units.update(crops_train=crops_arr, crops_validation=zeros)
        units.update(tokens_train=tokens, tokens_validation=zeros)
        files = [FileRef(f"/s{s}/f{i}.jsonl", f"f{i}.jsonl", "json", 1, "") for i in range(n)]
        sources.append(SourceIndex(f"s{s}", f"/s{s}", files, units, {}))
    return DataIndex(sources, {"packing": {"crop_len": 2048}})


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.98, 0.01, 0.01]])
def test_schedule_gives_each_position_one_source_and_keeps_shares(weights):
    schedule = Schedule.from_weights(weights)
    counts = schedule.counts(np.arange(0, 20001))
    np.testing.assert_array_equal(counts.sum(axis=0), np.arange(20001))
    steps = np.diff(counts, axis=1)
    assert set(np.unique(steps)) <= {0, 1}
    # Any window of 1,000 positions holds 1000 * w crops of each source, within 2.
    window = counts[:, 1000:] - counts[:, :-1000]
    expected = 1000 * schedule.weights[:, None]
    assert np.abs(window - expected).max() <= 2.0


def test_positions_invert_counts():
    schedule = Schedule.from_weights([0.6, 0.25, 0.15])
    sources = schedule.sources(0, 5000)
    for s in range(3):
        where = np.flatnonzero(sources == s)
        np.testing.assert_array_equal(schedule.positions(s, np.arange(len(where))), where)


def test_first_exhausted_stops_when_a_source_runs_out():
    index = synthetic_index([[100, 100], [50, 70]])
    p = plan(index, "train", [0.5, 0.5], MixtureConfig(stopping_strategy="first_exhausted"))
    sources = p.schedule.sources(0, p.length)
    taken = np.bincount(sources, minlength=2)
    assert taken[1] == 120 and taken[0] <= 200  # source 1 ran out and the stream stopped there
    assert all(seg.epoch == 0 for t in p.tasks for seg in t.segments)
    # One more position would need a crop source 1 does not have.
    assert p.schedule.counts(p.length + 1)[1, 0] == 121


def test_all_exhausted_repeats_the_short_source_in_new_passes():
    index = synthetic_index([[100, 100], [50, 70]])
    p = plan(index, "train", [0.5, 0.5], MixtureConfig(stopping_strategy="all_exhausted"))
    taken = np.bincount(p.schedule.sources(0, p.length), minlength=2)
    assert taken[0] == 200 and taken[1] >= 199  # source 0 read once, source 1 goes round again
    epochs = {seg.epoch for t in p.tasks for seg in t.segments if seg.source == 1}
    assert epochs == {0, 1}


def test_cycle_runs_to_max_crops_and_max_crops_caps():
    index = synthetic_index([[10, 10], [5]])
    cycle = MixtureConfig(stopping_strategy="cycle", max_crops=1000)
    assert plan(index, "train", [0.5, 0.5], cycle).length == 1000
    capped = MixtureConfig(stopping_strategy="all_exhausted", max_crops=7)
    assert plan(index, "train", [0.5, 0.5], capped).length == 7
    with pytest.raises(ValueError, match="max_crops"):
        MixtureConfig(stopping_strategy="cycle")


def test_byte_balance_corrects_for_padding():
    # Source 0 fills its crops half as well as source 1: it needs twice the crops per byte.
    index = synthetic_index([[1000], [1000]], fill=[0.5, 1.0])
    by_bytes = plan(index, "train", [0.5, 0.5], MixtureConfig(max_crops=900)).schedule
    assert by_bytes.weights[0] == pytest.approx(2 / 3, abs=1e-4)
    by_crops = plan(index, "train", [0.5, 0.5], MixtureConfig(balance="crops", max_crops=900))
    assert by_crops.schedule.weights[0] == pytest.approx(0.5, abs=1e-4)


def _crops_of(p, source):
    return sum(seg.hi - seg.lo for t in p.tasks for seg in t.segments if seg.source == source)


@pytest.mark.parametrize("task_crops", [1, 40, 10**9])
def test_tasks_cover_the_stream_exactly(task_crops):
    index = synthetic_index([[30, 5, 40, 25, 60], [12, 12, 12]])
    cfg = MixtureConfig(stopping_strategy="all_exhausted")
    p = plan(index, "train", [0.7, 0.3], cfg, task_crops=task_crops)
    assert p.tasks[0].start == 0 and p.tasks[-1].stop == p.length
    assert all(a.stop == b.start for a, b in zip(p.tasks, p.tasks[1:], strict=False))
    for t in p.tasks:
        n = p.schedule.counts(np.array([t.start, t.stop]))
        for s in range(2):
            got = sum(seg.hi - seg.lo for seg in t.segments if seg.source == s)
            assert got == n[s, 1] - n[s, 0]
    if task_crops == 10**9:
        assert len(p.tasks) == 1


def test_resume_plan_opens_only_the_unit_holding_k():
    index = synthetic_index([[30, 5, 40, 25, 60], [12, 12, 12]])
    cfg = MixtureConfig(stopping_strategy="first_exhausted", shuffle_units=False)
    full = plan(index, "train", [0.5, 0.5], cfg)
    k = 50
    resumed = plan(index, "train", [0.5, 0.5], cfg, start=k)
    assert resumed.tasks[0].start == k and resumed.length == full.length
    first = {}
    for seg in resumed.tasks[0].segments:
        first.setdefault(seg.source, seg)
    n = full.schedule.counts(k)[:, 0]
    # Source 0 has n[0] crops before k: its first segment starts inside the unit holding that crop.
    cum0 = np.cumsum([0, 30, 5, 40, 25, 60])
    unit = int(np.searchsorted(cum0, n[0], side="right")) - 1
    assert first[0].file == unit and first[0].lo == n[0] - cum0[unit]
    assert all(seg.file >= unit for t in resumed.tasks for seg in t.segments if seg.source == 0)


def test_shuffled_unit_order_is_stable_and_differs_per_pass():
    index = synthetic_index([[3] * 20, [100]])
    cfg = MixtureConfig(stopping_strategy="cycle", max_crops=400, seed=3)

    def order(p):
        return [(seg.epoch, seg.file) for t in p.tasks for seg in t.segments if seg.source == 0]

    a, b = plan(index, "train", [0.5, 0.5], cfg), plan(index, "train", [0.5, 0.5], cfg)
    assert order(a) == order(b)
    passes = {}
    for epoch, file in order(a):
        passes.setdefault(epoch, []).append(file)
    assert sorted(passes[0]) == list(range(20)) and passes[0] != passes[1]
    other_seed = plan(index, "train", [0.5, 0.5], MixtureConfig("cycle", max_crops=400, seed=4))
    assert order(other_seed) != order(a)


def test_source_without_crops_is_an_error():
    index = synthetic_index([[10], [0, 0]])
    with pytest.raises(EmptySourceError, match="source 's1' has no train crops"):
        plan(index, "train", [0.5, 0.5], MixtureConfig())
