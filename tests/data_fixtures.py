"""Helpers for the data pipeline tests: generated input files, configs and collected outputs.

Imported by the ``test_data_*`` modules (pytest puts ``tests/`` on the import path); the Ray
runtime fixture ``ray_session`` lives in conftest.py.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from perceiver_core.masking import IGNORE_INDEX
from pipelines.data import (
    MixtureConfig,
    PretrainDataConfig,
    SourceConfig,
    SplitConfig,
    default_sources,
)

WORDS = [
    "the", "of", "data", "crop", "Perceiver", "byte", "mask", "ray", "stream", "über", "naïve",
    "日本語", "tokenizer", "a", "to", "encyclopedia", "antidisestablishmentarianism", "x",
]  # fmt: skip


def random_docs(seed: int, n: int, mean_words: int = 120) -> list[str]:
    """``n`` documents of random words (some non-ASCII), lengths varying around ``mean_words``."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        k = int(rng.integers(1, 2 * mean_words))
        docs.append(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), k)))
    return docs


def write_parquet(
    path: Path, columns: dict[str, Sequence[Any]], row_group_size: int = 50, **types: pa.DataType
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def shared_config(data_dir: Path, **kwargs: Any) -> PretrainDataConfig:
    """The default C4 + Wikipedia mixture, read from the sample data through ``data_dir``; only the
    Wikipedia snapshot differs (the sample is the 2015 dump)."""
    sources = [
        dataclasses.replace(s, config="20150501.en") if s.name == "wikipedia" else s
        for s in default_sources()
    ]
    kwargs.setdefault("split", SplitConfig(validation_fraction=0.01))
    return PretrainDataConfig(sources=sources, data_dir=str(data_dir), **kwargs)


def generated_sources(root: Path) -> list[SourceConfig]:
    """Two small sources with many small units: parquet row groups of 20 and 4 JSON-lines files."""
    docs = random_docs(1, 400, mean_words=150)
    write_parquet(root / "a" / "part-0.parquet", {"text": docs[:200]}, row_group_size=20)
    write_parquet(root / "a" / "part-1.parquet", {"text": docs[200:]}, row_group_size=20)
    more = random_docs(2, 240, mean_words=60)
    for i in range(4):
        write_jsonl(root / "b" / f"shard-{i}.jsonl.gz", ({"text": t} for t in more[i::4]))
    return [
        SourceConfig(name="a", path=str(root / "a"), weight=0.6),
        SourceConfig(name="b", path=str(root / "b" / "*.jsonl.gz"), weight=0.4),
    ]


def generated_config(root: Path, **kwargs: Any) -> PretrainDataConfig:
    kwargs.setdefault("mixture", MixtureConfig(stopping_strategy="all_exhausted"))
    kwargs.setdefault("split", SplitConfig(validation_fraction=0.05))
    return PretrainDataConfig(sources=generated_sources(root), **kwargs)


def collect(blocks: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate column blocks (``iter_batches`` of a dataset, or ``local_crops``)."""
    parts: dict[str, list[np.ndarray]] = {}
    for block in blocks:
        for key, value in block.items():
            parts.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in parts.items()}


def collect_ds(ds: Any) -> dict[str, np.ndarray]:
    return collect(ds.iter_batches(batch_size=512, batch_format="numpy"))


def original_ids(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Unmasked ids of crops: labels where a position is a target, input ids elsewhere."""
    labels = rows["labels"].astype(np.int64)
    return np.where(labels != IGNORE_INDEX, labels, rows["input_ids"].astype(np.int64))


def assert_same_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"column {key} differs")
