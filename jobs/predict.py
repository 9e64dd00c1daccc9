"""Predict with a trained model: classify texts, or fill masked bytes with a language model.

    python -m jobs.predict --model models:/perceiver-imdb@champion "A wonderful film." "Dull."
    python -m jobs.predict --model DIR --mask " missing." \\
        "This is an incomplete sentence where some words are missing."
    python -m jobs.predict --model models:/perceiver-mlm/3 "The capital of France is [MASK*5]."

The model is any source ``pipelines.tracking.models.resolve_model`` takes (a registry URI, a run,
a folder). Texts come from the arguments, else ``--file`` (one per line), else standard input.
A classifier prints ``label<TAB>score<TAB>text`` per text; a masked-language model prints the
filled-in text and each predicted span. ``--json`` prints one JSON object per text instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.tracking.models import LoadedModel, ModelSourceError, load_model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.predict", description=__doc__.split("\n")[0]
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to predict on")
    parser.add_argument("--model", required=True, help="models:/..., runs:/..., run id or folder")
    parser.add_argument("--file", type=Path, help="read texts from this file, one per line")
    parser.add_argument(
        "--mask", metavar="SUBSTRING", help="MLM: mask every occurrence of SUBSTRING"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    parser.add_argument("--device", help="cuda if available, else cpu")
    parser.add_argument("--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--batch-size", type=int, default=32, help="classifier batch size")
    return parser.parse_args(argv)


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return list(args.texts)
    lines = args.file.read_text(encoding="utf-8") if args.file else sys.stdin.read()
    return [line for line in lines.splitlines() if line.strip()]


def classify_lines(loaded: LoadedModel, texts: list[str], args: argparse.Namespace) -> list[str]:
    from perceiver_core.predict import classify

    predictions = classify(loaded.model, texts, batch_size=args.batch_size)
    if args.json:
        return [
            json.dumps({"text": t, "label": p.label, "score": p.score, "scores": p.scores})
            for t, p in zip(texts, predictions, strict=True)
        ]
    return [f"{p.label}\t{p.score:.4f}\t{t}" for t, p in zip(texts, predictions, strict=True)]


def fill_lines(loaded: LoadedModel, texts: list[str], args: argparse.Namespace) -> list[str]:
    from perceiver_core.predict import fill_mask, masked_spans

    lines = []
    for text in texts:
        clean, spans = masked_spans(text, substring=args.mask)
        filled = fill_mask(loaded.model, clean, spans)
        if args.json:
            record: dict[str, Any] = {
                "text": text,
                "masked_text": filled.masked_text,
                "filled_text": filled.text,
                "spans": [list(span) for span in spans],
                "predictions": filled.predictions,
            }
            lines.append(json.dumps(record))
            continue
        lines.append(filled.text)
        for (start, end), predicted in zip(spans, filled.predictions, strict=True):
            lines.append(f"  bytes {start}-{end}: {predicted!r}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Its retry warnings would repeat the one error line that an unreachable server gets.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    # A missing model is answered at once; an unreachable server should be too, rather than
    # after MLflow's default retries (minutes). An explicit setting wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        texts = read_texts(args)
        if not texts:
            raise ValueError("no texts: give them as arguments, with --file, or on stdin")
        loaded = load_model(args.model, device=device, tracking_uri=args.tracking_uri)
        if loaded.kind == "classifier" and args.mask is not None:
            raise ValueError(f"--mask needs a masked-language model; {args.model} is a classifier")
        predict = classify_lines if loaded.kind == "classifier" else fill_lines
        lines = predict(loaded, texts, args)
    except (ModelSourceError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
