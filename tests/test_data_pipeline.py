"""The pretraining stream on real Ray Data: crops, mixture, determinism, resume, split, counters."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    assert_same_rows,
    collect,
    collect_ds,
    generated_config,
    original_ids,
    random_docs,
    shared_config,
    write_jsonl,
    write_parquet,
)

from perceiver_core.masking import IGNORE_INDEX
from perceiver_core.packing import PackingConfig
from perceiver_core.tokenizer import BYTE_OFFSET, MASK
from pipelines.data import (
    CropCounters,
    MixtureConfig,
    PretrainDataConfig,
    SourceConfig,
    SplitConfig,
    build_index,
    crops_to_torch,
    local_crops,
    plan_stream,
    pretraining_dataset,
)

pytestmark = pytest.mark.usefixtures("ray_session")

_WS = {ord(c) + BYTE_OFFSET for c in " \t\n\r\v\f"}


def source_documents(shared_data):
    """(source, file) -> (document bytes by row, end row of each row's unit) from the raw files."""
    with gzip.open(shared_data / "c4/en/c4-train.00000-of-00001.json.gz", "rt") as f:
        c4 = [json.loads(line)["text"].encode() for line in f]
    docs = {(0, 0): (c4, np.full(len(c4), len(c4)))}
    for i in range(2):
        pf = pq.ParquetFile(shared_data / f"wikipedia/20150501.en/train-0000{i}-of-00002.parquet")
        texts = [t.encode() for t in pf.read(columns=["text"]).column("text").to_pylist()]
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        docs[(1, i)] = (texts, np.repeat(np.cumsum(sizes), sizes))
    return docs


def test_crops_round_trip_to_source_bytes_in_groups_of_ten(shared_data):
    cfg = shared_config(
        shared_data,
        split=SplitConfig(validation_fraction=0.0),
        mixture=MixtureConfig(max_crops=1500),
        task_crops=400,
    )
    index = build_index(cfg)
    rows = collect_ds(pretraining_dataset(cfg, index))
    assert rows["input_ids"].shape == (1500, 2048) and rows["input_ids"].dtype == np.uint16
    assert rows["labels"].dtype == np.int16 and rows["length"].dtype == np.uint16
    np.testing.assert_array_equal(rows["position"], np.arange(1500))
    docs = source_documents(shared_data)
    ids = original_ids(rows)
    for i in range(len(ids)):
        texts, unit_end = docs[(int(rows["source"][i]), int(rows["file"][i]))]
        row, crop, n = int(rows["row"][i]), int(rows["crop"][i]), int(rows["length"][i])
        group = b"".join(texts[row : min(row + 10, unit_end[row])])  # groups stay in their unit
        want = group[crop * 2048 : crop * 2048 + 2048]
        assert (ids[i, :n] - BYTE_OFFSET).astype(np.uint8).tobytes() == want, f"crop {i}"
        assert not ids[i, n:].any() and (rows["labels"][i, n:] == IGNORE_INDEX).all()
    assert {int(s) for s in rows["source"]} == {0, 1}
    first_pass = rows["epoch"] == 0
    assert len(np.unique(rows["sample_id"][first_pass])) == first_pass.sum()  # one mask key each


def test_documents_on_s3_give_the_same_stream_as_local_files(shared_data, s3_data):
    # The sample data in a bucket on an S3-compatible server on 127.0.0.1, read through
    # data_dir=s3://... by Ray Data's workers: the same files, units and crops as from disk.
    local, remote = (
        shared_config(d, mixture=MixtureConfig(max_crops=300), task_crops=100)
        for d in (shared_data, s3_data)
    )
    local_index, remote_index = build_index(local), build_index(remote)
    assert [[f.relpath for f in s.files] for s in remote_index.sources] == [
        [f.relpath for f in s.files] for s in local_index.sources
    ]
    assert remote_index.sources[0].files[0].url.startswith(f"{s3_data}/c4/en/")
    got = collect_ds(pretraining_dataset(remote, remote_index))
    want = collect_ds(pretraining_dataset(local, local_index))
    for key in ("sample_id", "input_ids", "labels", "length"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _word_mask_stats(rows):
    """Fraction of whitespace-delimited words with a target, and of target words shown as MASK."""
    ids, labels = original_ids(rows), rows["labels"]
    words = masked = mask_shown = 0
    for r in range(len(ids)):
        n = int(rows["length"][r])
        is_word = ~np.isin(ids[r, :n], list(_WS))
        starts = np.flatnonzero(is_word & ~np.r_[False, is_word[:-1]])
        ends = np.flatnonzero(is_word & ~np.r_[is_word[1:], False]) + 1
        for a, b in zip(starts[1:-1], ends[1:-1], strict=True):  # skip words cut by crop edges
            words += 1
            if (labels[r, a:b] != IGNORE_INDEX).any():
                masked += 1
                mask_shown += bool((rows["input_ids"][r, a:b] == MASK).all())
    return masked / words, mask_shown / masked


def test_masks_about_15_percent_of_words_reproducibly(shared_data):
    cfg = shared_config(shared_data, mixture=MixtureConfig(max_crops=600))
    index = build_index(cfg)
    rows = collect_ds(pretraining_dataset(cfg, index))
    word_fraction, shown_as_mask = _word_mask_stats(rows)
    assert 0.13 < word_fraction < 0.17
    assert 0.75 < shown_as_mask < 0.85  # 80/10/10 replacement
    np.testing.assert_array_equal(
        rows["masked"], (rows["labels"] != IGNORE_INDEX).sum(axis=1).astype(np.uint16)
    )
    again = collect(local_crops(cfg, index))  # no Ray, one task: the same masks
    assert_same_rows(rows, again)


def test_mixture_keeps_byte_shares_in_every_window_of_1000(shared_data):
    cfg = shared_config(shared_data)  # all_exhausted: C4 (short) repeats until Wikipedia ends
    index = build_index(cfg)
    stream = plan_stream(cfg, index)
    ds = pretraining_dataset(cfg, index).select_columns(["source", "length", "epoch"])
    rows = collect_ds(ds)
    assert len(rows["source"]) == stream.length
    tokens = rows["length"].astype(np.int64)
    c4 = np.cumsum(np.r_[0, np.where(rows["source"] == 0, tokens, 0)])
    total = np.cumsum(np.r_[0, tokens])
    share = (c4[1000:] - c4[:-1000]) / (total[1000:] - total[:-1000])
    assert np.abs(share - 0.7).max() < 0.03
    counts = index.counters()["sources"]
    wiki = rows["source"] == 1
    assert wiki.sum() == counts["wikipedia"]["crops"]  # Wikipedia read exactly once
    assert (rows["epoch"][wiki] == 0).all() and rows["epoch"][~wiki].max() >= 2  # C4 cycled


def test_same_crops_whatever_the_number_of_tasks(tmp_path):
    import ray.data

    one_task = generated_config(tmp_path, task_crops=10**9, block_crops=64)
    many = generated_config(tmp_path, task_crops=16, block_crops=100)
    index = build_index(one_task)
    assert len(plan_stream(one_task, index).tasks) == 1
    assert len(plan_stream(many, index).tasks) > 8
    reference_ds = pretraining_dataset(one_task, index)
    # Order is kept by the dataset's own context (Ray often keeps it anyway on small runs, so
    # the comparisons below alone would not notice if it were lost).
    assert reference_ds.context.execution_options.preserve_order
    reference = collect_ds(reference_ds)
    serial = pretraining_dataset(many, index)
    serial.context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=1)
    assert_same_rows(reference, collect_ds(serial))
    assert_same_rows(reference, collect_ds(pretraining_dataset(many, index)))
    assert_same_rows(reference, collect(local_crops(many, index)))


def test_resume_at_k_gives_exactly_the_remaining_crops(tmp_path):
    cfg = generated_config(tmp_path, task_crops=48)
    index = build_index(cfg)
    full = collect_ds(pretraining_dataset(cfg, index))
    n = len(full["position"])
    for k in [1, 137, n // 2 + 5, n - 1]:
        resumed = collect_ds(pretraining_dataset(cfg, index, start=k))
        assert_same_rows({key: v[k:] for key, v in full.items()}, resumed)
    # Source b is short and repeats: a crop seen again in a later pass gets a new mask.
    again = (full["source"] == 1) & (full["epoch"] == 1)
    first = (full["source"] == 1) & (full["epoch"] == 0)
    key = {
        (f, r, c): i
        for i, (f, r, c) in enumerate(zip(full["file"], full["row"], full["crop"], strict=True))
        if first[i]
    }
    pairs = [
        (key[(f, r, c)], i)
        for i, (f, r, c) in enumerate(zip(full["file"], full["row"], full["crop"], strict=True))
        if again[i]
    ]
    assert len(pairs) > 10
    ids = original_ids(full)
    for i, j in pairs:
        np.testing.assert_array_equal(ids[i], ids[j])
    assert sum((full["labels"][i] != full["labels"][j]).any() for i, j in pairs) == len(pairs)
    empty = pretraining_dataset(cfg, index, start=n).take_all()
    assert empty == []
    with pytest.raises(ValueError, match="outside the stream"):
        pretraining_dataset(cfg, index, start=n + 1)


def test_validation_split_is_disjoint_and_follows_the_text(tmp_path):
    docs = random_docs(5, 300, mean_words=30)
    docs[250:] = docs[:50]  # exact duplicates must land on the same side
    write_parquet(tmp_path / "d.parquet", {"text": docs}, row_group_size=64)
    cfg = PretrainDataConfig(
        sources=[SourceConfig(name="d", path=str(tmp_path / "d.parquet"))],
        packing=PackingConfig(group_size=1),  # one document per group: row = document
        split=SplitConfig(validation_fraction=0.25, seed=7),
        mixture=MixtureConfig(stopping_strategy="first_exhausted"),
    )
    index = build_index(cfg)
    rows = {
        split: set(collect_ds(pretraining_dataset(cfg, index, split=split))["row"].tolist())
        for split in ("train", "validation")
    }
    assert not rows["train"] & rows["validation"]
    assert rows["train"] | rows["validation"] == set(range(300))
    assert 0.18 < len(rows["validation"]) / 300 < 0.32
    assert all((i in rows["validation"]) == (i + 250 in rows["validation"]) for i in range(50))
    counters = index.counters("validation")
    assert counters["docs"] == len(rows["validation"]) and counters["held_out_docs"] == len(
        rows["train"]
    )


def test_counters_for_logging(shared_data):
    stubs = SourceConfig(name="stubs", path=str(shared_data / "edge/wikipedia-stubs.parquet"))
    cfg = PretrainDataConfig(
        sources=[stubs], mixture=MixtureConfig(stopping_strategy="first_exhausted")
    )
    index = build_index(cfg)
    counters = index.counters()
    assert (
        counters["empty"] > 0 and counters["skipped_docs"] == counters["null"] + counters["empty"]
    )
    assert counters["rows"] == 1530 and counters["docs"] + counters["held_out_docs"] == (
        1530 - counters["skipped_docs"]
    )
    crop_counters = CropCounters(2048, ("stubs",))
    for batch in pretraining_dataset(cfg, index).iter_batches(batch_size=100, batch_format="numpy"):
        crop_counters.update(batch)
    got = crop_counters.as_dict()
    assert got["crops"] == counters["crops"] and got["tokens"] == counters["tokens"]
    assert got["padding_fraction"] == pytest.approx(counters["padding_fraction"], abs=1e-4)
    assert 0.12 < got["masked_fraction"] < 0.25  # stubs are short: some whole-crop minimums


def test_bad_files_through_ray_fail_naming_them_or_are_skipped(tmp_path):
    write_jsonl(tmp_path / "a-good.jsonl", [{"text": t} for t in random_docs(0, 30)])
    bad = tmp_path / "b-bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "x"}\n' * 5000)[:-50])
    cfg = PretrainDataConfig(sources=[SourceConfig(name="s", path=str(tmp_path))])
    with pytest.raises(Exception, match=r"cannot read .*b-bad\.jsonl\.gz"):
        build_index(cfg)
    cfg.read.on_bad_file = "skip"
    index = build_index(cfg)
    assert index.counters()["bad_files"] == 1
    assert index.sources[0].bad_files.keys() == {1}
    rows = collect_ds(pretraining_dataset(cfg, index))
    assert set(rows["file"].tolist()) == {0}


def test_missing_column_fails_fast_through_ray(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"body": ["text"]})
    cfg = PretrainDataConfig(
        sources=[SourceConfig(name="s", path=str(path), text_column="content")]
    )
    with pytest.raises(Exception, match=f"{path} has no column 'content'"):
        build_index(cfg)


def test_rows_become_model_tensors(tmp_path):
    cfg = generated_config(tmp_path, mixture=MixtureConfig(max_crops=40))
    ds = pretraining_dataset(cfg, build_index(cfg))
    batch = next(iter(ds.iter_batches(batch_size=16, batch_format="numpy")))
    tensors = crops_to_torch(batch)
    assert str(tensors["input_ids"].dtype) == "torch.int64" == str(tensors["labels"].dtype)
    assert tuple(tensors["labels"].shape) == (16, 2048)
    assert tensors["attention_mask"].sum(dim=1).tolist() == batch["length"].tolist()
