"""Read the rows of one file, or one parquet row group, as Arrow batches with their row numbers.

Formats: parquet (read by row group, only the needed columns), JSON lines and plain text (each
optionally gzip-compressed, streamed line by line so memory does not grow with the file). Text
columns come back as Arrow ``large_binary``: bytes exactly as stored, valid UTF-8 or not, with no
Python string per row on the parquet path.

Errors name the file, and come in three kinds, because they call for different handling:

- ``MissingColumnError`` / ``WrongFormatError``: the configuration does not fit the data (a column
  that is not there, a text column holding numbers, a ``.parquet`` file that is not parquet, a JSON
  file whose first record is not an object). Always raised: skipping would hide a config mistake.
- ``BadFileError``: the file is corrupt or unreadable (truncated gzip, broken parquet footer,
  invalid JSON further down, I/O failure). Raised, or skipped and counted with
  ``on_bad_file: skip``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.sources import FileRef, open_binary
from pipelines.errors import UserError

WHOLE_FILE = -1  # unit id of formats that are read whole (JSON lines, text)
_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(UserError):
    """A problem with input data; the message names the file (and column where relevant)."""


class MissingColumnError(DataError):
    """A configured column is absent from a file."""


class WrongFormatError(DataError):
    """A file is not in the format its name or the config says, or a column has the wrong type."""


class BadFileError(DataError):
    """A file is corrupt or cannot be read."""


@dataclass
class ReadConfig:
    """How files are read.

    on_bad_file: ``raise`` stops at a corrupt or unreadable file (naming it); ``skip`` leaves the
        file out of the index, logs it and counts it in ``bad_files``. Missing columns and wrong
        formats always raise. A file that breaks *after* it was indexed always raises: skipping it
        then would shift every later crop and break determinism.
    chunk_bytes: text read and packed at a time; memory per task is a small multiple of this (or of
        the largest document, when one is bigger). 2 MB keeps packing and masking in cache (about
        15% faster than 8 MB here); it changes no crop.
    """

    on_bad_file: Literal["raise", "skip"] = "raise"
    chunk_bytes: int = 2 << 20

    def __post_init__(self) -> None:
        if self.on_bad_file not in ("raise", "skip"):
            raise ValueError(f"on_bad_file must be 'raise' or 'skip', got {self.on_bad_file!r}")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive integer, got {self.chunk_bytes!r}")


@dataclass(frozen=True, eq=False)
class RowBatch:
    """Rows of one file: ``table`` has the requested columns (text columns as large_binary) and
    ``rows`` (int64) the position of each row in the file (parquet row, JSON/text line number)."""

    table: pa.Table
    rows: np.ndarray


def parquet_units(ref: FileRef) -> list[int]:
    """Row counts of a parquet file's row groups (reads the footer only)."""
    with _reading(ref.url), open_binary(ref.url) as f:
        meta = _open_parquet(ref.url, f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def read_batches(
    ref: FileRef,
    columns: Sequence[str],
    text_columns: Sequence[str],
    *,
    unit: int = WHOLE_FILE,
    sample_by: str = "line",
    batch_bytes: int = 8 << 20,
) -> Iterator[RowBatch]:
    """Rows of ``ref`` (one row group when ``unit`` >= 0) in batches of about ``batch_bytes``.

    ``text_columns`` (a subset of ``columns``) must hold strings or bytes; they are returned as
    large_binary. A single row larger than ``batch_bytes`` comes alone in its batch.
    """
    with _reading(ref.url):
        if ref.format == "parquet":
            yield from _parquet_batches(ref.url, columns, text_columns, unit, batch_bytes)
        elif ref.format == "json":
            yield from _json_batches(ref.url, columns, text_columns, batch_bytes)
        elif ref.format == "text":
            yield from _text_batches(ref.url, columns, text_columns, sample_by, batch_bytes)
        else:
            raise WrongFormatError(f"{ref.url}: unknown format {ref.format!r}")


def text_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(values uint8, offsets int64)`` of a binary/large_binary array without copying the bytes.

    Offsets are rebased so that they index ``values`` directly; nulls are not inspected.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset : arr.offset + len(arr) + 1]
    values = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    return values, offsets.astype(np.int64)


@contextlib.contextmanager
def _reading(url: str) -> Iterator[None]:
    """Turn low-level read failures into ``BadFileError`` naming the file."""
    try:
        yield
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, pa.ArrowException, ValueError) as err:
        # OSError covers gzip.BadGzipFile, I/O and network failures; ValueError covers
        # json.JSONDecodeError and UnicodeDecodeError.
        raise BadFileError(f"cannot read {url}: {type(err).__name__}: {err}") from err


def _open_parquet(url: str, f: Any) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as err:
        f.seek(0)
        head = f.read(4)
        if len(head) == 4 and head != _PARQUET_MAGIC:
            raise WrongFormatError(f"{url} is not a parquet file (starts with {head!r})") from err
        raise BadFileError(f"cannot read {url}: corrupt parquet file: {err}") from err


def _check_columns(url: str, available: Sequence[str], columns: Sequence[str]) -> None:
    for column in columns:
        if column not in available:
            raise MissingColumnError(
                f"{url} has no column {column!r} (its columns: {', '.join(available) or 'none'}; "
                "name the right one in the config)"
            )


def _as_binary(url: str, column: str, arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A string/binary column as large_binary (a zero-copy view for the common types)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return arr.view(pa.binary()).cast(pa.large_binary())
    if pa.types.is_large_string(t):
        return arr.view(pa.large_binary())
    if pa.types.is_large_binary(t):
        return arr
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t) or pa.types.is_null(t):
        return arr.cast(pa.large_binary())
    raise WrongFormatError(f"{url}: column {column!r} holds {t}, not text (string or binary)")


def _parquet_batches(
    url: str, columns: Sequence[str], text_columns: Sequence[str], unit: int, batch_bytes: int
) -> Iterator[RowBatch]:
    with open_binary(url) as f:
        pf = _open_parquet(url, f)
        _check_columns(url, pf.schema_arrow.names, columns)
        meta = pf.metadata
        groups = range(meta.num_row_groups) if unit == WHOLE_FILE else [unit]
        for g in groups:
            if not 0 <= g < meta.num_row_groups:
                raise BadFileError(f"{url} has no row group {g} (it has {meta.num_row_groups})")
            first = sum(meta.row_group(i).num_rows for i in range(g))
            rg = meta.row_group(g)
            # Rows per batch from the row group's uncompressed size: batches of about batch_bytes.
            per_row = max(1, rg.total_byte_size // max(1, rg.num_rows))
            size = int(min(max(1, batch_bytes // per_row), 65536))
            # use_threads=False: a Ray task holds one CPU, and Arrow's pool would take them all.
            batches = pf.iter_batches(
                batch_size=size, row_groups=[g], columns=list(columns), use_threads=False
            )
            for batch in batches:
                table = pa.Table.from_batches([batch])
                n = table.num_rows
                yield RowBatch(_binary_table(url, table, text_columns), np.arange(first, first + n))
                first += n


def _binary_table(url: str, table: pa.Table, text_columns: Sequence[str]) -> pa.Table:
    for name in text_columns:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, _as_binary(url, name, table.column(i)))
    return table


def _decompressed(url: str, raw: Any) -> Any:
    if not url.lower().endswith(".gz"):
        return raw
    head = raw.read(2)
    raw.seek(0)
    if head != _GZIP_MAGIC:
        raise WrongFormatError(f"{url} is named .gz but is not gzip-compressed (starts {head!r})")
    return gzip.GzipFile(fileobj=raw)


def _json_batches(
    url: str, columns: Sequence[str], text_columns: Sequence[str], batch_bytes: int
) -> Iterator[RowBatch]:
    text_set = set(text_columns)
    with open_binary(url) as raw:
        values: dict[str, list[Any]] = {c: [] for c in columns}
        rows: list[int] = []
        size = 0
        seen_record = False
        for lineno, line in enumerate(_decompressed(url, raw)):
            if not line.strip():
                continue
            record = _json_record(url, lineno, line, first=not seen_record)
            seen_record = True
            for column in columns:
                if column not in record:
                    raise MissingColumnError(
                        f"{url} has no column {column!r} in line {lineno + 1} "
                        f"(keys: {', '.join(record) or 'none'})"
                    )
                value = record[column]
                if column in text_set:
                    value = _text_value(url, lineno, column, value)
                    size += len(value) if value is not None else 0
                values[column].append(value)
            rows.append(lineno)
            # Drop the raw line and the parsed record now: with a 200 MB document they would
            # otherwise stay alive, twice over, while the batch is processed downstream.
            line = record = None
            if size >= batch_bytes:
                batch = _json_batch(url, values, rows, text_set)
                values, rows, size = {c: [] for c in columns}, [], 0
                yield batch
        if rows:
            batch = _json_batch(url, values, rows, text_set)
            values.clear()
            yield batch


def _json_record(url: str, lineno: int, line: bytes, *, first: bool) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as err:
        if first:  # nothing parsed yet: this is not JSON lines at all
            raise WrongFormatError(f"{url} is not JSON lines: line {lineno + 1}: {err}") from err
        raise BadFileError(f"cannot read {url}: invalid JSON in line {lineno + 1}: {err}") from err
    if not isinstance(record, dict):
        raise WrongFormatError(
            f"{url}: line {lineno + 1} is a JSON {type(record).__name__}, not an object"
        )
    return record


def _text_value(url: str, lineno: int, column: str, value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        # surrogatepass keeps lone surrogates (JSON "\ud800" escapes) as bytes instead of failing.
        return value.encode("utf-8", "surrogatepass")
    raise WrongFormatError(
        f"{url}: column {column!r} in line {lineno + 1} holds {type(value).__name__}, not text"
    )


def _json_batch(
    url: str, values: dict[str, list[Any]], rows: list[int], text_set: set[str]
) -> RowBatch:
    arrays = {}
    for column, vals in values.items():
        try:
            arrays[column] = pa.array(vals, pa.large_binary() if column in text_set else None)
        except (pa.ArrowException, TypeError) as err:
            raise WrongFormatError(f"{url}: column {column!r} has mixed types: {err}") from err
    return RowBatch(pa.table(arrays), np.asarray(rows, dtype=np.int64))


def _text_batches(
    url: str, columns: Sequence[str], text_columns: Sequence[str], sample_by: str, batch_bytes: int
) -> Iterator[RowBatch]:
    if len(columns) != 1 or list(text_columns) != list(columns):
        extra = [c for c in columns if c not in text_columns] or list(columns[1:])
        raise MissingColumnError(
            f"{url} is plain text and has only its text, no column {extra[0]!r}"
        )
    column = columns[0]
    with open_binary(url) as raw:
        docs: list[bytes] = []
        rows: list[int] = []
        size = 0
        for row, doc in enumerate(_text_documents(_decompressed(url, raw), sample_by)):
            docs.append(doc)
            rows.append(row)
            size += len(doc)
            if size >= batch_bytes:
                yield RowBatch(
                    pa.table({column: pa.array(docs, pa.large_binary())}), np.array(rows)
                )
                docs, rows, size = [], [], 0
        if rows:
            yield RowBatch(pa.table({column: pa.array(docs, pa.large_binary())}), np.array(rows))


def _text_documents(stream: Any, sample_by: str) -> Iterator[bytes]:
    """Documents of a text file as bytes: lines without their line break, paragraphs, or all."""
    if sample_by == "document":
        yield stream.read()
        return
    paragraph: list[bytes] = []
    for line in stream:
        text = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
        if sample_by == "line":
            yield text
        elif text.strip():
            paragraph.append(text)
        elif paragraph:
            yield b"\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield b"\n".join(paragraph)
