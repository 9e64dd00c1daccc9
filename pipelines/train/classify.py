"""Sequence classification as a task of the training core: every worker holds the task's rows and
deals itself its share of each global batch, in an order fixed by (seed, epoch).

Fine-tuning sets are small next to pretraining streams: QQP, the largest GLUE training set, is
364k pairs of about 120 bytes, under 50 MB as byte ids. So each worker reads the whole split
through Ray Data (tokenized in Ray Data tasks, ``pipelines.data.finetune``) and keeps the ids
without their padding (``pipelines.data.rows``). What that buys over ``streaming_split``:

- a true shuffle per epoch (the IMDB files are sorted by label: a windowed shuffle would train on
  one label at a time), with the order a function of (seed, epoch) only;
- global batch ``b`` of an epoch is the same examples whatever the number of workers, and each
  worker trains on its slice of it, so a run resumed at step ``k`` of an epoch continues with
  exactly the batches an uninterrupted run would have seen;
- batches are padded to their longest row rather than to ``max_length`` (SST-2 sentences average
  53 bytes of a 2048-byte input). Padded positions are masked out of the encoder's attention, so
  the outputs are the same as with full padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import torch

from perceiver_core.config import PerceiverConfig
from perceiver_core.flops import step_flops
from perceiver_core.hf import load_into, load_state_dict
from perceiver_core.init import unit_scale_head
from perceiver_core.model import PerceiverForSequenceClassification
from perceiver_core.task_metrics import classification_metrics, primary_metric
from pipelines.data.rows import LabelledRows
from pipelines.train.core import gather_arrays
from pipelines.train.job import Batch, StartingWeights, Task, WorkerJob


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` rows that epoch ``epoch`` trains in."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_rows(rows: LabelledRows, seed: int, epoch: int, draw: str = "all") -> np.ndarray:
    """The rows epoch ``epoch`` trains on, in order: every row (``draw`` ``all``), or one window of
    each text drawn from (seed, epoch) (``random``). A function of (seed, epoch) only, so every
    rank and a resumed run agree."""
    if draw == "all":
        return epoch_order(len(rows), seed, epoch)
    first = rows.texts()
    counts = np.diff(np.append(first, len(rows)))
    picks = first + np.random.default_rng([seed, epoch, 1]).integers(counts)
    return picks[epoch_order(len(first), seed, epoch)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Whole global batches per epoch; the remainder rows (different ones each epoch, as the order
    changes) wait for the next epoch, so every step has the same size on every rank."""
    return n // batch_size


def micro_slice(
    global_batch: np.ndarray, micro: int, size: int, rank: int, world_size: int
) -> np.ndarray:
    """Rank ``rank``'s rows of micro-batch ``micro`` of one global batch: the batch is cut into
    ``size``-row pieces, dealt to the ranks one micro-batch after another."""
    start = (micro * world_size + rank) * size
    return global_batch[start : start + size]


def eval_batches(n: int, batch_size: int, rank: int, world_size: int) -> Iterator[np.ndarray]:
    """Rank ``rank``'s share of an evaluation pass: rows ``rank, rank + W, ...`` in batches. Every
    rank yields the same number of batches (the last ones may be empty), because a forward pass
    under ZeRO-3 is a collective."""
    mine = np.arange(rank, n, world_size)
    rounds = -(-((n + world_size - 1) // world_size) // batch_size)
    for r in range(rounds):
        yield mine[r * batch_size : (r + 1) * batch_size]


@dataclass(frozen=True)
class ClassifySpec:
    """What the driver resolved for a classify stage."""

    task: str  # imdb, glue/sst2, files, ...
    model_config: PerceiverConfig  # the classifier's: num_labels, id2label, problem_type set
    start: StartingWeights
    freeze_encoder: bool
    keep_head: bool  # the starting weights are a classifier with as many labels
    eval_batch_size: int
    head_init: str = "standard"  # or "unit" (perceiver_core.init.unit_scale_head)
    window_draw: str = "all"  # or "random": one window of each text per epoch (epoch_rows)

    def build(self, job: WorkerJob, rank: int, world_size: int) -> Classify:
        return Classify(self, job.seed, rank, world_size)


class Classify(Task):
    """No state of its own: the order is a function of (seed, epoch), the step says where in it."""

    per_byte_loss = False

    def __init__(self, spec: ClassifySpec, seed: int, rank: int, world_size: int) -> None:
        self.spec, self.seed, self.rank, self.world_size = spec, seed, rank, world_size
        self.train_rows = LabelledRows.from_shard(ray.train.get_dataset_shard("train"))
        self.eval_rows = LabelledRows.from_shard(ray.train.get_dataset_shard("eval"))
        if len(self.eval_rows) == 0:
            raise ValueError("the evaluation split has no rows")
        self.metric = primary_metric(spec.task, spec.model_config.num_labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Called by the core before any batch. Every epoch trains on as many rows as the first."""
        self.batch_size = batch_size
        self._order_epoch = 0
        self._order = epoch_rows(self.train_rows, self.seed, 0, self.spec.window_draw)
        self.per_epoch = steps_per_epoch(len(self._order), batch_size)
        return self.per_epoch

    def build_model(self) -> PerceiverForSequenceClassification:
        """The starting weights' encoder; their head too when they are a classifier with the same
        labels (a later stage of a recipe), else a freshly initialised head."""
        spec = self.spec
        model = PerceiverForSequenceClassification(spec.model_config)
        weights = load_state_dict(spec.start.local())
        if not spec.keep_head:
            weights = {k: v for k, v in weights.items() if "decoder" not in k}
            if spec.head_init == "unit":
                unit_scale_head(model)
        load_into(model, weights, strict=spec.keep_head)
        if spec.freeze_encoder:
            model.encoder.requires_grad_(False)
        return model

    def batch(self, step: int, micro: int, size: int, device: torch.device) -> Batch:
        epoch, in_epoch = divmod(step, self.per_epoch)
        if epoch != self._order_epoch:
            self._order_epoch = epoch
            self._order = epoch_rows(self.train_rows, self.seed, epoch, self.spec.window_draw)
        global_batch = self._order[in_epoch * self.batch_size : (in_epoch + 1) * self.batch_size]
        rows = micro_slice(global_batch, micro, size, self.rank, self.world_size)
        inputs = self.train_rows.batch(rows, device)
        flops = step_flops(
            self.spec.model_config, len(rows), inputs["input_ids"].shape[1], task="classification"
        )
        return Batch(inputs, len(rows), self.train_rows.real_bytes(rows), len(rows), flops.total)

    def evaluate(self, engine: Any) -> dict[str, float]:
        """The task's metrics over the whole evaluation split (the same values on every rank)."""
        rows, batch = self.eval_rows, self.spec.eval_batch_size
        logits = class_logits(engine, rows, batch, engine.device, self.rank, self.world_size)
        return classification_metrics(self.spec.task, logits, rows.labels)


@torch.no_grad()
def class_logits(
    forward: Any,
    rows: LabelledRows,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """The logits of every row, in row order, from ``forward`` (a classifier or an engine in eval
    mode); with several ranks each runs its share and all get every row's logits."""
    indices, logits = [], []
    for batch in eval_batches(len(rows), batch_size, rank, world_size):
        # Every rank runs the same number of forward passes (a collective under ZeRO-3); a rank
        # out of rows runs one on row 0 and drops it.
        inputs = rows.batch(batch if len(batch) else np.zeros(1, np.int64), device)
        inputs.pop("labels")
        out = forward(**inputs)
        if len(batch):
            indices.append(batch)
            logits.append(out.logits.float().cpu().numpy())
    order = gather_arrays(np.concatenate(indices) if indices else np.zeros(0, np.int64), world_size)
    local = np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)
    return gather_arrays(local, world_size)[np.argsort(order)]
