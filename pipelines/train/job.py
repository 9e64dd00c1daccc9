"""The contract between the drivers and the training core: what a driver resolves and ships to every
worker (``WorkerJob``: the run, its engine and schedule, and a task spec whose ``build`` makes the
task on each worker), and what a task supplies to the core (``Task``, its ``Batch`` of inputs).
``pipelines.train.core`` runs it; ``pipelines.train.mlm`` and ``pipelines.train.classify`` are the
tasks; ``pipelines.train.pretrain`` and ``pipelines.train.finetune`` the drivers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perceiver_core.optim import OptimizerConfig
from perceiver_core.task_metrics import TaskMetric
from pipelines.tracking.config import TrackingConfig
from pipelines.tracking.models import resolve_model
from pipelines.tracking.registry import Lineage
from pipelines.train.config import DebugSection, EngineSection


@dataclass
class Batch:
    """One micro-batch: the model's inputs, and what the metrics count of it."""

    inputs: dict[str, torch.Tensor]
    examples: int
    real_bytes: int  # non-padding input bytes
    targets: int  # what the loss averages over (masked bytes, or examples)
    flops: float  # training FLOPs of the micro-batch


@dataclass(frozen=True)
class StartingWeights:
    """Trained weights a run starts from: ``folder`` as the driver sees it, and ``source`` (a
    registry URI, run id, ...) from which a node that cannot see the folder fetches them."""

    folder: str
    source: str
    tracking_uri: str

    def local(self) -> Path:
        if (Path(self.folder) / "config.json").is_file():
            return Path(self.folder)
        return resolve_model(self.source, tracking_uri=self.tracking_uri).hf_dir


class Task:
    """What a task supplies to the core (see ``pipelines.train.mlm`` for an example); one without
    state of its own keeps the default ``state_dict`` / ``load_state_dict``."""

    metric: TaskMetric  # the evaluation value that picks the best weights and stops early
    per_byte_loss: bool  # the loss is per byte (log it in bits per byte too)

    def build_model(self) -> nn.Module: ...  # with its starting weights
    def batch(self, step: int, micro: int, size: int, device: torch.device) -> Batch: ...
    def evaluate(self, engine: Any) -> dict[str, float]: ...  # a collective; same on all ranks

    def steps_per_epoch(self, batch_size: int) -> int:
        return 0  # a stream without epochs

    def state_dict(self) -> dict[str, Any]:  # JSON values
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class Schedule:
    """steps: optimizer steps (0: ``epochs`` passes over the task's data).
    eval_every: also evaluate every N steps (always at the end, and at each epoch's end).
    checkpoint_every: checkpoint every N steps (0: after each evaluation); always at the end.
    export_at: steps whose checkpoint also holds the model in Hugging Face format, registered as
        ``register_as`` (the final checkpoint always holds it).
    keep_best: export the weights of each evaluation that improves on the best so far.
    patience: stop after this many evaluations without improvement (0: never).
    """

    steps: int = 0
    epochs: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    export_at: tuple[int, ...] = ()
    keep_best: bool = False
    patience: int = 0


@dataclass(frozen=True)
class WorkerJob:
    """What the driver resolved before starting the workers, shipped in ``train_loop_config``.

    batch_size: examples per optimizer step over all workers; micro_batch_size: per forward pass
    and worker (None: ``batch_size / num_workers``, one forward pass per step). Gradient
    accumulation makes up the rest.
    """

    name: str  # the Ray Train run (and the progress lines' label)
    run_id: str
    tracking_uri: str
    run_dir: str
    seed: int
    task: Any  # the driver's description of the task: .build(job, rank, world_size) -> Task
    engine: EngineSection
    optimizer: OptimizerConfig
    batch_size: int
    micro_batch_size: int | None
    schedule: Schedule
    tracking: TrackingConfig
    config_hash: str
    signing_key: bytes = field(repr=False)  # of the checkpoints (pipelines.train.checkpoint)
    register_as: str | None = None  # the registered model of the exports at schedule.export_at
    lineage: Lineage | None = None  # of those exports
    debug: DebugSection = field(default_factory=DebugSection)
