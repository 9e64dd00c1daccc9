"""Pack documents into fixed-length byte crops the way the Perceiver IO paper pretrained.

The paper concatenates 10 documents and splits the byte stream into crops of 2048 bytes, no crop
spanning two groups. Crops hold raw UTF-8 bytes (id = byte + 6) and no ``[CLS]``/``[BOS]``: the
paper crops a plain byte stream, and MLM pretraining needs no summary token (a classification head
reads its own learned query, not position 0). The only padding is at the end of a group's last crop.

Everything here is a pure function of arrays in the Arrow layout (one uint8 buffer plus offsets), so
Ray Data can call it on a string column without building Python strings, and it is vectorised: the
cost is a few NumPy passes over the output, with no loop over documents or groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from perceiver_core.tokenizer import (
    BYTE_OFFSET,
    PAD,
    SEP,
    TextLike,
    segment_mask,
    utf8_buffer,
)

# Bits of a crop's sample id (see PackedCrops.sample_ids): 8 for the source, 32 for the group,
# 24 for the crop within its group (a group of up to 2**24 crops = 32 GiB at crop_len 2048).
_CROP_BITS = 24
_GROUP_BITS = 32
_SOURCE_BITS = 8


@dataclass(frozen=True)
class PackingConfig:
    """How documents become crops.

    group_size: documents concatenated into one stream before cropping (10 in the paper); the last
        group of a batch may hold fewer.
    crop_len: bytes per crop, equal to the model's input length (2048 in the paper).
    separator: "none" concatenates documents directly (the paper's byte stream); "sep" puts one
        ``[SEP]`` id between consecutive non-empty documents of a group so the model can see where
        a document ends.
    min_fill: a group's final partial crop is dropped when its real bytes are fewer than
        ``min_fill * crop_len``; it trades a little data for less padding compute. 0 keeps every
        non-empty crop.
    """

    group_size: int = 10
    crop_len: int = 2048
    separator: Literal["none", "sep"] = "none"
    min_fill: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.crop_len, int) or self.crop_len < 1:
            raise ValueError(f"crop_len must be a positive integer, got {self.crop_len!r}")
        if self.separator not in ("none", "sep"):
            raise ValueError(f"separator must be 'none' or 'sep', got {self.separator!r}")
        if not 0.0 <= self.min_fill <= 1.0:
            raise ValueError(f"min_fill must be within [0, 1], got {self.min_fill!r}")


@dataclass(frozen=True, eq=False)  # holds arrays: == would be ambiguous
class PackedCrops:
    """Crops of packed documents, one row per crop.

    input_ids: (N, crop_len) uint16 ids (byte + 6, ``[SEP]`` between documents if configured, PAD 0).
    lengths: (N,) int32 real tokens per crop; ``attention_mask`` is derived from them on demand,
        because most consumers store the length alone (a crop's real tokens are a prefix).
    group_index: (N,) int64 global group number, ``(first_doc_index + document position) //
        group_size``.
    crop_in_group: (N,) int32 position of the crop within its group, counting dropped crops too.
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    group_index: np.ndarray
    crop_in_group: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def attention_mask(self) -> np.ndarray:
        """(N, crop_len) uint8, 1 on real tokens."""
        return (np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]).astype(
            np.uint8
        )

    def sample_ids(self, source: int = 0) -> np.ndarray:
        """A uint64 id per crop, unique across a source's stream: the key masking draws from.

        Layout ``source << 56 | group << 24 | crop_in_group``; ``source`` (0..255) tells corpora
        apart when their streams are mixed, so that C4 group 7 and Wikipedia group 7 mask differently.
        """
        if not 0 <= source < 2**_SOURCE_BITS:
            raise ValueError(f"source must be in [0, {2**_SOURCE_BITS}), got {source}")
        if len(self) and (
            self.group_index.max() >= 2**_GROUP_BITS or self.crop_in_group.max() >= 2**_CROP_BITS
        ):
            raise ValueError("group or crop index too large for the 64-bit sample id layout")
        ids = self.group_index.astype(np.uint64) << np.uint64(_CROP_BITS)
        ids |= self.crop_in_group.astype(np.uint64)
        return ids | (np.uint64(source) << np.uint64(_CROP_BITS + _GROUP_BITS))


def _group_sums(values: np.ndarray, group_size: int) -> np.ndarray:
    """Sum of ``values`` over consecutive blocks of ``group_size`` (the last may be shorter)."""
    starts = np.arange(0, len(values), group_size)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(values.astype(np.int64), starts)


def _doc_layout(
    doc_lens: np.ndarray, cfg: PackingConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: position of its first byte in its group's stream, and whether a SEP precedes it.

    Also returns each group's stream length.
    """
    n = len(doc_lens)
    group_of_doc = np.arange(n) // cfg.group_size
    nonempty = (doc_lens > 0).astype(np.int64)
    if cfg.separator == "sep":
        # Non-empty documents before this one in the same group: running count minus the count
        # at the group's start. Only those get a SEP in front (empty documents add nothing).
        running = np.cumsum(nonempty) - nonempty
        sep_before = nonempty * (running - running[group_of_doc * cfg.group_size] > 0)
    else:
        sep_before = np.zeros(n, dtype=np.int64)
    footprint = doc_lens + sep_before
    running = np.cumsum(footprint) - footprint
    start_in_group = running - running[group_of_doc * cfg.group_size] + sep_before
    return start_in_group, sep_before.astype(bool), _group_sums(footprint, cfg.group_size)


def pack_documents(
    values: np.ndarray,
    offsets: np.ndarray,
    cfg: PackingConfig,
    first_doc_index: int = 0,
) -> PackedCrops:
    """Group, concatenate and crop documents given as one uint8 buffer plus offsets.

    Document i is ``values[offsets[i]:offsets[i + 1]]`` (the Arrow layout: ``values`` may be a
    ``pyarrow.Buffer``, offsets may start above 0). ``first_doc_index`` is the position of document 0 in the whole stream, so that group numbers
    are global; it must be a multiple of ``group_size``, or groups would straddle two calls.
    Empty documents count towards a group but add no bytes and no separator.
    """
    if first_doc_index < 0 or first_doc_index % cfg.group_size:
        raise ValueError(
            f"first_doc_index={first_doc_index} must be a non-negative multiple of "
            f"group_size={cfg.group_size}, so that groups do not straddle two calls"
        )
    if not isinstance(values, np.ndarray):
        values = np.frombuffer(values, dtype=np.uint8)  # e.g. a pyarrow.Buffer
    if values.dtype != np.uint8 or values.ndim != 1:
        raise ValueError(f"values must be a 1-D uint8 array, got {values.dtype} {values.shape}")
    offsets = np.asarray(offsets, dtype=np.int64)
    doc_lens = np.diff(offsets)
    if offsets.ndim != 1 or len(offsets) == 0 or np.any(doc_lens < 0):
        raise ValueError("offsets must be a non-empty, non-decreasing 1-D array")
    if offsets[0] < 0 or offsets[-1] > len(values):
        raise ValueError("offsets point outside values")

    crop_len = cfg.crop_len
    start_in_group, sep_before, stream_lens = _doc_layout(doc_lens, cfg)
    crops_per_group = -(-stream_lens // crop_len)  # ceil; 0 for a group with no bytes
    first_crop = np.cumsum(crops_per_group) - crops_per_group
    n_crops = int(crops_per_group.sum())

    group_of_crop = np.repeat(np.arange(len(stream_lens)), crops_per_group)
    crop_in_group = np.arange(n_crops) - first_crop[group_of_crop]
    lengths = np.minimum(crop_len, stream_lens[group_of_crop] - crop_in_group * crop_len)

    # Where each document's first byte lands in the flat (n_crops * crop_len) output.
    group_of_doc = np.arange(len(doc_lens)) // cfg.group_size
    dest = first_crop[group_of_doc] * crop_len + start_in_group
    flat = np.full(n_crops * crop_len, PAD, dtype=np.uint16)
    slots = segment_mask(len(flat), dest, doc_lens)
    # Documents keep their order in the output, so a boolean scatter of the contiguous source fills
    # exactly the right slots; np.add with a dtype shifts and widens in one pass.
    flat[slots] = np.add(values[offsets[0] : offsets[-1]], BYTE_OFFSET, dtype=np.uint16)
    flat[dest[sep_before] - 1] = SEP

    keep = lengths >= cfg.min_fill * crop_len  # only a group's last crop can be short
    input_ids = flat.reshape(n_crops, crop_len)
    if not keep.all():  # a boolean index copies: skip it when nothing is dropped (the usual case)
        input_ids = input_ids[keep]
    return PackedCrops(
        input_ids=input_ids,
        lengths=lengths[keep].astype(np.int32),
        group_index=(group_of_crop[keep] + first_doc_index // cfg.group_size).astype(np.int64),
        crop_in_group=crop_in_group[keep].astype(np.int32),
    )


def pack_texts(
    texts: Sequence[TextLike], cfg: PackingConfig, first_doc_index: int = 0
) -> PackedCrops:
    """``pack_documents`` for Python strings or bytes (str is encoded strictly as UTF-8)."""
    values, offsets = utf8_buffer(texts)
    return pack_documents(values, offsets, cfg, first_doc_index)
