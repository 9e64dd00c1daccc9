"""Pretraining end to end: real Ray Train with 2 workers, real DeepSpeed ZeRO-3 on CPU (the stage
that shards weights as well; ZeRO 0-2 are trained by tests/test_train_engine.py, ZeRO 0 on two
nodes by tests/cluster/test_elastic.py), its documents, run storage and checkpoints in a bucket on
an S3-compatible server, and a real MLflow server whose artifacts are there too; then the
registered model. The run is the session's ``pretrained_run`` (tests/fixtures_train.py), which
the fine-tuning tests start from."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fixtures_train import PRETRAIN_EVAL_EVERY, PRETRAIN_STEPS, tiny_config

from perceiver_core.hf import from_pretrained
from perceiver_core.model import PerceiverForMaskedLM
from perceiver_core.tokenizer import ByteTokenizer

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

STEPS, EVAL_EVERY = PRETRAIN_STEPS, PRETRAIN_EVAL_EVERY
EVALS = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))


@pytest.fixture(scope="module")
def trained(pretrained_run):
    """(ZeRO stage, config, result, a local copy of the final checkpoint)."""
    return (3, *pretrained_run)


def test_validation_loss_falls(trained, mlflow_server) -> None:
    from mlflow import MlflowClient

    _, _, result, _ = trained
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(result.run_id, "val/loss")
    # The evaluations, and the registered version's metrics logged again with its model (at the
    # final step, the same value: mlflow keeps both points).
    val = dict(sorted((m.step, m.value) for m in history))
    assert list(val) == EVALS and len(history) == len(EVALS) + 1
    assert sorted(m.value for m in history if m.step == STEPS) == [val[STEPS]] * 2
    losses = list(val.values())
    assert losses[-1] < losses[0] < math.log(262)  # below chance, and still falling
    assert result.metrics["val/loss"] == pytest.approx(losses[-1])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # One logged value per logging step, and the throughput metrics alongside.
    loss = client.get_metric_history(result.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(5, STEPS + 1, 5))
    for key in ("perf/mfu", "perf/bytes_per_s", "perf/data_wait_fraction", "train/grad_norm"):
        assert key in run.data.metrics
    assert 0 < run.data.metrics["perf/mfu"] < 1
    # Parameters, the resolved config and the data sources with their digests.
    assert run.data.params["train.zero_stage"] == str(trained[0])
    assert run.data.tags["data.fingerprint"] == result.data_fingerprint
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert names == {"c4", "wikipedia"}


def test_checkpoint_holds_every_rank_and_the_data_position(trained) -> None:
    import json

    _, cfg, _, folder = trained
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == STEPS and state["format_version"] == 2
    # The data position is a number: the crops of every step so far.
    assert state["task"] == {"consumed": STEPS * cfg.train.crops_per_step, "step": STEPS}
    assert state["progress"]["best_step"] in EVALS and state["progress"]["evals"] == len(EVALS)
    ranks = ["rank_00000.json", "rank_00001.json"]
    assert sorted(p.name for p in (folder / "rng").iterdir()) == ranks
    shards = list((folder / "engine" / f"step_{STEPS:08d}").glob("zero_pp_rank_*"))
    assert len({p.name.split("_")[3] for p in shards}) == 2  # both ranks' ZeRO shards
    # Every file is signed by the rank that wrote it, the signatures of all ranks beside them.
    assert sorted(p.name for p in (folder / "integrity").iterdir()) == ranks
    signed = set()
    for manifest in (folder / "integrity").iterdir():
        signed |= set(json.loads(manifest.read_text()))
    written = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert signed == {p for p in written if not p.startswith("integrity/")}


def test_registered_model_gives_the_trained_logits(trained, mlflow_server, tmp_path) -> None:
    import mlflow
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, cfg, result, folder = trained
    assert result.registered_model is not None
    # The trained weights, read from the DeepSpeed checkpoint by DeepSpeed's own converter.
    trained_state = get_fp32_state_dict_from_zero_checkpoint(
        str(folder / "engine"), tag=f"step_{STEPS:08d}"
    )
    reference = PerceiverForMaskedLM(cfg.model.perceiver_config()).eval()
    reference.load_state_dict(trained_state)

    text = ["The capital of France is Paris.", "Whole words are masked at random."]
    # transformers' MLM decodes every position the model has, so the input fills them all.
    length = cfg.model.perceiver_config().max_position_embeddings
    ids = torch.as_tensor(
        ByteTokenizer().encode(text, padding="max_length", max_length=length)["input_ids"]
    )
    with torch.no_grad():
        expected = reference(ids, decode="all").logits

    mlflow.set_tracking_uri(mlflow_server.uri)
    uri = result.registered_model.registry_uri
    pipeline = mlflow.transformers.load_model(uri)
    assert type(pipeline).__name__ == "FillMaskPipeline"
    with torch.no_grad():
        hf_logits = pipeline.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(hf_logits, expected, atol=1e-4, rtol=1e-4)

    local = Path(mlflow.artifacts.download_artifacts(f"{uri}", dst_path=str(tmp_path)))
    model_dir = next(p.parent for p in local.rglob("config.json"))
    ours = from_pretrained(PerceiverForMaskedLM, model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, decode="all").logits, expected, atol=1e-5, rtol=1e-5)

    tags = (
        mlflow.MlflowClient(mlflow_server.uri)
        .get_model_version(result.registered_model.name, result.registered_model.version)
        .tags
    )
    assert tags["lineage.run_id"] == result.run_id
    assert tags["lineage.step"] == str(STEPS)
    assert tags["lineage.data_fingerprint"] == result.data_fingerprint
    assert tags["lineage.config_hash"] == result.config_hash
    assert tags["lineage.code_version"]
    # The same lineage as a classifier's: the task, and the evaluation of the registered weights.
    assert tags["lineage.task"] == "mlm"
    for name in ("loss", "accuracy", "bits_per_byte"):
        assert float(tags[f"metric.{name}"]) == pytest.approx(result.metrics[f"val/{name}"])


def test_a_stream_too_short_for_the_run_fails_on_the_driver(
    shared_data, tiny_data_index, tmp_path
) -> None:
    from pipelines.config import ConfigError
    from pipelines.data.index import DataIndex
    from pipelines.train.pretrain import check_data

    cfg = tiny_config(
        shared_data,
        tmp_path,
        "http://unused",
        "short",
        ["data.mixture.stopping_strategy=all_exhausted", "data.mixture.max_crops=null"],
    )
    index = DataIndex.from_json(tiny_data_index.read_text())
    with pytest.raises(
        ConfigError, match=r"data: the training stream has .* crops and the run needs"
    ):
        check_data(
            tiny_config(shared_data, tmp_path, "http://unused", "short", ["train.steps=100000"]),
            index,
        )
    assert check_data(cfg, index) == 256  # eval.crops, the held-out split being larger


def test_a_rank_waiting_for_its_crops_says_so(ray_session, caplog) -> None:
    """A stream that makes no progress (its read tasks find no free CPU) is reported while the
    rank waits, not only when Ray Data gives up half an hour later."""
    import logging
    import time

    from pipelines.train.mlm import wait_for

    @ray_session.remote(num_cpus=0)
    def late() -> str:
        time.sleep(1.2)
        return "rows"

    with caplog.at_level(logging.WARNING, logger="pipelines.train.mlm"):
        assert wait_for(late.remote(), "run: crops 0..4 (step 1)", report_every_s=0.5) == "rows"
    said = [r.getMessage() for r in caplog.records if r.name == "pipelines.train.mlm"]
    assert said[:2] == [
        f"run: crops 0..4 (step 1): waited {s} s for the stream; its read tasks need a CPU the "
        "workers leave free (train.cpus_per_worker) or a cluster that can add one"
        for s in ("0.5", "1")
    ], said
