"""Predict with a trained model: classify texts, or fill masked bytes with a language model.

    python -m jobs.predict --model models:/perceiver-imdb@champion "A wonderful film." "Dull."
    python -m jobs.predict --model DIR --mask " missing." \\
        "This is an incomplete sentence where some words are missing."
    python -m jobs.predict --model models:/perceiver-mlm/3 "The capital of France is [MASK*5]."
    python -m jobs.predict --model models:/perceiver-imdb@champion \
        --input s3://bucket/reviews/ --output s3://bucket/scored/ --id-column review_id

The model is any source ``pipelines.tracking.models.resolve_model`` takes (a registry URI, a run,
a folder, a Hub id). Texts come from the arguments, else ``--file`` (one per line), else standard
input. A classifier prints ``label<TAB>score<TAB>text`` per text; a masked-language model prints
the filled-in text and each predicted span. ``--json`` prints one JSON object per text instead.

With ``--input`` and ``--output`` it scores files instead, on Ray (the cluster ``RAY_ADDRESS``
names, else an in-process one): every parquet or JSON lines file of the inputs gets a parquet
output with its rows' ``row``, id column, ``label`` and ``score``; a re-run skips the files
already scored (``pipelines.inference``).
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
    parser.add_argument(
        "--long-text",
        choices=("truncate", "windows"),
        help="texts longer than the model's positions: keep the beginning, or average the "
        "logits of consecutive windows (default: the model's setting, long_text in config.json)",
    )
    files = parser.add_argument_group("batch inference (files in, parquet out, on Ray)")
    files.add_argument("--input", nargs="+", metavar="PATH", help="files, folders or globs")
    files.add_argument("--output", metavar="DIR", help="folder or s3:// prefix for the outputs")
    files.add_argument("--text-column", default="text", help="the text to classify (text)")
    files.add_argument("--pair-column", help="the second text of pair tasks")
    files.add_argument("--id-column", help="an input column copied to the output")
    files.add_argument("--actors", type=int, help="actor pool size (default: CPUs or GPUs)")
    files.add_argument("--cpus-per-actor", type=int, default=1, help="torch threads each (1)")
    files.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs each (0)")
    args = parser.parse_args(argv)
    if (args.input is None) != (args.output is None):
        parser.error("--input and --output go together")
    if args.input and (args.texts or args.file or args.mask):
        parser.error("--input scores files: give no texts, --file or --mask with it")
    return args


def predict_files(args: argparse.Namespace) -> int:
    from jobs import console, report_user_error, start_ray
    from pipelines.inference import PredictSettings, Resources
    from pipelines.inference import predict_files as run

    console()
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        settings = PredictSettings(
            text_column=args.text_column,
            pair_column=args.pair_column,
            id_column=args.id_column,
            batch_size=args.batch_size,
            long_text=args.long_text,
        )
        resources = Resources(args.actors, args.cpus_per_actor, args.gpus_per_actor)
        start_ray()
        result = run(
            args.model,
            args.input,
            args.output,
            settings,
            resources,
            tracking_uri=args.tracking_uri,
        )
    except Exception as error:  # what to fix, in one line; anything else is re-raised
        return report_user_error(error)
    print(result.summary())
    return 0


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return list(args.texts)
    lines = args.file.read_text(encoding="utf-8") if args.file else sys.stdin.read()
    return [line for line in lines.splitlines() if line.strip()]


def classify_lines(loaded: LoadedModel, texts: list[str], args: argparse.Namespace) -> list[str]:
    from perceiver_core.predict import classify

    predictions = classify(
        loaded.model, texts, batch_size=args.batch_size, long_text=args.long_text
    )
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
    # A missing model is answered at once; an unreachable server should be too, rather than
    # after MLflow's default retries (minutes). An explicit setting wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if args.input:
        return predict_files(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Its retry warnings would repeat the one error line that an unreachable server gets.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
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
