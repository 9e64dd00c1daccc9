"""Run configs of training: the sections every run shares (``RunSection``, ``EngineSection``,
``DebugSection``; fine-tuning's recipe config in ``finetune_config`` reuses them) and the config of
MLM pretraining, one YAML file with every section a typed dataclass:

    run:        name (the resume key), storage, seed, failures tolerated
    model:      a perceiver_core preset plus field overrides
    data:       pipelines.data's PretrainDataConfig (sources, packing, masking, split, mixture)
    train:      workers, batch, ZeRO stage, precision, optimizer and schedule, logging cadence
    eval:       validation cadence and size
    checkpoint: checkpoint cadence, retention, which steps export a registered model
    tracking:   MLflow (pipelines.tracking.config)
    debug:      fault injection for tests (never set in real runs)

``PretrainConfig.__post_init__`` checks what spans sections (crop length against the model's
positions, LAMB against ZeRO), so a bad combination fails at load time on the driver.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from perceiver_core.config import PRESETS, PerceiverConfig, get_preset
from perceiver_core.init import InitRecipe, check_fits
from perceiver_core.optim import OptimizerConfig
from pipelines.config import check_at_least
from pipelines.data.config import PretrainDataConfig
from pipelines.tracking.config import TrackingConfig


@dataclass
class RunSection:
    """name: Ray Train run name and MLflow run name. Submitting again with the same name resumes
        from the run's last checkpoint, in the same MLflow run.
    storage_path: where Ray Train keeps checkpoints (a local folder or ``s3://bucket/prefix``);
        relative paths are taken from the driver's working directory.
    seed: model initialisation and dropout (each rank adds its rank).
    max_failures: worker failures survived by restarting from the last checkpoint.
    """

    name: str = "perceiver-mlm"
    storage_path: str = "runs"
    seed: int = 0
    max_failures: int = 1

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty name without '/', got {self.name!r}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")


@dataclass
class ModelSection:
    """preset: a perceiver_core preset (``language-perceiver`` is the paper's 201M model).
    overrides: PerceiverConfig fields to change, e.g. ``{max_position_embeddings: 256}``.
    init_from: start from trained weights instead of a fresh ``preset``: a registry URI
        (``models:/perceiver-mlm@champion``), an MLflow run id, a checkpoint folder or a Hugging
        Face format directory. Its config.json gives the shapes (``preset`` is then unused;
        ``overrides`` still apply, e.g. dropout). Continued pretraining and MLM adaptation.
    init: how a fresh model's weights start (``perceiver_core.init.InitRecipe``, whose module
        says what each key does); the default is transformers' initialisation. Not with
        ``init_from``.
    """

    preset: str = "language-perceiver"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init: InitRecipe = field(default_factory=InitRecipe)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        known = {f.name for f in dataclasses.fields(PerceiverConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(
                f"overrides.{unknown[0]}: unknown PerceiverConfig field; expected one of "
                f"{sorted(known)}"
            )
        self.perceiver_config()  # PerceiverConfig's own checks, now rather than on a worker
        if self.init_from is not None and not self.init.is_standard:
            raise ValueError(
                "init sets how fresh weights start, and init_from starts from trained ones: "
                "drop one of them"
            )

    def perceiver_config(self) -> PerceiverConfig:
        return get_preset(self.preset, **self.overrides)


@dataclass
class EngineSection:
    """The Ray Train worker group and its engine, the same for every task.

    num_workers / use_gpu / cpus_per_worker: the Ray Train worker group; a worker drives one
        device. Fractional CPUs leave cores to the Ray Data read tasks on small machines.
        ``[min, max]`` makes the group elastic: it starts with as many workers as the cluster
        has room for (at least ``min``), goes on with fewer when a node is lost and grows again
        when room returns, each resize restarting from the last checkpoint. The global batch
        stays the same (gradient accumulation makes up for fewer workers), so it must split
        evenly for every size in the range; ZeRO 1-3 checkpoints cannot change size (stage 0).
    elastic_resize_s: how often an elastic group checks whether it can grow.
    worker_resources: custom Ray resources each worker needs besides its CPUs (and GPU), to put
        workers on the nodes that offer them: ``{"trainer": 1}`` with nodes started with
        ``--resources '{"trainer": 1}'`` places one worker per such node.
    strategy: ``deepspeed`` (ZeRO ``zero_stage`` 0-3) or ``ddp`` (torch DistributedDataParallel
        through Ray Train; zero_stage must be 0).
    zero_stage: DeepSpeed ZeRO stage (0: plain data parallel; 1-3 shard optimizer state, then
        gradients, then weights).
    precision: ``auto`` is bf16 where supported, else fp16.
    grad_clip: global gradient-norm clipping (0 disables).
    peak_flops_per_worker: the device's peak FLOP/s, the denominator of MFU. ``null`` (the
        default): a known GPU's data-sheet peak (``perceiver_core.flops.GPU_PEAK_FLOPS``; H100 bf16
        dense 989e12), else the matmul rate each worker measures at start in its precision. A
        number given here that the run exceeds is wrong: MFU is then not reported, and a warning
        says so.
    log_every: steps between metric logs (each log averages the steps since the previous one).
    """

    num_workers: int | list[int] = 1
    elastic_resize_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    worker_resources: dict[str, float] = field(default_factory=dict)
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    grad_clip: float = 1.0
    peak_flops_per_worker: float | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        shape_ok = isinstance(self.num_workers, int) or len(self.num_workers) == 2
        if not shape_ok or not 1 <= self.workers[0] <= self.workers[1]:
            raise ValueError(
                f"num_workers must be a positive number or [min, max], got {self.num_workers}"
            )
        check_at_least(self, 1, "log_every")
        check_at_least(self, 0, "grad_clip")
        if self.elastic and self.zero_stage:
            raise ValueError(
                f"num_workers: ZeRO-{self.zero_stage} checkpoints hold each worker's shard and "
                "load only into as many workers as wrote them; an elastic group needs "
                "zero_stage 0 (or strategy ddp), or give a fixed number of workers"
            )
        if self.elastic_resize_s <= 0:
            raise ValueError(f"elastic_resize_s must be positive, got {self.elastic_resize_s}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.strategy == "ddp" and self.zero_stage:
            raise ValueError("zero_stage must be 0 with strategy ddp (ZeRO is DeepSpeed's)")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU") or not amount > 0:
                raise ValueError(
                    f"worker_resources.{name}: give a positive amount of a custom resource "
                    "(CPUs and GPUs are cpus_per_worker and use_gpu)"
                )
        if self.peak_flops_per_worker is not None and self.peak_flops_per_worker <= 0:
            raise ValueError("peak_flops_per_worker must be positive (or null: measured)")

    @property
    def workers(self) -> tuple[int, int]:
        """(fewest, most) workers of the group."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (int(n[0]), int(n[-1]))

    @property
    def elastic(self) -> bool:
        return self.workers[0] != self.workers[1]

    def check_batch(self, batch_size: int, micro_batch_size: int | None, key: str) -> None:
        """The global batch splits into micro-batches on every group size in the range."""
        for world in range(self.workers[0], self.workers[1] + 1):
            size = micro_batch_size or batch_size // world
            if batch_size % (size * world):
                raise ValueError(
                    f"{key}: a batch of {batch_size} does not split into micro-batches of {size} "
                    f"on {world} workers (num_workers {self.num_workers})"
                )

    def check_optimizer(self, optimizer: OptimizerConfig, key: str = "optimizer") -> None:
        if optimizer.name == "lamb" and self.zero_stage > 0:
            raise ValueError(
                f"{key}.name: lamb needs whole parameter tensors for its per-layer trust ratio, "
                f"and ZeRO stage {self.zero_stage} hands the optimizer flat shards; use "
                "zero_stage 0 with lamb, or optimizer.name adamw"
            )


@dataclass
class TrainConfig(EngineSection):
    """Pretraining's worker group and engine (``EngineSection``), and:

    steps: optimizer steps of the whole run.
    micro_batch_size: crops per worker per forward pass.
    grad_accum_steps: micro-batches per optimizer step; a step sees
        ``micro_batch_size * grad_accum_steps * num_workers`` crops (the most workers of an
        elastic group; with fewer, each accumulates more micro-batches).
    prefetch_batches: data batches each worker keeps ready.
    data_buffer_mb: object-store memory the training stream may fill ahead of the workers. Ray
        Data otherwise produces as far ahead as the object store allows, busying CPUs the
        workers need (on a small machine) for crops needed only much later.
    """

    steps: int = 500_000
    micro_batch_size: int = 64
    grad_accum_steps: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    prefetch_batches: int = 2
    data_buffer_mb: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 1, "steps", "micro_batch_size", "grad_accum_steps", "data_buffer_mb")
        check_at_least(self, 0, "prefetch_batches")
        self.check_optimizer(self.optimizer)
        self.check_batch(self.crops_per_step, self.micro_batch_size, "micro_batch_size")

    @property
    def crops_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.workers[1]


@dataclass
class EvalSection:
    """every: steps between validations on the held-out split (0: only at the end).
    crops: held-out crops per validation (fewer if the split is smaller).
    batch_size: crops per forward pass.
    """

    every: int = 1000
    crops: int = 1024
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_at_least(self, 0, "every")
        check_at_least(self, 1, "crops", "batch_size")


@dataclass
class CheckpointSection:
    """every: steps between checkpoints (one is always written at the end).
    keep: checkpoints kept in storage (oldest deleted first).
    export_at: steps whose checkpoint is also exported as a registered model (the end always is).
    """

    every: int = 1000
    keep: int = 3
    export_at: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "every", "keep")
        if any(step < 1 for step in self.export_at):
            raise ValueError(f"export_at steps must be >= 1, got {self.export_at}")


@dataclass
class DebugSection:
    """Fault injection and records for the failure tests (never set in real runs).
    ``pause_after_steps`` steps after its worker group started (or restored a checkpoint), every
    worker writes its PID to ``marker_dir/rank<r>-of-<world size>.pid`` and sleeps ``pause_s``,
    giving a test the time to kill something; once per rank and group size, so a group of a size
    that paused before goes on, and one of a new size (an elastic group shrunk) pauses too.
    ``samples_dir``: masked-LM workers append the stream positions and sample ids of every
    micro-batch they train on there (JSON lines), to compare runs crop by crop."""

    pause_after_steps: int | None = None
    pause_s: float = 60.0
    marker_dir: str | None = None
    samples_dir: str | None = None

    def __post_init__(self) -> None:
        if self.pause_after_steps is not None and not self.marker_dir:
            raise ValueError("marker_dir must be set with pause_after_steps")


@dataclass
class PretrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        crop_len = self.data.packing.crop_len
        positions = self.model.perceiver_config().max_position_embeddings
        # With init_from the shapes come from the starting model; run_pretraining checks them.
        if crop_len > positions and self.model.init_from is None:
            raise ValueError(
                f"data.packing.crop_len ({crop_len}) exceeds the model's max_position_embeddings "
                f"({positions}); set model.overrides.max_position_embeddings or a shorter crop"
            )
        if self.model.init_from is None:
            try:
                check_fits(self.model.perceiver_config(), self.model.init, crop_len)
            except ValueError as error:
                raise ValueError(f"model.init: {error}") from None
        late = [s for s in self.checkpoint.export_at if s > self.train.steps]
        if late:
            raise ValueError(
                f"checkpoint.export_at: steps {late} are after the last step ({self.train.steps})"
            )


# Keys that do not change what is trained (names, places, retries, where workers run): left out
# of the config hash used for lineage.
HASH_EXCLUDE = (
    "run.name",
    "run.storage_path",
    "tracking",
    "debug",
    "run.max_failures",
    "train.cpus_per_worker",
    "train.worker_resources",
    "train.elastic_resize_s",
)
