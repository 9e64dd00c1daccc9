"""Fine-tuning pieces without Ray: compact rows, the per-epoch order and each rank's share, the
recipe config's checks, and the classifier config built from a starting model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.data.rows import LabelledRows
from pipelines.train.classify import epoch_order, eval_batches, micro_slice, steps_per_epoch
from pipelines.train.finetune_config import FinetuneConfig


def _rows(lengths: list[int], width: int = 12) -> LabelledRows:
    ids = np.zeros((len(lengths), width), dtype=np.uint16)
    mask = np.zeros((len(lengths), width), dtype=np.uint8)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.arange(1, n + 1) + 10 * i
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "label": np.arange(len(lengths)) % 2}
    half = len(lengths) // 2
    return LabelledRows.from_batches(
        [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]
    )


def test_rows_drop_padding_and_pad_batches_to_their_longest_row() -> None:
    rows = _rows([3, 5, 1, 4])
    assert len(rows) == 4
    assert rows.ids.size == 13  # no padding kept
    batch = rows.batch(np.array([2, 0]))
    assert batch["input_ids"].shape == (2, 3)
    assert batch["input_ids"].tolist() == [[21, 0, 0], [1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 0]
    assert rows.real_bytes(np.array([1, 3])) == 9


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    a = epoch_order(100, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=0))


@pytest.mark.parametrize(("world_size", "accum"), [(1, 1), (2, 1), (4, 1), (1, 4), (2, 2)])
def test_ranks_split_each_global_batch_whatever_the_world_size(world_size, accum) -> None:
    order = epoch_order(70, seed=0, epoch=0)
    batch = 8
    size = batch // (world_size * accum)  # rows per micro-batch and worker
    assert steps_per_epoch(70, batch) == 8  # 6 rows wait for the next epoch
    for step in range(steps_per_epoch(70, batch)):
        global_batch = order[step * batch : (step + 1) * batch]
        parts = [
            micro_slice(global_batch, micro, size, rank, world_size)
            for micro in range(accum)
            for rank in range(world_size)
        ]
        # The global batch is the same 8 rows for any number of workers and micro-batches.
        assert sorted(np.concatenate(parts).tolist()) == sorted(global_batch.tolist())


@pytest.mark.parametrize(("n", "world_size"), [(10, 1), (10, 3), (2, 4), (17, 2)])
def test_eval_batches_cover_every_row_once_with_equal_counts(n: int, world_size: int) -> None:
    per_rank = [list(eval_batches(n, 3, r, world_size)) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # the same number of forward passes everywhere
    seen = np.concatenate([np.concatenate(b) for b in per_rank if b])
    assert sorted(seen.tolist()) == list(range(n))


def test_recipe_config_errors_name_the_key(tmp_path) -> None:
    def load(*overrides: str) -> FinetuneConfig:
        return load_config(FinetuneConfig, None, list(overrides))

    assert load().registered_model == "perceiver-imdb"
    assert load("data.task=glue/sst2").registered_model == "perceiver-sst2"
    assert load("data.task=glue/mnli").splits.eval_split("glue/mnli") == "validation_matched"
    with pytest.raises(ConfigError, match=r"stages.0.batch_size: a batch of 5 does not split"):
        load("train.num_workers=2", "stages.0.batch_size=5")
    with pytest.raises(ConfigError, match="last stage must be a classify stage"):
        load("stages.0.kind=mlm")
    with pytest.raises(ConfigError, match="zero_stage must be 0 with strategy ddp"):
        load("train.strategy=ddp", "train.zero_stage=2")
    with pytest.raises(ConfigError, match=r"stages\.0\.optimizer\.name: lamb needs whole"):
        load("train.zero_stage=2", "stages.0.optimizer.name=lamb")
    with pytest.raises(ConfigError, match=r"stages\.0\.optimizer\.lrr: unknown key"):
        load("stages.0.optimizer.lrr=1")
    with pytest.raises(ConfigError, match="sweep, freeze_encoder and head_init apply to classify"):
        load("stages.0.kind=mlm", "stages.0.freeze_encoder=true")
    with pytest.raises(ConfigError, match=r"stages\.0\.head_init: expected one of"):
        load("stages.0.head_init=zeros")


def test_classifier_config_takes_shapes_from_the_start_and_labels_from_the_task(tmp_path) -> None:
    from perceiver_core.config import get_preset
    from perceiver_core.hf import save_pretrained
    from perceiver_core.model import PerceiverForMaskedLM
    from pipelines.train.finetune import classifier_config

    torch.manual_seed(0)
    folder = save_pretrained(PerceiverForMaskedLM(get_preset("tiny")), tmp_path / "mlm")
    cfg = load_config(FinetuneConfig, None, ["data.max_length=128"])
    config = classifier_config(cfg, folder)
    assert config.d_latents == get_preset("tiny").d_latents
    assert config.label_names() == ["neg", "pos"]
    stsb = classifier_config(
        load_config(FinetuneConfig, None, ["data.task=glue/stsb", "data.max_length=64"]), folder
    )
    assert (stsb.num_labels, stsb.problem_type) == (1, "regression")
    with pytest.raises(ConfigError, match="exceeds the starting model's max_position_embeddings"):
        classifier_config(load_config(FinetuneConfig, None, ["data.max_length=512"]), folder)


def test_evaluation_scores_what_classify_answers_reading_long_texts_in_windows(tmp_path) -> None:
    """The evaluate stage scores a model as users' ``classify`` answers: a ``long_text: windows``
    model on every window of each text the set holds, a ``truncate`` one on its beginning."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from perceiver_core.config import get_preset
    from perceiver_core.model import PerceiverForSequenceClassification
    from perceiver_core.predict import classify
    from pipelines.data.finetune import FinetuneDataConfig
    from pipelines.workflow.evaluate import evaluate_classifier, load_eval_set

    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh é"), size=n)) for n in rng.integers(5, 150, 40)]
    labels = rng.integers(0, 2, size=40)
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "set.parquet")
    data = FinetuneDataConfig(task="files", path=str(tmp_path / "set.parquet"), max_length=512)
    eval_set = load_eval_set(data, "train")
    torch.manual_seed(0)
    config = get_preset("tiny", num_labels=2, max_position_embeddings=32, initializer_range=0.5)
    weights = PerceiverForSequenceClassification(config).state_dict()
    answers = {}
    for mode in ("truncate", "windows"):
        model = PerceiverForSequenceClassification(config.replace(long_text=mode))
        model.load_state_dict(weights)
        answers[mode] = [int(p.label[-1]) for p in classify(model, texts)]  # LABEL_0, LABEL_1
        accuracy = float(np.mean(np.array(answers[mode]) == labels))
        assert evaluate_classifier(model, eval_set)["accuracy"] == pytest.approx(accuracy)
    assert answers["truncate"] != answers["windows"]  # the windows were read
