"""Bad input, file formats and byte fidelity, read in-process (the Ray path is in
test_data_pipeline.py and runs the same functions)."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pytest
from data_fixtures import collect, original_ids, write_jsonl, write_parquet

from perceiver_core.packing import PackingConfig
from pipelines.data import (
    BadFileError,
    MissingColumnError,
    PretrainDataConfig,
    SourceConfig,
    SplitConfig,
    WrongFormatError,
    build_index_local,
    local_crops,
)
from pipelines.data.readers import read_batches
from pipelines.data.sources import list_files


def one_source(path, **kwargs) -> PretrainDataConfig:
    source = SourceConfig(name="s", path=str(path), **kwargs)
    return PretrainDataConfig(sources=[source], split=SplitConfig(validation_fraction=0.0))


def stream_bytes(cfg: PretrainDataConfig) -> bytes:
    """All crop bytes of a one-source stream, padding removed, in stream order."""
    rows = collect(local_crops(cfg, build_index_local(cfg)))
    ids = original_ids(rows)
    pieces = zip(ids, rows["length"], strict=True)
    return b"".join((r[:n] - 6).astype(np.uint8).tobytes() for r, n in pieces)


def test_null_and_empty_texts_are_skipped_and_counted(tmp_path):
    texts = ["first", None, "", "second", None, "third"]
    write_parquet(tmp_path / "t.parquet", {"text": texts}, row_group_size=4)
    cfg = one_source(tmp_path / "t.parquet")
    counters = build_index_local(cfg).counters()
    assert (counters["rows"], counters["null"], counters["empty"]) == (6, 2, 1)
    assert counters["docs"] == 3 and counters["skipped_docs"] == 3
    assert stream_bytes(cfg) == b"firstsecondthird"


@pytest.mark.parametrize("name", ["t.parquet", "t.jsonl", "t.jsonl.gz"])
def test_missing_column_fails_naming_file_and_column(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, {"body": ["x"]})
    else:
        write_jsonl(path, [{"body": "x"}])
    with pytest.raises(MissingColumnError, match=rf"{path}.*column 'text'"):
        build_index_local(one_source(path))


def test_wrong_formats_fail_naming_the_file(tmp_path):
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text('{"text": "I am JSON"}\n')
    with pytest.raises(WrongFormatError, match=f"{not_parquet} is not a parquet file"):
        build_index_local(one_source(not_parquet))
    numbers = write_parquet(tmp_path / "n.parquet", {"text": [1, 2]})
    with pytest.raises(WrongFormatError, match=f"{numbers}: column 'text' holds int64"):
        build_index_local(one_source(numbers))
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text('{"text": "x"}\n')
    with pytest.raises(WrongFormatError, match=f"{not_gzip} is named .gz but is not gzip"):
        build_index_local(one_source(not_gzip))
    arrays = write_jsonl(tmp_path / "a.jsonl", [["text", "x"]])  # type: ignore[list-item]
    with pytest.raises(WrongFormatError, match=f"{arrays}: line 1 is a JSON list"):
        build_index_local(one_source(arrays))
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"text": 3}])
    with pytest.raises(WrongFormatError, match=f"{mixed}: column 'text' in line 2 holds int"):
        build_index_local(one_source(mixed))


def test_corrupt_files_fail_naming_the_file(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", {"text": ["some text"] * 100})
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(BadFileError, match=f"cannot read {cut}"):
        build_index_local(one_source(cut))
    data = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError, match=f"cannot read {truncated}"):
        build_index_local(one_source(truncated))
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n')
    with pytest.raises(BadFileError, match=f"{broken}: invalid JSON in line 2"):
        build_index_local(one_source(broken))


def test_skip_policy_leaves_corrupt_files_out_and_counts_them(tmp_path, caplog):
    write_jsonl(tmp_path / "0-good.jsonl", [{"text": "kept words"}])
    (tmp_path / "1-bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 500)[:-30])
    cfg = one_source(tmp_path)
    cfg.read.on_bad_file = "skip"
    with caplog.at_level("WARNING"):
        index = build_index_local(cfg)
    assert index.counters()["bad_files"] == 1
    assert "1-bad.jsonl.gz" in caplog.text
    assert stream_bytes(cfg) == b"kept words"


def test_non_utf8_bytes_in_a_binary_column_are_kept(tmp_path):
    docs = [b"caf\xe9 \xff\xfe raw", b"\x80\x81 bytes", b"valid \xc3\xa9"]
    write_parquet(tmp_path / "b.parquet", {"text": docs}, text=pa.binary())
    assert stream_bytes(one_source(tmp_path / "b.parquet")) == b"".join(docs)


def test_text_files_by_line_paragraph_and_document(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one line\r\nsecond\n\npara two\nstill two\n\n\nlast")
    ref = list_files(str(path))[0]

    def docs(sample_by):
        batches = read_batches(ref, ["text"], ["text"], sample_by=sample_by)
        pairs = [zip(b.rows, b.table.column(0).to_pylist(), strict=True) for b in batches]
        return [(int(r), t) for pair in pairs for r, t in pair]

    assert docs("line") == [
        (0, b"one line"), (1, b"second"), (2, b""), (3, b"para two"), (4, b"still two"),
        (5, b""), (6, b""), (7, b"last"),
    ]  # fmt: skip
    assert [t for _, t in docs("paragraph")] == [
        b"one line\nsecond",
        b"para two\nstill two",
        b"last",
    ]
    assert docs("document") == [(0, path.read_bytes())]
    cfg = one_source(path, sample_by="line")
    assert build_index_local(cfg).counters()["empty"] == 3


def test_groups_never_cross_units_and_hold_ten_documents(tmp_path):
    # 25 one-byte documents in row groups of 12: groups are rows 0-9, 10-11 | 12-21, 22-23 | 24.
    texts = [chr(ord("a") + i) for i in range(25)]
    write_parquet(tmp_path / "g.parquet", {"text": texts}, row_group_size=12)
    cfg = one_source(tmp_path / "g.parquet")
    cfg.mixture.shuffle_units = False
    rows = collect(local_crops(cfg, build_index_local(cfg)))
    assert rows["row"].tolist() == [0, 10, 12, 22, 24]
    assert rows["length"].tolist() == [10, 2, 10, 2, 1]


def test_packing_separator_is_respected(tmp_path):
    write_parquet(tmp_path / "s.parquet", {"text": ["ab", "cd"]})
    cfg = one_source(tmp_path / "s.parquet")
    cfg.packing = PackingConfig(separator="sep")
    rows = collect(local_crops(cfg, build_index_local(cfg)))
    assert original_ids(rows)[0, :5].tolist() == [97 + 6, 98 + 6, 5, 99 + 6, 100 + 6]


def test_saved_index_reloads_and_guards_against_other_settings_and_changed_files(tmp_path):
    from pipelines.config import ConfigError
    from pipelines.data import DataError, DataIndex
    from pipelines.data.index import INDEX_FILE, run_index

    path = write_parquet(tmp_path / "d.parquet", {"text": [f"document {i}" for i in range(40)]})
    cfg = one_source(path)
    index = build_index_local(cfg)
    assert DataIndex.load(tmp_path / "run" / INDEX_FILE) is None
    index.save(tmp_path / "run" / INDEX_FILE)
    loaded = DataIndex.load(tmp_path / "run" / INDEX_FILE)
    assert loaded.fingerprint == index.fingerprint
    # A run's resume reuses the index it saved, without reading the data again.
    assert run_index(cfg, str(tmp_path / "run")).fingerprint == index.fingerprint
    first = collect(local_crops(cfg, loaded))
    assert len(first["length"]) == 4

    other = one_source(path)
    other.packing = PackingConfig(crop_len=512)
    with pytest.raises(ValueError, match="index was built with packing"):
        collect(local_crops(other, loaded))
    # A user error (one line from the job, no traceback), naming the run.
    with pytest.raises(ConfigError, match=f"run {tmp_path / 'run'} was started with other data"):
        run_index(other, str(tmp_path / "run"))

    write_parquet(path, {"text": ["only one document now"]})
    with pytest.raises(DataError, match=f"{path}.*changed since the index was built"):
        collect(local_crops(cfg, loaded))
