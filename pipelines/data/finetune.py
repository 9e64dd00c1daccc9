"""Fine-tuning datasets: labelled text as lazy Ray Datasets of fixed-length byte ids.

Tasks: ``imdb`` (``text, label``), ``glue/<task>`` (single sentences or pairs, columns from
``GLUE_TASKS``) and ``files`` (any local, ``s3://`` or ``hf://`` parquet/JSON lines file with
configurable columns). Text is tokenized by ``perceiver_core.tokenizer.ByteTokenizer`` straight
from the Arrow buffers, the way ``transformers.PerceiverTokenizer`` does it: ``[CLS] a [SEP]`` or
``[CLS] a [SEP] b [SEP]``, truncated ``longest_first`` and padded to ``max_length``.

Rows: ``input_ids`` (max_length,) uint16, ``attention_mask`` (max_length,) uint8, ``label``
(int64, or float32 for regression such as STS-B). Null texts count as empty strings (the row and
its label are kept, so evaluation sets keep their size); a null label, or a label or text column
that a file lacks, fails with the file and column named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perceiver_core.tokenizer import MODEL_MAX_LENGTH, ByteTokenizer
from pipelines.data.readers import DataError, read_batches, text_buffers
from pipelines.data.sources import FileRef, Format, files_digest, list_files

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class TaskColumns:
    """Columns of a labelled task and its number of labels (1 = regression)."""

    text: str
    pair: str | None
    label: str
    num_labels: int


# GLUE on the Hub (nyu-mll/glue): config = task name; MNLI's evaluation splits are
# validation_matched / validation_mismatched. Test splits carry label -1 (hidden).
GLUE_TASKS: dict[str, TaskColumns] = {
    "cola": TaskColumns("sentence", None, "label", 2),
    "sst2": TaskColumns("sentence", None, "label", 2),
    "mrpc": TaskColumns("sentence1", "sentence2", "label", 2),
    "qqp": TaskColumns("question1", "question2", "label", 2),
    "stsb": TaskColumns("sentence1", "sentence2", "label", 1),
    "mnli": TaskColumns("premise", "hypothesis", "label", 3),
    "qnli": TaskColumns("question", "sentence", "label", 2),
    "rte": TaskColumns("sentence1", "sentence2", "label", 2),
    "wnli": TaskColumns("sentence1", "sentence2", "label", 2),
}
_IMDB = TaskColumns("text", None, "label", 2)

# Label names by label id, from the datasets' cards (regression tasks have none).
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "imdb": ("neg", "pos"),
    "glue/cola": ("unacceptable", "acceptable"),
    "glue/sst2": ("negative", "positive"),
    "glue/mrpc": ("not_equivalent", "equivalent"),
    "glue/qqp": ("not_duplicate", "duplicate"),
    "glue/mnli": ("entailment", "neutral", "contradiction"),
    "glue/qnli": ("entailment", "not_entailment"),
    "glue/rte": ("entailment", "not_entailment"),
    "glue/wnli": ("not_entailment", "entailment"),
}


@dataclass
class FinetuneDataConfig:
    """A labelled dataset.

    task: ``imdb``, ``glue/<name>`` (one of ``GLUE_TASKS``) or ``files``.
    path: where the files are: required for ``files``; for the named tasks it replaces their Hub
        dataset (``hf://datasets/stanfordnlp/imdb``, ``hf://datasets/nyu-mll/glue``).
    config / files / format: as for pretraining sources (Hub config folder, a glob relative to
        ``path`` with ``{split}`` and ``{config}`` substituted, the file format).
    text_column / text_pair_column / label_column / num_labels: override the task's (for ``files``
        the defaults are ``text``, no pair, ``label``, 2).
    label_names: names of the labels in id order (default: the task's, from its dataset card;
        ``LABEL_0``... for files); they become the model's ``id2label``.
    max_length: the model's input length; longer texts are truncated, shorter ones padded.
    train_windows: single-text tasks: train on up to this many consecutive windows of each text
        (``max_length - 2`` bytes each, the way ``long_text: windows`` reads a text at inference),
        each a row with the text's label, instead of its first ``max_length - 2`` bytes only.
        Evaluation splits keep the first window.
    train_window_draw: ``all``: every one of those windows is a row of every epoch; ``random``:
        each epoch trains on one window of each text, drawn afresh from (seed, epoch), so an epoch
        costs what one window costs and the epochs together see every part of the texts.
    data_dir: local mirror of the Hub, as for pretraining.
    """

    task: str = "imdb"
    path: str | None = None
    config: str | None = None
    files: str | None = None
    format: Format = "auto"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    num_labels: int | None = None
    label_names: list[str] | None = None
    max_length: int = MODEL_MAX_LENGTH
    train_windows: int = 1
    train_window_draw: Literal["all", "random"] = "all"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.task not in ("imdb", "files") and not (
            self.task.startswith("glue/") and self.task[5:] in GLUE_TASKS
        ):
            glue = ", ".join(f"glue/{t}" for t in GLUE_TASKS)
            raise ValueError(f"task must be imdb, files or one of {glue}; got {self.task!r}")
        if self.task == "files" and not self.path:
            raise ValueError("path must be set when task is 'files'")
        if not isinstance(self.max_length, int) or self.max_length < 4:
            raise ValueError(f"max_length must be an integer >= 4, got {self.max_length!r}")
        if not isinstance(self.train_windows, int) or self.train_windows < 1:
            raise ValueError(f"train_windows must be an integer >= 1, got {self.train_windows!r}")
        if self.train_windows > 1 and self.columns().pair is not None:
            raise ValueError(
                f"train_windows applies to single-text tasks; {self.task} has text pairs"
            )
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels!r}")
        if self.label_names is not None and len(self.label_names) != self.columns().num_labels:
            raise ValueError(
                f"label_names: {len(self.label_names)} names for {self.columns().num_labels} labels"
            )

    def label_name_list(self) -> list[str]:
        """The label names in id order ([] for regression)."""
        n = self.columns().num_labels
        if n == 1:
            return []
        names = self.label_names or list(TASK_LABELS.get(self.task, ()))
        return names if len(names) == n else [f"LABEL_{i}" for i in range(n)]

    def columns(self) -> TaskColumns:
        """The task's columns with this config's overrides applied."""
        if self.task.startswith("glue/"):
            base = GLUE_TASKS[self.task[5:]]
        elif self.task == "imdb":
            base = _IMDB
        else:
            base = TaskColumns("text", None, "label", 2)
        return TaskColumns(
            self.text_column or base.text,
            self.text_pair_column or base.pair,
            self.label_column or base.label,
            self.num_labels or base.num_labels,
        )

    def location(self) -> tuple[str, str | None]:
        """(path, Hub config) of the files."""
        if self.task.startswith("glue/"):
            return self.path or "hf://datasets/nyu-mll/glue", self.config or self.task[5:]
        if self.task == "imdb":
            return self.path or "hf://datasets/stanfordnlp/imdb", self.config or "plain_text"
        assert self.path is not None  # checked in __post_init__
        return self.path, self.config


def finetune_files(cfg: FinetuneDataConfig, split: str) -> list[FileRef]:
    """Sorted files of one split (listing only)."""
    path, config = cfg.location()
    return list_files(
        path, config=config, split=split, files=cfg.files, format=cfg.format, data_dir=cfg.data_dir
    )


def split_fingerprint(cfg: FinetuneDataConfig, split: str) -> str:
    """A digest of a split's files (names, sizes, versions) and the columns read from them."""
    return files_digest(
        finetune_files(cfg, split), json.dumps(asdict(cfg.columns()), sort_keys=True)
    )


def check_columns(cfg: FinetuneDataConfig, split: str) -> None:
    """Fail now, on the driver, if the split has no files or its first file lacks the text or
    label columns (``MissingColumnError`` naming the file and column), rather than in a read task
    once training has started."""
    refs = finetune_files(cfg, split)
    if not refs:
        path, config = cfg.location()
        raise DataError(f"{path} (config {config}, split {split!r}): no files found")
    columns = cfg.columns()
    texts = [c for c in (columns.text, columns.pair) if c is not None]
    for rows in read_batches(refs[0], [*texts, columns.label], texts):
        encode_rows(refs[0].url, rows.table.slice(0, 16), columns, 16)
        break


def read_labelled(cfg: FinetuneDataConfig, split: str) -> Iterator[dict[str, np.ndarray]]:
    """The rows of a split in this process, in file order (no Ray): for evaluation sets small
    enough to read in one place."""
    columns = cfg.columns()
    texts = [c for c in (columns.text, columns.pair) if c is not None]
    for ref in finetune_files(cfg, split):
        for rows in read_batches(ref, [*texts, columns.label], texts):
            yield encode_rows(ref.url, rows.table, columns, cfg.max_length)


def finetune_dataset(
    cfg: FinetuneDataConfig, split: str = "train", *, windows: int = 1
) -> ray.data.Dataset:
    """Lazy Ray Dataset of (input_ids, attention_mask, label), one read task per file, in order;
    with ``windows`` > 1, up to that many rows per text (``cfg.train_windows`` for training)."""
    import ray.data

    refs = finetune_files(cfg, split)
    items = [{"ref": json.dumps(asdict(r))} for r in refs]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _tokenize_files,
        batch_size=1,
        fn_kwargs={"columns": cfg.columns(), "max_length": cfg.max_length, "windows": windows},
        # Tokenizing runs at ~100 MB/s, so a read task is mostly I/O: a quarter CPU each lets it
        # start beside training workers that hold fractional CPUs (sweep trials in parallel on a
        # small machine would otherwise leave no whole CPU free, and wait forever).
        num_cpus=0.25,
    )
    ds.context.execution_options.preserve_order = True  # this dataset's own context
    return ds


def _tokenize_files(
    batch: dict[str, np.ndarray], columns: TaskColumns, max_length: int, windows: int
) -> Iterator[dict[str, np.ndarray]]:
    for item in batch["ref"]:
        ref = FileRef(**json.loads(item))
        texts = [c for c in (columns.text, columns.pair) if c is not None]
        for rows in read_batches(ref, [*texts, columns.label], texts):
            yield encode_rows(ref.url, rows.table, columns, max_length, windows)


def encode_rows(
    url: str, table: pa.Table, columns: TaskColumns, max_length: int, windows: int = 1
) -> dict[str, np.ndarray]:
    """Tokenize one Arrow batch of a labelled file (text columns as binary); with ``windows`` > 1
    (single texts only), a row for each of a text's first ``windows`` windows of
    ``max_length - 2`` bytes."""
    tokenizer = ByteTokenizer(model_max_length=max_length, dtype="uint16")
    first = _buffers(table.column(columns.text))
    pair = _buffers(table.column(columns.pair)) if columns.pair is not None else None
    owner, window = np.arange(table.num_rows), np.zeros(table.num_rows, np.int64)
    if windows > 1 and pair is None:
        *first, owner, window = text_windows(*first, max_length - 2, windows)
    encoded = tokenizer.encode_buffers(
        *first, pair=pair, padding="max_length", truncation=True, max_length=max_length
    )
    label = table.column(columns.label)
    if label.null_count:
        raise DataError(f"{url}: column {columns.label!r} has {label.null_count} null labels")
    dtype = np.float32 if columns.num_labels == 1 else np.int64
    try:
        labels = label.to_numpy().astype(dtype)
    except (TypeError, ValueError, pa.ArrowException) as err:
        raise DataError(f"{url}: column {columns.label!r} holds {label.type}: {err}") from err
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"].astype(np.uint8),
        "label": labels[owner],
        "window": window.astype(np.uint16),  # which window of its text a row is (0: the first)
    }


def text_windows(
    values: np.ndarray, offsets: np.ndarray, width: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each text's first ``count`` consecutive ``width``-byte pieces (an empty text is one empty
    piece) as new ``(values, offsets)``, the index of the text each piece comes from, and which
    piece of its text it is."""
    starts, ends = offsets[:-1], offsets[1:]
    pieces = np.clip(-(-(ends - starts) // width), 1, count)
    owner = np.repeat(np.arange(len(starts)), pieces)
    index = np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    begin = starts[owner] + index * width
    size = np.minimum(begin + width, ends[owner]) - begin
    new_offsets = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    gather = np.repeat(begin - new_offsets[:-1], size) + np.arange(new_offsets[-1])
    return values[gather], new_offsets, owner, index


def _buffers(column: Any) -> tuple[np.ndarray, np.ndarray]:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return text_buffers(pc.fill_null(arr, b""))
