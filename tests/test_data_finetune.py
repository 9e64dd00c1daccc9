"""Fine-tuning datasets on real Ray Data: IMDB and GLUE from the mirror, pairs, custom files."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_fixtures import collect_ds, write_jsonl, write_parquet

from perceiver_core.tokenizer import ByteTokenizer
from pipelines.data import GLUE_TASKS, FinetuneDataConfig, finetune_dataset
from pipelines.data.finetune import finetune_files, split_fingerprint
from pipelines.data.rows import LabelledRows
from pipelines.train.classify import epoch_rows

pytestmark = pytest.mark.usefixtures("ray_session")


def test_imdb_from_the_hub_layout_mirror(shared_data):
    cfg = FinetuneDataConfig(task="imdb", data_dir=str(shared_data), max_length=512)
    assert [f.relpath for f in finetune_files(cfg, "test")] == ["test.parquet"]
    rows = collect_ds(finetune_dataset(cfg, "test"))
    table = pq.read_table(shared_data / "imdb/test.parquet")
    assert rows["input_ids"].shape == (2000, 512) and rows["input_ids"].dtype == np.uint16
    assert rows["attention_mask"].dtype == np.uint8 and rows["label"].dtype == np.int64
    np.testing.assert_array_equal(rows["label"], table.column("label").to_numpy())
    want = ByteTokenizer()(
        table.column("text").to_pylist()[:50],
        padding="max_length",
        truncation=True,
        max_length=512,
    )
    np.testing.assert_array_equal(rows["input_ids"][:50], want["input_ids"])
    np.testing.assert_array_equal(rows["attention_mask"][:50], want["attention_mask"])


def test_glue_single_sentence_task(shared_data):
    cfg = FinetuneDataConfig(task="glue/sst2", data_dir=str(shared_data), max_length=128)
    assert cfg.columns() == GLUE_TASKS["sst2"]
    rows = collect_ds(finetune_dataset(cfg, "validation"))
    assert rows["input_ids"].shape == (872, 128)
    assert set(rows["label"].tolist()) == {0, 1}
    assert (rows["input_ids"][:, 0] == 4).all()  # [CLS]


def test_pairs_are_joined_and_truncated_like_hf(tmp_path):
    from transformers import PerceiverTokenizer

    first = ["The cat sat.", "A much longer first sentence " * 5, "naïve café"]
    second = ["It was tired.", "short", "über [SEP] literal"]
    write_parquet(
        tmp_path / "mrpc" / "train.parquet",
        {"sentence1": first, "sentence2": second, "label": [1, 0, 1]},
    )
    cfg = FinetuneDataConfig(
        task="glue/mrpc", path=str(tmp_path), files="{config}/{split}.parquet", max_length=40
    )
    rows = collect_ds(finetune_dataset(cfg, "train"))
    hf = PerceiverTokenizer()(first, second, padding="max_length", truncation=True, max_length=40)
    np.testing.assert_array_equal(rows["input_ids"], np.array(hf["input_ids"]))
    np.testing.assert_array_equal(rows["attention_mask"], np.array(hf["attention_mask"]))


def test_regression_labels_and_custom_json_columns(tmp_path):
    write_jsonl(
        tmp_path / "data" / "train-0.jsonl.gz",
        [
            {"review": "good", "other": "x", "score": 4.5},
            {"review": None, "other": "y", "score": 1.0},
        ],
    )
    cfg = FinetuneDataConfig(
        task="files",
        path=str(tmp_path / "data" / "*.jsonl.gz"),
        text_column="review",
        text_pair_column="other",
        label_column="score",
        num_labels=1,
        max_length=16,
    )
    rows = collect_ds(finetune_dataset(cfg, "train"))
    assert rows["label"].dtype == np.float32 and rows["label"].tolist() == [4.5, 1.0]
    # A null text is an empty string: [CLS] [SEP] y [SEP]
    assert rows["input_ids"][1, :4].tolist() == [4, 5, ord("y") + 6, 5]


def test_training_windows_are_the_pieces_inference_reads(tmp_path):
    # Texts of 0, 3, 6, 7 and 20 bytes, windows of 3 bytes (max_length 5), at most 3 per text:
    # the consecutive pieces long_text: windows classifies, each with its text's label.
    texts = ["", "abc", "abcdef", "abcdefg", "é" * 10]
    write_jsonl(
        tmp_path / "train.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    )
    cfg = FinetuneDataConfig(task="files", path=str(tmp_path / "*.jsonl"), max_length=5)
    rows = collect_ds(finetune_dataset(cfg, "train", windows=3))
    pieces, labels, owners = [], [], []
    for i, text in enumerate(texts):
        data = text.encode()
        for start in range(0, max(len(data), 1), 3)[:3]:
            pieces.append(data[start : start + 3])
            labels.append(i % 2)
            owners.append(i)
    want = ByteTokenizer()(pieces, padding="max_length", max_length=5)
    np.testing.assert_array_equal(rows["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(rows["attention_mask"], want["attention_mask"])
    assert rows["label"].tolist() == labels
    assert rows["window"].tolist() == [0, 0, 0, 1, 0, 1, 2, 0, 1, 2]
    assert len(collect_ds(finetune_dataset(cfg, "train"))["label"]) == len(texts)

    # train_window_draw: random: each epoch trains on one window of every text, a different one
    # from epoch to epoch, the same for a given (seed, epoch).
    compact = LabelledRows.from_batches([rows])
    drawn = [epoch_rows(compact, seed=0, epoch=e, draw="random") for e in range(20)]
    for picks in drawn:
        assert sorted(owners[r] for r in picks) == list(range(len(texts)))
    assert {int(r) for picks in drawn for r in picks} == set(range(len(pieces)))
    np.testing.assert_array_equal(drawn[3], epoch_rows(compact, seed=0, epoch=3, draw="random"))
    assert sorted(epoch_rows(compact, 0, 0, "all").tolist()) == list(range(len(pieces)))


def test_a_splits_fingerprint_follows_its_files_and_columns(tmp_path):
    """The lineage of a classifier: the same files and columns give the same digest, a changed
    file or another column another one."""
    path = write_parquet(
        tmp_path / "a.parquet", {"text": ["a", "b"], "other": ["c", "d"], "label": [0, 1]}
    )
    cfg = FinetuneDataConfig(task="files", path=str(path))
    first = split_fingerprint(cfg, "train")
    assert split_fingerprint(FinetuneDataConfig(task="files", path=str(path)), "train") == first
    other_column = FinetuneDataConfig(task="files", path=str(path), text_column="other")
    assert split_fingerprint(other_column, "train") != first
    write_parquet(path, {"text": ["a", "b", "e"], "other": ["c", "d", "f"], "label": [0, 1, 1]})
    assert split_fingerprint(cfg, "train") != first


def test_missing_label_column_fails_naming_file_and_column(tmp_path):
    path = write_parquet(tmp_path / "unlabelled.parquet", {"text": ["a", "b"]})
    cfg = FinetuneDataConfig(task="files", path=str(path))
    with pytest.raises(Exception, match=f"{path} has no column 'label'"):
        finetune_dataset(cfg, "train").take_all()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="task must be"):
        FinetuneDataConfig(task="glue/nope")
    with pytest.raises(ValueError, match="path must be set"):
        FinetuneDataConfig(task="files")
    with pytest.raises(ValueError, match="max_length"):
        FinetuneDataConfig(max_length=2)
    with pytest.raises(ValueError, match="train_windows must be"):
        FinetuneDataConfig(train_windows=0)
    with pytest.raises(ValueError, match="train_windows applies to single-text tasks"):
        FinetuneDataConfig(task="glue/mrpc", train_windows=2)
