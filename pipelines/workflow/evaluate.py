"""Evaluating a classifier on a fixed labelled set in one process: what the retraining pipeline
compares a challenger and the champion on."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
import torch

from perceiver_core.predict import text_logits
from perceiver_core.task_metrics import classification_metrics, primary_metric
from perceiver_core.tokenizer import BYTE_OFFSET
from pipelines.data.finetune import FinetuneDataConfig, finetune_files, read_labelled
from pipelines.data.rows import LabelledRows
from pipelines.data.sources import files_digest
from pipelines.train.classify import class_logits


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
    """The task's metrics of ``model`` (a perceiver_core classifier) on the set. Single texts are
    answered as ``perceiver_core.predict.classify`` answers them, so a model that reads a long
    text in windows (``long_text: windows``) is scored on all of each text the set holds."""
    if eval_set.data.columns().pair is None:
        rows = eval_set.rows
        texts = [_text_bytes(rows.ids[a:b]) for a, b in itertools.pairwise(rows.offsets)]
        logits = text_logits(model, texts, batch_size=batch_size).numpy()
    else:
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


def _text_bytes(ids: np.ndarray) -> bytes:
    """The text of a row of byte ids, its special tokens ([CLS], [SEP]) left out."""
    return (ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()
