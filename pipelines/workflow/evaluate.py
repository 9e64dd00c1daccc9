"""Evaluating a classifier on a fixed labelled set in one process: what the retraining pipeline
compares a challenger and the champion on."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from perceiver_core.task_metrics import primary_metric
from pipelines.data.finetune import FinetuneDataConfig, finetune_files, read_labelled
from pipelines.data.sources import files_digest
from pipelines.train.classify import LabelledRows, class_logits, classification_metrics


@dataclass(frozen=True)
class EvalSet:
    data: FinetuneDataConfig
    split: str
    rows: LabelledRows
    fingerprint: str  # of the files and settings: two evaluations on equal fingerprints compare


def load_eval_set(data: FinetuneDataConfig, split: str, max_rows: int = 0) -> EvalSet:
    rows = LabelledRows.from_batches(read_labelled(data, split))
    if max_rows and len(rows) > max_rows:
        rows = rows.head(max_rows)  # the first rows in file order: the same set every time
    settings = json.dumps([split, max_rows, data.max_length, data.columns().label])
    return EvalSet(data, split, rows, files_digest(finetune_files(data, split), settings))


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, eval_set: EvalSet, *, batch_size: int = 64
) -> dict[str, float]:
    """The task's metrics of ``model`` (a perceiver_core classifier) on the set."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = class_logits(model, eval_set.rows, batch_size, device)
    finally:
        model.train(was_training)
    task, n = eval_set.data.task, eval_set.data.columns().num_labels
    metrics = classification_metrics(task, logits, eval_set.rows.labels)
    metrics["primary"] = metrics[primary_metric(task, n).name]
    return metrics
