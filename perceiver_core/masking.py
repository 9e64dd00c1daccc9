"""Whole-word masking over byte crops, deterministic per sample and epoch.

The Perceiver IO paper masks each whitespace-delimited word independently with probability 0.15 and
trains on the masked bytes only. This module does that for a (B, L) batch of byte ids:

- A *word* is a maximal run of byte ids (>= 6) that are not ASCII whitespace; special ids (PAD, CLS,
  SEP, MASK, BOS, EOS) are never masked and end words.
- A run longer than ``max_word_bytes`` (a URL, base64, CJK text without spaces) is cut into
  *pseudo-words* of about ``max_word_bytes`` bytes, cutting only where a UTF-8 character starts, so a
  piece never splits a character. Otherwise one long run would be all-or-nothing and a crop of
  Chinese text would have one enormous target or none.
- With ``include_leading_space`` a masked word also takes the one whitespace byte just before it.
  DeepMind's model card for ``deepmind/language-perceiver`` masks `` missing`` rather than
  ``missing``: the model was trained to fill spans that start with the space, and predicts much
  better that way. Only the first piece of a split word has a space before it.
- Each selected word is replaced (80/10/10 by default, configurable) by [MASK] bytes, random bytes,
  or left as it is; labels hold the original ids on all of its bytes and -100 elsewhere.

Randomness is a counter-based hash (the splitmix64 finaliser) of (seed, sample id, epoch, stream,
column of the word's first byte), so a row's mask depends on nothing but those and the row's bytes:
not on the batch it travels in, its place there, or how many workers produced it. That makes data
loading reproducible and resumable, and a new epoch draws a new mask for the same crop.

Cost: a few passes over the batch to find words, then work per word, not per byte; about 200 MB/s
of 2048-byte crops per core for batches of 256 (benchmarks/tokenizer_throughput.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perceiver_core.tokenizer import BYTE_OFFSET, MASK, VOCAB_SIZE

IGNORE_INDEX = -100  # label of unmasked positions; PyTorch's cross_entropy ignores it by default

_SPACE = ord(" ") + BYTE_OFFSET
_WS_LOW, _WS_HIGH = ord("\t") + BYTE_OFFSET, ord("\r") + BYTE_OFFSET  # \t \n \v \f \r
_CONT_LOW, _CONT_HIGH = 0x80 + BYTE_OFFSET, 0xBF + BYTE_OFFSET  # UTF-8 continuation bytes

# Independent random streams: which words, how each is replaced, which random bytes.
_STREAM_SELECT, _STREAM_ACTION, _STREAM_BYTES = 1, 2, 3
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_KEY_SALT = 0x6A09E667F3BCC909  # arbitrary odd constants separating the key's parts
_EPOCH_SALT = 0xBB67AE8584CAA73B
_STREAM_SALT = 0x3C6EF372FE94F82B


@dataclass(frozen=True)
class MaskingConfig:
    """Whole-word masking settings.

    mask_prob: probability that a word (or pseudo-word) is selected, independently (paper: 0.15).
    replace_mask / replace_random / keep: what happens to a selected word: all bytes -> [MASK], all
        bytes -> uniform random bytes, or unchanged. BERT's 80/10/10 by default; the paper does not
        say, and 1/0/0 is allowed. Must sum to 1.
    max_word_bytes: longer whitespace-free runs are split into pseudo-words of at most
        ``max_word_bytes + 3`` bytes (cuts at UTF-8 character starts only).
    include_leading_space: a masked word also masks the whitespace byte right before it; the byte is
        then part of the word's span (labelled, and replaced the same way as the word's bytes).
    seed: global seed; with the sample id and epoch it fixes every mask.
    """

    mask_prob: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1
    keep: float = 0.1
    max_word_bytes: int = 16
    include_leading_space: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {self.mask_prob!r}")
        shares = {"replace_mask": self.replace_mask, "replace_random": self.replace_random}
        shares["keep"] = self.keep
        for name, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share!r}")
        if abs(sum(shares.values()) - 1.0) > 1e-6:
            raise ValueError(f"replace_mask + replace_random + keep must be 1, got {shares}")
        if not isinstance(self.max_word_bytes, int) or self.max_word_bytes < 1:
            raise ValueError(
                f"max_word_bytes must be a positive integer, got {self.max_word_bytes!r}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place: a bijection of uint64 whose output bits depend on all input bits.

    uint64 arithmetic wraps modulo 2**64, which is what the finaliser wants.
    """
    tmp = np.empty_like(z)
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        z ^= tmp
        z *= np.uint64(factor)
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


def _row_keys(seed: int, sample_ids: np.ndarray, epoch: int) -> np.ndarray:
    """One uint64 key per row from (seed, sample id, epoch); the mixing makes nearby ids unrelated."""
    base = _mix(np.array([seed], dtype=np.uint64) ^ np.uint64(_KEY_SALT))
    key = _mix(base ^ sample_ids)
    return _mix(key ^ (np.array([epoch], dtype=np.uint64) * np.uint64(_EPOCH_SALT)))


def _draw(row_keys: np.ndarray, stream: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """uint64 hash for each (row, col) in a stream: splitmix64 sequence ``col`` of the row's key."""
    stream_keys = _mix(row_keys ^ (np.array([stream], dtype=np.uint64) * np.uint64(_STREAM_SALT)))
    state = cols.astype(np.uint64)
    state += np.uint64(1)
    state *= np.uint64(_GOLDEN)
    state += stream_keys[rows]
    return _mix(state)


def _uniform(bits: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from the top 53 bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``range(s, s + n)`` for each segment, with one repeat and no loop."""
    before = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - before, lengths)


def _shift(a: np.ndarray, k: int, offset: np.ndarray) -> np.ndarray:
    """``a`` delayed by k inside each ragged segment (False before the segment's start)."""
    out = np.zeros_like(a)
    out[k:] = a[:-k]
    return out & (offset >= k)


def _piece_starts(
    ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, limit: int
) -> np.ndarray:
    """Flat positions where long words are cut into pseudo-words (word starts not included).

    A cut goes at a character start whose bucket ``pos // limit`` differs from the previous
    character start's: a piece then ends at the first character start past a multiple of ``limit``,
    so it has at most ``limit + 3`` bytes. Valid UTF-8 has at most 3 continuation bytes per
    character; to keep the bound for invalid bytes too, a 4th consecutive continuation byte counts
    as a character start (as a decoder would start a new replacement character there).
    """
    where = _ragged_arange(starts, lengths)
    pos = where - np.repeat(starts, lengths)  # position inside the word
    b = ids[where]
    cont = (b >= _CONT_LOW) & (b <= _CONT_HIGH)
    c1, c2, c3 = (_shift(cont, k, pos) for k in (1, 2, 3))
    char_start = ~cont | (c1 & c2 & c3)
    inner = ~char_start
    n1, n2, n3 = (_shift(inner, k, pos) for k in (1, 2, 3))
    gap = 1 + n1.astype(np.int64) + (n1 & n2) + (n1 & n2 & n3)  # back to the previous char start
    prev = np.maximum(pos - gap, 0)
    cut = char_start & (pos > 0) & (pos // limit != prev // limit)
    return where[cut]


@dataclass(frozen=True, eq=False)  # holds arrays: == would be ambiguous
class _Units:
    """Maskable units of a flat (B*L) batch, in order: flat start, row, column, flat end."""

    start: np.ndarray
    row: np.ndarray
    col: np.ndarray
    end: np.ndarray
    is_word: np.ndarray  # False for the second and later pieces of a split word
    row_has_units: np.ndarray  # (B,) bool


def _units(ids: np.ndarray, B: int, L: int, limit: int) -> _Units:
    # (ids - first whitespace id) wraps around in uint16, so one comparison excludes \t..\r.
    word = (
        (ids >= BYTE_OFFSET) & (ids != _SPACE) & ((ids - np.uint16(_WS_LOW)) > _WS_HIGH - _WS_LOW)
    )
    # Word edges in one pass: in a (B, L + 1) grid, column j flags word[j] != word[j - 1] (with
    # non-words outside the row), so each row lists start, end, start, end, ...
    grid = word.reshape(B, L)
    edges = np.zeros((B, L + 1), dtype=bool)
    edges[:, :L] = grid
    edges[:, 1:] ^= grid
    at = np.flatnonzero(edges)
    per_row = np.diff(np.searchsorted(at, np.arange(B + 1) * (L + 1)))
    rows = np.repeat(np.arange(B), per_row)
    at -= rows  # from (L + 1)-wide to L-wide flat positions
    start, end, row = at[0::2], at[1::2], rows[0::2]
    has_units = per_row > 0
    long_words = np.flatnonzero(end - start > limit)
    if len(long_words) == 0:
        return _Units(start, row, start - row * L, end, np.ones(len(start), dtype=bool), has_units)
    cuts = _piece_starts(ids, start[long_words], end[long_words] - start[long_words], limit)
    slot = np.searchsorted(start, cuts, side="right")  # after the cut word's start and earlier cuts
    is_word = np.insert(np.ones(len(start), dtype=bool), slot, False)
    word_of_unit = np.cumsum(is_word) - 1
    unit_start = np.insert(start, slot, cuts)
    unit_row = row[word_of_unit]
    unit_end = end[word_of_unit]
    # Where the next unit is a piece of the same word, this unit ends where that one starts.
    inside = ~is_word[1:]
    unit_end[:-1][inside] = unit_start[1:][inside]
    return _Units(unit_start, unit_row, unit_start - unit_row * L, unit_end, is_word, has_units)


def _select(u: np.ndarray, rows: np.ndarray, row_has_units: np.ndarray, prob: float) -> np.ndarray:
    """Units drawn with probability ``prob``, plus the lowest draw of any row that drew none."""
    selected = u < prob
    needy_rows = row_has_units.copy()
    needy_rows[rows[selected]] = False
    if needy_rows.any():
        needy = np.flatnonzero(needy_rows[rows])
        order = needy[np.lexsort((u[needy], rows[needy]))]
        first_of_row = np.r_[True, rows[order][1:] != rows[order][:-1]]
        selected[order[first_of_row]] = True
    return selected


def mask_batch(
    input_ids: np.ndarray,
    sample_ids: np.ndarray,
    epoch: int,
    cfg: MaskingConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask whole words of a (B, L) batch of ids; returns ``(masked_ids uint16, labels int16)``.

    ``sample_ids`` (B,) identify the rows (e.g. ``PackedCrops.sample_ids()``); the mask of a row is
    a function of ``(cfg.seed, sample_id, epoch, row)`` only. ``labels`` hold the original id where
    a word was selected (whether replaced by [MASK], random bytes or kept) and -100 elsewhere.

    Every row with at least one word gets at least one masked word: when the draw selects none, the
    word with the lowest draw is taken, so no crop is wasted without a target. That raises the
    selection rate only for rows with few words (a row of n words gains at most 0.85**n of a word;
    nothing for a full 2048-byte crop of text). A row of padding or special ids has no targets.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be a 2-D integer array, got {ids.dtype} {ids.shape}")
    B, L = ids.shape
    sample_ids = np.asarray(sample_ids)
    if sample_ids.shape != (B,) or sample_ids.dtype.kind not in "iu":
        raise ValueError(
            f"sample_ids must be {B} integers, got {sample_ids.dtype} {sample_ids.shape}"
        )
    if not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        bad = ids[(ids < 0) | (ids >= VOCAB_SIZE)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary 0..{VOCAB_SIZE - 1}")

    flat = ids.astype(np.uint16).reshape(-1)  # a copy: it becomes the masked output
    labels = np.full(B * L, IGNORE_INDEX, dtype=np.int16)
    if flat.size == 0:
        return flat.reshape(B, L), labels.reshape(B, L)
    units = _units(flat, B, L, cfg.max_word_bytes)
    keys = _row_keys(cfg.seed, sample_ids.astype(np.uint64), int(epoch))
    u = _uniform(_draw(keys, _STREAM_SELECT, units.row, units.col))
    chosen = np.flatnonzero(_select(u, units.row, units.row_has_units, cfg.mask_prob))
    starts, ends = units.start[chosen], units.end[chosen]
    rows, cols = units.row[chosen], units.col[chosen]
    action = _uniform(_draw(keys, _STREAM_ACTION, rows, cols))

    if cfg.include_leading_space:
        before = flat[np.maximum(starts - 1, 0)]
        is_space = (before == _SPACE) | ((before >= _WS_LOW) & (before <= _WS_HIGH))
        # Only a word's first piece can qualify: inside a split word the byte before is no space.
        starts = starts - ((cols > 0) & is_space)

    at = _ragged_arange(starts, ends - starts)
    labels[at] = flat[at]
    # 0: [MASK], 1: random bytes, 2: keep; one small int per word, repeated over its bytes.
    kind = (action >= cfg.replace_mask).astype(np.int8)
    kind += action >= cfg.replace_mask + cfg.replace_random
    kind = np.repeat(kind, ends - starts)
    flat[at[kind == 0]] = MASK
    noisy = at[kind == 1]
    if len(noisy):
        r, c = np.divmod(noisy, L)
        random_bytes = _draw(keys, _STREAM_BYTES, r, c) >> np.uint64(56)
        flat[noisy] = random_bytes.astype(np.uint16) + BYTE_OFFSET
    return flat.reshape(B, L), labels.reshape(B, L)
