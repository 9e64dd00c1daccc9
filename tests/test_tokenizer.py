"""ByteTokenizer against transformers.PerceiverTokenizer, on the sample corpora and generated text.

HF's tokenizer runs at about 2.5 MB/s, so each corpus goes through its text path once (without
special tokens: that is where text becomes ids); special tokens, truncation and padding are then
checked on those ids through HF's own ``prepare_for_model`` and ``pad``, the two steps its batch
``__call__`` runs per text and per batch. C4 and the stubs also go through HF's full text path with
every option.
"""

from __future__ import annotations

import gzip
import itertools
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from perceiver_core.tokenizer import (
    BYTE_OFFSET,
    CLS,
    MASK,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    ByteTokenizer,
    bytes_to_ids,
    utf8_buffer,
)

CORPORA = ("wikipedia", "c4", "stubs", "imdb")


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than 2048" and pair-truncation notices
    yield transformers.PerceiverTokenizer()
    hf_logging.set_verbosity(previous)


def _read_texts(root: Path, name: str) -> list[str]:
    pq = pytest.importorskip("pyarrow.parquet")
    if name == "c4":
        with gzip.open(root / "c4/en/c4-train.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]
    paths = {
        "wikipedia": sorted((root / "wikipedia/20150501.en").glob("train-*.parquet")),
        "stubs": [root / "edge/wikipedia-stubs.parquet"],
        "imdb": [root / "imdb/train.parquet", root / "imdb/test.parquet"],
    }[name]
    assert paths, f"no files for {name}"
    return [t for p in paths for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]


@pytest.fixture(scope="module")
def corpus(shared_data):
    """name -> (texts, HF ids without special tokens), computed once: HF's text path is the slow part."""
    cache: dict[str, tuple[list[str], list[list[int]]]] = {}

    def get(name: str, hf_tok) -> tuple[list[str], list[list[int]]]:
        if name not in cache:
            texts = _read_texts(shared_data, name)
            raw = hf_tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            cache[name] = (texts, raw)
        return cache[name]

    return get


def _hf_from_ids(hf_tok, id_lists, **kwargs) -> dict:
    """HF's batch ``__call__`` on already-tokenized texts: prepare_for_model per text, then pad."""
    padding = kwargs.pop("padding", False)
    padding = "longest" if padding is True else padding  # what __call__ hands to pad()
    per_text = [
        hf_tok.prepare_for_model(ids, return_attention_mask=False, **kwargs)["input_ids"]
        for ids in id_lists
    ]
    return hf_tok.pad(
        {"input_ids": per_text}, padding=padding, max_length=kwargs.get("max_length")
    ).data


def _flat(rows) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(r) for r in rows])
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64), lengths


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key in theirs:
        if isinstance(ours[key], list):
            got, want = _flat(ours[key]), _flat(theirs[key])
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"{key} lengths")
            np.testing.assert_array_equal(got[0], want[0], err_msg=key)
        else:
            np.testing.assert_array_equal(ours[key], np.array(theirs[key]), err_msg=key)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", CORPORA)
def test_every_document_matches_hf(name, corpus, hf):
    texts, raw = corpus(name, hf)
    assert len(texts) > 500
    tok = ByteTokenizer()
    ours = tok(texts, add_special_tokens=False, return_attention_mask=False)
    _assert_same(ours, {"input_ids": raw})
    _assert_same(tok(texts), _hf_from_ids(hf, raw))
    padded = tok(texts, padding="max_length", truncation=True, max_length=2048)
    assert padded["input_ids"].shape == (len(texts), 2048)
    _assert_same(
        padded, _hf_from_ids(hf, raw, padding="max_length", truncation=True, max_length=2048)
    )
    for start in range(0, len(texts), 64):  # "longest" per batch, as a DataLoader would
        batch = slice(start, start + 64)
        _assert_same(
            tok(texts[batch], padding="longest"), _hf_from_ids(hf, raw[batch], padding=True)
        )


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"padding": "max_length", "truncation": True, "max_length": 2048},
        {"padding": True, "truncation": True, "max_length": 700},
        {"max_length": 100},  # max_length alone turns truncation on, in HF and here
    ],
)
def test_full_hf_text_path_on_c4_and_stubs(options, corpus, hf):
    texts = corpus("c4", hf)[0] + corpus("stubs", hf)[0]
    _assert_same(ByteTokenizer()(texts, **options), hf(texts, **options).data)


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = [
        "a", "b", " ", "\n", "\t", "\x00", "é", "e\u0301", "😀", "👩‍👩‍👧", "中", "文", "ש", "\u200b",
        "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[BOS]", "[EOS]", "[cls]", "[CL", "S]", "[", "]", "[[SEP]]",
    ]  # fmt: skip
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_generated_text_matches_hf(hf):
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randrange(0, 60)) for _ in range(400)] + [""]
    tok = ByteTokenizer()
    _assert_same(tok(texts), hf(texts).data)
    _assert_same(tok(texts, add_special_tokens=False), hf(texts, add_special_tokens=False).data)
    _assert_same(tok(texts, padding=True), hf(texts, padding=True).data)
    for text in texts[:50]:  # single texts give 1-D arrays
        _assert_same(tok(text), hf(text).data)
    assert tok("[CLS]x[SEP]")["input_ids"].tolist() == [CLS, CLS, ord("x") + 6, SEP, SEP]


def test_pairs_and_longest_first_truncation_match_hf(hf):
    rng = random.Random(1)
    a = [_random_text(rng, rng.randrange(0, 40)) for _ in range(300)]
    b = [_random_text(rng, rng.randrange(0, 40)) for _ in range(300)]
    tok = ByteTokenizer()
    _assert_same(tok(a, b), hf(a, b).data)
    for max_length in (3, 4, 5, 8, 13, 40, 90):
        for options in (
            {"truncation": True},
            {"truncation": "longest_first", "padding": "max_length"},
            {"truncation": True, "padding": True, "add_special_tokens": False},
        ):
            _assert_same(
                tok(a, b, max_length=max_length, **options),
                hf(a, b, max_length=max_length, **options).data,
            )
    _assert_same(tok("abc", "defgh", max_length=6), hf("abc", "defgh", max_length=6).data)
    assert tok("abc", "defgh", max_length=6)["input_ids"].tolist() == [CLS, 103, 104, SEP, 106, SEP]


def test_special_token_strings_do_not_join_across_texts():
    tok = ByteTokenizer()
    out = tok(["x[CL", "S]y", "[SEP]"], add_special_tokens=False)["input_ids"]
    assert [o.tolist() for o in out] == [
        [ord(c) + 6 for c in "x[CL"],
        [ord(c) + 6 for c in "S]y"],
        [SEP],
    ]
    kept = ByteTokenizer(split_special_tokens=True)("[SEP]", add_special_tokens=False)["input_ids"]
    assert kept.tolist() == [ord(c) + 6 for c in "[SEP]"]


def test_bytes_input_including_invalid_utf8(hf):
    rng = np.random.default_rng(2)
    blobs = [
        rng.integers(0, 256, rng.integers(0, 50), dtype=np.uint8).tobytes() for _ in range(200)
    ]
    blobs += [
        b"\xff\xfe",
        b"\xe2\x82",
        b"\xc0\xaf",
        b"a\x00b",
        b"\xed\xa0\x80",
    ]  # overlong, surrogate
    tok = ByteTokenizer(split_special_tokens=True)  # random bytes could spell "[SEP]"
    ours = tok(blobs, padding=True, truncation=True, max_length=40)
    # HF takes no bytes; its id path gives what it would do with these byte ids.
    ids = [[b + BYTE_OFFSET for b in blob] for blob in blobs]
    _assert_same(ours, _hf_from_ids(hf, ids, padding=True, truncation=True, max_length=40))
    text = "naïve 😀 [SEP]"
    np.testing.assert_array_equal(
        ByteTokenizer()(text.encode())["input_ids"], ByteTokenizer()(text)["input_ids"]
    )


def test_str_that_is_not_unicode_raises_like_hf(hf):
    with pytest.raises(UnicodeEncodeError):
        hf("ok \ud800")
    with pytest.raises(UnicodeEncodeError, match=r"text #1"):
        ByteTokenizer()(["fine", "ok \ud800"])
    with pytest.raises(TypeError, match="str or bytes"):
        ByteTokenizer()([1, 2])


def test_batch_shapes_and_hf_deviations():
    tok = ByteTokenizer()
    ragged = tok(["ab", "cde"])
    assert [r.tolist() for r in ragged["input_ids"]] == [
        [CLS, 103, 104, SEP],
        [CLS, 105, 106, 107, SEP],
    ]
    assert [m.tolist() for m in ragged["attention_mask"]] == [[1] * 4, [1] * 5]
    assert tok([], padding=True)["input_ids"].shape == (0, 0)
    assert tok([])["input_ids"] == []
    with pytest.raises(ValueError, match="truncation=True"):
        tok(["abcdef", "a"], padding="max_length", max_length=4)
    single = tok(
        "abcdef", padding="max_length", max_length=4
    )  # one text: returned whole, as HF does
    assert single["input_ids"].tolist() == [CLS, *range(103, 109), SEP]
    with pytest.raises(ValueError, match="no room"):
        tok("abc", truncation=True, max_length=1)
    with pytest.raises(ValueError, match="only_first"):
        tok("abc", truncation="only_first")
    with pytest.raises(ValueError, match="padding"):
        tok("abc", padding="left")
    padded = tok(["ab", "c"], padding="max_length", max_length=5)
    assert padded["input_ids"].tolist() == [[CLS, 103, 104, SEP, PAD], [CLS, 105, SEP, PAD, PAD]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert padded["input_ids"].dtype == np.int64


def test_uint16_output_and_pickling():
    tok = ByteTokenizer(dtype="uint16", model_max_length=16)
    out = tok(["hello", "wörld"], padding="max_length", truncation=True)
    assert out["input_ids"].dtype == np.uint16 and out["input_ids"].shape == (2, 16)
    np.testing.assert_array_equal(
        out["input_ids"],
        ByteTokenizer()(["hello", "wörld"], padding="max_length", max_length=16)["input_ids"],
    )
    clone = pickle.loads(pickle.dumps(tok))
    assert clone == tok
    with pytest.raises(ValueError, match="16 bits"):
        ByteTokenizer(dtype="uint8")
    with pytest.raises(ValueError, match="model_max_length"):
        ByteTokenizer(model_max_length=0)


def test_arrow_columns_encode_like_python_strings():
    pa = pytest.importorskip("pyarrow")
    texts = ["", "alpha [MASK] beta", "γάμμα", "x" * 50, "emoji 😀"]
    tok = ByteTokenizer()
    for array in (pa.array(texts, pa.string()), pa.array(texts, pa.large_string())):
        sliced = array.slice(1)  # a non-zero offset, as Arrow batches often have
        _, offsets_buf, data_buf = sliced.buffers()
        width = np.int32 if array.type == pa.string() else np.int64
        offsets = np.frombuffer(offsets_buf, width)[sliced.offset : sliced.offset + len(sliced) + 1]
        got = tok.encode_buffers(
            data_buf, offsets, padding="max_length", truncation=True, max_length=24
        )
        _assert_same(got, tok(texts[1:], padding="max_length", truncation=True, max_length=24))
        pair = tok.encode_buffers(data_buf, offsets, pair=(data_buf, offsets), padding=True)
        _assert_same(pair, tok(texts[1:], texts[1:], padding=True))
    ids, id_offsets = bytes_to_ids(*utf8_buffer(["[CLS]é", "b"]), dtype=np.uint16)
    assert ids.tolist() == [CLS, 0xC3 + 6, 0xA9 + 6, ord("b") + 6] and id_offsets.tolist() == [
        0,
        3,
        4,
    ]


def test_decode_matches_hf_and_never_raises_on_bytes(hf):
    tok = ByteTokenizer()
    rng = np.random.default_rng(3)
    for _ in range(200):
        ids = rng.integers(0, VOCAB_SIZE, rng.integers(0, 40)).tolist()
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    every = list(range(6)) + [ord(c) + 6 for c in " x."]
    assert tok.decode(every) == "[PAD][BOS][EOS][MASK][CLS][SEP] x."
    assert tok.decode(every, skip_special_tokens=True) == " x."
    assert tok.decode([0xFF + 6, 0xE2 + 6, 0x82 + 6]) == "\ufffd\ufffd"
    assert tok.decode([]) == "" and tok.decode(np.array([104])) == "b"
    assert tok.batch_decode(
        np.array([[CLS, 104, SEP], [CLS, 105, PAD]]), skip_special_tokens=True
    ) == ["b", "c"]
    blob = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    ids = ByteTokenizer(split_special_tokens=True)(blob)["input_ids"]
    assert tok.decode_bytes(ids) == blob  # lossless whatever the bytes, specials dropped
    assert tok.decode(ids, skip_special_tokens=True) == blob.decode("utf-8", errors="replace")
    for bad in ([5, 262], [-1], [1000]):
        with pytest.raises(ValueError, match=str(bad[-1])):
            tok.decode(bad)
    with pytest.raises(ValueError, match="262"):
        tok.decode_bytes(np.array([7, 262]))
    with pytest.raises(TypeError):
        tok.decode([1.5])


@pytest.mark.shared_data
def test_decode_round_trips_every_document(corpus, hf):
    tok = ByteTokenizer()
    for name in CORPORA:
        texts = corpus(name, hf)[0]
        encoded = tok(texts)["input_ids"]
        assert tok.batch_decode(encoded, skip_special_tokens=True) == texts
        assert [tok.decode_bytes(e) for e in encoded[:50]] == [t.encode() for t in texts[:50]]


def test_save_pretrained_loads_in_transformers(tmp_path, hf):
    from transformers import AutoTokenizer, PerceiverTokenizer

    written = ByteTokenizer(model_max_length=512).save_pretrained(tmp_path)
    assert sorted(Path(p).name for p in written) == [
        "special_tokens_map.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PerceiverTokenizer"
    assert [config["added_tokens_decoder"][str(i)]["content"] for i in range(6)] == list(
        SPECIAL_TOKENS
    )
    for loader in (PerceiverTokenizer, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, PerceiverTokenizer) and loaded.model_max_length == 512
        assert (
            loaded.pad_token_id,
            loaded.mask_token_id,
            loaded.cls_token_id,
            loaded.sep_token_id,
        ) == (PAD, MASK, CLS, SEP)
        texts = ["Perceiver [MASK] bytes ü", "", "x" * 600]
        _assert_same(
            ByteTokenizer(model_max_length=512)(texts, padding="max_length", truncation=True),
            loaded(texts, padding="max_length", truncation=True).data,
        )
        assert loaded.decode([CLS, 104, MASK]) == ByteTokenizer().decode([CLS, 104, MASK])
    ByteTokenizer(split_special_tokens=True).save_pretrained(tmp_path / "split")
    loaded = PerceiverTokenizer.from_pretrained(tmp_path / "split")
    assert loaded("[SEP]", add_special_tokens=False)["input_ids"] == [ord(c) + 6 for c in "[SEP]"]
