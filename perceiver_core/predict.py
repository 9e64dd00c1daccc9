"""Inference on one device: classify texts, and fill masked bytes with the language model.

These are the two things users do with a trained model, written against ``perceiver_core`` models
directly (no ``transformers`` pipeline), so they run on whatever ``perceiver_core.hf.from_pretrained``
or a training checkpoint gives back.

Classification follows ``transformers``' text-classification pipeline: each text is encoded as
``[CLS] text [SEP]`` (``[CLS] a [SEP] b [SEP]`` for pairs), truncated to the model's input length,
and a batch is padded to its longest row. Padded keys are masked out of the encoder's attention, so a
text gets the same logits alone or beside a longer one; texts are therefore sorted by length before
batching (less padding, same answers) and returned in input order.

Fill-mask works on bytes: a masked span of N bytes is N ``[MASK]`` ids, and the model predicts one
byte per position. This is the example of the ``deepmind/language-perceiver`` model card, which masks
the nine bytes of ``" missing."`` (``input_ids[0, 52:61]``) and decodes the argmax there.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from perceiver_core.config import LONG_TEXT_MODES, PerceiverConfig
from perceiver_core.model import PerceiverForMaskedLM, PerceiverForSequenceClassification
from perceiver_core.tokenizer import BYTE_OFFSET, CLS, MASK, SEP, ByteTokenizer

Device = torch.device | str | None

# What a masked byte looks like in text: the clean text of ``masked_spans`` and ``masked_text``.
MASK_PLACEHOLDER = "_"
# ``[MASK]`` is one byte, as transformers' FillMaskPipeline reads it with this tokenizer (the
# tokenizer turns the literal into one MASK id); ``[MASK*N]`` is N bytes.
_MARKER = re.compile(r"\[MASK(?:\*(\d+))?\]")
# No span is longer than any model input; the cap stops "[MASK*99999999999]" allocating memory.
_MAX_MARKER_BYTES = 1 << 20


@dataclass(frozen=True)
class Prediction:
    """One text's classification.

    Classifiers: ``label`` is the most probable label name, ``score`` its softmax probability and
    ``scores`` the probability of every label. Regression models (one output): ``label`` is the
    output's name (``config.label_names()[0]``, ``"LABEL_0"`` unless named), ``score`` the raw
    predicted value and ``scores`` ``{label: score}``. That is what transformers' pipeline (and
    hence an MLflow ``transformers`` model) returns for the same model, so both serve one format.
    """

    label: str
    score: float
    scores: dict[str, float]


@dataclass(frozen=True)
class FilledText:
    """A fill-mask result.

    text: the input with every span replaced by the predicted bytes, decoded as UTF-8 with
        ``errors="replace"`` (a span can cut a character or predict invalid UTF-8).
    predictions: the decoded bytes of each span, in the order the spans were given.
    masked_text: the input with each masked byte shown as ``MASK_PLACEHOLDER``.
    span_bytes: the raw predicted bytes of each span (exact where ``predictions`` may not be).
    """

    text: str
    predictions: list[str]
    masked_text: str
    span_bytes: list[bytes]


@contextlib.contextmanager
def _inference(model: torch.nn.Module, device: Device) -> Iterator[torch.device]:
    """Eval mode (no dropout) and no autograd for the duration; the model's mode is restored after,
    so a training loop can call this on its own model. ``device`` moves the model there first."""
    if device is not None:
        model.to(device)
    target = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield target
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------


def _length_limit(config: PerceiverConfig, max_length: int | None) -> int:
    positions = config.max_position_embeddings
    if max_length is None:
        return positions
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 ([CLS] and [SEP]), got {max_length!r}")
    if max_length > positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's max_position_embeddings ({positions})"
        )
    return max_length


def _prediction(logits: torch.Tensor, names: list[str], regression: bool) -> Prediction:
    if regression:
        value = float(logits[0])
        return Prediction(label=names[0], score=value, scores={names[0]: value})
    probs = torch.softmax(logits, dim=-1).tolist()
    best = int(torch.argmax(logits))
    return Prediction(
        label=names[best], score=probs[best], scores=dict(zip(names, probs, strict=True))
    )


def classify(
    model: PerceiverForSequenceClassification,
    texts: Sequence[str],
    *,
    pairs: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    device: Device = None,
    long_text: str | None = None,
) -> list[Prediction]:
    """Classify ``texts`` (with their second sentences ``pairs`` for pair tasks such as MRPC).

    Texts longer than ``max_length`` tokens (default: the model's ``max_position_embeddings``),
    special tokens included, are answered as ``long_text`` says (default: the model's
    ``config.long_text``): ``"truncate"`` keeps their beginning; ``"windows"`` splits each text
    into consecutive windows that fit, classifies every window and averages their logits (single
    texts only: pairs are truncated). ``device`` moves the model; by default it runs where the
    model is. Returns one ``Prediction`` per text, in input order.
    """
    logits = text_logits(
        model,
        texts,
        pairs=pairs,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        long_text=long_text,
    )
    names = model.config.label_names()
    return [_prediction(row, names, model.is_regression) for row in logits]


def text_logits(
    model: PerceiverForSequenceClassification,
    texts: Sequence[str | bytes],
    *,
    pairs: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    device: Device = None,
    long_text: str | None = None,
) -> torch.Tensor:
    """The float32 logits ``classify`` answers from, (len(texts), num_labels), in input order;
    a text may also be its UTF-8 bytes (an evaluation that holds them)."""
    if not isinstance(model, PerceiverForSequenceClassification):
        raise TypeError(f"classify needs a PerceiverForSequenceClassification, got {type(model)}")
    if isinstance(texts, str | bytes) or (pairs is not None and isinstance(pairs, str)):
        raise TypeError(
            "texts and pairs must be sequences of strings; wrap a single text in a list"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    mode = long_text or model.config.long_text
    if mode not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {mode!r}")
    texts = list(texts)
    pair_list = None if pairs is None else list(pairs)
    if pair_list is not None and len(pair_list) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(pair_list)} pairs")
    limit = _length_limit(model.config, max_length)
    with _inference(model, device) as target:
        if mode == "truncate" or pair_list is not None:
            return _logits(model, target, texts, pair_list, limit, batch_size)
        windows, owners = _windows(texts, limit - 2)  # [CLS] and [SEP] around each
        per_window = _logits(model, target, windows, None, limit, batch_size)
    owner = torch.as_tensor(owners)
    total = torch.zeros(len(texts), per_window.shape[1]).index_add_(0, owner, per_window)
    return total / torch.bincount(owner, minlength=len(texts)).unsqueeze(1)


def _windows(texts: Sequence[str | bytes], width: int) -> tuple[list[bytes], list[int]]:
    """Each text's UTF-8 bytes in consecutive pieces of ``width`` (an empty text is one empty
    piece), and the index of the text each piece comes from."""
    windows, owners = [], []
    for i, text in enumerate(texts):
        data = text.encode("utf-8") if isinstance(text, str) else text
        for start in range(0, max(len(data), 1), width):
            windows.append(data[start : start + width])
            owners.append(i)
    return windows, owners


def _logits(
    model: PerceiverForSequenceClassification,
    target: torch.device,
    texts: Sequence[str | bytes],
    pairs: Sequence[str] | None,
    limit: int,
    batch_size: int,
) -> torch.Tensor:
    """Float32 logits of every text, in input order, computed in batches of similar length."""
    tokenizer = ByteTokenizer(model_max_length=limit)

    def size(text: str | bytes) -> int:
        return len(text.encode("utf-8")) if isinstance(text, str) else len(text)

    lengths = [size(t) for t in texts]
    if pairs is not None:
        lengths = [n + size(p) for n, p in zip(lengths, pairs, strict=True)]
    order = np.argsort(lengths, kind="stable")
    out = torch.empty(len(texts), model.config.num_labels)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size].tolist()
        batch = tokenizer(
            [texts[i] for i in rows],
            None if pairs is None else [pairs[i] for i in rows],
            padding="longest",
            truncation=True,
            max_length=limit,
        )
        ids = torch.from_numpy(batch["input_ids"]).to(target)
        mask = torch.from_numpy(batch["attention_mask"]).to(target)
        out[rows] = model(ids, mask).logits.float().cpu()
    return out


# ---------------------------------------------------------------------------------------------------
# Fill-mask
# ---------------------------------------------------------------------------------------------------


def _occurrences(text: str, substring: str) -> list[tuple[int, int]]:
    if not substring:
        raise ValueError("substring must not be empty")
    raw, needle = text.encode("utf-8"), substring.encode("utf-8")
    spans = []
    start = raw.find(needle)
    while start != -1:
        spans.append((start, start + len(needle)))
        start = raw.find(needle, start + len(needle))  # non-overlapping, left to right
    if not spans:
        raise ValueError(f"nothing to mask: {substring!r} does not occur in the text")
    return spans


def masked_spans(text: str, *, substring: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The clean text and the byte spans ``[start, end)`` of its UTF-8 encoding to mask.

    With ``substring``: every non-overlapping occurrence of it, and the text unchanged. Otherwise
    the text's markers: ``[MASK]`` masks one byte and ``[MASK*N]`` masks N bytes; each marker is
    replaced by one ``MASK_PLACEHOLDER`` per masked byte in the clean text. Raises ``ValueError``
    when nothing would be masked.
    """
    if substring is not None:
        return text, _occurrences(text, substring)
    pieces: list[bytes] = []
    spans: list[tuple[int, int]] = []
    offset = cursor = 0
    for match in _MARKER.finditer(text):
        before = text[cursor : match.start()].encode("utf-8")
        count = int(match.group(1)) if match.group(1) is not None else 1
        if not 1 <= count <= _MAX_MARKER_BYTES:
            raise ValueError(f"{match.group(0)}: N must be between 1 and {_MAX_MARKER_BYTES}")
        offset += len(before)
        pieces += [before, MASK_PLACEHOLDER.encode() * count]
        spans.append((offset, offset + count))
        offset += count
        cursor = match.end()
    if not spans:
        raise ValueError(
            "nothing to mask: put [MASK] (one byte) or [MASK*N] (N bytes) in the text, "
            "or pass substring="
        )
    pieces.append(text[cursor:].encode("utf-8"))
    return b"".join(pieces).decode("utf-8"), spans


def _checked_spans(spans: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    checked = [(operator.index(a), operator.index(b)) for a, b in spans]
    if not checked:
        raise ValueError("nothing to mask: spans is empty")
    for a, b in checked:
        if not 0 <= a < b <= size:
            raise ValueError(
                f"span ({a}, {b}) is not a non-empty byte range of the {size}-byte text"
            )
    ordered = sorted(checked)
    for (_, end), (start, _) in itertools.pairwise(ordered):
        if start < end:
            raise ValueError(f"spans overlap at byte {start}")
    return checked


def masked_input_ids(text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """``[CLS] bytes [SEP]`` ids with the spans' bytes set to ``[MASK]``, and the masked positions
    in span order (byte offset + 1, for the leading ``[CLS]``).

    The text is taken byte for byte: a literal ``[CLS]`` in it stays five bytes, so byte offsets
    and positions always correspond.
    """
    raw = text.encode("utf-8")
    checked = _checked_spans(spans, len(raw))
    # int64 before adding the offset: in uint8, bytes 250..255 would wrap around to ids 0..5.
    byte_ids = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
    ids = np.concatenate([[CLS], byte_ids, [SEP]])
    positions = [p + 1 for a, b in checked for p in range(a, b)]
    ids[positions] = MASK
    return ids.tolist(), positions


def fill_mask(
    model: PerceiverForMaskedLM,
    text: str,
    spans: Sequence[tuple[int, int]],
    *,
    device: Device = None,
) -> FilledText:
    """Predict the masked bytes of ``text``: the argmax over byte ids at each masked position.

    ``spans`` are byte ranges of the UTF-8 encoding of ``text`` (see ``masked_spans``). Special ids
    are excluded from the argmax, so that every position is filled with a byte; where the model's
    overall argmax is a byte (as for any trained model), the result is the model card's.
    """
    if not isinstance(model, PerceiverForMaskedLM):
        raise TypeError(f"fill_mask needs a PerceiverForMaskedLM, got {type(model)}")
    raw = text.encode("utf-8")
    limit = model.config.max_position_embeddings
    if len(raw) + 2 > limit:
        raise ValueError(
            f"text is {len(raw)} bytes; with [CLS] and [SEP] the model reads at most {limit - 2}"
        )
    ids, positions = masked_input_ids(text, spans)
    checked = _checked_spans(spans, len(raw))
    with _inference(model, device) as target:
        out = model(
            torch.tensor([ids], device=target), positions=torch.tensor(positions, device=target)
        )
        byte_logits = out.logits[0, :, BYTE_OFFSET:].float()
        predicted = byte_logits.argmax(dim=-1).to(torch.uint8).cpu().numpy().tobytes()
    filled, masked = bytearray(raw), bytearray(raw)
    span_bytes = []
    used = 0
    for a, b in checked:
        chunk = predicted[used : used + b - a]
        used += b - a
        filled[a:b] = chunk
        masked[a:b] = MASK_PLACEHOLDER.encode() * (b - a)
        span_bytes.append(chunk)
    return FilledText(
        text=filled.decode("utf-8", errors="replace"),
        predictions=[chunk.decode("utf-8", errors="replace") for chunk in span_bytes],
        masked_text=masked.decode("utf-8", errors="replace"),
        span_bytes=span_bytes,
    )
