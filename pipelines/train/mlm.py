"""Masked-language modelling as a task of the training core: batches from the crop stream, the loss
the model computes on the masked bytes, and validation on held-out crops.

Every global step trains on the same crops, in the same micro-batches, whatever the number of
workers, through restarts and resizes: step ``k`` (counted from the start of the run) takes the
``batch_size`` crops at stream positions ``[k * B, (k + 1) * B)``, cut into micro-batches of
``size`` crops dealt to the ranks one micro-batch after another (piece ``micro * W + rank``). The
stream is read once, in order, by a ``CropFeed`` actor (``pipelines.data.feed``) that rank 0
starts for each worker group at the restored position; the ranks ask it for positions. So the data
position of a checkpoint is a number (crops consumed), nothing a lost worker could have moved, and
a resumed or resized run trains every crop of the stream exactly once, in the order an
uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from perceiver_core.config import PerceiverConfig
from perceiver_core.flops import step_flops
from perceiver_core.hf import load_into, load_state_dict
from perceiver_core.init import InitRecipe, apply_init
from perceiver_core.masking import IGNORE_INDEX
from perceiver_core.model import PerceiverForMaskedLM
from perceiver_core.task_metrics import TaskMetric
from pipelines.data.feed import CropFeed, StreamSpec
from pipelines.data.pretrain import crops_to_torch
from pipelines.train.job import Batch, StartingWeights, Task, WorkerJob
from pipelines.train.metrics import bits_per_byte

log = logging.getLogger(__name__)

# How long a rank waits for its crops before saying so (then again as often): a stream whose
# read tasks find no free CPU makes no progress, silently, until Ray Data gives up after 30 min.
STALL_REPORT_S = 60.0


@dataclass(frozen=True)
class MaskedLMSpec:
    """What the driver resolved for a masked-LM run: the model and where its starting weights
    are, the stream its feed reads (as long as the run needs), and how much of the held-out split
    each validation reads."""

    model_config: PerceiverConfig
    stream: StreamSpec  # its ``crops``: positions the run trains on, steps x batch size
    # The held-out crops, read once by a Ray task the driver starts before the workers (it reads
    # while they start up): ``ray.ObjectRef`` to ``held_out_batches``' list.
    validation: Any
    start: StartingWeights | None = None  # continued pretraining, MLM adaptation
    init: InitRecipe = field(default_factory=InitRecipe)  # how fresh weights start

    def build(self, job: WorkerJob, rank: int, world_size: int) -> MaskedLM:
        return MaskedLM(self, job, rank, world_size)


class MaskedLM(Task):
    metric = TaskMetric("loss", higher_is_better=False)
    per_byte_loss = True

    def __init__(self, spec: MaskedLMSpec, job: WorkerJob, rank: int, world_size: int) -> None:
        self.spec, self.job, self.rank, self.world_size = spec, job, rank, world_size
        self.validation: list[dict[str, np.ndarray]] | None = None  # fetched at the first eval
        # Crops consumed by the end of step ``base_step`` (the restored checkpoint's).
        self.base_position, self.base_step = 0, 0
        self.step = 0  # the last step a batch was taken for
        self.next_ref: tuple[tuple[int, int], Any] | None = None
        # The feed's process starts now, while the engine is built; it opens the stream once the
        # restored position is known (``load_state_dict``).
        self.feed = self._feed_actor()

    def build_model(self) -> PerceiverForMaskedLM:
        model = PerceiverForMaskedLM(self.spec.model_config)
        if self.spec.start is None:
            apply_init(model, self.spec.init, self.spec.stream.data.packing.crop_len)
        else:
            # A classifier's encoder keeps a freshly initialised MLM decoder (which is logged).
            load_into(model, load_state_dict(self.spec.start.local()), strict=False)
        return model

    def position(self, step: int, micro: int, size: int) -> int:
        """First stream position of this rank's micro-batch ``micro`` of step ``step`` (0-based)."""
        offset = (step - self.base_step) * self.job.batch_size
        return self.base_position + offset + (micro * self.world_size + self.rank) * size

    def batch(self, step: int, micro: int, size: int, device: torch.device) -> Batch:
        start = self.position(step, micro, size)
        if self.next_ref is not None and self.next_ref[0] == (start, size):
            ref = self.next_ref[1]
        else:
            ref = self.feed.take.remote(self.base_position, start, size)
        rows = wait_for(ref, f"{self.job.name}: crops {start}..{start + size} (step {step + 1})")
        # The next micro-batch, asked for now, arrives while this one trains.
        ahead = start + self.world_size * size  # this rank's next micro-batch, in any step
        if ahead + size <= self.spec.stream.crops:
            self.next_ref = ((ahead, size), self.feed.take.remote(self.base_position, ahead, size))
        self.step = step
        self._log_samples(step + 1, rows)
        masked = rows["masked"].astype(np.int64)
        decoded = max(1, int(masked.max(initial=0)))  # the decoder's positions per crop
        crop_len = self.spec.stream.data.packing.crop_len
        flops = step_flops(self.spec.model_config, size, crop_len, decoded_positions=decoded)
        return Batch(
            inputs=crops_to_torch(rows, device),
            examples=len(masked),
            real_bytes=int(rows["length"].astype(np.int64).sum()),
            targets=int(masked.sum()),
            flops=flops.total,
        )

    def _log_samples(self, step: int, rows: dict[str, np.ndarray]) -> None:
        """With ``debug.samples_dir``: each rank appends the stream positions and sample ids of
        every micro-batch it trains on (JSON lines), for the tests that compare runs crop by crop.
        Records of one worker group share its ``attempt`` (its feed's name)."""
        if self.job.debug.samples_dir is None:
            return
        path = Path(self.job.debug.samples_dir) / f"rank{self.rank}-{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "step": step,
            "world_size": self.world_size,
            "attempt": self.attempt,
            "time": time.time(),
            "positions": rows["position"].tolist(),
            "sample_ids": [int(x) for x in rows["sample_id"]],
        }
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _feed_actor(self) -> Any:
        """Rank 0 starts this worker group's feed; every rank gets it by name."""
        names = [f"crop-feed-{uuid.uuid4().hex}"]
        feed = None
        if self.rank == 0:
            here = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=True
            )
            # Owned by rank 0's process: it ends with this worker group. A named actor's name is
            # registered when ``remote()`` returns, so the other ranks find it at once.
            feed = (
                ray.remote(CropFeed)
                .options(name=names[0], num_cpus=0, scheduling_strategy=here)
                .remote(self.spec.stream)
            )
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(names, src=0)
        self.attempt = names[0]
        return feed if feed is not None else ray.get_actor(names[0])

    @torch.no_grad()
    def evaluate(self, engine: Any) -> dict[str, float]:
        """Masked-byte loss, accuracy and bits per byte on the held-out crops. The batches are dealt
        round-robin to ranks; every rank runs the same number of forward passes (ZeRO-3 gathers
        weights collectively), the surplus ones on a repeated batch whose result is not counted."""
        if self.validation is None:
            self.validation = ray.get(self.spec.validation)
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

    def consumed(self) -> int:
        """Crops trained on by the end of the last step."""
        return self.base_position + (self.step + 1 - self.base_step) * self.job.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed(), "step": self.step + 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.base_position, self.base_step = int(state["consumed"]), int(state["step"])
            self.step = self.base_step - 1
        if self.rank == 0:  # the stream starts reading now, before the first step asks for it
            self.feed.open.remote(self.base_position)


def wait_for(ref: Any, what: str, report_every_s: float = STALL_REPORT_S) -> Any:
    """``ray.get(ref)``, saying every ``report_every_s`` seconds that ``what`` is still awaited."""
    waited = 0.0
    while not ray.wait([ref], timeout=report_every_s)[0]:
        waited += report_every_s
        log.warning(
            "%s: waited %g s for the stream; its read tasks need a CPU the workers leave free "
            "(train.cpus_per_worker) or a cluster that can add one",
            what,
            waited,
        )
    return ray.get(ref)


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
