"""Batch inference throughput: ``jobs.predict --input/--output`` on Ray against transformers'
text-classification pipeline, on the same IMDB reviews with the same weights, in one run.

Ours: the reviews in parquet files, scored by ``pipelines.inference.predict_files`` on an
in-process Ray (an actor pool, one torch thread per actor by default; texts sorted by length in
each file so batches hold little padding) into parquet outputs; timed from the call to the last
output written, so the model's load, the actors' start and the writes are in it. Ray's own start is
reported apart. transformers: ``pipeline("text-classification", truncation=True)`` with the
process's torch threads, at each batch size given, over the same texts in memory (no file read or
written); its best setting is compared. Both truncate each review to the model's positions. The
labels of both must agree, or the figures mean nothing.

    python benchmarks/batch_predict.py                       # small preset, 2,000 reviews
    python benchmarks/batch_predict.py --preset tiny --rows 200 --files 2

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from machine import describe

from perceiver_core import hf
from perceiver_core.config import get_preset
from perceiver_core.model import PerceiverForSequenceClassification

IMDB = Path(os.environ.get("PERCEIVER_SHARED_DATA", "../shared/data")) / "imdb/test.parquet"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def transformers_rate(model_dir: Path, texts: list[str], batch_size: int) -> tuple[float, list]:
    """Rows per second of transformers' pipeline at ``batch_size``, and its predictions."""
    import transformers

    classifier = transformers.pipeline(
        "text-classification", model=str(model_dir), device=-1, truncation=True
    )
    classifier(texts[:batch_size], batch_size=batch_size)  # warm up
    start = time.perf_counter()
    predictions = classifier(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - start), predictions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rows", type=int, default=2000, help="IMDB test reviews")
    parser.add_argument("--files", type=int, default=4, help="parquet files they are split into")
    parser.add_argument("--actors", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--batch-size", type=int, default=32, help="ours")
    parser.add_argument("--hf-batch-sizes", default="1,32", help="transformers' settings")
    args = parser.parse_args()

    import ray

    from pipelines.console import quiet
    from pipelines.inference import PredictSettings, Resources, predict_files

    quiet()
    torch.manual_seed(0)
    config = get_preset(args.preset, num_labels=2, id2label={0: "neg", 1: "pos"})
    table = pq.read_table(IMDB, columns=["text"]).slice(0, args.rows)
    texts = table.column("text").to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Wider weights than the default initialisation, so that the labels are not all one.
        model = PerceiverForSequenceClassification(config.replace(initializer_range=0.2))
        model_dir = hf.save_pretrained(model, root / "model")
        (root / "in").mkdir()
        per_file = -(-len(texts) // args.files)
        for i in range(args.files):
            pq.write_table(table.slice(i * per_file, per_file), root / "in" / f"{i:03d}.parquet")

        start = time.perf_counter()
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, logging_level="ERROR")
            quiet()  # ray.init configured the loggers again
        ray_start_s = time.perf_counter() - start
        log(f"ours: {len(texts)} reviews in {args.files} files ({args.preset} preset)")
        start = time.perf_counter()
        result = predict_files(
            str(model_dir),
            [str(root / "in")],
            str(root / "out"),
            PredictSettings(batch_size=args.batch_size),
            Resources(actors=args.actors),
            progress=log,
        )
        ours_s = time.perf_counter() - start
        outputs = sorted((root / "out").glob("*.parquet"))
        ours_labels = [x for p in outputs for x in pq.read_table(p).column("label").to_pylist()]

        threads = torch.get_num_threads()
        theirs: dict[str, float] = {}
        agree = 1.0  # the lowest agreement of any setting with ours
        for batch in (int(b) for b in args.hf_batch_sizes.split(",")):
            log(f"transformers pipeline: batch size {batch}, {threads} torch threads")
            rate, predictions = transformers_rate(model_dir, texts, batch)
            theirs[f"batch_{batch}"] = round(rate, 1)
            labels = [p["label"] for p in predictions]
            same = sum(a == b for a, b in zip(labels, ours_labels, strict=True)) / len(texts)
            agree = min(agree, same)

    ours_rate = result.rows / ours_s
    best = max(theirs.values())
    print(
        json.dumps(
            {
                "preset": args.preset,
                "rows": result.rows,
                "files": args.files,
                "mean_review_bytes": round(sum(len(t.encode()) for t in texts) / len(texts)),
                "max_positions": config.max_position_embeddings,
                "ours_rows_per_s": round(ours_rate, 1),
                "ours_seconds": round(ours_s, 2),
                "ours_scoring_seconds": round(result.seconds, 2),
                "ray_start_seconds": round(ray_start_s, 2),
                "transformers_rows_per_s": theirs,
                "speedup_vs_best": round(ours_rate / best, 2),
                "labels_agree": agree,
                "label_counts": {x: ours_labels.count(x) for x in sorted(set(ours_labels))},
                "machine": describe(),
            }
        )
    )


if __name__ == "__main__":
    main()
