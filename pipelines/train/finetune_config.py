"""The run config of fine-tuning: a starting model, a labelled task, and a recipe of stages.

    run:        name (the resume key of every stage), storage, seed, failures tolerated
    init:       the starting model: a registry URI (``models:/perceiver-mlm@champion``), an MLflow
                run id, a checkpoint folder or a Hugging Face format directory
    init_kind:  what ``init`` must be: ``mlm`` (a pretrained masked-LM), or ``classifier`` to go on
                fine-tuning a classifier (its head is kept when the task has as many labels)
    data:       pipelines.data's FinetuneDataConfig (task, files, columns, max_length)
    stages:     the recipe, run in order, each from the previous stage's best weights:
                ``mlm`` adapts the encoder to the task's own text (masked-LM, as pretraining),
                ``classify`` trains the classifier (optionally with the encoder frozen)
    train:      the Ray Train worker group and the DeepSpeed settings shared by the stages
    register:   the result's registered model (``perceiver-<task>``) and its alias
    tracking:   MLflow (tracking_uri, experiment)

The paper's GLUE recipe is one ``classify`` stage of 10 epochs with lr in {1e-4, 5e-5, 2e-5, 1e-5},
200 warm-up steps and batch {16, 32, 64}; its IMDB result came from MLM adaptation on IMDB and then
full fine-tuning (``jobs/configs/finetune_imdb.yaml``). ``sweep`` on a classify stage runs that grid
as parallel trials and keeps the best.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from perceiver_core.optim import OptimizerConfig
from pipelines.config import check_at_least
from pipelines.data.finetune import FinetuneDataConfig
from pipelines.tracking.config import TrackingConfig
from pipelines.train.config import HASH_EXCLUDE as PRETRAIN_HASH_EXCLUDE
from pipelines.train.config import EngineSection, RunSection


@dataclass
class SweepConfig:
    """A grid over a classify stage: every (lr, batch_size) pair is a trial, run in parallel on
    the cluster (``max_concurrent`` at a time, 0: all); the trial with the best validation score
    continues the recipe. Empty lists keep the stage's own value."""

    lr: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        if any(lr <= 0 for lr in self.lr):
            raise ValueError(f"lr values must be positive, got {self.lr}")
        if any(b < 1 for b in self.batch_size):
            raise ValueError(f"batch_size values must be >= 1, got {self.batch_size}")
        check_at_least(self, 0, "max_concurrent")

    @property
    def enabled(self) -> bool:
        return bool(self.lr or self.batch_size)


@dataclass
class StageConfig:
    """One stage of the recipe.

    name: the stage's label (part of its run name: ``<run.name>-<name>``).
    kind: ``classify`` or ``mlm`` (masked-LM adaptation on the task's training text).
    epochs: classify: passes over the training split (the stage may stop earlier, see patience).
    steps: mlm: optimizer steps.
    batch_size: examples (classify) or crops (mlm) per optimizer step over all workers; must be a
        multiple of ``train.num_workers``.
    optimizer: AdamW by default, with the paper's fine-tuning warm-up; ``schedule: linear``.
    freeze_encoder: classify: train only the classification head (a linear probe of the encoder).
    head_init: classify: how a new head starts (one the starting model does not already have):
        ``standard`` (transformers' initialisation) or ``unit`` (outputs on the scale of its
        inputs, reading the mean of the latents; what an encoder pretrained from
        ``model.init.ngrams`` needs to learn, see ``perceiver_core.init.unit_scale_head``).
    patience: classify: stop after this many evaluations without improving the task's metric
        (0: never stop early). The best evaluation's weights are the stage's result either way.
    eval_every_steps: classify: also evaluate (and checkpoint) every N steps within an epoch (0:
        at the end of each epoch only).
    crop_len / mask_prob: mlm: crop length in bytes (at most the model's positions) and the
        probability that a word is masked (as ``data.masking.mask_prob`` in pretraining).
    sweep: classify: a learning-rate x batch-size grid run as parallel trials.
    """

    name: str = "finetune"
    kind: Literal["classify", "mlm"] = "classify"
    epochs: int = 10
    steps: int = 1000
    batch_size: int = 32
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            name="adamw", lr=5e-5, weight_decay=0.01, warmup_steps=200, schedule="linear"
        )
    )
    freeze_encoder: bool = False
    head_init: Literal["standard", "unit"] = "standard"
    patience: int = 0
    eval_every_steps: int = 0
    crop_len: int = 2048
    mask_prob: float = 0.15
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty name without '/', got {self.name!r}")
        check_at_least(self, 1, "epochs", "steps", "batch_size", "crop_len")
        check_at_least(self, 0, "patience", "eval_every_steps")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.kind == "mlm" and (
            self.sweep.enabled or self.freeze_encoder or self.head_init != "standard"
        ):
            raise ValueError("sweep, freeze_encoder and head_init apply to classify stages only")


@dataclass
class FinetuneTrainSection(EngineSection):
    """The worker group and the engine, shared by all stages (``EngineSection``), and:

    eval_batch_size: examples per forward pass in evaluation, per worker.
    """

    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 1, "eval_batch_size")


@dataclass
class FinetuneSplits:
    """train / eval: the task's split names. ``eval`` unset: ``validation`` for GLUE
    (``validation_matched`` for MNLI) and files, ``test`` for IMDB (which has no validation
    split)."""

    train: str = "train"
    eval: str | None = None

    def eval_split(self, task: str) -> str:
        if self.eval:
            return self.eval
        if task == "imdb":
            return "test"
        return "validation_matched" if task == "glue/mnli" else "validation"


@dataclass
class RegisterSection:
    """What happens to the result (the last stage's best weights).

    enabled: log it to MLflow as a text-classification model and register a new version.
    name: the registered model (default ``perceiver-<task>``).
    promote: compare the new version with the ``champion`` on the task's metric: it becomes the
        champion if it is at least as good (or there is none), else the ``challenger``. Off: it
        only becomes the challenger.
    long_text: how the model answers a text longer than its positions, written into its
        config.json: ``truncate`` (its beginning, as training saw it) or ``windows``
        (consecutive windows, their logits averaged). ``jobs.predict``, batch inference and
        ``perceiver_core.predict.classify`` follow it; MLflow's transformers pipeline, pyfunc and
        server always truncate.
    """

    enabled: bool = True
    name: str | None = None
    promote: bool = True
    long_text: Literal["truncate", "windows"] = "truncate"


@dataclass
class FinetuneConfig:
    # The pretraining section: name is the resume key of every stage (stage s trains as Ray Train
    # run and MLflow run "<name>-<s>"; a resubmitted recipe skips finished stages and resumes the
    # interrupted one), seed also fixes the classifier head and the per-epoch shuffle.
    run: RunSection = field(default_factory=lambda: RunSection(name="perceiver-finetune"))
    init: str = "models:/perceiver-mlm@champion"
    init_kind: Literal["mlm", "classifier"] = "mlm"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    splits: FinetuneSplits = field(default_factory=FinetuneSplits)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)
    register: RegisterSection = field(default_factory=lambda: RegisterSection())
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(experiment="perceiver-finetune")
    )

    def __post_init__(self) -> None:
        if not self.init:
            raise ValueError("init: name the starting model (registry URI, run, folder)")
        if not self.stages:
            raise ValueError("stages: the recipe needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        if self.stages[-1].kind != "classify":
            raise ValueError("stages: the last stage must be a classify stage (it is registered)")
        for i, stage in enumerate(self.stages):
            self.train.check_optimizer(stage.optimizer, f"stages.{i}.optimizer")
            for size in stage.sweep.batch_size or [stage.batch_size]:
                self.train.check_batch(size, None, f"stages.{i}.batch_size")
            if stage.crop_len > self.data.max_length and stage.kind == "mlm":
                raise ValueError(
                    f"stages.{i}.crop_len ({stage.crop_len}) exceeds data.max_length "
                    f"({self.data.max_length}), the model's input length"
                )

    @property
    def registered_model(self) -> str:
        """``register.name``, else ``perceiver-<task>`` (``perceiver-imdb``, ``perceiver-sst2``)."""
        return self.register.name or "perceiver-" + self.data.task.removeprefix("glue/")


# Pretraining's, less its ``debug`` section, which fine-tuning configs do not have.
HASH_EXCLUDE = tuple(key for key in PRETRAIN_HASH_EXCLUDE if key != "debug")
