"""Byte tokenizer throughput against transformers.PerceiverTokenizer, plus packing and masking.

Both tokenizers encode the same texts (Wikipedia, C4 and IMDB from the sample data) in one batch
call with the same options: special tokens added, no padding, no truncation. HF returns Python
lists, we return NumPy arrays; each side is timed producing its natural output, and the outputs are
checked equal. HF runs once (it takes seconds), ours the best of ``--repeats`` runs.

Then the pretraining path: Wikipedia + C4 packed into 2048-byte crops (groups of 10 documents) and
masked in batches of 256 crops. All of it is single-threaded: NumPy's element-wise kernels and HF's
Python loop each use one core, so the MB/s figures are per core.

    python benchmarks/tokenizer_throughput.py [--data-dir ../shared/data] [--repeats 5]

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import describe

from perceiver_core.masking import MaskingConfig, mask_batch
from perceiver_core.packing import PackingConfig, pack_documents
from perceiver_core.tokenizer import ByteTokenizer, utf8_buffer

REPO_ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_texts(data_dir: Path) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    def parquet(paths: list[Path]) -> list[str]:
        if not paths:
            raise SystemExit(f"no parquet files found under {data_dir}")
        return [
            t for p in paths for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()
        ]

    with gzip.open(data_dir / "c4/en/c4-train.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        c4 = [json.loads(line)["text"] for line in f]
    return {
        "wikipedia": parquet(sorted((data_dir / "wikipedia/20150501.en").glob("*.parquet"))),
        "c4": c4,
        "imdb": parquet([data_dir / "imdb/train.parquet", data_dir / "imdb/test.parquet"]),
    }


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` calls (the first warms the allocator), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def flat(rows) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(r) for r in rows])
    return np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())
    ), lengths


def tokenizer_comparison(texts: list[str], repeats: int) -> dict[str, float]:
    from transformers import PerceiverTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "longer than 2048" notices for long articles
    mb = sum(len(t.encode()) for t in texts) / 1e6
    ours_tok, hf_tok = ByteTokenizer(), PerceiverTokenizer()
    ours_s, ours = best_time(lambda: ours_tok(texts), repeats)
    log(f"ours: {mb:.1f} MB in {ours_s:.3f} s = {mb / ours_s:.0f} MB/s")
    compact_s, _ = best_time(lambda: ByteTokenizer(dtype="uint16")(texts), repeats)
    log("HF: encoding (one run, this takes a while)...")
    start = time.perf_counter()
    theirs = hf_tok(texts)
    hf_s = time.perf_counter() - start
    log(f"HF: {mb:.1f} MB in {hf_s:.1f} s = {mb / hf_s:.2f} MB/s")
    for key in ("input_ids", "attention_mask"):
        got, want = flat(ours[key]), flat(theirs[key])
        if not (np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])):
            raise SystemExit(f"outputs differ in {key}")
    log("outputs equal")
    return {
        "mb": round(mb, 3),
        "docs": len(texts),
        "ours_s": round(ours_s, 4),
        "hf_s": round(hf_s, 3),
        "ours_mb_per_s": round(mb / ours_s, 1),
        "ours_uint16_mb_per_s": round(mb / compact_s, 1),
        "hf_mb_per_s": round(mb / hf_s, 3),
        "speedup": round(hf_s / ours_s, 1),
        "outputs_equal": True,
    }


def pack_mask_throughput(texts: list[str], repeats: int, batch: int) -> dict[str, float]:
    values, offsets = utf8_buffer(texts)
    mb = len(values) / 1e6
    pack_s, packed = best_time(lambda: pack_documents(values, offsets, PackingConfig()), repeats)
    ids, sample_ids = packed.input_ids, packed.sample_ids()
    cfg = MaskingConfig()

    def mask_all() -> int:
        targets = 0
        for start in range(0, len(ids), batch):
            _, labels = mask_batch(
                ids[start : start + batch], sample_ids[start : start + batch], 0, cfg
            )
            targets += int((labels != -100).sum())
        return targets

    mask_s, targets = best_time(mask_all, repeats)
    crop_mb = ids.size / 1e6
    log(f"pack: {mb:.1f} MB -> {len(ids)} crops in {pack_s:.3f} s; mask: {mask_s:.3f} s")
    return {
        "pack_mask_text_mb": round(mb, 3),
        "crops": len(ids),
        "pack_mb_per_s_per_core": round(mb / pack_s, 1),
        "mask_mb_per_s_per_core": round(crop_mb / mask_s, 1),  # MB of 2048-byte crops
        "pack_mask_mb_per_s_per_core": round(mb / (pack_s + mask_s), 1),  # MB of text, both steps
        "masked_fraction_of_bytes": round(targets / float(packed.lengths.sum()), 4),
        "mask_batch": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=5, help="runs of our side; the best counts")
    parser.add_argument("--mask-batch", type=int, default=256, help="crops per mask_batch call")
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"sample data not found at {args.data_dir} (pass --data-dir)")

    log(f"reading {args.data_dir}")
    corpora = load_texts(args.data_dir)
    texts = corpora["wikipedia"] + corpora["c4"] + corpora["imdb"]
    summary: dict[str, object] = {"benchmark": "tokenizer_throughput", "threads": 1}
    summary.update(tokenizer_comparison(texts, args.repeats))
    summary.update(
        pack_mask_throughput(corpora["wikipedia"] + corpora["c4"], args.repeats, args.mask_batch)
    )
    summary["machine"] = describe()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
