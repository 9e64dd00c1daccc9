"""Human-readable views of crops: decoded text with the masked words marked, and the counters.

Used by ``python -m jobs.inspect_data``, the first thing to run on a new data config.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from perceiver_core.masking import IGNORE_INDEX
from perceiver_core.tokenizer import ByteTokenizer
from pipelines.data.index import build_index
from pipelines.data.pretrain import (
    CropCounters,
    PretrainDataConfig,
    plan_stream,
    pretraining_dataset,
)

OPEN, CLOSE = "⟦", "⟧"


def render_crop(input_ids: np.ndarray, labels: np.ndarray, length: int) -> str:
    """The crop's original text with each masking target shown as ⟦original bytes⟧.

    Targets are the positions with a label (replaced by [MASK], by random bytes, or kept); the
    original bytes come from the labels. Special ids print as their names ([SEP]).
    """
    tokenizer = ByteTokenizer()
    ids = np.asarray(input_ids[:length]).astype(np.int64)
    lab = np.asarray(labels[:length]).astype(np.int64)
    target = lab != IGNORE_INDEX
    original = np.where(target, lab, ids)
    edges = np.flatnonzero(np.diff(target.astype(np.int8))) + 1
    pieces = []
    for a, b in zip(np.r_[0, edges], np.r_[edges, len(ids)], strict=True):
        text = tokenizer.decode(original[a:b])
        pieces.append(f"{OPEN}{text}{CLOSE}" if target[a] else text)
    return "".join(pieces)


def describe_crop(row: dict[str, Any], source_names: list[str], files: list[list[Any]]) -> str:
    """A header naming where a crop comes from, then its rendered text."""
    source = int(row["source"])
    ref = files[source][int(row["file"])]
    length, masked = int(row["length"]), int(row["masked"])
    header = (
        f"--- position {int(row['position'])}: {source_names[source]} {ref.relpath} "
        f"row {int(row['row'])} crop {int(row['crop'])} pass {int(row['epoch'])}; "
        f"{length} bytes, {masked} masked ({masked / max(1, length):.1%})"
    )
    return header + "\n" + render_crop(row["input_ids"], row["labels"], length)


def format_counters(counters: dict[str, Any]) -> str:
    return json.dumps(counters, indent=2, sort_keys=False)


def inspect_report(
    cfg: PretrainDataConfig,
    *,
    split: str = "train",
    start: int = 0,
    show: int = 3,
    sample: int = 512,
) -> str:
    """Index the config's files, then decode ``show`` crops from ``start`` and count ``sample``.

    Executes on Ray (the caller starts it). Returns the text to print: the crops with their masked
    words marked, then the index counters (documents, bytes, skipped texts and files, crops,
    padding) and the counters of the sampled crops (masked fraction, byte shares).
    """
    index = build_index(cfg)
    ds = pretraining_dataset(cfg, index, split=split, start=start).limit(max(show, sample))
    names = [s.name for s in cfg.sources]
    files = [s.files for s in index.sources]
    counters = CropCounters(cfg.packing.crop_len, tuple(names))
    lines: list[str] = []
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        counters.update(batch)
        for i in range(min(show - len(lines), len(batch["position"]))):
            row = {k: v[i] for k, v in batch.items()}
            lines.append(describe_crop(row, names, files))
    report = {"index": index.counters(split), "sampled_crops": counters.as_dict()}
    report["stream_length"] = plan_stream(cfg, index, split).length
    return "\n\n".join([*lines, "counters:\n" + format_counters(report)])
