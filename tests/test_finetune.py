"""Fine-tuning end to end: a tiny model pretrained here, fine-tuned on the IMDB sample by real Ray
Train workers under DeepSpeed to clearly better than chance, registered in a real MLflow server
with its lineage; a rerun that trains nothing; and the errors that must come before any training.
(tests/test_model_serving.py fetches a registered classifier back every way a user can;
tests/cluster/test_pipeline.py classifies with a fine-tuned champion.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fixtures_train import REPO

from pipelines.config import load_config
from pipelines.train.finetune_config import FinetuneConfig

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

TINY_FINETUNE = REPO / "jobs" / "configs" / "finetune_imdb_tiny.yaml"


def finetune_config(shared_data: Path, storage: Path, tracking_uri: str, name: str, *overrides):
    base = [
        f"run.name={name}",
        f"run.storage_path={storage}",
        f"data.data_dir={shared_data}",
        f"tracking.tracking_uri={tracking_uri}",
        "tracking.experiment=tests-finetune",
    ]
    return load_config(FinetuneConfig, TINY_FINETUNE, [*base, *overrides])


@pytest.fixture(scope="module")
def finetuned(pretrained, shared_data, mlflow_server, tmp_path_factory):
    from pipelines.workflow.recipe import run_finetune

    storage = tmp_path_factory.mktemp("ft-runs")
    cfg = finetune_config(
        shared_data, storage, mlflow_server.uri, "imdb-tiny", f"init={pretrained}"
    )
    started = time.monotonic()
    result = run_finetune(cfg)
    return cfg, result, time.monotonic() - started


def test_imdb_accuracy_is_clearly_above_chance(finetuned, mlflow_server) -> None:
    from mlflow import MlflowClient

    _, result, elapsed = finetuned
    client = MlflowClient(mlflow_server.uri)
    stage_run = client.get_run(result.stages[0].run_id)
    history = client.get_metric_history(stage_run.info.run_id, "val/accuracy")
    per_epoch = ", ".join(f"{m.value:.3f}" for m in sorted(history, key=lambda m: m.step))
    print(f"IMDB sample: accuracy {result.score:.4f} on 2,000 test reviews in {elapsed:.0f} s")
    print(f"by epoch: {per_epoch}")
    # 2,000 balanced reviews: chance is 0.5 with a standard deviation of 0.011.
    assert result.metric == "accuracy" and result.score >= 0.55
    assert stage_run.info.status == "FINISHED"
    assert stage_run.data.tags["mlflow.parentRunId"] == result.run_id
    assert len(history) >= 2  # evaluated every epoch
    # The registered weights are the best evaluation's, which early stopping keeps.
    assert max(m.value for m in history) == pytest.approx(result.score)


def test_result_is_registered_with_lineage_signature_and_alias(
    finetuned, pretrained, mlflow_server
):
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    _, result, _ = finetuned
    assert result.registered is not None and result.registered.name == "perceiver-imdb"
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    version = client.get_model_version("perceiver-imdb", result.registered.version)
    tags = version.tags
    assert tags["lineage.parent"] == pretrained
    assert tags["lineage.task"] == "imdb"
    assert float(tags["metric.accuracy"]) == pytest.approx(result.score)
    for key in ("lineage.data_fingerprint", "lineage.config_hash", "lineage.code_version"):
        assert tags[key]
    # The first version of a model becomes the champion, and the decision is recorded.
    assert client.get_model_version_by_alias("perceiver-imdb", "champion").version == (
        version.version
    )
    assert tags["promotion.decision"] == "champion"
    assert result.promoted
    # The run the version names holds the metrics of the registered weights.
    recipe_run = client.get_run(version.run_id)
    assert recipe_run.data.metrics["val/accuracy"] == pytest.approx(result.score)
    info = get_model_info(version.source)
    assert info.signature is not None
    assert [c.name for c in info.signature.outputs.inputs] == ["label", "score"]


def test_a_rerun_skips_the_finished_stage(finetuned, shared_data, mlflow_server) -> None:
    from pipelines.workflow.recipe import run_finetune

    cfg, first, _ = finetuned
    started = time.monotonic()
    again = run_finetune(cfg)
    assert time.monotonic() - started < 60  # no training: the stage's stored result is reused
    assert again.stages == first.stages
    assert again.registered == first.registered  # registration is idempotent per run and step


def test_bad_starts_fail_before_any_training(
    pretrained, finetuned, shared_data, mlflow_server, tmp_path
) -> None:
    from pipelines.data.readers import MissingColumnError
    from pipelines.tracking.models import ModelSourceError
    from pipelines.workflow.recipe import run_finetune

    def attempt(name: str, *overrides: str) -> BaseException:
        cfg = finetune_config(shared_data, tmp_path, mlflow_server.uri, name, *overrides)
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            run_finetune(cfg)
        assert time.monotonic() - started < 30, name
        assert not (tmp_path / f"{name}-classify").exists()  # no Ray Train run was started
        return caught.value

    missing = attempt("missing", "init=models:/no-such-model/1")
    assert isinstance(missing, ModelSourceError) and "no-such-model" in str(missing)
    # A classifier where a masked-LM is expected.
    classifier = finetuned[1].registered.registry_uri
    wrong = attempt("wrong-kind", f"init={classifier}")
    assert isinstance(wrong, ModelSourceError) and "classifier" in str(wrong)
    no_label = attempt("no-label", f"init={pretrained}", "data.label_column=stars")
    assert isinstance(no_label, MissingColumnError)
    assert "stars" in str(no_label) and "train.parquet" in str(no_label)
