"""The stages of a fine-tuning recipe, on the driver: a classifier trained through the training
core, masked-LM adaptation on the task's own text, and the registered result.

A recipe (``FinetuneConfig``) chains these as a pipeline of stages (``pipelines.workflow.recipe``),
each from the previous one's best weights. Everything a stage could fail on late is checked by
the recipe before any stage starts.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from perceiver_core.config import PerceiverConfig
from perceiver_core.hf import read_config
from perceiver_core.masking import MaskingConfig
from perceiver_core.packing import PackingConfig
from perceiver_core.task_metrics import primary_metric
from pipelines import storage
from pipelines.config import ConfigError, config_hash
from pipelines.data.config import MixtureConfig, PretrainDataConfig
from pipelines.data.finetune import finetune_dataset, split_fingerprint
from pipelines.data.sources import SourceConfig
from pipelines.data.units import SplitConfig
from pipelines.signing import checkpoint_key
from pipelines.tracking import registry, runs
from pipelines.tracking.models import resolve_model
from pipelines.tracking.sink import section
from pipelines.train import export
from pipelines.train.classify import ClassifySpec
from pipelines.train.config import (
    CheckpointSection,
    EngineSection,
    EvalSection,
    ModelSection,
    PretrainConfig,
    TrainConfig,
)
from pipelines.train.finetune_config import HASH_EXCLUDE, FinetuneConfig, StageConfig
from pipelines.train.job import Schedule, StartingWeights, WorkerJob
from pipelines.train.launch import fit
from pipelines.train.pretrain import run_pretraining

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOutcome:
    weights: str  # the stage's best (classify) or final (mlm) weights: an HF folder or URI
    metrics: dict[str, float]  # of those weights, on the evaluation split
    step: int  # the step those weights are from


def train_classifier(
    cfg: FinetuneConfig,
    stage: StageConfig,
    source: str,
    *,
    run_name: str,
    run_id: str,
    tracking_uri: str,
    workdir: Path,
    signing_key: bytes | None = None,
) -> StageOutcome:
    """Train one classify stage (or sweep trial) from ``source`` as Ray Train run ``run_name``,
    logging into the MLflow run ``run_id``; its best evaluation's weights."""
    init = resolve_model(source, tracking_uri=tracking_uri)
    model_config = classifier_config(cfg, init.hf_dir)
    run_dir = f"{storage.resolve(cfg.run.storage_path, workdir)}/{run_name}"
    job = WorkerJob(
        name=run_name,
        run_id=run_id,
        tracking_uri=tracking_uri,
        run_dir=run_dir,
        seed=cfg.run.seed,
        task=ClassifySpec(
            task=cfg.data.task,
            model_config=model_config,
            start=StartingWeights(str(init.hf_dir), source, tracking_uri),
            freeze_encoder=stage.freeze_encoder,
            keep_head=init.kind == "classifier"
            and len(init.label_names) == model_config.num_labels,
            head_init=stage.head_init,
            window_draw=cfg.data.train_window_draw,
            eval_batch_size=cfg.train.eval_batch_size,
        ),
        engine=cfg.train,
        optimizer=stage.optimizer,
        batch_size=stage.batch_size,
        micro_batch_size=None,
        schedule=Schedule(
            epochs=stage.epochs,
            eval_every=stage.eval_every_steps,
            keep_best=True,
            patience=stage.patience,
        ),
        tracking=cfg.tracking,
        config_hash=stage_hash(cfg, stage),
        signing_key=signing_key or checkpoint_key(),
    )
    fit(
        job,
        # Every worker reads every row, in file order (see pipelines.train.classify).
        datasets={
            "train": finetune_dataset(cfg.data, cfg.splits.train, windows=cfg.data.train_windows),
            "eval": finetune_dataset(cfg.data, cfg.splits.eval_split(cfg.data.task)),
        },
        keep=2,
        max_failures=cfg.run.max_failures,
    )
    location, best = export.best_location(run_dir)
    return StageOutcome(location, {k: float(v) for k, v in best["metrics"].items()}, best["step"])


def adapt(
    cfg: FinetuneConfig,
    stage: StageConfig,
    source: str,
    *,
    run_name: str,
    tracking_uri: str,
    workdir: Path,
    signing_key: bytes | None = None,
) -> StageOutcome:
    """Masked-LM adaptation: pretraining as the run ``run_name`` in the recipe's storage and
    MLflow experiment, from ``source``, on the task's training text (its first text column, labels
    unused), nothing registered; its final weights. The paper's IMDB result (about 94% accuracy)
    came from masked-LM training on IMDB's own reviews before fine-tuning."""
    data = cfg.data
    path, hub_config = data.location()
    text_source = SourceConfig(
        name=data.task.replace("/", "-"),
        path=path,
        config=hub_config,
        hub_split=cfg.splits.train,
        files=data.files,
        format=data.format,
        text_column=data.columns().text,
        sample_by="document",
    )
    t = cfg.train
    every = max(1, stage.steps // 4)
    engine = {f.name: getattr(t, f.name) for f in dataclasses.fields(EngineSection)}
    config = PretrainConfig(
        run=dataclasses.replace(cfg.run, name=run_name),
        model=ModelSection(init_from=source),
        data=PretrainDataConfig(
            sources=[text_source],
            data_dir=data.data_dir,
            packing=dataclasses.replace(PackingConfig(), crop_len=stage.crop_len),
            masking=dataclasses.replace(MaskingConfig(), mask_prob=stage.mask_prob),
            split=SplitConfig(validation_fraction=0.02),
            # A task's text is small: pass over it as often as the stage's steps need.
            mixture=MixtureConfig(stopping_strategy="cycle", max_crops=10_000_000),
        ),
        train=TrainConfig(
            **engine,
            steps=stage.steps,
            micro_batch_size=stage.batch_size // t.workers[1],
            optimizer=stage.optimizer,
        ),
        eval=EvalSection(every=every, crops=256, batch_size=t.eval_batch_size),
        checkpoint=CheckpointSection(every=every, keep=2),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri, register=False),
    )
    result = run_pretraining(config, workdir=workdir, signing_key=signing_key)
    return StageOutcome(result.hf_path, section(result.metrics), result.steps)


def register_result(
    cfg: FinetuneConfig,
    outcome: StageOutcome,
    *,
    parent: str,
    run_id: str,
    tracking_uri: str,
) -> tuple[registry.RegisteredModel, registry.PromotionDecision | None]:
    """The recipe's result as a new version of ``perceiver-<task>`` with its lineage, then the
    ``champion`` alias if it is at least as good as the current one (``register.promote``),
    else ``challenger``."""
    metric = primary_metric(cfg.data.task, cfg.data.columns().num_labels)
    lineage = registry.Lineage(
        run_id=run_id,
        step=outcome.step,
        data_fingerprint=split_fingerprint(cfg.data, cfg.splits.train),
        config_hash=config_hash(cfg, exclude=HASH_EXCLUDE),
        code_version=registry.code_version(),
        parent=parent,
        task=cfg.data.task,
        metrics=outcome.metrics,
    )
    model = export.register(
        tracking_uri,
        outcome.weights,
        cfg.registered_model,
        lineage,
        timeout_s=cfg.tracking.close_timeout_s,
    )
    client = runs.client_for(runs.resolve_tracking(tracking_uri))
    decision = None
    if cfg.register.promote:
        decision = registry.promote(
            client,
            model.name,
            model.version,
            metric=metric.name,
            higher_is_better=metric.higher_is_better,
        )
    else:
        registry.set_alias(client, model.name, registry.CHALLENGER, model.version)
    log.info("registered %s; %s", model.registry_uri, decision)
    return model, decision


def classifier_config(cfg: FinetuneConfig, weights: Path) -> PerceiverConfig:
    """The classifier's config: the starting model's shapes with the task's labels."""
    config, _ = read_config(weights)
    labels = cfg.data.label_name_list()
    n = cfg.data.columns().num_labels
    if cfg.data.max_length > config.max_position_embeddings:
        raise ConfigError(
            f"data.max_length ({cfg.data.max_length}) exceeds the starting model's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    return config.replace(
        num_labels=n,
        id2label=dict(enumerate(labels)),
        problem_type="regression" if n == 1 else None,
        long_text=cfg.register.long_text,
    )


def stage_hash(cfg: FinetuneConfig, stage: StageConfig) -> str:
    """What decides a stage's training: the data, the engine, the seed and the stage itself."""
    parts = {"data": cfg.data, "splits": cfg.splits, "train": cfg.train, "stage": stage}
    return config_hash({**parts, "seed": cfg.run.seed})
