"""The product's stage kinds: pretrain, finetune, evaluate, promote, showcase.

Each wraps one pipeline function with typed params, inputs and outputs (see ``spec.StageKind``):

    pretrain   a PretrainConfig YAML (+ overrides), optionally from an upstream or named model
               -> the registered MLM (models:/perceiver-mlm/N), its run and validation loss
    finetune   a FinetuneConfig YAML (+ overrides), from an upstream model
               -> the registered classifier (models:/perceiver-imdb/N), the task's metric
    evaluate   a candidate classifier and the current champion on one fixed labelled set
               -> both scores, measured together
    promote    move the ``champion`` alias to the candidate if it is at least as good (and the
               MLM it came from becomes the MLM champion); else it is the ``challenger``
    showcase   load the champion from the registry and predict, and fill a masked span

A stage's training runs are named ``ctx.run_name`` and log into the stage's own MLflow child run
(the training functions find a run by name), so re-running an interrupted pipeline resumes them
from their checkpoints. YAML paths in params are relative to the driver's working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.finetune import FinetuneDataConfig
from pipelines.errors import UserError
from pipelines.workflow.spec import NoInputs, PipelineConfig, StageContext, StageKind


@dataclass(frozen=True)
class TrainParams:
    """config: the stage's YAML (relative to the working directory); overrides: ``KEY=VALUE``
    as with ``--set``. The run name, tracking URI and experiment are the pipeline's.
    init_from: pretrain only: a model to start from when no upstream stage gives one (the
    retraining pipeline names ``models:/perceiver-mlm@champion``)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None


@dataclass(frozen=True)
class ModelInput:
    init_model: str | None = None


@dataclass(frozen=True)
class PretrainOutputs:
    model_uri: str  # registry URI of the final model
    run_id: str
    val_loss: float


@dataclass(frozen=True)
class FinetuneOutputs:
    model_uri: str  # registry URI of the new version (models:/perceiver-imdb/N)
    run_id: str
    metric: str
    score: float


def _train_overrides(ctx: StageContext, params: TrainParams) -> list[str]:
    return [
        *params.overrides,
        f"run.name={ctx.run_name}",
        f"tracking.tracking_uri={ctx.tracking_uri}",
        f"tracking.experiment={ctx.experiment}",
    ]


def start_from(model: str) -> list[str]:
    """Overrides that start a pretraining config from trained weights: ``model.init`` (how fresh
    weights start, e.g. a recipe's) no longer applies."""
    return [f"model.init_from={model}", "model.init={}"]


def _quiet_ray_data() -> None:
    import ray

    # The training loops print their own progress; Ray Data's bars would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False


def pretrain(ctx: StageContext, params: TrainParams, inputs: ModelInput) -> PretrainOutputs:
    from pipelines.config import load_config
    from pipelines.train.config import PretrainConfig
    from pipelines.train.pretrain import run_pretraining

    overrides = _train_overrides(ctx, params)
    init = inputs.init_model or params.init_from
    if init:
        overrides += start_from(init)
    cfg = load_config(PretrainConfig, ctx.workdir / params.config, overrides)
    if not cfg.tracking.register:
        raise ValueError(f"stage {ctx.stage}: tracking.register must be on (later stages need it)")
    _quiet_ray_data()
    result = run_pretraining(cfg, workdir=ctx.workdir, signing_key=ctx.signing_key)
    assert result.registered_model is not None  # register is on
    return PretrainOutputs(
        model_uri=result.registered_model.registry_uri,
        run_id=result.run_id,
        val_loss=float(result.metrics.get("val/loss", float("nan"))),
    )


def finetune(ctx: StageContext, params: TrainParams, inputs: ModelInput) -> FinetuneOutputs:
    """A fine-tuning recipe, its stages nested under this stage's run."""
    from pipelines.config import load_config
    from pipelines.train.finetune_config import FinetuneConfig
    from pipelines.workflow.recipe import run_finetune

    overrides = _train_overrides(ctx, params)
    if inputs.init_model:
        overrides.append(f"init={inputs.init_model}")
    cfg = load_config(FinetuneConfig, ctx.workdir / params.config, overrides)
    if not cfg.register.enabled:
        raise ValueError(f"stage {ctx.stage}: register.enabled must be on (later stages need it)")
    _quiet_ray_data()
    result = run_finetune(
        cfg, workdir=ctx.workdir, parent_run_id=ctx.run_id, signing_key=ctx.signing_key
    )
    assert result.registered is not None
    return FinetuneOutputs(
        model_uri=result.registered.registry_uri,
        run_id=result.run_id,
        metric=result.metric,
        score=result.score,
    )


@dataclass(frozen=True)
class EvaluateParams:
    """data: the labelled set (task, files, max_length); split: which split (default: the task's
    evaluation split); max_rows: its first N rows only (0: all); alias: what to compare with."""

    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    split: str | None = None
    max_rows: int = 0
    alias: str = "champion"
    batch_size: int = 64


@dataclass(frozen=True)
class EvaluateInputs:
    model_uri: str  # the candidate: a registry version URI


@dataclass(frozen=True)
class EvaluateOutputs:
    model_uri: str
    metric: str
    higher_is_better: bool
    score: float
    champion_uri: str | None  # the version the alias named when evaluated; None if none
    champion_score: float | None
    eval_set: str  # fingerprint of the set both were measured on


def evaluate(ctx: StageContext, params: EvaluateParams, inputs: EvaluateInputs) -> EvaluateOutputs:
    from perceiver_core.task_metrics import primary_metric
    from pipelines.tracking import registry
    from pipelines.tracking.models import load_model
    from pipelines.train.finetune_config import FinetuneSplits
    from pipelines.workflow.evaluate import evaluate_classifier, load_eval_set

    name, _ = registry.parse_version_uri(inputs.model_uri)
    split = params.split or FinetuneSplits().eval_split(params.data.task)
    eval_set = load_eval_set(params.data, split, params.max_rows)
    metric = primary_metric(params.data.task, params.data.columns().num_labels)

    def score(uri: str) -> float:
        model = load_model(uri, tracking_uri=ctx.tracking_uri, expect="classifier").model
        return evaluate_classifier(model, eval_set, batch_size=params.batch_size)["primary"]

    client = ctx.mlflow_client()
    champion = registry.get_alias(client, name, params.alias)
    champion_uri = f"models:/{name}/{champion}" if champion is not None else None
    outputs = EvaluateOutputs(
        model_uri=inputs.model_uri,
        metric=metric.name,
        higher_is_better=metric.higher_is_better,
        score=score(inputs.model_uri),
        champion_uri=champion_uri,
        champion_score=score(champion_uri) if champion_uri else None,
        eval_set=eval_set.fingerprint,
    )
    client.log_metric(ctx.run_id, f"candidate/{metric.name}", outputs.score)
    if outputs.champion_score is not None:
        client.log_metric(ctx.run_id, f"champion/{metric.name}", outputs.champion_score)
    return outputs


@dataclass(frozen=True)
class PromoteParams:
    """parent_alias: also point the MLM the new champion was fine-tuned from at this alias of its
    own registered model (the retraining pipeline continues pretraining from it); "" disables."""

    parent_alias: str = "champion"


@dataclass(frozen=True)
class PromoteInputs:
    model_uri: str
    metric: str
    higher_is_better: bool
    score: float
    champion_score: float | None = None


@dataclass(frozen=True)
class PromoteOutputs:
    promoted: bool
    champion_uri: str  # models:/NAME@champion resolved to its version after the decision
    challenger_score: float
    champion_score: float | None
    previous_champion: str | None


def promote(ctx: StageContext, params: PromoteParams, inputs: PromoteInputs) -> PromoteOutputs:
    from pipelines.tracking import registry

    client = ctx.mlflow_client()
    name, version = registry.parse_version_uri(inputs.model_uri)
    decision = registry.promote(
        client,
        name,
        version,
        metric=inputs.metric,
        higher_is_better=inputs.higher_is_better,
        scores=(inputs.score, inputs.champion_score),
    )
    if decision.promoted and params.parent_alias:
        parent = client.get_model_version(name, version).tags.get("lineage.parent", "")
        if parent.startswith("models:/"):
            parent_name, parent_version = registry.parse_version_uri(parent)
            registry.set_alias(client, parent_name, params.parent_alias, parent_version)
    champion = registry.get_alias(client, name, registry.CHAMPION)
    for key, value in (("promoted", decision.promoted), ("champion", champion)):
        client.set_tag(ctx.run_id, f"promotion.{key}", str(value))
    return PromoteOutputs(
        promoted=decision.promoted,
        champion_uri=f"models:/{name}/{champion}",
        challenger_score=decision.candidate_score,
        champion_score=decision.champion_score,
        previous_champion=decision.champion_before,
    )


@dataclass(frozen=True)
class ShowcaseParams:
    """texts: classified by the champion; fill_text / fill_mask: a sentence and the substring the
    MLM champion fills in (the model card's example by default)."""

    classifier: str = "models:/perceiver-imdb@champion"
    mlm: str = "models:/perceiver-mlm@champion"
    texts: list[str] = field(default_factory=list)
    fill_text: str = "This is an incomplete sentence where some words are missing."
    fill_mask: str = " missing."


@dataclass(frozen=True)
class ShowcaseOutputs:
    predictions: list[dict[str, Any]]
    filled: str
    fill_predictions: list[str]


def showcase(ctx: StageContext, params: ShowcaseParams, inputs: NoInputs) -> ShowcaseOutputs:
    from perceiver_core.predict import classify, fill_mask, masked_spans
    from pipelines.tracking.models import load_model

    classifier = load_model(params.classifier, tracking_uri=ctx.tracking_uri, expect="classifier")
    predictions = classify(classifier.model, params.texts) if params.texts else []
    mlm = load_model(params.mlm, tracking_uri=ctx.tracking_uri, expect="mlm")
    text, spans = masked_spans(params.fill_text, substring=params.fill_mask)
    filled = fill_mask(mlm.model, text, spans)
    return ShowcaseOutputs(
        predictions=[
            {"text": t, "label": p.label, "score": p.score}
            for t, p in zip(params.texts, predictions, strict=True)
        ],
        filled=filled.text,
        fill_predictions=list(filled.predictions),
    )


class DataUnavailable(UserError, RuntimeError):
    """Neither a local copy of the data nor the Hugging Face Hub is reachable."""


SHARED_DATA = Path("../shared/data")  # the offline sample beside a checkout of this repository


def resolve_data_dir(explicit: str | None, *, timeout_s: float = 5.0) -> str | None:
    """Where the pipeline's datasets come from: ``explicit`` (``--data-dir`` / ``DATA_DIR``), else
    ``../shared/data`` when it exists, else the Hub (None) if it answers. Raises at once, rather
    than when a stage first reads, when none of them is there."""
    import urllib.request

    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.is_dir():
            raise DataUnavailable(f"DATA_DIR {explicit!r} is not a folder")
        return str(path)
    if SHARED_DATA.is_dir():
        return str(SHARED_DATA.resolve())
    # HF_ENDPOINT: huggingface_hub's own setting for a mirror or a private Hub.
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/datasets/allenai/c4", timeout=timeout_s):
            return None
    except OSError as error:
        raise DataUnavailable(
            "no local data (set DATA_DIR or --data-dir to a folder laid out like the Hub "
            f"datasets; {SHARED_DATA} does not exist here) and the Hugging Face Hub at "
            f"{endpoint} is not reachable ({error})"
        ) from error


def with_locations(
    cfg: PipelineConfig, *, data_dir: str | None = None, storage_path: str | None = None
) -> PipelineConfig:
    """The pipeline with every training and evaluation stage reading from ``data_dir`` and every
    training stage keeping its checkpoints under ``storage_path`` (None: as configured). Set
    once per job rather than in each stage's YAML: a job submitted with ``--working-dir`` runs
    in a fresh upload folder, and a resubmitted one must find the same checkpoints."""
    stages = []
    for stage in cfg.stages:
        params = copy.deepcopy(stage.params)
        extra = []
        if data_dir is not None:
            extra.append(f"data.data_dir={data_dir}")
            if stage.kind == "evaluate":
                params.setdefault("data", {})["data_dir"] = data_dir
        if storage_path is not None:
            extra.append(f"run.storage_path={storage_path}")
        if stage.kind in ("pretrain", "finetune"):
            params["overrides"] = [*params.get("overrides", []), *extra]
        stages.append(dataclasses.replace(stage, params=params))
    return dataclasses.replace(cfg, stages=stages)


KINDS: dict[str, StageKind[Any, Any, Any]] = {
    kind.name: kind
    for kind in (
        StageKind("pretrain", pretrain, TrainParams, ModelInput, PretrainOutputs),
        StageKind("finetune", finetune, TrainParams, ModelInput, FinetuneOutputs),
        StageKind("evaluate", evaluate, EvaluateParams, EvaluateInputs, EvaluateOutputs),
        StageKind("promote", promote, PromoteParams, PromoteInputs, PromoteOutputs),
        StageKind("showcase", showcase, ShowcaseParams, NoInputs, ShowcaseOutputs),
    )
}
