"""Fine-tuning recipes on Ray Train, tracked in MLflow: the pipeline's second entry point.

    result = run_finetune(load_config(FinetuneConfig, "jobs/configs/finetune_imdb_tiny.yaml"))

Runs the recipe's stages in order on the connected Ray cluster, each starting from the previous
stage's best weights (the first from ``init``), then registers the last stage's best weights as a
new version of ``perceiver-<task>`` and sets its alias. Everything a stage could fail on late is
checked first on the driver: the starting model exists and is a Perceiver, the task's files exist
and have the text and label columns, the batch sizes fit.

MLflow: a parent run ``run.name`` and a child run per stage (``<run.name>-<stage>``, the stage's
Ray Train run name too). A stage that finished stores its result on its child run; submitting the
same config again skips it and resumes the first unfinished stage from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from perceiver_core.config import PerceiverConfig
from pipelines.config import config_hash, to_dict, to_yaml
from pipelines.data.finetune import FinetuneDataConfig, check_columns, finetune_dataset
from pipelines.tracking import registry, runs
from pipelines.train.finetune_config import HASH_EXCLUDE, FinetuneConfig, StageConfig
from pipelines.train.finetune_loop import ClassifyJob, best_weights, classify_loop_per_worker
from pipelines.train.pretrain import storage_root
from pipelines.train.task_metrics import primary_metric

log = logging.getLogger(__name__)

RESULT_TAG = "finetune.result"


@dataclass(frozen=True)
class StageResult:
    stage: str
    kind: str
    run_name: str
    run_id: str
    weights: str  # the stage's best (classify) or final (mlm) weights: an HF folder or URI
    metrics: dict[str, float]  # of those weights, on the evaluation split
    step: int  # the step those weights are from
    params: dict[str, Any]  # what a sweep chose (lr, batch_size); {} otherwise


@dataclass(frozen=True)
class FinetuneResult:
    run_id: str  # the parent MLflow run
    stages: list[StageResult]
    metric: str  # the task's primary metric
    score: float
    registered: registry.RegisteredModel | None
    promotion: registry.PromotionDecision | None


@dataclass(frozen=True)
class _Context:
    cfg: FinetuneConfig
    tracking_uri: str
    client: Any
    experiment: str
    parent_run_id: str
    run_root: str  # storage folder of the stages' Ray Train runs


def run_finetune(cfg: FinetuneConfig, *, workdir: Path | None = None) -> FinetuneResult:
    """Run (or resume) the recipe; needs a connected Ray runtime (``ray.init``)."""
    from pipelines.tracking.models import resolve_model

    workdir = (workdir or Path.cwd()).resolve()
    target = runs.resolve_tracking(cfg.tracking.tracking_uri, workdir)
    # A missing model, or one of the wrong kind, fails here, before anything starts.
    init = resolve_model(cfg.init, tracking_uri=target.tracking_uri, expect=cfg.init_kind)
    for split in (cfg.splits.train, cfg.splits.eval_split(cfg.data.task)):
        check_columns(cfg.data, split)  # the label and text columns, in the first file
    client = runs.client_for(target)
    experiment = runs.experiment_id(client, cfg.tracking.experiment, target.artifact_location)
    digest = config_hash(cfg, exclude=HASH_EXCLUDE)
    fingerprint = data_fingerprint(cfg.data, cfg.splits.train)
    tags = {"config_hash": digest, "data.fingerprint": fingerprint, "finetune.init": cfg.init}
    parent, _ = runs.start_or_resume_run(client, experiment, cfg.run.name, tags)
    runs.log_params(client, parent, runs.flatten(to_dict(cfg)))
    client.log_text(parent, to_yaml(cfg), "config/resolved.yaml")
    ctx = _Context(
        cfg,
        target.tracking_uri,
        client,
        experiment,
        parent,
        storage_root(cfg.run.storage_path, workdir),
    )
    try:
        results, source = [], cfg.init
        for stage in cfg.stages:
            result = _run_stage(ctx, stage, source)
            results.append(result)
            source = result.weights
        registered, promotion = _register(ctx, init, results[-1], digest, fingerprint)
    except BaseException:
        runs.finish_run(client, parent, "FAILED")
        raise
    runs.finish_run(client, parent)
    metric = primary_metric(cfg.data.task, cfg.data.columns().num_labels)
    return FinetuneResult(
        run_id=parent,
        stages=results,
        metric=metric.name,
        score=results[-1].metrics[metric.name],
        registered=registered,
        promotion=promotion,
    )


def data_fingerprint(data: FinetuneDataConfig, split: str) -> str:
    """A digest of the training files (names, sizes, versions) and the columns read from them."""
    import hashlib

    from pipelines.data.finetune import finetune_files

    refs = finetune_files(data, split)
    text = "|".join(f"{r.relpath}:{r.size}:{r.version}" for r in refs)
    text += "|" + json.dumps(asdict(data.columns()), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# -- stages --------------------------------------------------------------------------------------


def _run_stage(ctx: _Context, stage: StageConfig, source: str) -> StageResult:
    """One stage, or its stored result when it finished before (a resubmitted run)."""
    run_name = f"{ctx.cfg.run.name}-{stage.name}"
    result = _finished(ctx, run_name)
    if result is not None:
        log.info("stage %s finished before (%s); skipping it", stage.name, result.metrics)
        return result
    tags = {
        "mlflow.parentRunId": ctx.parent_run_id,
        "finetune.stage": stage.name,
        "finetune.init": source,
    }
    run_id, _ = runs.start_or_resume_run(ctx.client, ctx.experiment, run_name, tags)
    runs.log_params(ctx.client, run_id, runs.flatten(to_dict(stage), "stage."))
    log.info("stage %s (%s) from %s", stage.name, stage.kind, source)
    if stage.kind == "mlm":
        work = _mlm_stage
    elif stage.sweep.enabled:
        work = _sweep_stage
    else:
        work = run_classify
    return _recorded(ctx, run_id, lambda: work(ctx, stage, source, run_name, run_id))


def _recorded(ctx: _Context, run_id: str, work: Callable[[], StageResult]) -> StageResult:
    """``work()`` as the MLflow run ``run_id``: FAILED if it raises, else its result stored on the
    run (what ``_finished`` reads back) and the run FINISHED."""
    try:
        result = work()
    except BaseException:
        runs.finish_run(ctx.client, run_id, "FAILED")
        raise
    ctx.client.set_tag(run_id, RESULT_TAG, json.dumps(asdict(result)))
    runs.finish_run(ctx.client, run_id)
    return result


def _finished(ctx: _Context, run_name: str) -> StageResult | None:
    """The stored result of the stage or trial run ``run_name``, if it finished."""
    found = runs.find_run(ctx.client, ctx.experiment, run_name)
    if found is None or found.info.status != "FINISHED" or RESULT_TAG not in found.data.tags:
        return None
    return StageResult(**json.loads(found.data.tags[RESULT_TAG]))


def classifier_config(cfg: FinetuneConfig, weights: Path) -> PerceiverConfig:
    """The classifier's config: the starting model's shapes with the task's labels."""
    from perceiver_core.hf import config_from_hf

    config = config_from_hf(json.loads((weights / "config.json").read_text()))
    labels = cfg.data.label_name_list()
    n = cfg.data.columns().num_labels
    if cfg.data.max_length > config.max_position_embeddings:
        raise ValueError(
            f"data.max_length ({cfg.data.max_length}) exceeds the starting model's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    return config.replace(
        num_labels=n,
        id2label=dict(enumerate(labels)),
        problem_type="regression" if n == 1 else None,
    )


def run_classify(
    ctx: _Context, stage: StageConfig, source: str, run_name: str, run_id: str
) -> StageResult:
    """Train one classify stage (or sweep trial) as Ray Train run ``run_name``."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from pipelines.tracking.models import resolve_model

    cfg, t = ctx.cfg, ctx.cfg.train
    init = resolve_model(source, tracking_uri=ctx.tracking_uri)
    run_dir = f"{ctx.run_root}/{run_name}"
    job = ClassifyJob(
        stage=stage,
        train=t,
        tracking=cfg.tracking,
        task=cfg.data.task,
        seed=cfg.run.seed,
        model_config=classifier_config(cfg, init.hf_dir),
        init_dir=str(init.hf_dir),
        init_source=source,
        run_id=run_id,
        tracking_uri=ctx.tracking_uri,
        run_dir=run_dir,
    )
    env = {**cfg.tracking.worker_env(), **_passed_env()}
    eval_split = cfg.splits.eval_split(cfg.data.task)
    trainer = TorchTrainer(
        classify_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=ctx.run_root,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env},
        ),
        datasets={
            "train": finetune_dataset(cfg.data, cfg.splits.train),
            "eval": finetune_dataset(cfg.data, eval_split),
        },
        # Every worker reads every row, in file order (see pipelines.train.finetune_data).
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    trainer.fit()
    with tempfile.TemporaryDirectory(prefix="best-") as tmp:
        folder, best = best_weights(run_dir, Path(tmp))
        weights = str(folder) if "://" not in run_dir else f"{run_dir}/best/{best['folder']}"
    return StageResult(
        stage=stage.name,
        kind="classify",
        run_name=run_name,
        run_id=run_id,
        weights=weights,
        metrics={k: float(v) for k, v in best["metrics"].items()},
        step=int(best["step"]),
        params={"lr": stage.optimizer.lr, "batch_size": stage.batch_size},
    )


def _sweep_stage(
    ctx: _Context, stage: StageConfig, source: str, run_name: str, run_id: str
) -> StageResult:
    """Every (lr, batch size) of the grid as a Ray Tune trial, in parallel; the best one wins."""
    from ray import tune

    sweep = stage.sweep
    grid = {
        "lr": tune.grid_search(sweep.lr or [stage.optimizer.lr]),
        "batch_size": tune.grid_search(sweep.batch_size or [stage.batch_size]),
    }
    metric = primary_metric(ctx.cfg.data.task, ctx.cfg.data.columns().num_labels)
    trial = tune.with_parameters(_trial, ctx=ctx, stage=stage, source=source, parent=run_id)
    tuner = tune.Tuner(
        # A trial only drives its Ray Train run, whose workers ask for their own CPUs; a trial
        # holding Tune's default whole CPU would starve them on a small cluster.
        tune.with_resources(trial, {"cpu": 0.001}),
        param_space=grid,
        tune_config=tune.TuneConfig(
            metric="score",
            mode="max" if metric.higher_is_better else "min",
            max_concurrent_trials=sweep.max_concurrent or None,
        ),
        run_config=tune.RunConfig(name=f"{run_name}-tune", storage_path=ctx.run_root),
    )
    grid_result = tuner.fit()
    failed = [r for r in grid_result if r.error is not None]
    if failed:
        raise RuntimeError(
            f"stage {stage.name}: {len(failed)} sweep trials failed: {failed[0].error}"
        )
    best = StageResult(**grid_result.get_best_result().metrics["result"])
    for trial in grid_result:
        trial_result = StageResult(**trial.metrics["result"])
        key = f"lr{trial_result.params['lr']:g}-bs{trial_result.params['batch_size']}"
        ctx.client.log_metric(run_id, f"sweep/{key}/{metric.name}", trial.metrics["score"])
    ctx.client.set_tag(run_id, "sweep.best", best.run_name)
    return replace(best, stage=stage.name, run_name=run_name, run_id=run_id)


def _trial(config: dict[str, Any], *, ctx: _Context, stage: StageConfig, source: str, parent: str):
    from ray import tune

    lr, batch = float(config["lr"]), int(config["batch_size"])
    trial_stage = replace(stage, batch_size=batch, optimizer=replace(stage.optimizer, lr=lr))
    name = f"{ctx.cfg.run.name}-{stage.name}-lr{lr:g}-bs{batch}"
    result = _finished(ctx, name)
    if result is None:
        tags = {"mlflow.parentRunId": parent, "finetune.trial": name}
        run_id, _ = runs.start_or_resume_run(ctx.client, ctx.experiment, name, tags)
        ctx.client.log_param(run_id, "lr", lr)
        ctx.client.log_param(run_id, "batch_size", batch)
        result = _recorded(
            ctx, run_id, lambda: run_classify(ctx, trial_stage, source, name, run_id)
        )
    metric = primary_metric(ctx.cfg.data.task, ctx.cfg.data.columns().num_labels)
    tune.report({"score": result.metrics[metric.name], "result": asdict(result)})


def _mlm_stage(
    ctx: _Context, stage: StageConfig, source: str, run_name: str, run_id: str
) -> StageResult:
    """Masked-LM adaptation on the task's training text: pretraining, started from ``source``."""
    from pipelines.train.adapt import adaptation_config
    from pipelines.train.pretrain import run_pretraining

    pretrain_cfg = adaptation_config(ctx.cfg, stage, source, run_name, ctx.tracking_uri)
    result = run_pretraining(pretrain_cfg)
    return StageResult(
        stage=stage.name,
        kind="mlm",
        run_name=run_name,
        run_id=run_id,
        weights=result.hf_path,
        metrics={k: float(v) for k, v in result.metrics.items() if k.startswith("val/")},
        step=result.steps,
        params={},
    )


# -- registration --------------------------------------------------------------------------------


def _register(
    ctx: _Context, init: Any, last: StageResult, digest: str, fingerprint: str
) -> tuple[registry.RegisteredModel | None, registry.PromotionDecision | None]:
    cfg = ctx.cfg
    if not cfg.register.enabled:
        return None, None
    metric = primary_metric(cfg.data.task, cfg.data.columns().num_labels)
    parent = init.registered.registry_uri if init.registered is not None else cfg.init
    lineage = registry.Lineage(
        run_id=ctx.parent_run_id,
        step=last.step,
        data_fingerprint=fingerprint,
        config_hash=digest,
        code_version=registry.code_version(),
        parent=parent,
        task=cfg.data.task,
        metrics=last.metrics,
    )
    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        weights = Path(last.weights)
        if "://" in last.weights:
            weights, _ = best_weights(last.weights.rsplit("/best/", 1)[0], Path(tmp))
        model = registry.register_with_retry(
            ctx.tracking_uri,
            weights,
            cfg.registered_model,
            lineage,
            timeout_s=cfg.tracking.close_timeout_s,
        )
    if cfg.register.promote:
        decision = registry.promote(
            ctx.client,
            model.name,
            model.version,
            metric=metric.name,
            higher_is_better=metric.higher_is_better,
        )
    else:
        registry.set_alias(ctx.client, model.name, "challenger", model.version)
        decision = None
    log.info("registered %s; %s", model.registry_uri, decision)
    return model, decision


def _passed_env() -> dict[str, str]:
    """Driver settings the workers need as well."""
    names = (
        "TORCH_EXTENSIONS_DIR",
        "PERCEIVER_CODE_VERSION",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    )
    return {name: os.environ[name] for name in names if name in os.environ}
