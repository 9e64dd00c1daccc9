"""UTF-8 byte tokenizer with the ids of ``transformers.PerceiverTokenizer``, vectorised with NumPy.

The Perceiver IO language model reads raw UTF-8 bytes: id = byte + 6, and ids 0..5 are the special
tokens ``[PAD] [BOS] [EOS] [MASK] [CLS] [SEP]``. The Hugging Face tokenizer does this one character
at a time in Python (about 2.5 MB/s); here a whole batch is encoded as one byte buffer, so the cost is
a few NumPy passes over the bytes.

Behaviour copied from ``transformers.PerceiverTokenizer`` (checked against it in the tests):

- special tokens: ``[CLS] a [SEP]`` and ``[CLS] a [SEP] b [SEP]``;
- the literal strings ``[PAD]``, ``[BOS]``, ``[EOS]``, ``[MASK]``, ``[CLS]``, ``[SEP]`` inside a text
  become their special id, as HF's added-token splitting does (``split_special_tokens=True`` turns
  this off and keeps them as bytes, again as in HF);
- padding (``True``/``"longest"``/``"max_length"``) on the right with ``[PAD]`` = 0 and attention
  mask 0 there; truncation ``"longest_first"`` on the right, with HF's closed-form split for pairs;
  giving only ``max_length`` turns truncation on, like HF;
- decoding renders special ids as their names (``"[CLS]"``) unless skipped, joins everything as bytes
  and decodes with ``errors="replace"``, so invalid bytes never raise.

Deliberate differences, all of them cases where HF gives a result that cannot be used:

- a ``str`` that is not valid Unicode (lone surrogates) raises ``UnicodeEncodeError`` as HF does,
  but naming the text's index; ``bytes`` input is taken as raw bytes, so invalid UTF-8 is encodable
  (HF accepts no bytes at all);
- truncating to a ``max_length`` smaller than the number of special tokens raises ``ValueError``
  (HF returns a sequence longer than ``max_length``);
- a batch with ``padding="max_length"`` and a row longer than ``max_length`` without truncation
  raises ``ValueError`` (HF returns ragged lists that no model can take);
- a batch without padding returns lists of 1-D arrays, one per text (HF returns lists of lists);
- only right padding and right truncation, and only the ``longest_first`` truncation strategy.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

PAD, BOS, EOS, MASK, CLS, SEP = 0, 1, 2, 3, 4, 5
BYTE_OFFSET = 6
VOCAB_SIZE = 256 + BYTE_OFFSET
MODEL_MAX_LENGTH = 2048
# Index = id. These strings are what HF prints for the special ids and what it parses in text.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")

TextLike = str | bytes | bytearray | memoryview
Padding = bool | Literal["longest", "max_length", "do_not_pad"]
Truncation = bool | None | Literal["longest_first", "do_not_truncate"]

# The names share no prefix and contain no "[" after the first byte, so matches never overlap and a
# match found in a buffer of concatenated documents either lies inside one document or is discarded.
_SPECIAL_RE = re.compile(rb"\[(?:PAD|BOS|EOS|MASK|CLS|SEP)\]")
_SPECIAL_ID = {name.encode(): i for i, name in enumerate(SPECIAL_TOKENS)}


# ---------------------------------------------------------------------------------------------------
# Ragged-array helpers: a batch of sequences is one flat array plus offsets (the Arrow layout).
# ---------------------------------------------------------------------------------------------------


def segment_mask(size: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Boolean mask of ``size`` that is True on the disjoint segments ``[start, start + length)``.

    A difference array and one cumulative sum: linear in ``size`` with no loop over segments.
    """
    delta = np.zeros(size + 1, dtype=np.int8)
    used = lengths > 0
    np.add.at(delta, starts[used], 1)
    np.add.at(delta, starts[used] + lengths[used], -1)
    # Segments are disjoint, so the running sum stays in {0, 1} and int8 cannot overflow.
    return np.cumsum(delta[:-1], dtype=np.int8).view(np.bool_)


def _exclusive_cumsum(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _check_id_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "iu" or dt.itemsize < 2:
        raise ValueError(f"id dtype must be an integer type of at least 16 bits, got {dt}")
    return dt


def utf8_buffer(texts: Sequence[TextLike]) -> tuple[np.ndarray, np.ndarray]:
    """Encode texts into one flat uint8 buffer plus int64 offsets (text i is ``buf[off[i]:off[i+1]]``).

    ``str`` is encoded strictly as UTF-8; ``bytes``-like input is taken as is, valid or not.
    """
    try:
        encoded = [t.encode("utf-8") if isinstance(t, str) else _as_bytes(t) for t in texts]
    except UnicodeEncodeError:
        for i, t in enumerate(texts):
            if isinstance(t, str):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as err:
                    reason = f"{err.reason} in text #{i}; pass bytes to tokenize raw bytes"
                    raise UnicodeEncodeError("utf-8", t, err.start, err.end, reason) from None
        raise
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), _exclusive_cumsum(lengths)


def _as_bytes(text: object) -> bytes | bytearray:
    if isinstance(text, (bytes, bytearray)):
        return text
    if isinstance(text, memoryview):
        return text.tobytes()  # len() of a memoryview counts items, not bytes
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def bytes_to_ids(
    values: Any,
    offsets: np.ndarray,
    *,
    split_special_tokens: bool = False,
    dtype: Any = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn an Arrow-style string column into flat token ids without special tokens added.

    ``values`` is the column's data buffer (anything ``np.frombuffer`` takes: a NumPy uint8 array, a
    ``pyarrow.Buffer``); ``offsets`` its int32/int64 offsets, which may start above 0 (sliced
    arrays). For a pyarrow ``StringArray`` ``arr``::

        _, off_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(off_buf, np.int32)[arr.offset : arr.offset + len(arr) + 1]
        ids, id_offsets = bytes_to_ids(data_buf, offsets)

    Nulls are not inspected (fill them first). Returns ``(ids, id_offsets)`` with ``id_offsets``
    starting at 0; ids of text i are ``ids[id_offsets[i]:id_offsets[i + 1]]``. Unless
    ``split_special_tokens`` is set, literal ``[CLS]``-style strings become one special id, as HF does.
    """
    dt = _check_id_dtype(dtype)
    if not isinstance(values, np.ndarray):
        values = np.frombuffer(values, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) == 0 or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be a non-empty, non-decreasing 1-D array")
    buf = values[offsets[0] : offsets[-1]]
    rel = offsets - offsets[0]
    if not split_special_tokens and _SPECIAL_RE.search(buf) is not None:
        return _ids_with_specials(buf, rel, dt)
    # np.add with a dtype converts and shifts in one pass (astype + add would take two).
    return np.add(buf, BYTE_OFFSET, dtype=dt), rel


def _ids_with_specials(
    buf: np.ndarray, offsets: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Slow path when a buffer contains special-token strings: each match becomes one id."""
    # One Python step per match, not per byte; matches are rare in real text.
    found = [(m.start(), m.end(), _SPECIAL_ID[m.group()]) for m in _SPECIAL_RE.finditer(buf)]
    spans = np.array(found, dtype=np.int64).reshape(-1, 3)
    start_doc = np.searchsorted(offsets, spans[:, 0], side="right") - 1
    end_doc = np.searchsorted(offsets, spans[:, 1] - 1, side="right") - 1
    spans = spans[start_doc == end_doc]  # a "match" across two documents is no match
    starts, ends, special = spans[:, 0], spans[:, 1], spans[:, 2]
    removed = ends - starts - 1  # each match keeps its first byte's slot for the special id
    dropped = segment_mask(len(buf), starts + 1, removed)
    removed_before = _exclusive_cumsum(removed)
    ids = np.add(buf[~dropped], BYTE_OFFSET, dtype=dtype)
    ids[starts - removed_before[:-1]] = special
    new_offsets = offsets - removed_before[np.searchsorted(starts, offsets, side="left")]
    return ids, new_offsets


# ---------------------------------------------------------------------------------------------------
# Truncation and assembly
# ---------------------------------------------------------------------------------------------------


def _longest_first(
    len_a: np.ndarray, len_b: np.ndarray | None, n_special: int, max_length: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Kept lengths under HF's ``longest_first`` (``truncate_sequences``), vectorised over rows."""
    if max_length < n_special:
        raise ValueError(
            f"max_length={max_length} leaves no room for the {n_special} special tokens"
        )
    total = len_a + (0 if len_b is None else len_b) + n_special
    remove = np.maximum(total - max_length, 0)
    if len_b is None:
        return len_a - remove, None
    # HF: first even out the longer side, then split the rest, the odd token going to the pair side
    # ("b") unless "a" was strictly longer.
    first = np.minimum(np.abs(len_b - len_a), remove)
    second = remove - first
    a_longer = len_a > len_b
    cut_a = np.where(a_longer, first + second // 2, second // 2)
    cut_b = np.where(a_longer, second - second // 2, first + second - second // 2)
    return len_a - cut_a, len_b - cut_b


def _take_prefixes(ids: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Concatenation of ``ids[off[i] : off[i] + keep[i]]`` (a view when nothing is cut)."""
    if np.array_equal(keep, np.diff(offsets)):
        return ids
    return ids[segment_mask(len(ids), offsets[:-1], keep)]


def _assemble(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    add_special_tokens: bool,
    width: int | None,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """Lay out ``[CLS] a [SEP] (b [SEP])`` per row into a flat buffer; returns (flat, row_starts).

    ``parts`` holds ``(ids, offsets, kept_lengths)`` for the first and optional second sequence.
    With ``width`` the rows are padded to it (row i starts at ``i * width``); otherwise they are
    packed back to back.
    """
    rows = len(parts[0][2])
    lengths = sum(kept for _, _, kept in parts) + (len(parts) + 1 if add_special_tokens else 0)
    if width is None:
        row_starts = _exclusive_cumsum(lengths)
        size = int(row_starts[-1])
        row_starts = row_starts[:-1]
    else:
        row_starts = np.arange(rows, dtype=np.int64) * width
        size = rows * width
    flat = np.full(size, PAD, dtype=dtype)
    cursor = row_starts.copy()
    if add_special_tokens:
        flat[cursor] = CLS
        cursor += 1
    for ids, offsets, kept in parts:
        # Row-major boolean assignment fills the slots in the order the sources are concatenated.
        flat[segment_mask(size, cursor, kept)] = _take_prefixes(ids, offsets, kept)
        cursor += kept
        if add_special_tokens:
            flat[cursor] = SEP
            cursor += 1
    return flat, lengths


@dataclass(frozen=True)
class ByteTokenizer:
    """Stateless, picklable byte tokenizer with the ``transformers.PerceiverTokenizer`` interface.

    ``model_max_length`` plays HF's role: the length used by ``padding="max_length"`` or
    ``truncation=True`` when no ``max_length`` is given. ``dtype`` is the dtype of returned ids and
    attention masks: int64 (what HF and PyTorch embeddings take) or a smaller integer type such as
    uint16 for compact storage.
    """

    model_max_length: int = MODEL_MAX_LENGTH
    split_special_tokens: bool = False
    dtype: str = "int64"

    pad_token_id: ClassVar[int] = PAD
    bos_token_id: ClassVar[int] = BOS
    eos_token_id: ClassVar[int] = EOS
    mask_token_id: ClassVar[int] = MASK
    cls_token_id: ClassVar[int] = CLS
    sep_token_id: ClassVar[int] = SEP
    vocab_size: ClassVar[int] = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {self.model_max_length}")
        _check_id_dtype(self.dtype)

    def __call__(
        self, text: TextLike | Sequence[TextLike], text_pair: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self.encode(text, text_pair, **kwargs)

    def encode(
        self,
        text: TextLike | Sequence[TextLike],
        text_pair: TextLike | Sequence[TextLike] | None = None,
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        padding: Padding = False,
        truncation: Truncation = None,
        return_attention_mask: bool = True,
    ) -> dict[str, Any]:
        """Tokenize one text (1-D arrays) or a batch (2-D arrays when padded, else lists of 1-D).

        Options mean what they mean in ``PerceiverTokenizer.__call__``; see the module docstring for
        the few cases that raise instead of returning what HF returns.
        """
        single = isinstance(text, (str, bytes, bytearray, memoryview))
        texts = [text] if single else list(text)
        pairs = None
        if text_pair is not None:
            pair_single = isinstance(text_pair, (str, bytes, bytearray, memoryview))
            pairs = [text_pair] if pair_single else list(text_pair)
            if pair_single != single or len(pairs) != len(texts):
                raise ValueError("text_pair must match text: both single, or batches of one length")
        columns = (
            [utf8_buffer(texts)] if pairs is None else [utf8_buffer(texts), utf8_buffer(pairs)]
        )
        out = self._encode_columns(
            columns,
            single=single,
            add_special_tokens=add_special_tokens,
            max_length=max_length,
            padding=padding,
            truncation=truncation,
            return_attention_mask=return_attention_mask,
        )
        if single:
            return {k: v[0] for k, v in out.items()}
        return out

    def encode_buffers(
        self,
        values: Any,
        offsets: np.ndarray,
        *,
        pair: tuple[Any, np.ndarray] | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        padding: Padding = False,
        truncation: Truncation = None,
        return_attention_mask: bool = True,
    ) -> dict[str, Any]:
        """``encode`` for Arrow-style columns: ``values``/``offsets`` as in :func:`bytes_to_ids`.

        ``pair`` is the second column's ``(values, offsets)``. Always returns batch-shaped output.
        This is what a Ray Data ``map_batches`` over an Arrow batch calls: no Python strings made.
        """
        columns = [(values, offsets)] if pair is None else [(values, offsets), pair]
        options = {
            "add_special_tokens": add_special_tokens,
            "max_length": max_length,
            "padding": padding,
            "truncation": truncation,
            "return_attention_mask": return_attention_mask,
        }
        return self._encode_columns(columns, single=False, **options)

    def _encode_columns(
        self,
        columns: list[tuple[Any, np.ndarray]],
        *,
        single: bool,
        add_special_tokens: bool,
        max_length: int | None,
        padding: Padding,
        truncation: Truncation,
        return_attention_mask: bool,
    ) -> dict[str, Any]:
        pad_to, truncate, max_length = self._strategies(padding, truncation, max_length)
        dt = np.dtype(self.dtype)
        split = self.split_special_tokens
        parts = [bytes_to_ids(v, o, split_special_tokens=split, dtype=dt) for v, o in columns]
        if len(parts) == 2 and len(parts[1][1]) != len(parts[0][1]):
            raise ValueError("the pair column must have as many rows as the first column")
        lens = [np.diff(off) for _, off in parts]
        n_special = (len(parts) + 1) if add_special_tokens else 0
        if truncate:
            kept = _longest_first(
                lens[0], lens[1] if len(lens) == 2 else None, n_special, max_length
            )
            lens = [k for k in kept if k is not None]
        total = sum(lens) + n_special
        width = None
        if pad_to == "longest":
            width = int(total.max(initial=0))
        elif pad_to == "max_length":
            too_long = np.flatnonzero(total > max_length)
            if len(too_long) and not single:
                raise ValueError(
                    f"text #{too_long[0]} has {total[too_long[0]]} tokens > max_length={max_length};"
                    " pass truncation=True or a larger max_length"
                )
            # A single text longer than max_length comes back unpadded and whole, as in HF.
            width = max(max_length, int(total.max(initial=0)))
        triples = [(ids, off, kept) for (ids, off), kept in zip(parts, lens, strict=True)]
        flat, lengths = _assemble(triples, add_special_tokens, width, dt)
        out: dict[str, Any] = {}
        if width is not None:
            out["input_ids"] = flat.reshape(len(lengths), width)
            if return_attention_mask:
                cols = np.arange(width)
                out["attention_mask"] = (cols[None, :] < lengths[:, None]).astype(dt)
            return out
        bounds = _exclusive_cumsum(lengths)
        out["input_ids"] = [flat[a:b] for a, b in itertools.pairwise(bounds)]
        if return_attention_mask:
            ones = np.ones(len(flat), dtype=dt)
            out["attention_mask"] = [ones[a:b] for a, b in itertools.pairwise(bounds)]
        return out

    def _strategies(
        self, padding: Padding, truncation: Truncation, max_length: int | None
    ) -> tuple[str | None, bool, int]:
        """Resolve HF's padding/truncation arguments (``_get_padding_truncation_strategies``)."""
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # HF: max_length alone turns truncation on
        pad_modes = {False: None, "do_not_pad": None, True: "longest", "longest": "longest"}
        pad_modes["max_length"] = "max_length"
        trunc_modes = {None: False, False: False, "do_not_truncate": False, True: True}
        trunc_modes["longest_first"] = True
        if padding not in pad_modes:
            raise ValueError(f"padding must be one of {list(pad_modes)}, got {padding!r}")
        if truncation not in trunc_modes:
            raise ValueError(
                f"truncation must be one of {list(trunc_modes)}, got {truncation!r}"
                " (only_first/only_second are not supported)"
            )
        pad_to, truncate = pad_modes[padding], trunc_modes[truncation]
        if max_length is None:
            max_length = self.model_max_length
        return pad_to, truncate, max_length

    # -------------------------------------------------------------------------------------------
    # Decoding
    # -------------------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Ids to text; specials print as ``[CLS]`` etc. (HF's rendering) unless skipped.

        All pieces are joined as bytes and decoded with ``errors="replace"``, so invalid UTF-8 gives
        U+FFFD instead of an exception, exactly as HF's ``convert_tokens_to_string`` does.
        """
        arr = _validated_ids(ids)
        if skip_special_tokens or not np.any(arr < BYTE_OFFSET):
            raw = self.decode_bytes(arr)
        else:
            table, starts, lengths = _decode_table()
            piece_lens = lengths[arr]
            out_starts = _exclusive_cumsum(piece_lens)
            index = np.arange(out_starts[-1]) - np.repeat(out_starts[:-1] - starts[arr], piece_lens)
            raw = table[index].tobytes()
        return raw.decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """``decode`` per row of a 2-D array or per sequence of a list."""
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def decode_bytes(self, ids: Any) -> bytes:
        """The raw bytes of the ids, special ids dropped; lossless for any byte content."""
        arr = _validated_ids(ids)
        return (arr[arr >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()

    # -------------------------------------------------------------------------------------------
    # Interoperability
    # -------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path) -> tuple[str, ...]:
        """Write the files ``transformers.PerceiverTokenizer.from_pretrained`` loads.

        The Perceiver tokenizer has no vocabulary file: ``tokenizer_config.json`` is all it needs.
        It has the keys ``PerceiverTokenizer().save_pretrained`` writes in transformers 5, plus
        ``split_special_tokens`` so that the loaded tokenizer parses ``[CLS]`` strings as this one
        does; ``special_tokens_map.json`` is added for older transformers releases.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = dict(zip(("pad", "bos", "eos", "mask", "cls", "sep"), SPECIAL_TOKENS, strict=True))
        flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        flags["special"] = False  # what HF writes for these added tokens
        decoder = {str(i): {"content": name, **flags} for i, name in enumerate(SPECIAL_TOKENS)}
        config = {
            "added_tokens_decoder": decoder,
            "backend": "custom",
            **{f"{key}_token": name for key, name in sorted(names.items())},
            "model_max_length": self.model_max_length,
            "split_special_tokens": self.split_special_tokens,
            "tokenizer_class": "PerceiverTokenizer",
        }
        files = {
            "tokenizer_config.json": config,
            "special_tokens_map.json": {f"{k}_token": v for k, v in names.items()},
        }
        written = []
        for filename, content in files.items():
            path = directory / filename
            path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            written.append(str(path))
        return tuple(written)


def _validated_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim > 1:
        raise ValueError(f"expected one sequence of ids, got shape {arr.shape}; use batch_decode")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64, copy=False)
    bad = arr[(arr < 0) | (arr >= VOCAB_SIZE)]
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
    return arr


@functools.lru_cache(maxsize=1)
def _decode_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bytes of every id laid end to end: the six special names, then the 256 single bytes."""
    pieces = [name.encode() for name in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    table = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    return table, _exclusive_cumsum(lengths)[:-1], lengths
