"""Masked-language modelling as a task of the training core: batches from the crop stream, the loss
the model computes on the masked bytes, and validation on held-out crops.

Each worker reads its shard of the stream (``ray.train.get_dataset_shard("train")``), skipping the
crops that the restored checkpoint records as trained on, and records the stream positions it
hands out; at each checkpoint the workers pool them into the run's ``DataPosition``
(``pipelines.train.position``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import torch
import torch.nn.functional as F

from perceiver_core.config import PerceiverConfig
from perceiver_core.flops import step_flops
from perceiver_core.hf import load_into, load_state_dict
from perceiver_core.masking import IGNORE_INDEX
from perceiver_core.model import PerceiverForMaskedLM
from perceiver_core.task_metrics import TaskMetric
from pipelines.data.pretrain import crops_to_torch, take_rows
from pipelines.train.core import Batch, StartingWeights, WorkerJob, gather_arrays
from pipelines.train.metrics import bits_per_byte
from pipelines.train.position import DataPosition, ResumePointer


@dataclass(frozen=True)
class MaskedLMSpec:
    """What the driver resolved for a masked-LM run: the model, where its starting weights are,
    and how much of the held-out split each validation reads."""

    model_config: PerceiverConfig
    crop_len: int
    eval_crops: int
    eval_batch_size: int
    prefetch_batches: int
    start: StartingWeights | None = None  # continued pretraining, MLM adaptation

    def build(self, job: WorkerJob, rank: int, world_size: int) -> MaskedLM:
        return MaskedLM(self, job.run_dir, rank, world_size)


class MaskedLM:
    metric = TaskMetric("loss", higher_is_better=False)
    per_byte_loss = True

    def __init__(self, spec: MaskedLMSpec, run_dir: str, rank: int, world_size: int) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.validation = load_rows(
            ray.train.get_dataset_shard("validation"), spec.eval_crops, spec.eval_batch_size
        )
        self.position = DataPosition()
        self.committed = 0  # watermark of the newest checkpoint known to be committed
        self.pointer = ResumePointer(run_dir)
        self.stream: MicroBatches | None = None

    def steps_per_epoch(self, batch_size: int) -> int:
        return 0  # a stream has no epochs

    def build_model(self) -> PerceiverForMaskedLM:
        model = PerceiverForMaskedLM(self.spec.model_config)
        if self.spec.start is not None:
            # A classifier's encoder keeps a freshly initialised MLM decoder (which is logged).
            load_into(model, load_state_dict(self.spec.start.local()), strict=False)
        return model

    def batch(self, step: int, micro: int, size: int, device: torch.device) -> Batch:
        if self.stream is None:
            shard = ray.train.get_dataset_shard("train")
            rows = shard.iter_batches(
                batch_size=size, batch_format="numpy", prefetch_batches=self.spec.prefetch_batches
            )
            self.stream = MicroBatches(iter(rows), size, self.position)
            self.flops = _FlopsCounter(self.spec.model_config, size, self.spec.crop_len)
        rows = self.stream.next()
        masked = rows["masked"].astype(np.int64)
        return Batch(
            inputs=crops_to_torch(rows, device),
            examples=len(masked),
            real_bytes=int(rows["length"].astype(np.int64).sum()),
            targets=int(masked.sum()),
            flops=self.flops(max(1, int(masked.max(initial=0)))),
        )

    @torch.no_grad()
    def evaluate(self, engine: Any) -> dict[str, float]:
        """Masked-byte loss, accuracy and bits per byte on the held-out crops. The batches are dealt
        round-robin to ranks; every rank runs the same number of forward passes (ZeRO-3 gathers
        weights collectively), the surplus ones on a repeated batch whose result is not counted."""
        batches = self.validation
        rounds = -(-len(batches) // self.world_size)
        sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
        for r in range(rounds):
            index = r * self.world_size + self.rank
            inputs = crops_to_torch(batches[min(index, len(batches) - 1)], engine.device)
            out = engine(**inputs)
            if index < len(batches):
                sums += masked_lm_sums(out.logits, out.targets)
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
        nll, correct, count = (float(v) for v in sums.tolist())
        loss = nll / max(count, 1.0)
        return {
            "loss": loss,
            "accuracy": correct / max(count, 1.0),
            "bits_per_byte": bits_per_byte(loss),
        }

    def train_metrics(self) -> dict[str, float]:
        return {"data/skipped_crops": float(self.stream.skipped if self.stream else 0)}

    def checkpoint_metrics(self) -> dict[str, float]:
        return {"data/crops_consumed": float(self.position.consumed)}

    def before_checkpoint(self) -> None:
        """Pool every rank's consumed positions (a collective) and move the resume pointer."""
        consumed = (
            self.stream.drain_consumed() if self.stream is not None else np.zeros(0, np.int64)
        )
        self.position = self.position.advance(gather_arrays(consumed, self.world_size))
        if self.stream is not None:
            self.stream.skip = self.position
        if self.rank == 0:
            # The pointer lags one checkpoint behind: the one being written is not committed
            # until Ray Train has it, the previous one is.
            self.pointer.write(self.committed)
        self.committed = self.position.watermark

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.position = DataPosition.from_dict(state["position"])
            self.committed = self.position.watermark


@torch.no_grad()
def masked_lm_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy (nats), correct predictions, count] over the decoded targets
    (``MaskedLMOutput.targets``: -100 where there is nothing to predict)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    counted = flat_targets != IGNORE_INDEX
    correct = ((flat_logits.argmax(dim=-1) == flat_targets) & counted).sum()
    return torch.stack([nll.double(), correct.double(), counted.sum().double()])


class _FlopsCounter:
    """Training FLOPs of a micro-batch, by the number of positions it decodes (cached)."""

    def __init__(self, config: PerceiverConfig, batch_size: int, seq_len: int) -> None:
        self.config, self.batch_size, self.seq_len = config, batch_size, seq_len
        self._cache: dict[int, int] = {}

    def __call__(self, decoded_positions: int) -> int:
        if decoded_positions not in self._cache:
            self._cache[decoded_positions] = step_flops(
                self.config, self.batch_size, self.seq_len, decoded_positions=decoded_positions
            ).total
        return self._cache[decoded_positions]


class MicroBatches:
    """Exactly ``size`` crops at a time from a worker's stream shard, skipping crops a checkpoint
    records as trained on, and recording the positions it hands out."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], size: int, skip: DataPosition):
        self._batches = batches
        self.size = size
        self.skip = skip
        self._pending: collections.deque[dict[str, np.ndarray]] = collections.deque()
        self._pending_rows = 0
        self._consumed: list[np.ndarray] = []
        self.skipped = 0

    def next(self) -> dict[str, np.ndarray]:
        while self._pending_rows < self.size:
            batch = next(self._batches, None)
            if batch is None:
                raise EOFError(
                    "the training stream ended before the last step: make it longer "
                    "(data.mixture.stopping_strategy: cycle with max_crops) or train fewer steps"
                )
            keep = ~self.skip.seen(batch["position"])
            if not keep.all():
                self.skipped += int((~keep).sum())
                batch = {k: v[keep] for k, v in batch.items()}
            if len(batch["position"]):
                self._pending.append(batch)
                self._pending_rows += len(batch["position"])
        rows = take_rows(self._pending, self.size)
        self._pending_rows -= self.size
        self._consumed.append(rows["position"])
        return rows

    def drain_consumed(self) -> np.ndarray:
        """Positions handed out since the last call."""
        out = np.concatenate(self._consumed) if self._consumed else np.zeros(0, dtype=np.int64)
        self._consumed = []
        return out


def load_rows(shard: Any, limit: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The first ``limit`` rows of a shard, in batches of ``batch_size`` (for validation)."""
    out, count = [], 0
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        batch = {k: v[: limit - count] for k, v in batch.items()}
        out.append(batch)
        count += len(batch["position"])
        if count >= limit:
            break
    return out
