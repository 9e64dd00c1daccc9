"""Fine-tuning recipes: MLM adaptation on the task's text -> a frozen-encoder stage -> full
fine-tuning, each from the previous stage's best weights (under DDP), with early stopping in the
frozen stage; a learning-rate grid run as parallel trials (stages of the recipe's pipeline),
keeping the best. Short stages on the first 1,024 training and 512 test reviews of the IMDB sample
(``small_imdb_dir``): these check the plumbing, not accuracy (tests/test_finetune.py checks that on
the whole sample)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_train import TRAIN_REVIEWS
from test_finetune import finetune_config

from perceiver_core.hf import load_state_dict

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


@pytest.fixture(scope="module")
def small_imdb(small_imdb_dir: Path) -> list[str]:
    return [f"data.path={small_imdb_dir}", "data.files={split}.parquet"]


def _encoder(folder: str) -> dict[str, torch.Tensor]:
    weights = load_state_dict(Path(folder))
    return {k: v for k, v in weights.items() if "decoder" not in k}


@pytest.fixture(scope="module")
def recipe(pretrained, small_imdb, shared_data, mlflow_server, tmp_path_factory):
    """Masked-LM adaptation -> frozen-encoder probe -> full fine-tuning, under ``train.strategy:
    ddp`` (torch DistributedDataParallel over Ray Train's gloo group, 2 workers); DeepSpeed runs
    the other fine-tuning tests. The probe's learning rate is too small to change anything, so its
    score never improves after its first evaluation: patience 1 stops it after the second of three
    epochs (one run checks both the chain and early stopping)."""
    from pipelines.workflow.recipe import run_finetune

    cfg = finetune_config(
        shared_data,
        tmp_path_factory.mktemp("recipe"),
        mlflow_server.uri,
        "recipe",
        f"init={pretrained}",
        *small_imdb,
        "data.max_length=128",
        "register.enabled=false",
        "train.strategy=ddp",
        "train.zero_stage=0",
        "stages=["
        "{name: adapt, kind: mlm, steps: 20, batch_size: 16, crop_len: 128},"
        "{name: probe, kind: classify, freeze_encoder: true, epochs: 3, batch_size: 32,"
        " patience: 1, optimizer: {name: adamw, lr: 1.0e-9, warmup_steps: 0}},"
        "{name: full, kind: classify, epochs: 1, batch_size: 32,"
        " optimizer: {name: adamw, lr: 0.0003, warmup_steps: 10}}]",
    )
    return run_finetune(cfg)


def test_stages_chain_from_each_previous_best(recipe, pretrained, mlflow_server):
    from mlflow import MlflowClient

    result = recipe
    adapt, probe, full = result.stages
    assert [s.kind for s in result.stages] == ["mlm", "classify", "classify"]
    assert (
        full.step == TRAIN_REVIEWS // 32
    )  # one epoch of whole global batches: its only evaluation
    assert result.registered is None
    client = MlflowClient(mlflow_server.uri)
    # Each stage's run records what it started from: the previous stage's weights.
    starts = [client.get_run(s.run_id).data.tags["finetune.init"] for s in result.stages]
    assert starts == [pretrained, adapt.weights, probe.weights]
    for stage in result.stages:
        run = client.get_run(stage.run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.info.status == "FINISHED"
    # The adaptation changed the encoder; the frozen stage kept it exactly; full fine-tuning moved it.
    from pipelines.tracking.models import resolve_model

    start = _encoder(str(resolve_model(pretrained, tracking_uri=mlflow_server.uri).hf_dir))
    adapted, probed, tuned = (_encoder(s.weights) for s in result.stages)
    key = "perceiver.encoder.cross_attention.attention.self.query.weight"
    assert not torch.equal(start[key], adapted[key])
    for name, value in adapted.items():
        if name.startswith("perceiver."):
            assert torch.equal(value, probed[name]), name
    assert not torch.equal(probed[key], tuned[key])
    assert full.metrics["accuracy"] == result.score


def test_early_stopping_keeps_the_best_evaluation(recipe, mlflow_server) -> None:
    """The probe stopped after its second epoch of three, and the next stage started from its
    first evaluation's weights."""
    from mlflow import MlflowClient

    probe = recipe.stages[1]
    per_epoch = TRAIN_REVIEWS // 32
    assert probe.step == per_epoch  # the best (first) evaluation's weights
    client = MlflowClient(mlflow_server.uri)
    evals = client.get_metric_history(probe.run_id, "val/accuracy")
    assert sorted(m.step for m in evals) == [per_epoch, 2 * per_epoch]  # no third epoch


def test_sweep_runs_the_grid_as_parallel_trials_and_keeps_the_best(
    pretrained, small_imdb, shared_data, mlflow_server, tmp_path
) -> None:
    from mlflow import MlflowClient

    from pipelines.workflow.recipe import run_finetune

    cfg = finetune_config(
        shared_data,
        tmp_path,
        mlflow_server.uri,
        "sweep",
        f"init={pretrained}",
        *small_imdb,
        "data.max_length=128",
        "register.enabled=false",
        "train.num_workers=1",
        "stages.0.epochs=1",
        "stages.0.sweep.lr=[0.001,0.0001]",
        "stages.0.sweep.batch_size=[32]",
    )
    result = run_finetune(cfg)
    client = MlflowClient(mlflow_server.uri)
    stage_run = client.get_run(result.stages[0].run_id)
    scores = {
        key: value
        for key, value in stage_run.data.metrics.items()
        if key.startswith("sweep/") and key.endswith("/accuracy")
    }
    assert set(scores) == {"sweep/lr0.001-bs32/accuracy", "sweep/lr0.0001-bs32/accuracy"}
    assert result.score == max(scores.values())
    names = ["sweep-classify-lr0p001-bs32", "sweep-classify-lr0p0001-bs32"]
    assert stage_run.data.tags["sweep.best"] in names
    trials = client.search_runs(
        [stage_run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.run_id}'",
    )
    trials = [t for t in trials if t.info.run_name in names]
    assert sorted(t.info.run_name for t in trials) == sorted(names)
    # Parallel trials: each started before the other ended.
    (a, b) = sorted(trials, key=lambda t: t.info.start_time)
    assert b.info.start_time < a.info.end_time
