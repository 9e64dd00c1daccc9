"""mask_batch: whole-word selection, replacement shares, determinism, and the word splitting rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from perceiver_core.masking import IGNORE_INDEX, MaskingConfig, _units, mask_batch
from perceiver_core.packing import PackingConfig, pack_texts
from perceiver_core.tokenizer import BOS, BYTE_OFFSET, CLS, EOS, MASK, PAD, SEP

WHITESPACE = {ord(c) for c in " \t\n\v\f\r"}


def reference_units(row: np.ndarray, limit: int) -> list[tuple[int, int, bool]]:
    """(start, end, starts_a_word) of every unit of a row, one byte at a time."""
    row = [int(b) for b in row]
    units = []
    n, i = len(row), 0

    def in_word(k: int) -> bool:
        return row[k] >= BYTE_OFFSET and row[k] - BYTE_OFFSET not in WHITESPACE

    while i < n:
        if not in_word(i):
            i += 1
            continue
        j = i
        while j < n and in_word(j):
            j += 1
        cuts, previous_char_start, run = [0], 0, 0
        for p in range(j - i if j - i > limit else 0):
            continuation = 0x80 <= row[i + p] - BYTE_OFFSET <= 0xBF
            run = run + 1 if continuation else 0
            if (not continuation or run >= 4) and p > 0:  # a character starts here
                if p // limit != previous_char_start // limit:
                    cuts.append(p)
                previous_char_start = p
        bounds = [*cuts, j - i]
        units += [(i + a, i + b, k == 0) for k, (a, b) in enumerate(itertools.pairwise(bounds))]
        i = j
    return units


def _random_rows(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """Rows mixing ASCII words, whitespace, CJK, emoji, invalid bytes, specials and padding."""
    pieces = [
        b"word ",
        b"a ",
        b"\n",
        b"\t\t",
        "中文字符".encode(),
        "😀".encode(),
        b"x" * 40,
        b"\x80" * 7,
    ]
    pieces += [b"\xff\xbf", "é".encode(), b"http://example.com/a/b/c?q=1 "]
    out = np.full((rows, length), PAD, dtype=np.uint16)
    for r in range(rows):
        blob = b"".join(pieces[k] for k in rng.integers(0, len(pieces), 200))
        ids = np.frombuffer(blob, np.uint8).astype(np.uint16) + BYTE_OFFSET
        fill = rng.integers(length // 2, length + 1)
        out[r, :fill] = ids[:fill]
        out[r, rng.integers(0, length, 3)] = rng.choice([CLS, SEP, MASK, BOS, EOS], 3)
    return out


def _word_rows(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """Rows of random lowercase words of 1..12 letters separated by single spaces."""
    out = np.empty((rows, length), dtype=np.uint16)
    for r in range(rows):
        words = [
            "".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 13)))
            for _ in range(length // 3)
        ]
        out[r] = np.frombuffer(" ".join(words).encode()[:length], np.uint8) + BYTE_OFFSET
    return out


def _labelled_units(labels: np.ndarray, batch: np.ndarray, limit: int) -> tuple[list, list]:
    """Reference units (row, start, end, starts_a_word) split into labelled and not."""
    selected, others = [], []
    for r, row in enumerate(batch):
        for start, end, is_word in reference_units(row, limit):
            unit = (r, start, end, is_word)
            (selected if labels[r, start] != IGNORE_INDEX else others).append(unit)
    return selected, others


@pytest.mark.parametrize("limit", [1, 2, 5, 16])
def test_units_match_the_byte_by_byte_rule(limit):
    batch = _random_rows(np.random.default_rng(limit), 8, 512)
    units = _units(batch.reshape(-1), *batch.shape, limit)
    got = list(zip(units.start.tolist(), units.end.tolist(), units.is_word.tolist(), strict=True))
    want = [
        (r * 512 + s, r * 512 + e, w)
        for r in range(8)
        for s, e, w in reference_units(batch[r], limit)
    ]
    assert got == want
    assert units.col.tolist() == [s % 512 for s, _, _ in want]
    lengths = units.end - units.start
    split = ~units.is_word | np.r_[~units.is_word[1:], False]  # pieces of split words
    assert split.any() and lengths[split].max() <= limit + 3


def test_masks_are_whole_units_with_their_leading_space():
    batch = _random_rows(np.random.default_rng(0), 32, 512)
    for space in (True, False):
        cfg = MaskingConfig(mask_prob=0.3, include_leading_space=space)
        masked, labels = mask_batch(batch, np.arange(32), 0, cfg)
        expected = np.zeros(batch.shape, dtype=bool)
        for r, start, end, is_word in _labelled_units(labels, batch, cfg.max_word_bytes)[0]:
            expected[r, start:end] = True
            if space and is_word and start > 0 and int(batch[r, start - 1]) - 6 in WHITESPACE:
                expected[r, start - 1] = True
        np.testing.assert_array_equal(labels != IGNORE_INDEX, expected)
        np.testing.assert_array_equal(labels[expected], batch[expected])
        np.testing.assert_array_equal(masked[~expected], batch[~expected])
        assert masked.dtype == np.uint16 and labels.dtype == np.int16
        assert labels.shape == masked.shape == batch.shape


def test_selection_rate_is_mask_prob_per_word():
    batch = _word_rows(np.random.default_rng(1), 128, 2048)
    _, labels = mask_batch(batch, np.arange(128), 0, MaskingConfig())
    selected, others = _labelled_units(labels, batch, 16)
    n = len(selected) + len(others)
    assert n > 30_000
    # Binomial sd at n = 35k is 0.0019; 0.008 is 4 sd and still far from a wrong rate like 0.13.
    assert abs(len(selected) / n - 0.15) < 0.008


def test_replacement_shares_and_random_bytes():
    batch = _word_rows(np.random.default_rng(2), 128, 2048)
    masked, labels = mask_batch(
        batch, np.arange(128), 3, MaskingConfig(include_leading_space=False)
    )
    kinds = {"mask": 0, "keep": 0, "random": 0}
    random_bytes = []
    for r, start, end, _ in _labelled_units(labels, batch, 16)[0]:
        got, original = masked[r, start:end], batch[r, start:end]
        if np.all(got == MASK):
            kinds["mask"] += 1
        elif np.array_equal(got, original):
            kinds["keep"] += 1
        else:
            kinds["random"] += 1
            random_bytes.extend(got.tolist())
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.02
    assert abs(kinds["keep"] / total - 0.1) < 0.015
    assert abs(kinds["random"] / total - 0.1) < 0.015
    random_bytes = np.array(random_bytes)
    assert random_bytes.min() >= BYTE_OFFSET and random_bytes.max() <= 261
    assert len(np.unique(random_bytes)) > 240  # spread over the whole byte range, not letters
    assert abs(random_bytes.mean() - 133.5) < 4


def test_all_mask_and_all_keep_configs():
    batch = _random_rows(np.random.default_rng(3), 16, 256)
    masked, labels = mask_batch(batch, np.arange(16), 0, MaskingConfig(1.0, 1.0, 0.0, 0.0))
    chosen = labels != IGNORE_INDEX
    assert np.all(masked[chosen] == MASK) and np.array_equal(masked[~chosen], batch[~chosen])
    is_word = (batch >= BYTE_OFFSET) & ~np.isin(batch - BYTE_OFFSET, list(WHITESPACE))
    assert np.all(chosen[is_word])  # mask_prob 1: every word byte is a target
    masked, labels = mask_batch(batch, np.arange(16), 0, MaskingConfig(0.5, 0.0, 0.0, 1.0))
    np.testing.assert_array_equal(masked, batch)
    assert (labels != IGNORE_INDEX).sum() > 100


def test_specials_are_never_masked_and_split_words():
    row = np.frombuffer(b"alpha beta", np.uint8).astype(np.uint16) + BYTE_OFFSET
    row = np.concatenate([[CLS], row[:3], [SEP], row[3:], [MASK, BOS, EOS, PAD, PAD]])[None]
    masked, labels = mask_batch(
        row,
        np.array([7]),
        0,
        MaskingConfig(mask_prob=1.0, replace_mask=1.0, replace_random=0, keep=0),
    )
    specials = row < BYTE_OFFSET
    assert np.all(labels[specials] == IGNORE_INDEX) and np.array_equal(
        masked[specials], row[specials]
    )
    assert np.all(
        masked[~specials] == MASK
    )  # "alp", "ha", " ", "beta": all words, space leads "beta"
    units = _units(row.reshape(-1), 1, row.shape[1], 16)
    assert units.start.tolist() == [1, 5, 8] and units.end.tolist() == [4, 7, 12]


def test_pseudo_words_on_long_runs_and_cjk():
    ascii_row = np.full((1, 2048), ord("q") + BYTE_OFFSET, dtype=np.uint16)
    _, labels = mask_batch(ascii_row, np.array([1]), 0, MaskingConfig())
    blocks = (labels.reshape(128, 16) != IGNORE_INDEX).sum(axis=1)
    assert (
        set(blocks.tolist()) == {0, 16} and 5 <= (blocks == 16).sum() <= 45
    )  # aligned 16-byte pieces
    cjk = (
        np.frombuffer(("汉字没有空格" * 120).encode()[:2040], np.uint8).astype(np.uint16)[None]
        + BYTE_OFFSET
    )
    for epoch in range(5):
        _, labels = mask_batch(cjk, np.array([9]), epoch, MaskingConfig())
        chosen = np.flatnonzero(labels[0] != IGNORE_INDEX)
        edges = chosen[np.r_[True, np.diff(chosen) > 1]]  # first byte of every labelled run
        assert len(chosen) and np.all(edges % 3 == 0)  # runs start on a character, never inside
    units = _units(cjk.reshape(-1), 1, cjk.shape[1], 16)
    assert np.all(units.start % 3 == 0) and (units.end - units.start).max() == 18


def test_mask_is_a_function_of_seed_sample_epoch_and_row_only():
    batch = _random_rows(np.random.default_rng(4), 24, 384)
    ids = np.arange(1000, 1024, dtype=np.uint64)
    cfg = MaskingConfig()
    masked, labels = mask_batch(batch, ids, 5, cfg)
    perm = np.random.default_rng(5).permutation(24)
    p_masked, p_labels = mask_batch(batch[perm], ids[perm], 5, cfg)
    np.testing.assert_array_equal(p_masked, masked[perm])
    np.testing.assert_array_equal(p_labels, labels[perm])
    for part in (slice(0, 1), slice(3, 17), slice(17, 24)):  # any split, any batch-mates
        np.testing.assert_array_equal(mask_batch(batch[part], ids[part], 5, cfg)[1], labels[part])
    same = mask_batch(batch.astype(np.int64), ids.astype(np.int64), 5, cfg)
    np.testing.assert_array_equal(same[0], masked)
    np.testing.assert_array_equal(same[1], labels)

    def differs(other: np.ndarray) -> float:
        return float(np.mean(np.any(other != labels, axis=1)))

    assert differs(mask_batch(batch, ids, 6, cfg)[1]) > 0.9  # a new epoch, a new mask
    assert differs(mask_batch(batch, ids, 5, MaskingConfig(seed=1))[1]) > 0.9
    assert differs(mask_batch(batch, ids + 24, 5, cfg)[1]) > 0.9
    twins = np.repeat(batch[:1], 8, axis=0)  # identical crops with different ids mask differently
    assert len({lab.tobytes() for lab in mask_batch(twins, np.arange(8), 0, cfg)[1]}) == 8


def test_every_row_with_a_word_gets_a_target():
    rows = np.full((4, 64), PAD, dtype=np.uint16)
    rows[0, :5] = np.frombuffer(b"hello", np.uint8) + BYTE_OFFSET
    rows[1, :11] = np.frombuffer(b"ab cd ef gh", np.uint8)[:11] + BYTE_OFFSET
    rows[2, :6] = [CLS, SEP, ord(" ") + 6, ord("\n") + 6, MASK, EOS]  # specials and whitespace only
    for sample in range(200):
        masked, labels = mask_batch(rows, np.arange(4) + 4 * sample, 0, MaskingConfig())
        targets = (labels != IGNORE_INDEX).sum(axis=1)
        assert targets[0] == 5 and targets[1] >= 2
        assert targets[2] == 0 and targets[3] == 0
        np.testing.assert_array_equal(masked[2:], rows[2:])
    empty = mask_batch(np.zeros((0, 16), np.uint16), np.zeros(0, np.uint64), 0, MaskingConfig())
    assert empty[0].shape == (0, 16) and empty[1].dtype == np.int16


def test_validation():
    ok = np.full((1, 4), 100, dtype=np.int64)
    for bad, message in [(262, "262"), (-1, "-1")]:
        ids = ok.copy()
        ids[0, 2] = bad
        with pytest.raises(ValueError, match=message):
            mask_batch(ids, np.zeros(1, np.int64), 0, MaskingConfig())
    with pytest.raises(ValueError, match="2-D"):
        mask_batch(ok[0], np.zeros(1, np.int64), 0, MaskingConfig())
    with pytest.raises(ValueError, match="2-D integer"):
        mask_batch(ok.astype(float), np.zeros(1, np.int64), 0, MaskingConfig())
    with pytest.raises(ValueError, match="sample_ids"):
        mask_batch(ok, np.zeros(2, np.int64), 0, MaskingConfig())
    with pytest.raises(ValueError, match="epoch"):
        mask_batch(ok, np.zeros(1, np.int64), -1, MaskingConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_prob": 0.0}, "mask_prob"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"replace_mask": 0.5}, "must be 1"),
        ({"replace_random": -0.1, "keep": 0.3}, "replace_random"),
        ({"max_word_bytes": 0}, "max_word_bytes"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**kwargs)


@pytest.mark.shared_data
def test_wikipedia_crops_mask_at_the_paper_rate(shared_data):
    pq = pytest.importorskip("pyarrow.parquet")
    path = sorted((shared_data / "wikipedia/20150501.en").glob("*.parquet"))[0]
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    packed = pack_texts(texts, PackingConfig())
    masked, labels = mask_batch(packed.input_ids, packed.sample_ids(), 0, MaskingConfig())
    units = _units(packed.input_ids.reshape(-1), *packed.input_ids.shape, 16)
    rate = np.mean(labels.reshape(-1)[units.start] != IGNORE_INDEX)
    assert len(units.start) > 500_000 and abs(rate - 0.15) < 0.003
    assert np.all((labels != IGNORE_INDEX).any(axis=1))
    assert abs(np.mean(masked[labels != IGNORE_INDEX] == MASK) - 0.8) < 0.01  # the 80 of 80/10/10
