"""Evaluating a classifier on a fixed labelled set in one process: what the retraining pipeline
compares a challenger and the champion on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.data.finetune import FinetuneDataConfig, finetune_files, read_labelled
from pipelines.train.finetune_data import LabelledRows
from pipelines.train.task_metrics import primary_metric, task_metrics


@dataclass(frozen=True)
class EvalSet:
    data: FinetuneDataConfig
    split: str
    rows: LabelledRows
    fingerprint: str  # of the files and settings: two evaluations on equal fingerprints compare


def load_eval_set(data: FinetuneDataConfig, split: str, max_rows: int = 0) -> EvalSet:
    rows = LabelledRows.from_batches(read_labelled(data, split))
    if max_rows and len(rows) > max_rows:
        keep = np.arange(max_rows)  # the first rows in file order: the same set every time
        ids_end = rows.offsets[max_rows]
        rows = LabelledRows(rows.ids[:ids_end], rows.offsets[: max_rows + 1], rows.labels[keep])
    refs = finetune_files(data, split)
    text = "|".join(f"{r.relpath}:{r.size}:{r.version}" for r in refs)
    text += json.dumps([split, max_rows, data.max_length, data.columns().label])
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return EvalSet(data, split, rows, digest)


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, eval_set: EvalSet, *, batch_size: int = 64
) -> dict[str, float]:
    """The task's metrics of ``model`` (a perceiver_core classifier) on the set."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = []
    try:
        for start in range(0, len(eval_set.rows), batch_size):
            index = np.arange(start, min(start + batch_size, len(eval_set.rows)))
            inputs = eval_set.rows.batch(index, device)
            inputs.pop("labels")
            logits.append(model(**inputs).logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    task, n = eval_set.data.task, eval_set.data.columns().num_labels
    metrics = task_metrics(task, n, np.concatenate(logits), eval_set.rows.labels)
    metrics["primary"] = metrics[primary_metric(task, n).name]
    return metrics
