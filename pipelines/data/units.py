"""From the rows of one unit (a parquet row group or a whole JSON/text file) to packed crops.

A *unit* is the smallest piece of a file that can be read on its own. Everything about crops is
decided inside a unit: null and empty documents are dropped, the held-out split is taken out by
document hash, and the remaining documents are grouped in tens *counting from the unit's first
document*, then packed by ``perceiver_core.packing.pack_documents``. Because no group crosses a unit
boundary, a unit's crops depend on that unit's bytes alone: not on batch sizes, task counts, or
which worker reads it. The price is that a unit's last group may hold fewer than 10 documents
(one short group per row group, about 0.2% of Wikipedia's groups).

Documents are fed to the packer in chunks whose size is a multiple of the group size, which bounds
memory (a few times the chunk, or a few times one document when it is larger) without changing the
result: packing chunk by chunk with ``first_doc_index`` gives the same crops as packing the unit at
once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from perceiver_core.packing import PackingConfig, pack_documents
from pipelines.data.readers import RowBatch, read_batches, text_buffers
from pipelines.data.sources import FileRef

TRAIN, VALIDATION = "train", "validation"
SPLITS = (TRAIN, VALIDATION)
_MASK64 = (1 << 64) - 1


@dataclass
class SplitConfig:
    """The held-out validation split, chosen per document by a hash of its bytes.

    validation_fraction: share of documents held out (0 disables the split and skips the hashing).
    seed: salt of the hash; a new seed draws a different validation set.

    Hashing the text rather than (file, row) makes the split a property of the document: it
    survives re-sharded or re-ordered dumps, and exact duplicates (common in C4) all land on the
    same side, so no validation document is also trained on through a copy.
    """

    validation_fraction: float = 0.005
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


def validation_docs(
    values: np.ndarray, offsets: np.ndarray, candidates: np.ndarray, cfg: SplitConfig
) -> np.ndarray:
    """True for the candidate documents whose keyed 64-bit BLAKE2b hash falls below the fraction."""
    out = np.zeros(len(offsets) - 1, dtype=bool)
    if cfg.validation_fraction == 0.0:
        return out
    threshold = int(cfg.validation_fraction * 2**64)
    key = cfg.seed.to_bytes(8, "little")
    view = memoryview(values)
    # One C call per document (about 1 GB/s); a loop over documents, never over bytes.
    for i in np.flatnonzero(candidates).tolist():
        digest = hashlib.blake2b(view[offsets[i] : offsets[i + 1]], digest_size=8, key=key).digest()
        out[i] = int.from_bytes(digest, "little") < threshold
    return out


def file_key(source: str, relpath: str) -> int:
    """A 64-bit key of a file within a source: the root of its crops' sample ids."""
    digest = hashlib.blake2b(f"{source}\0{relpath}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_ids(key: int, rows: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """uint64 id of each crop from (file key, first row of its group, crop in group).

    Stable: it depends on the source name, the file's path relative to the dataset root and the
    row, not on the file's position in a listing or the crop's position in the stream; masking
    draws from it, so a crop gets the same mask wherever and whenever it is produced. A
    splitmix64 finaliser spreads the structured value; collisions need 2**32 crops to be likely.
    """
    z = (rows.astype(np.uint64) << np.uint64(24)) | crops.astype(np.uint64)
    z ^= np.uint64(key)
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z ^= z >> np.uint64(shift)
        z *= np.uint64(factor)
    z ^= z >> np.uint64(31)
    return z


@dataclass
class DocStats:
    """What reading a unit saw: rows, dropped null/empty texts, and documents and bytes per split."""

    rows: int = 0
    null: int = 0
    empty: int = 0
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    text_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))


@dataclass(frozen=True, eq=False)
class DocChunk:
    """Documents of one split, a whole number of groups (except at the unit's end).

    values/offsets: the documents' bytes (Arrow layout); rows: row of each document in its file;
    first_doc: documents of this split before the chunk in the unit (a multiple of the group size).
    """

    values: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    first_doc: int


class _GroupChunker:
    """Buffers kept documents and releases them in chunks of whole groups."""

    def __init__(self, group_size: int, chunk_bytes: int) -> None:
        self.group_size, self.chunk_bytes = group_size, chunk_bytes
        self.arrays: list[pa.Array] = []
        self.rows: list[np.ndarray] = []
        self.size = 0
        self.count = 0
        self.emitted = 0

    def add(self, docs: pa.Array, rows: np.ndarray) -> Iterator[DocChunk]:
        if len(docs) == 0:
            return
        self.arrays.append(docs)
        self.rows.append(rows)
        self.size += docs.nbytes
        self.count += len(docs)
        if self.size >= self.chunk_bytes and self.count >= self.group_size:
            yield self._emit(self.count - self.count % self.group_size)

    def finish(self) -> Iterator[DocChunk]:
        if self.count:
            yield self._emit(self.count)

    def _emit(self, n: int) -> DocChunk:
        docs = pa.concat_arrays(self.arrays) if len(self.arrays) > 1 else self.arrays[0]
        rows = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
        head, tail = docs.slice(0, n), docs.slice(n)
        self.arrays, self.rows = ([tail], [rows[n:]]) if len(tail) else ([], [])
        self.size, self.count = tail.nbytes if len(tail) else 0, len(tail)
        values, offsets = text_buffers(head)
        chunk = DocChunk(values, offsets, rows[:n], self.emitted)
        self.emitted += n
        return chunk


def unit_documents(
    ref: FileRef,
    unit: int,
    *,
    text_column: str,
    sample_by: str,
    splits: Sequence[str],
    split_cfg: SplitConfig,
    group_size: int,
    chunk_bytes: int,
    stats: DocStats | None = None,
) -> Iterator[tuple[str, DocChunk]]:
    """Kept documents of a unit as ``(split, chunk)``, reading the file once for all ``splits``."""
    stats = stats if stats is not None else DocStats()
    chunkers = {s: _GroupChunker(group_size, chunk_bytes) for s in splits}
    batches = read_batches(
        ref, [text_column], [text_column], unit=unit, sample_by=sample_by, batch_bytes=chunk_bytes
    )
    for batch in batches:
        for split, docs, rows in _split_batch(batch, split_cfg, splits, stats):
            for chunk in chunkers[split].add(docs, rows):
                yield split, chunk
    for split, chunker in chunkers.items():
        for chunk in chunker.finish():
            yield split, chunk


def _split_batch(
    batch: RowBatch, cfg: SplitConfig, splits: Sequence[str], stats: DocStats
) -> Iterator[tuple[str, pa.Array, np.ndarray]]:
    arr = batch.table.column(0).combine_chunks()
    values, offsets = text_buffers(arr)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    nonempty = valid & (np.diff(offsets) > 0)
    held_out = validation_docs(values, offsets, nonempty, cfg)
    stats.rows += len(arr)
    stats.null += int((~valid).sum())
    stats.empty += int((valid & ~nonempty).sum())
    for split in splits:
        keep = nonempty & (held_out if split == VALIDATION else ~held_out)
        # Filtering compacts the kept documents' bytes (a copy), needed only if some are dropped.
        docs = arr if keep.all() else arr.filter(pa.array(keep))
        stats.docs[split] += len(docs)
        stats.text_bytes[split] += int(np.diff(offsets)[keep].sum())
        yield split, docs, batch.rows[keep]


@dataclass(frozen=True, eq=False)
class CropChunk:
    """Packed crops of consecutive groups of one unit, in unit order.

    input_ids: (n, crop_len) uint16 unmasked ids; lengths: (n,) real tokens; rows: (n,) file row of
    the first document of the crop's group; crops: (n,) crop index within its group.
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray
    crops: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def slice(self, start: int, stop: int) -> CropChunk:
        return CropChunk(
            self.input_ids[start:stop],
            self.lengths[start:stop],
            self.rows[start:stop],
            self.crops[start:stop],
        )


def pack_chunk(chunk: DocChunk, cfg: PackingConfig) -> CropChunk:
    """Pack a chunk with perceiver_core and attach each crop's provenance."""
    packed = pack_documents(chunk.values, chunk.offsets, cfg, first_doc_index=chunk.first_doc)
    first_doc_of_group = packed.group_index * cfg.group_size - chunk.first_doc
    return CropChunk(
        packed.input_ids,
        packed.lengths,
        chunk.rows[first_doc_of_group],
        packed.crop_in_group,
    )
