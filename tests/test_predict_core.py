"""Single-device inference: classify agrees with a direct forward and with padding removed, and
fill-mask predicts what transformers' PerceiverForMaskedLM predicts on our exported weights."""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
import transformers

from perceiver_core import hf
from perceiver_core.config import PerceiverConfig, get_preset
from perceiver_core.model import (
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    init_weights,
)
from perceiver_core.predict import (
    MASK_PLACEHOLDER,
    FilledText,
    Prediction,
    classify,
    fill_mask,
    masked_input_ids,
    masked_spans,
)
from perceiver_core.tokenizer import BYTE_OFFSET, CLS, MASK, SEP

CARD_SENTENCE = "This is an incomplete sentence where some words are missing."
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
# Characters of 1 to 4 UTF-8 bytes, and bracketed specials that the tokenizer turns into one id.
ALPHABET = [*"abcdefghij klmnop,.!", "é", "ß", "日", "本", "🙂", "[SEP]", "[MASK]"]


def random_model(cls, config: PerceiverConfig, seed: int = 0):
    """A model with weights large enough that its outputs differ clearly between inputs and
    positions (the 0.02 initialisation gives near-ties that make argmax checks meaningless)."""
    torch.manual_seed(seed)
    model = cls(config)
    init_weights(model, 0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # zero at init: randomise so a dropped bias shows up
                p.normal_(std=0.02)
    return model


def random_texts(count: int, max_chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(0, max_chars))) for _ in range(count)]


@pytest.fixture(scope="module")
def classifier() -> PerceiverForSequenceClassification:
    return random_model(
        PerceiverForSequenceClassification, get_preset("tiny", num_labels=3, id2label=LABELS)
    )


@functools.cache
def hf_tokenizer() -> transformers.PerceiverTokenizer:
    return transformers.PerceiverTokenizer()


def direct_logits(model, text: str, pair: str | None = None) -> torch.Tensor:
    """Logits of one unpadded text, encoded by transformers' own tokenizer."""
    ids = hf_tokenizer()(text, pair, truncation=True, max_length=128)["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def assert_matches(prediction: Prediction, logits: torch.Tensor, names: list[str]) -> None:
    probs = torch.softmax(logits, dim=-1)
    top2 = torch.topk(logits, 2).values
    assert top2[0] - top2[1] > 1e-4, "near-tie: the argmax check would be meaningless"
    best = int(logits.argmax())
    assert prediction.label == names[best]
    assert prediction.score == pytest.approx(float(probs[best]), abs=1e-5)
    assert prediction.scores.keys() == set(names)
    for name, p in zip(names, probs.tolist(), strict=True):
        assert prediction.scores[name] == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_classify_equals_a_direct_forward_of_each_text_alone(classifier, batch_size: int) -> None:
    # Up to 60 characters of up to 5 bytes: some texts pass the 128 positions and are truncated,
    # and with batch_size > 1 most rows are padded to a longer neighbour.
    texts = random_texts(24, 60, seed=batch_size)
    classifier.train()  # classify must switch dropout off, and give the mode back
    predictions = classify(classifier, texts, batch_size=batch_size)
    assert classifier.training
    assert len(predictions) == len(texts)
    names = list(LABELS.values())
    labels_seen = set()
    for text, prediction in zip(texts, predictions, strict=True):
        assert_matches(prediction, direct_logits(classifier, text), names)
        labels_seen.add(prediction.label)
    assert len(labels_seen) > 1  # the model's answers depend on the text


def test_logits_do_not_depend_on_padding_length(classifier) -> None:
    ids = torch.tensor([hf_tokenizer()("Grüße aus Köln, 日本")["input_ids"]])
    classifier.eval()
    with torch.no_grad():
        alone = classifier(ids).logits
        for width in (ids.shape[1] + 1, 64, 128):
            padded = torch.zeros(1, width, dtype=torch.long)
            padded[0, : ids.shape[1]] = ids[0]
            mask = (torch.arange(width) < ids.shape[1]).long()[None]
            torch.testing.assert_close(classifier(padded, mask).logits, alone, atol=1e-5, rtol=0)
            # Without the mask the padding is read as input: the check above can fail.
            assert not torch.allclose(classifier(padded).logits, alone, atol=1e-3)


def test_classify_pairs_use_cls_a_sep_b_sep(classifier) -> None:
    texts, pairs = random_texts(6, 20, seed=1), random_texts(6, 20, seed=2)
    predictions = classify(classifier, texts, pairs=pairs, batch_size=3)
    names = list(LABELS.values())
    for text, pair, prediction in zip(texts, pairs, predictions, strict=True):
        assert_matches(prediction, direct_logits(classifier, text, pair), names)


def test_classify_truncates_to_max_length(classifier) -> None:
    long_text = "abcdefghij" * 30  # 300 bytes: longer than the model's 128 positions
    short = classify(classifier, [long_text], max_length=20)[0]
    assert_matches(short, direct_logits(classifier, long_text[:18]), list(LABELS.values()))
    full = classify(classifier, [long_text])[0]
    assert_matches(full, direct_logits(classifier, long_text[:126]), list(LABELS.values()))


def test_windows_average_the_logits_of_consecutive_windows(classifier, tmp_path) -> None:
    from perceiver_core.hf import from_pretrained, save_pretrained

    rng = random.Random(3)
    # 126 bytes fit with [CLS] and [SEP]: texts of one (empty, short, exactly full) and several
    # windows, multi-byte characters cut at window edges (windows are of bytes, as the model
    # reads them).
    plain = ALPHABET[:-2]  # no "[SEP]"-style literals, which the tokenizer reads as one id
    texts = ["", "short", "".join(rng.choices(plain, k=240)), "x" * 126]
    names = list(LABELS.values())
    windows = classify(classifier, texts, batch_size=3, long_text="windows")
    for text, prediction in zip(texts, windows, strict=True):
        data = text.encode()
        pieces = [data[i : i + 126] for i in range(0, max(len(data), 1), 126)]
        logits = torch.stack([_piece_logits(classifier, piece) for piece in pieces])
        assert_matches(prediction, logits.mean(0), names)
    assert len(texts[2].encode()) > 2 * 126  # the long text really spans several windows
    truncated = classify(classifier, texts)
    for i in (0, 1, 3):  # a text that fits is one window either way
        assert truncated[i].label == windows[i].label
        assert truncated[i].score == pytest.approx(windows[i].score, abs=1e-5)
    assert truncated[2].score != pytest.approx(windows[2].score, abs=1e-3)

    # The mode is the model's, saved with it: a classifier exported with windows answers so.
    windowed = PerceiverForSequenceClassification(classifier.config.replace(long_text="windows"))
    windowed.load_state_dict(classifier.state_dict())
    saved = save_pretrained(windowed, tmp_path / "cls")
    loaded = from_pretrained(PerceiverForSequenceClassification, saved)
    assert loaded.config.long_text == "windows"
    by_default, asked = (
        classify(loaded, texts[2:3]),
        classify(loaded, texts[2:3], long_text="windows"),
    )
    assert by_default[0].score == pytest.approx(asked[0].score, abs=1e-6)
    assert by_default[0].score != pytest.approx(
        classify(loaded, texts[2:3], long_text="truncate")[0].score, abs=1e-3
    )
    assert "long_text" not in json.loads((saved / "config.json").read_text())  # an extra only
    with pytest.raises(ValueError, match="long_text must be one of"):
        classify(classifier, texts, long_text="average")


def _piece_logits(model, piece: bytes) -> torch.Tensor:
    ids = [CLS, *(b + BYTE_OFFSET for b in piece), SEP]
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_regression_prediction_is_the_raw_value() -> None:
    model = random_model(PerceiverForSequenceClassification, get_preset("tiny", num_labels=1))
    texts = ["a similar sentence", "", "something else entirely"]
    predictions = classify(model, texts, batch_size=2)
    for text, prediction in zip(texts, predictions, strict=True):
        value = float(direct_logits(model, text)[0])
        assert prediction.label == "LABEL_0"
        assert prediction.score == pytest.approx(value, rel=1e-5, abs=1e-5)
        assert prediction.scores == {"LABEL_0": prediction.score}
    assert len({p.score for p in predictions}) == 3


def test_classify_rejects_bad_arguments(classifier) -> None:
    assert classify(classifier, []) == []
    with pytest.raises(TypeError, match="sequences of strings"):
        classify(classifier, "one text")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        classify(classifier, ["x"], max_length=129)
    with pytest.raises(ValueError, match="max_length must be"):
        classify(classifier, ["x"], max_length=1)
    with pytest.raises(ValueError, match="batch_size"):
        classify(classifier, ["x"], batch_size=0)
    with pytest.raises(ValueError, match="2 texts but 1 pairs"):
        classify(classifier, ["x", "y"], pairs=["z"])
    mlm = PerceiverForMaskedLM(get_preset("tiny"))
    with pytest.raises(TypeError, match="PerceiverForSequenceClassification"):
        classify(mlm, ["x"])


# ---------------------------------------------------------------------------------------------------
# masked_spans and the model card's example
# ---------------------------------------------------------------------------------------------------


def test_model_card_positions() -> None:
    text, spans = masked_spans(CARD_SENTENCE, substring=" missing.")
    assert (text, spans) == (CARD_SENTENCE, [(51, 60)])
    ids, positions = masked_input_ids(text, spans)
    assert positions == list(range(52, 61))
    # The model card: tokenizer(text).input_ids with [52:61] set to the mask id.
    expected = hf_tokenizer()(CARD_SENTENCE)["input_ids"]
    expected[52:61] = [MASK] * 9
    assert ids == expected


def test_markers_with_multibyte_text() -> None:
    text, spans = masked_spans("Grüße[MASK], 日本[MASK*3]!")
    assert text == "Grüße_, 日本___!"
    # "Grüße" is 7 bytes (ü and ß take two); ", 日本" is 8 more (3 per kanji) after the mask.
    assert spans == [(7, 8), (16, 19)]
    raw = text.encode()
    assert all(raw[a:b] == MASK_PLACEHOLDER.encode() * (b - a) for a, b in spans)


def test_single_byte_markers_are_what_transformers_tokenizer_makes_of_mask() -> None:
    marked = "héllo [MASK]orld, [MASK][MASK] 日本"
    text, spans = masked_spans(marked)
    assert spans == [(7, 8), (14, 15), (15, 16)]
    ids, _ = masked_input_ids(text, spans)
    assert ids == hf_tokenizer()(marked)["input_ids"]


def test_substring_occurring_twice() -> None:
    assert masked_spans("the cat saw the dog", substring="the")[1] == [(0, 3), (12, 15)]
    # Byte offsets, not character offsets: "ü" is two bytes.
    assert masked_spans("über Müll", substring="ü")[1] == [(0, 2), (7, 9)]
    assert masked_spans("aaaa", substring="aa")[1] == [(0, 2), (2, 4)]  # non-overlapping


@pytest.mark.parametrize(
    ("text", "substring", "message"),
    [
        ("no markers here", None, "nothing to mask"),
        ("[MASK*] is not a marker", None, "nothing to mask"),
        ("zero [MASK*0]", None, "N must be"),
        ("abc", "xyz", "does not occur"),
        ("abc", "", "must not be empty"),
    ],
)
def test_masked_spans_errors(text: str, substring: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        masked_spans(text, substring=substring)


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([], "spans is empty"),
        ([(3, 3)], "non-empty"),
        ([(0, 99)], "5-byte"),
        ([(0, 3), (2, 4)], "overlap"),
    ],
)
def test_masked_input_ids_rejects_bad_spans(spans, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        masked_input_ids("hello", spans)


def test_bytes_above_249_keep_their_ids() -> None:
    # A 4-byte emoji starts with 0xF0: byte + 6 must not wrap around to a special id.
    ids, _ = masked_input_ids("🙂x", [(4, 5)])
    assert ids == [4, 0xF0 + 6, 0x9F + 6, 0x99 + 6, 0x82 + 6, MASK, 5]


# ---------------------------------------------------------------------------------------------------
# fill_mask against transformers
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlm_pair(tmp_path_factory):
    """Our tiny MLM model and transformers' PerceiverForMaskedLM loaded from its export."""
    ours = random_model(PerceiverForMaskedLM, get_preset("tiny"))
    path = hf.save_pretrained(ours, tmp_path_factory.mktemp("mlm"))
    theirs = transformers.PerceiverForMaskedLM.from_pretrained(path).eval()
    return ours, theirs


def transformers_bytes(theirs, ids: list[int], positions: list[int]) -> bytes:
    with torch.no_grad():
        logits = theirs(inputs=torch.tensor([ids])).logits[0, positions, 6:]
    top2 = torch.topk(logits, 2, dim=-1).values
    assert bool((top2[:, 0] - top2[:, 1] > 1e-3).all()), "near-tie: argmax comparison unsafe"
    return bytes(logits.argmax(dim=-1).tolist())


@pytest.mark.parametrize(
    ("marked", "substring"),
    [
        (CARD_SENTENCE, " missing."),
        ("Grüße[MASK], 日本[MASK*3]! [MASK*5] end", None),
        ("the cat saw the dog and the bird", "the"),
    ],
)
def test_fill_mask_equals_transformers_argmax(mlm_pair, marked: str, substring) -> None:
    ours, theirs = mlm_pair
    text, spans = masked_spans(marked, substring=substring)
    ours.train()
    result = fill_mask(ours, text, spans)
    assert ours.training
    assert isinstance(result, FilledText)
    ids, positions = masked_input_ids(text, spans)
    expected = transformers_bytes(theirs, ids, positions)
    assert b"".join(result.span_bytes) == expected
    assert [len(b) for b in result.span_bytes] == [b - a for a, b in spans]
    assert len(set(expected)) > 1  # positions get different bytes: the model is not degenerate
    # The three views of the result agree with the predicted bytes.
    filled, masked = bytearray(text.encode()), bytearray(text.encode())
    for (a, b), chunk in zip(spans, result.span_bytes, strict=True):
        filled[a:b], masked[a:b] = chunk, b"_" * (b - a)
    assert result.text == filled.decode(errors="replace")
    assert result.masked_text == masked.decode(errors="replace")
    assert result.predictions == [c.decode(errors="replace") for c in result.span_bytes]


def test_model_card_masked_text(mlm_pair) -> None:
    ours, _ = mlm_pair
    result = fill_mask(ours, *masked_spans(CARD_SENTENCE, substring=" missing."))
    assert result.masked_text == "This is an incomplete sentence where some words are_________"
    assert result.text.startswith("This is an incomplete sentence where some words are")


def test_fill_mask_rejects_bad_input(mlm_pair, classifier) -> None:
    ours, _ = mlm_pair
    with pytest.raises(ValueError, match="at most 126"):
        fill_mask(ours, "x" * 127, [(0, 1)])
    with pytest.raises(ValueError, match="overlap"):
        fill_mask(ours, "hello", [(0, 2), (1, 3)])
    with pytest.raises(TypeError, match="PerceiverForMaskedLM"):
        fill_mask(classifier, "hello", [(0, 1)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_answers(classifier, mlm_pair) -> None:
    texts = random_texts(8, 30, seed=7)
    on_cpu = classify(classifier, texts, batch_size=4)
    ours, _ = mlm_pair
    text, spans = masked_spans(CARD_SENTENCE, substring=" missing.")
    cpu_fill = fill_mask(ours, text, spans)
    try:
        on_gpu = classify(classifier, texts, batch_size=4, device="cuda")
        gpu_fill = fill_mask(ours, text, spans, device="cuda")
        assert next(classifier.parameters()).device.type == "cuda"
    finally:
        classifier.to("cpu")
        ours.to("cpu")
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert a.label == b.label
        assert a.score == pytest.approx(b.score, abs=1e-3)
    assert gpu_fill.span_bytes == cpu_fill.span_bytes
