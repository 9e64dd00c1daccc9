"""What the distributed stack costs per training step, against a bare PyTorch loop, in one run.

Full stack: ``pipelines.train.run_pretraining`` (Ray Train worker, DeepSpeed ZeRO-2 engine, the
Ray Data crop stream, metric logging to MLflow) on the offline sample in ../shared/data. Bare loop:
the same model, batch size, crops (taken from the same stream beforehand), fp32 precision,
optimizer (torch AdamW), clipping and thread count, in this process with no Ray or DeepSpeed.

Each side is timed over steady-state steps (after warm-up): the full stack by the training loop's
own interval timers (``perf/wall_s_per_step``: everything the loop does between two logs; the
final interval with its validation and checkpoint is left out), the bare loop by the wall clock.

    python benchmarks/train_overhead.py                     # small preset, 512-byte crops
    python benchmarks/train_overhead.py --steps 60 --workers 2

``--workers 1`` (the default) gives the training worker one core and leaves the other to Ray Data
on a 2-core machine, so that what is measured is the stack's overhead, not CPU contention between
data loading and compute. Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

from perceiver_core.flops import measured_matmul_flops, step_flops
from perceiver_core.model import PerceiverForMaskedLM

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def matmul_peak(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    """fp32 matmul FLOP/s of this machine with ``threads`` threads: the MFU denominator."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measured_matmul_flops("cpu", torch.float32, n=n, seconds=seconds)
    finally:
        torch.set_num_threads(previous)


def benchmark_config(
    args: argparse.Namespace, workdir: Path, peak: float, name: str, buffer_mb: int
):
    from pipelines.config import load_config
    from pipelines.train import PretrainConfig

    overrides = [
        f"run.name={name}",
        f"run.storage_path={workdir / 'runs'}",
        f"data.data_dir={args.data}",
        f"data.packing.crop_len={args.crop_len}",
        "model.preset=small",
        f"model.overrides.max_position_embeddings={args.crop_len}",
        f"train.steps={args.steps}",
        f"train.num_workers={args.workers}",
        f"train.cpus_per_worker={1 if args.workers == 1 else 0.5}",
        f"train.micro_batch_size={args.batch}",
        "train.zero_stage=2",
        "train.precision=fp32",
        f"train.peak_flops_per_worker={peak}",
        f"train.log_every={args.log_every}",
        f"train.data_buffer_mb={buffer_mb}",
        "eval.every=0",
        "eval.crops=64",
        f"checkpoint.every={args.steps}",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "tracking.register=false",
    ]
    return load_config(PretrainConfig, REPO / "jobs" / "configs" / "pretrain_tiny.yaml", overrides)


def full_stack(cfg, workdir: Path) -> dict[str, float]:
    from mlflow import MlflowClient

    from pipelines.train import run_pretraining

    started = time.perf_counter()
    result = run_pretraining(cfg, workdir=workdir)
    total = time.perf_counter() - started
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")

    def series(key: str) -> list[float]:
        values = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, key))
        # Drop the first two intervals (compilation, stream start-up) and the last (validation,
        # checkpoint): the steady state is what a long run sees.
        return [v for _, v in values[2:-1]]

    return {
        "wall_s_per_step": statistics.median(series("perf/wall_s_per_step")),
        "step_time_s": statistics.median(series("perf/step_time_s")),
        "mfu": statistics.median(series("perf/mfu")),
        "data_wait_fraction": statistics.median(series("perf/data_wait_fraction")),
        "bytes_per_s": statistics.median(series("perf/bytes_per_s")),
        "run_seconds": total,
    }


def backpressured_run(args: argparse.Namespace, workdir: Path, peak: float) -> dict[str, float]:
    """The full stack again, with a 1 MiB read-ahead buffer: smaller than this run's stream, as a
    long run's buffer is smaller than its stream, so Ray Data's executor waits on the workers
    until the end, which is the steady state of a long run."""
    from pipelines.data.index import INDEX_FILE

    cfg = benchmark_config(args, workdir, peak, "overhead-backpressured", 1)
    folder = workdir / "runs" / "overhead-backpressured"
    folder.mkdir(parents=True)
    index = workdir / "runs" / "overhead" / INDEX_FILE
    (folder / INDEX_FILE).write_text(index.read_text())  # the same data, not indexed again
    result = full_stack(cfg, workdir)
    log(f"full stack, backpressured stream: {result}")
    return result


def sample_batches(cfg, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` micro-batches of the stream the full stack trains on (its index, built here, is
    saved where the run will reuse it)."""
    from pipelines.data.index import run_index
    from pipelines.data.pretrain import crops_to_torch, pretraining_dataset

    index = run_index(cfg.data, f"{cfg.run.storage_path}/{cfg.run.name}")
    ds = pretraining_dataset(cfg.data, index)
    size = cfg.train.micro_batch_size
    batches = []
    # Closing the iterator stops the stream's executor, which would otherwise keep a core busy
    # during the bare loop.
    with contextlib.closing(iter(ds.iter_batches(batch_size=size, batch_format="numpy"))) as it:
        for batch in it:
            if len(batch["position"]) == size:
                batches.append(crops_to_torch(batch))
            if len(batches) == count:
                return batches
    raise RuntimeError("the stream is shorter than the benchmark")


def bare_loop(cfg, batches: list[dict[str, torch.Tensor]], warmup: int, threads: int) -> float:
    """Seconds per step of plain PyTorch: same model, optimizer, clipping and precision."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    model = PerceiverForMaskedLM(cfg.model.perceiver_config()).train()
    o = cfg.train.optimizer
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="crops per worker per step")
    parser.add_argument("--crop-len", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--data-buffer-mb", type=int, default=256)
    parser.add_argument(
        "--no-backpressured-run",
        action="store_true",
        help="skip the second full-stack run, whose stream outlasts the read-ahead buffer",
    )
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    threads = 1  # what a 1-CPU Ray worker gets (OMP_NUM_THREADS=1)
    peak = matmul_peak(threads)
    log(f"fp32 matmul peak with {threads} thread: {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        workdir = Path(tmp)
        cfg = benchmark_config(args, workdir, peak, "overhead", args.data_buffer_mb)
        batches = sample_batches(cfg, 5 + max(20, args.steps // 2))
        # The bare loop runs before and after the full stack, and the two are averaged, so that
        # a change in the machine's load during the run biases neither side.
        bare_before = bare_loop(cfg, batches, warmup=5, threads=threads)
        log(f"bare loop: {bare_before:.4f} s/step; full stack: {args.workers} worker(s), ZeRO-2")
        full = full_stack(cfg, workdir)
        log(f"full stack: {full}")
        pressed = None if args.no_backpressured_run else backpressured_run(args, workdir, peak)
        bare_after = bare_loop(cfg, batches, warmup=5, threads=threads)
    ray.shutdown()
    bare = (bare_before + bare_after) / 2
    model_cfg = cfg.model.perceiver_config()
    decoded = statistics.mean(int((b["labels"] != -100).sum(1).max()) for b in batches)
    flops = step_flops(
        model_cfg,
        cfg.train.micro_batch_size,
        cfg.data.packing.crop_len,
        decoded_positions=round(decoded),
    ).total
    log(f"bare loop: {bare_before:.4f} and {bare_after:.4f} s/step")
    result = {
        "overhead_fraction": round(full["wall_s_per_step"] / bare - 1.0, 4),
        "step_overhead_fraction": round(full["step_time_s"] / bare - 1.0, 4),
        "mfu": round(full["mfu"], 4),
        "bare_mfu": round(flops / bare / peak, 4),
        "full_wall_s_per_step": round(full["wall_s_per_step"], 4),
        "full_step_time_s": round(full["step_time_s"], 4),
        "bare_step_time_s": round(bare, 4),
        "bare_step_time_s_before_after": [round(bare_before, 4), round(bare_after, 4)],
        "data_wait_fraction": round(full["data_wait_fraction"], 4),
        "bytes_per_s": round(full["bytes_per_s"], 1),
        "peak_flops_per_worker": round(peak),
        "workers": args.workers,
        "zero_stage": 2,
        "preset": "small",
        "micro_batch_size": args.batch,
        "crop_len": args.crop_len,
        "steps": args.steps,
        "threads_per_worker": threads,
        "full_run_seconds": round(full["run_seconds"], 1),
    }
    if pressed is not None:
        result["overhead_fraction_backpressured_stream"] = round(
            pressed["wall_s_per_step"] / bare - 1.0, 4
        )
        result["mfu_backpressured_stream"] = round(pressed["mfu"], 4)
    result["machine"] = describe()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
