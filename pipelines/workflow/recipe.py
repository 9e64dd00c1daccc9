"""A fine-tuning recipe run as a pipeline: the stage engine of ``pipelines.workflow`` runs it.

    result = run_finetune(load_config(FinetuneConfig, "jobs/configs/finetune_imdb_tiny.yaml"))

Each stage of the recipe becomes a stage of a pipeline named ``finetune`` whose run name is the
recipe's ``run.name``: an ``mlm`` stage (masked-LM adaptation) or a ``classify`` stage, each
starting from the previous one's weights. A classify stage with a ``sweep`` becomes one stage per
(lr, batch size) of its grid, run side by side (``max_concurrent`` at a time), and a ``select``
stage that keeps the best; a ``register`` stage registers the last stage's weights and sets the
alias. As for every pipeline, MLflow holds the state: submitting the same recipe again skips the
finished stages and resumes the interrupted one from its last checkpoint; a finished stage whose
settings changed is refused rather than silently reused.

Everything a stage could fail on late is checked first, on the driver: the starting model exists
and is of the expected kind, the task's files exist and have the text and label columns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceiver_core.task_metrics import primary_metric
from pipelines.config import config_hash, to_dict
from pipelines.data.finetune import check_columns, split_fingerprint
from pipelines.tracking import registry, runs
from pipelines.tracking.config import TrackingConfig
from pipelines.tracking.models import ResolvedModel, resolve_model
from pipelines.train import finetune
from pipelines.train.finetune_config import HASH_EXCLUDE, FinetuneConfig, StageConfig
from pipelines.train.launch import describe_run, open_run
from pipelines.workflow.engine import run_pipeline
from pipelines.workflow.spec import (
    PipelineConfig,
    PipelineSection,
    StageContext,
    StageKind,
)
from pipelines.workflow.spec import StageConfig as PipelineStage

PIPELINE = "finetune"


@dataclass(frozen=True)
class RecipeParams:
    """recipe: the whole recipe (only its data, splits, engine and seed decide a stage's result,
    besides the stage itself); stage: this stage (a sweep trial: with the trial's lr and batch
    size); init: the starting model when no earlier stage gives one."""

    recipe: FinetuneConfig
    stage: StageConfig
    init: str = ""


@dataclass(frozen=True)
class WeightsInput:
    weights: str | None = None  # the previous stage's


@dataclass(frozen=True)
class StageOutputs:
    stage: str  # the recipe's stage
    kind: str  # mlm or classify
    weights: str  # the stage's best (classify) or final (mlm) weights: an HF folder or URI
    metrics: dict[str, float]  # of those weights, on the evaluation split
    step: int
    run_name: str
    run_id: str
    lr: float
    batch_size: int


@dataclass(frozen=True)
class SelectParams:
    metric: str
    higher_is_better: bool


@dataclass(frozen=True)
class SelectInputs:
    trials: list[dict[str, Any]] = field(default_factory=list)  # StageOutputs of each trial


@dataclass(frozen=True)
class RegisterParams:
    recipe: FinetuneConfig
    parent: str  # the registry URI (or source) of the starting model: lineage


@dataclass(frozen=True)
class RegisterInputs:
    result: dict[str, Any]  # StageOutputs of the last stage


@dataclass(frozen=True)
class RegisterOutputs:
    model_uri: str  # models:/perceiver-<task>/N
    logged_model: str  # models:/m-...
    promoted: bool | None  # None: register.promote off (the version is the challenger)
    champion_before: str | None


def train_stage(ctx: StageContext, params: RecipeParams, inputs: WeightsInput) -> StageOutputs:
    """An ``mlm`` or ``classify`` stage of the recipe, from the previous stage's weights."""
    cfg, stage = params.recipe, params.stage
    source = inputs.weights or params.init
    client = ctx.mlflow_client()
    client.set_tag(ctx.run_id, "finetune.init", source)
    runs.log_params(client, ctx.run_id, runs.flatten(to_dict(stage), "stage."))
    where = {
        "run_name": ctx.run_name,
        "tracking_uri": ctx.tracking_uri,
        "workdir": ctx.workdir,
        "signing_key": ctx.signing_key,
    }
    if stage.kind == "mlm":
        outcome = finetune.adapt(cfg, stage, source, **where)
    else:
        outcome = finetune.train_classifier(cfg, stage, source, run_id=ctx.run_id, **where)
    return StageOutputs(
        stage=stage.name,
        kind=stage.kind,
        weights=outcome.weights,
        metrics=outcome.metrics,
        step=outcome.step,
        run_name=ctx.run_name,
        run_id=ctx.run_id,
        lr=stage.optimizer.lr,
        batch_size=stage.batch_size,
    )


def select(ctx: StageContext, params: SelectParams, inputs: SelectInputs) -> StageOutputs:
    """The best trial of a sweep, by the task's metric (a trial that diverged to NaN never wins
    over one that did not); every trial's score on this stage's run."""
    trials = [StageOutputs(**t) for t in inputs.trials]
    client = ctx.mlflow_client()
    for t in trials:
        key = f"sweep/lr{t.lr:g}-bs{t.batch_size}/{params.metric}"
        client.log_metric(ctx.run_id, key, t.metrics[params.metric])
    sign = 1.0 if params.higher_is_better else -1.0

    def rank(t: StageOutputs) -> float:
        value = t.metrics[params.metric]
        return -math.inf if math.isnan(value) else sign * value

    best = max(trials, key=rank)
    client.set_tag(ctx.run_id, "sweep.best", best.run_name)
    return dataclasses.replace(best, run_name=ctx.run_name, run_id=ctx.run_id)


def register(ctx: StageContext, params: RegisterParams, inputs: RegisterInputs) -> RegisterOutputs:
    """The last stage's weights as a new registered version, with its lineage and alias; its
    metrics also on the recipe's run, which the version names as its run."""
    result = StageOutputs(**inputs.result)
    outcome = finetune.StageOutcome(result.weights, result.metrics, result.step)
    model, decision = finetune.register_result(
        params.recipe,
        outcome,
        parent=params.parent,
        run_id=ctx.parent_run_id,
        tracking_uri=ctx.tracking_uri,
    )
    client = ctx.mlflow_client()
    for name, value in result.metrics.items():
        client.log_metric(ctx.parent_run_id, f"val/{name}", value, step=result.step)
    return RegisterOutputs(
        model_uri=model.registry_uri,
        logged_model=model.model_uri,
        promoted=decision.promoted if decision else None,
        champion_before=decision.champion_before if decision else None,
    )


# Where checkpoints are kept and how often a stage may retry change nothing it produces, nor do
# the parts of the recipe that other stages read.
_UNUSED = ("run.name", "run.storage_path", "run.max_failures", "tracking", "register")
KINDS: dict[str, StageKind[Any, Any, Any]] = {
    k.name: k
    for k in (
        StageKind(
            "train",
            train_stage,
            RecipeParams,
            WeightsInput,
            StageOutputs,
            hash_exclude=tuple(f"recipe.{key}" for key in (*_UNUSED, "stages", "init")),
        ),
        StageKind("select", select, SelectParams, SelectInputs, StageOutputs),
        StageKind(
            "register",
            register,
            RegisterParams,
            RegisterInputs,
            RegisterOutputs,
            hash_exclude=tuple(f"recipe.{key}" for key in ("run.storage_path", "run.max_failures")),
        ),
    )
}


def recipe_pipeline(cfg: FinetuneConfig, tracking_uri: str, parent: str) -> PipelineConfig:
    """The recipe's stages as a pipeline (see the module docstring)."""
    recipe = to_dict(cfg)
    stages: list[PipelineStage] = []
    previous: str | None = None
    for stage in cfg.stages:
        if stage.sweep.enabled:
            trials = _trials(stage)
            names = [
                f"{stage.name}-lr{t.optimizer.lr:g}-bs{t.batch_size}".replace(".", "p")
                for t in trials
            ]
            limit = stage.sweep.max_concurrent
            for i, (name, trial) in enumerate(zip(names, trials, strict=True)):
                after = [names[i - limit]] if limit and i >= limit else []
                stages.append(_train(name, recipe, trial, cfg.init, previous, after))
            metric = primary_metric(cfg.data.task, cfg.data.columns().num_labels)
            stages.append(
                PipelineStage(
                    name=stage.name,
                    kind="select",
                    inputs={"trials": list(names)},
                    params={"metric": metric.name, "higher_is_better": metric.higher_is_better},
                )
            )
        else:
            stages.append(_train(stage.name, recipe, stage, cfg.init, previous, []))
        previous = stage.name
    if cfg.register.enabled:
        stages.append(
            PipelineStage(
                name="register",
                kind="register",
                inputs={"result": str(previous)},
                params={"recipe": recipe, "parent": parent},
            )
        )
    return PipelineConfig(
        pipeline=PipelineSection(name=PIPELINE, run_name=cfg.run.name),
        stages=stages,
        tracking=TrackingConfig(tracking_uri=tracking_uri, experiment=cfg.tracking.experiment),
    )


def _trials(stage: StageConfig) -> list[StageConfig]:
    sweep = stage.sweep
    return [
        dataclasses.replace(
            stage,
            batch_size=batch,
            optimizer=dataclasses.replace(stage.optimizer, lr=lr),
            sweep=dataclasses.replace(sweep, lr=[], batch_size=[]),
        )
        for lr in sweep.lr or [stage.optimizer.lr]
        for batch in sweep.batch_size or [stage.batch_size]
    ]


def _train(
    name: str,
    recipe: dict[str, Any],
    stage: StageConfig,
    init: str,
    previous: str | None,
    after: list[str],
) -> PipelineStage:
    params = {"recipe": recipe, "stage": to_dict(stage)}
    if previous is None:
        params["init"] = init
    inputs: dict[str, str | list[str]] = {"weights": f"{previous}.weights"} if previous else {}
    return PipelineStage(name=name, kind="train", inputs=inputs, after=after, params=params)


@dataclass(frozen=True)
class FinetuneResult:
    run_id: str  # the recipe's MLflow run (parent of the stage runs)
    stages: list[StageOutputs]  # of the recipe's stages (a sweep: its best trial's)
    metric: str  # the task's primary metric
    score: float
    registered: registry.RegisteredModel | None
    promoted: bool | None


def check_finetune(cfg: FinetuneConfig, tracking_uri: str | None = None) -> ResolvedModel:
    """What can be checked without Ray, so that a job can fail at once: the starting model
    (found, downloaded from the Hub when it is an id, of the right kind) and the data's label and
    text columns (in the first file of each split). Returns the resolved model."""
    init = resolve_model(cfg.init, tracking_uri=tracking_uri, expect=cfg.init_kind)
    for split in (cfg.splits.train, cfg.splits.eval_split(cfg.data.task)):
        check_columns(cfg.data, split)
    return init


def run_finetune(
    cfg: FinetuneConfig,
    *,
    workdir: Path | None = None,
    parent_run_id: str | None = None,
    signing_key: bytes | None = None,
) -> FinetuneResult:
    """Run (or resume) the recipe; needs a connected Ray runtime (``ray.init``). ``parent_run_id``:
    an MLflow run to hold the stage runs (a stage of an enclosing pipeline); ``signing_key``: of
    the checkpoints (default: ``checkpoint_key()`` here)."""
    workdir = (workdir or Path.cwd()).resolve()
    target = runs.resolve_tracking(cfg.tracking.tracking_uri, workdir)
    init = check_finetune(cfg, target.tracking_uri)
    parent = init.registered.registry_uri if init.registered is not None else cfg.init
    tags = {
        "config_hash": config_hash(cfg, exclude=HASH_EXCLUDE),
        "data.fingerprint": split_fingerprint(cfg.data, cfg.splits.train),
        "finetune.init": cfg.init,
    }
    # The recipe's run: this one's own, or the enclosing stage's run it is nested in.
    if parent_run_id is None:
        client, run_id = open_run(target, cfg.tracking.experiment, cfg.run.name, cfg, tags=tags)
    else:
        client, run_id = runs.client_for(target), parent_run_id
        describe_run(client, run_id, cfg, tags=tags)
    pipeline = recipe_pipeline(cfg, target.tracking_uri, parent)
    try:
        result = run_pipeline(
            pipeline, KINDS, workdir=workdir, parent_run_id=run_id, signing_key=signing_key
        )
    except BaseException:
        if parent_run_id is None:
            runs.finish_run(client, run_id, "FAILED")
        raise
    if parent_run_id is None:
        runs.finish_run(client, run_id)
    outputs = {name: stage.outputs or {} for name, stage in result.stages.items()}
    stages = [StageOutputs(**outputs[s.name]) for s in cfg.stages]
    metric = primary_metric(cfg.data.task, cfg.data.columns().num_labels)
    registered = None
    if "register" in outputs:
        name, version = registry.parse_version_uri(outputs["register"]["model_uri"])
        registered = registry.RegisteredModel(name, version, outputs["register"]["logged_model"])
    return FinetuneResult(
        run_id=result.parent_run_id,
        stages=stages,
        metric=metric.name,
        score=stages[-1].metrics[metric.name],
        registered=registered,
        promoted=outputs.get("register", {}).get("promoted"),
    )
