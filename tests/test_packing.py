"""pack_documents: groups of documents, concatenated and cropped, checked against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest

from perceiver_core.packing import PackedCrops, PackingConfig, pack_documents, pack_texts
from perceiver_core.tokenizer import BYTE_OFFSET, PAD, SEP, utf8_buffer


def _reference_streams(docs: list[bytes], cfg: PackingConfig) -> list[list[int]]:
    """Each group's id stream, built the obvious way (one document at a time)."""
    streams = []
    for g in range(0, len(docs), cfg.group_size):
        stream: list[int] = []
        for doc in docs[g : g + cfg.group_size]:
            if not doc:
                continue
            if stream and cfg.separator == "sep":
                stream.append(SEP)
            stream.extend(b + BYTE_OFFSET for b in doc)
        streams.append(stream)
    return streams


def _check_against_reference(
    docs: list[bytes], cfg: PackingConfig, first_doc_index: int = 0
) -> PackedCrops:
    values, offsets = utf8_buffer(docs)
    packed = pack_documents(values, offsets, cfg, first_doc_index)
    n = len(packed)
    assert packed.input_ids.shape == (n, cfg.crop_len) and packed.input_ids.dtype == np.uint16
    assert (
        packed.attention_mask.shape == (n, cfg.crop_len) and packed.attention_mask.dtype == np.uint8
    )
    assert packed.lengths.dtype == np.int32 and packed.crop_in_group.dtype == np.int32
    assert packed.group_index.dtype == np.int64
    # Real tokens first, padding after, and the mask says which is which.
    positions = np.arange(cfg.crop_len)[None, :]
    np.testing.assert_array_equal(packed.attention_mask, positions < packed.lengths[:, None])
    assert np.all(packed.input_ids[positions >= packed.lengths[:, None]] == PAD)
    assert np.all(packed.input_ids[packed.attention_mask.astype(bool)] != PAD)
    # Every group's crops, in order, give back exactly that group's stream: no crop spans groups.
    base = first_doc_index // cfg.group_size
    for g, stream in enumerate(_reference_streams(docs, cfg)):
        rows = np.flatnonzero(packed.group_index == base + g)
        n_crops = -(-len(stream) // cfg.crop_len)
        short = len(stream) % cfg.crop_len
        dropped = short and short < cfg.min_fill * cfg.crop_len
        assert packed.crop_in_group[rows].tolist() == list(range(n_crops - bool(dropped)))
        got = np.concatenate([packed.input_ids[r, : packed.lengths[r]] for r in rows] or [[]])
        want = stream[: len(stream) - short] if dropped else stream
        assert got.tolist() == want
    assert np.all(np.diff(packed.group_index) >= 0)
    return packed


@pytest.mark.parametrize("separator", ["none", "sep"])
@pytest.mark.parametrize("crop_len", [1, 7, 64])
@pytest.mark.parametrize("group_size", [1, 3, 10])
def test_random_documents_match_reference(separator, crop_len, group_size):
    rng = np.random.default_rng(crop_len * 100 + group_size)
    lengths = rng.choice([0, 0, 1, 5, 40, 200], size=57)
    docs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    for min_fill in (0.0, 0.5, 1.0):
        cfg = PackingConfig(
            group_size=group_size, crop_len=crop_len, separator=separator, min_fill=min_fill
        )
        _check_against_reference(docs, cfg)


def test_default_groups_of_ten():
    docs = [f"doc{i:02d}".encode() for i in range(25)]
    packed = _check_against_reference(docs, PackingConfig(crop_len=16))
    # 10 docs x 5 bytes = 50 bytes -> 4 crops (16+16+16+2); the last group has 5 docs -> 2 crops.
    assert packed.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    assert packed.lengths.tolist() == [16, 16, 16, 2] * 2 + [16, 9]
    assert (
        (packed.input_ids[0] - BYTE_OFFSET)
        .astype(np.uint8)
        .tobytes()
        .startswith(b"doc00doc01doc02d")
    )


def test_separator_goes_only_between_non_empty_documents():
    cfg = PackingConfig(group_size=4, crop_len=8, separator="sep")
    packed = pack_texts(["", "ab", "", "cd", "ef", "", "", ""], cfg)
    assert packed.input_ids.tolist() == [
        [103, 104, SEP, 105, 106, PAD, PAD, PAD],
        [107, 108, 0, 0, 0, 0, 0, 0],
    ]
    assert packed.group_index.tolist() == [0, 1]  # the all-empty part of group 1 adds nothing


def test_min_fill_drops_only_short_final_crops():
    docs = ["a" * 10, "b" * 3]  # group 0 has 10 bytes, group 1 has 3
    cfg = PackingConfig(group_size=1, crop_len=4, min_fill=0.5)
    packed = pack_texts(docs, cfg)
    # group 0: 4 + 4 + 2 (2 >= 0.5*4 kept); group 1: 3 kept
    assert packed.lengths.tolist() == [4, 4, 2, 3]
    packed = pack_texts(docs, PackingConfig(group_size=1, crop_len=4, min_fill=0.75))
    assert packed.lengths.tolist() == [4, 4, 3]
    assert packed.crop_in_group.tolist() == [0, 1, 0]
    packed = pack_texts(docs, PackingConfig(group_size=1, crop_len=4, min_fill=1.0))
    assert packed.lengths.tolist() == [4, 4]


def test_single_huge_document_and_empty_inputs():
    huge = bytes(range(256)) * 400 + b"tail"  # 102,404 bytes
    packed = _check_against_reference([huge], PackingConfig(crop_len=2048))
    assert len(packed) == 51 and packed.lengths[-1] == 102_404 - 50 * 2048
    assert packed.crop_in_group.tolist() == list(range(51))
    for docs in ([], [b""], [b""] * 25):
        empty = pack_texts(docs, PackingConfig(crop_len=8))
        assert empty.input_ids.shape == (0, 8) and len(empty.sample_ids()) == 0


def test_global_group_numbers_and_sample_ids():
    docs = [b"x" * 30] * 20
    packed = _check_against_reference(docs, PackingConfig(crop_len=128), first_doc_index=50)
    assert packed.group_index.tolist() == [5, 5, 5, 6, 6, 6]
    ids = packed.sample_ids()
    assert ids.dtype == np.uint64 and len(set(ids.tolist())) == len(ids)
    assert ids[1] == (5 << 24) | 1
    other = packed.sample_ids(source=1)
    assert not set(ids.tolist()) & set(other.tolist())
    with pytest.raises(ValueError, match="source"):
        packed.sample_ids(source=256)
    with pytest.raises(ValueError, match="multiple of"):
        pack_texts(docs, PackingConfig(), first_doc_index=5)


def test_arrow_buffers_pack_like_python_strings():
    pa = pytest.importorskip("pyarrow")
    texts = ["zero", "one ü", "", "three 😀"] * 7
    array = pa.array(texts).slice(3)
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[array.offset : array.offset + len(array) + 1]
    cfg = PackingConfig(group_size=4, crop_len=16, separator="sep")
    got = pack_documents(data_buf, offsets, cfg)
    want = pack_texts(texts[3:], cfg)
    for field in ("input_ids", "attention_mask", "lengths", "group_index", "crop_in_group"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 0}, "group_size"),
        ({"crop_len": 0}, "crop_len"),
        ({"crop_len": 2.5}, "crop_len"),
        ({"separator": "eos"}, "separator"),
        ({"min_fill": 1.5}, "min_fill"),
        ({"min_fill": -0.1}, "min_fill"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PackingConfig(**kwargs)


def test_input_validation():
    cfg = PackingConfig(crop_len=4)
    with pytest.raises(ValueError, match="uint8"):
        pack_documents(np.zeros(4, np.int64), np.array([0, 4]), cfg)
    with pytest.raises(ValueError, match="non-decreasing"):
        pack_documents(np.zeros(4, np.uint8), np.array([0, 3, 2]), cfg)
    with pytest.raises(ValueError, match="outside"):
        pack_documents(np.zeros(4, np.uint8), np.array([0, 9]), cfg)


@pytest.mark.shared_data
def test_wikipedia_packs_losslessly(shared_data):
    pq = pytest.importorskip("pyarrow.parquet")
    path = sorted((shared_data / "wikipedia/20150501.en").glob("*.parquet"))[0]
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    docs = [t.encode() for t in texts]
    packed = _check_against_reference(docs, PackingConfig())
    assert int(packed.lengths.sum()) == sum(map(len, docs))
    assert (packed.lengths == 2048).mean() > 0.9  # long articles: most crops are full
