"""Fine-tuning throughput on real SST-2 sentences: our path against transformers', in one run.

Ours: rows held without padding (``pipelines.data.rows.LabelledRows``), each batch padded
to its longest sentence, our classifier. transformers: ``PerceiverTokenizer`` and
``PerceiverForSequenceClassification``, batched two ways: padded to the model's 2048 positions (the
model card's ``padding="max_length"``; also what ``run_glue.py`` does by default, with
``max_seq_length`` set to the model's length) and padded per batch by ``DataCollatorWithPadding``
(its fastest). As in both pipelines, text is tokenized once before training (run_glue.py maps the
dataset; ours tokenizes in Ray Data tasks); the timed loop makes each batch from the tokenized rows
and trains from the same weights with the same AdamW, in fp32, one optimizer step per batch.

    python benchmarks/finetune_throughput.py                  # small preset, batch 32
    python benchmarks/finetune_throughput.py --preset language-perceiver --batch 8 --steps 3

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import transformers
from machine import describe

from perceiver_core import hf
from perceiver_core.config import get_preset
from perceiver_core.model import PerceiverForSequenceClassification
from perceiver_core.tokenizer import ByteTokenizer
from pipelines.data.rows import LabelledRows

SST2 = Path(os.environ.get("PERCEIVER_SHARED_DATA", "../shared/data")) / "glue/sst2/train.parquet"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_sentences(count: int) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(SST2, columns=["sentence", "label"]).slice(0, count)
    return table.column("sentence").to_pylist(), np.asarray(table.column("label"), np.int64)


def time_steps(
    model: torch.nn.Module, batches: Callable[[int], dict], steps: int, warmup: int
) -> float:
    """Seconds per step (making the batch included), after ``warmup`` untimed steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step(i: int) -> None:
        loss = model(**batches(i)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if not SST2.is_file():
        sys.exit(f"{SST2} not found: set PERCEIVER_SHARED_DATA to the sample data folder")

    config = get_preset(args.preset, attention_probs_dropout_prob=0.0, num_labels=2)
    n = args.batch * (args.steps + args.warmup)
    texts, labels = load_sentences(n)
    torch.manual_seed(0)
    initial = PerceiverForSequenceClassification(config).state_dict()
    hf_config = transformers.PerceiverConfig(
        **hf.config_to_hf(config, "PerceiverForSequenceClassification")
    )
    tokenizer = transformers.PerceiverTokenizer()
    collator = transformers.DataCollatorWithPadding(tokenizer)
    length = config.max_position_embeddings
    padded = tokenizer(texts, padding="max_length", truncation=True, max_length=length)
    unpadded = [tokenizer(t, truncation=True, max_length=length) for t in texts]
    ids = ByteTokenizer()(texts, padding="longest", truncation=True, max_length=length)
    rows = LabelledRows.from_batches(
        [
            {
                "input_ids": np.asarray(ids["input_ids"], np.uint16),
                "attention_mask": np.asarray(ids["attention_mask"], np.uint8),
                "label": labels,
            }
        ]
    )

    def span(i: int) -> slice:
        return slice(i * args.batch, (i + 1) * args.batch)

    def hf_max_length(i: int) -> dict:
        return {"inputs": torch.tensor(padded["input_ids"][span(i)]),
                "attention_mask": torch.tensor(padded["attention_mask"][span(i)]),
                "labels": torch.from_numpy(labels[span(i)])}  # fmt: skip

    def hf_longest(i: int) -> dict:
        features = [
            {**dict(enc), "labels": int(y)}
            for enc, y in zip(unpadded[span(i)], labels[span(i)], strict=True)
        ]
        batch = collator(features)
        return {"inputs": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": batch["labels"]}  # fmt: skip

    def ours(i: int) -> dict:
        return rows.batch(np.arange(span(i).start, span(i).stop))

    def fresh_hf() -> torch.nn.Module:
        model = transformers.PerceiverForSequenceClassification(hf_config)
        model.load_state_dict(hf.ours_to_hf(initial), strict=True)
        return model

    def fresh_ours() -> torch.nn.Module:
        model = PerceiverForSequenceClassification(config)
        model.load_state_dict(initial)
        return model

    sides = {
        "hf_padded_to_max_length": (fresh_hf, hf_max_length),
        "hf_padded_per_batch": (fresh_hf, hf_longest),
        "ours": (fresh_ours, ours),
    }
    seconds = {}
    for label, (build, batches) in sides.items():
        seconds[label] = time_steps(build(), batches, args.steps, args.warmup)
        log(f"{label}: {seconds[label]:.3f} s/step, {args.batch / seconds[label]:,.1f} examples/s")
    best_hf = min(seconds["hf_padded_to_max_length"], seconds["hf_padded_per_batch"])
    print(
        json.dumps(
            {
                "preset": args.preset,
                "batch": args.batch,
                "mean_sentence_bytes": round(float(np.mean([len(t.encode()) for t in texts])), 1),
                "examples_per_s": {k: round(args.batch / v, 1) for k, v in seconds.items()},
                "speedup_vs_max_length": round(
                    seconds["hf_padded_to_max_length"] / seconds["ours"], 2
                ),
                "speedup_vs_per_batch": round(seconds["hf_padded_per_batch"] / seconds["ours"], 2),
                "speedup_vs_best": round(best_hf / seconds["ours"], 2),
                "machine": describe(),
            }
        )
    )


if __name__ == "__main__":
    main()
