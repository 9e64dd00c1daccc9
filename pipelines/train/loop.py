"""The per-worker training function that Ray Train runs on each of N workers.

Each worker builds the model, wraps it in a DeepSpeed engine, restores the last checkpoint if Ray
Train hands one over, and trains on its shard of the crop stream. Every collective (gradient
reduction, metric all-reduce, validation, checkpoint report) happens at the same step on every
rank, decided by the step number alone, so the ranks never wait on each other forever.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceiver_core.config import PerceiverConfig
from perceiver_core.model import PerceiverForMaskedLM
from pipelines.tracking.registry import Lineage, register_with_retry
from pipelines.tracking.sink import MetricsSink, MlflowSink, MultiSink, build_sink
from pipelines.train.checkpoint import HF_DIR, Checkpointer, ResumePointer, TrainState
from pipelines.train.config import PretrainConfig
from pipelines.train.data import DataPosition, MicroBatches, iterate_rows, load_rows
from pipelines.train.engine import (
    create_engine,
    deepspeed_config,
    full_fp32_state_dict,
    global_grad_norm,
    needs_manual_grad_norm,
    resolve_precision,
)
from pipelines.train.metrics import (
    ConsoleSink,
    FlopsCounter,
    Interval,
    interval_metrics,
    masked_lm_sums,
    validation_metrics,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerJob:
    """What the driver resolved before starting workers, shipped in ``train_loop_config``."""

    cfg: PretrainConfig
    run_id: str
    tracking_uri: str
    run_dir: str  # the run's storage folder (local path or s3://), for the resume pointer
    config_hash: str
    data_fingerprint: str
    code_version: str
    eval_crops: int
    model_config: PerceiverConfig  # the preset's, or the starting model's (model.init_from)
    init_dir: str | None = None  # starting weights as the driver sees them (HF directory)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``TorchTrainer(train_loop_per_worker, train_loop_config={"job": ...})``."""
    import ray.train

    job: WorkerJob = config["job"]
    _log_to_console()
    context = ray.train.get_context()
    worker = PretrainWorker(job, context.get_world_rank(), context.get_world_size())
    worker.run()


class PretrainWorker:
    def __init__(self, job: WorkerJob, rank: int, world_size: int) -> None:
        import ray.train

        self.job, self.cfg = job, job.cfg
        self.rank, self.world_size = rank, world_size
        self.model_config = job.model_config
        self.engine, precision = self._build_engine()
        self.checkpointer = Checkpointer(self.engine, rank, ResumePointer(job.run_dir))
        state = self.checkpointer.restore(ray.train.get_checkpoint())
        self.step = state.step if state else 0
        self.position = state.position if state else DataPosition()
        self.sink: MetricsSink = build_sink(rank, self._make_sink)
        started = time.perf_counter()
        self.validation = load_rows(
            ray.train.get_dataset_shard("validation"), job.eval_crops, self.cfg.eval.batch_size
        )
        log.info(
            "rank %d: engine ready (%s, ZeRO %d, %d threads), %d validation batches in %.1f s, "
            "step %d",
            rank,
            precision,
            self.cfg.train.zero_stage,
            torch.get_num_threads(),
            len(self.validation),
            time.perf_counter() - started,
            self.step,
        )
        t = self.cfg.train
        rows = iterate_rows(
            ray.train.get_dataset_shard("train"), t.micro_batch_size, t.prefetch_batches
        )
        self.stream = MicroBatches(
            rows, t.micro_batch_size, skip=self.position, device=self.engine.device
        )
        crop_len = self.cfg.data.packing.crop_len
        self.flops = FlopsCounter(self.model_config, t.micro_batch_size, crop_len)
        self.interval = Interval(self.engine.device)

    def _build_engine(self) -> tuple[Any, str]:
        from deepspeed.accelerator import get_accelerator

        cfg = self.cfg
        # Same initial weights on every rank (DeepSpeed also broadcasts rank 0's), then a
        # different dropout stream per rank.
        _seed(cfg.run.seed)
        model = PerceiverForMaskedLM(self.model_config)
        if self.job.init_dir is not None:
            _load_init(model, self.job)
        model.encoder.activation_checkpointing = cfg.model.activation_checkpointing
        _seed(cfg.run.seed + 1 + self.rank)
        precision = resolve_precision(cfg.train.precision, get_accelerator().is_bf16_supported())
        ds_config = deepspeed_config(
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps,
            world_size=self.world_size,
            zero_stage=cfg.train.zero_stage,
            precision=precision,
            grad_clip=cfg.train.grad_clip,
            on_gpu=cfg.train.use_gpu,
        )
        engine = create_engine(model, ds_config, cfg.train.optimizer, cfg.train.steps)
        return engine, precision

    def _make_sink(self) -> MetricsSink:
        mlflow_sink = MlflowSink.from_config(
            self.job.run_id, self.job.tracking_uri, self.cfg.tracking
        )
        return MultiSink(ConsoleSink(self.cfg.train.steps, self.step), mlflow_sink)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        import ray.train

        total = self.cfg.train.steps
        try:
            if self.step >= total:  # restored from the final checkpoint: only the export is left
                self._export_final()
                return
            while self.step < total:
                self._train_step()
                self.step += 1
                self._maybe_pause()
                metrics = self._collect_metrics()
                if metrics:
                    self.sink.log(self.step, metrics)
                report_every = self.cfg.train.report_every
                if self._is_checkpoint_step():
                    self._checkpoint(metrics)
                elif report_every and self.step % report_every == 0:
                    ray.train.report(metrics if self.rank == 0 else {})
        finally:
            self.sink.close()

    def _train_step(self) -> None:
        """One optimizer step: ``grad_accum_steps`` micro-batches, then DeepSpeed's step."""
        started = time.perf_counter()
        wait_before = self.stream.wait_s
        manual_norm = needs_manual_grad_norm(self.engine)
        norm = 0.0
        for _ in range(self.cfg.train.grad_accum_steps):
            batch = self.stream.next()
            out = self.engine(**batch.inputs)
            self.engine.backward(out.loss)
            if manual_norm and self.engine.is_gradient_accumulation_boundary():
                norm = global_grad_norm(self.engine)
            self.engine.step()
            self.interval.add_micro(
                out.loss, batch.masked, batch.real_bytes, self.flops(batch.decoded)
            )
        if not manual_norm:
            norm = global_grad_norm(self.engine)
        self.interval.grad_norm_sum += norm
        self.interval.steps += 1
        self.interval.data_wait_s += self.stream.wait_s - wait_before
        self.interval.step_time_s += time.perf_counter() - started

    def _collect_metrics(self) -> dict[str, float]:
        cfg, total = self.cfg, self.cfg.train.steps
        metrics: dict[str, float] = {}
        if self.step % cfg.train.log_every == 0 or self.step == total:
            totals = self.interval.reduce(self.world_size)
            metrics.update(
                interval_metrics(
                    self.interval,
                    totals,
                    world_size=self.world_size,
                    lr=float(self.engine.get_lr()[0]),
                    peak_flops_per_worker=cfg.train.peak_flops_per_worker,
                )
            )
            metrics["data/skipped_crops"] = float(self.stream.skipped)
            self.interval = Interval(self.engine.device)
        every = cfg.eval.every
        if (every and self.step % every == 0) or self.step == total:
            metrics.update(self._evaluate())
        return metrics

    def _is_checkpoint_step(self) -> bool:
        c = self.cfg.checkpoint
        return (
            self.step % c.every == 0
            or self.step == self.cfg.train.steps
            or self.step in c.export_at
        )

    # -- validation ------------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Masked-byte loss, accuracy and bits per byte on the held-out crops. The batches are dealt
        round-robin to ranks; every rank runs the same number of forward passes (ZeRO-3 gathers
        weights collectively), the surplus ones on a repeated batch whose result is not counted."""
        from pipelines.data.pretrain import crops_to_torch

        batches = self.validation
        rounds = -(-len(batches) // self.world_size)
        sums = torch.zeros(3, dtype=torch.float64, device=self.engine.device)
        self.engine.eval()
        try:
            for r in range(rounds):
                index = r * self.world_size + self.rank
                inputs = crops_to_torch(batches[min(index, len(batches) - 1)], self.engine.device)
                out = self.engine(**inputs)
                if index < len(batches):
                    sums += masked_lm_sums(out.logits, out.positions, out.valid, inputs["labels"])
        finally:
            self.engine.train()
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
        return validation_metrics(sums)

    # -- checkpoints and exports -----------------------------------------------------------------

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        # Metrics of the steps up to this checkpoint must be stored before it can be committed:
        # a run resumed from it does not run those steps again. During an outage the wait is
        # bounded and the values stay buffered (lost only if this process dies before the server
        # is back, which the sink reports).
        if not self.sink.flush(self.cfg.tracking.checkpoint_flush_s):
            log.warning("metrics up to step %d not yet stored in MLflow", self.step)
        positions = _gather_positions(self.stream.drain_consumed(), self.world_size)
        self.position = self.position.advance(positions)
        self.stream.skip = self.position
        state = TrainState(
            step=self.step,
            position=self.position,
            run_id=self.job.run_id,
            config_hash=self.job.config_hash,
            world_size=self.world_size,
            zero_stage=self.cfg.train.zero_stage,
        )
        final = self.step == self.cfg.train.steps
        export = final or self.step in self.cfg.checkpoint.export_at
        hf_state = full_fp32_state_dict(self.engine, self.rank) if export else None
        report = {
            **metrics,
            "step": float(self.step),
            "data/crops_consumed": state.position.consumed,
        }

        def register(folder: Path) -> None:
            self._register(folder / HF_DIR, required=final)

        self.checkpointer.save(
            state,
            report if self.rank == 0 else {},
            hf_state=hf_state,
            model_config=self.model_config,
            after_report=register if (export and self.rank == 0) else None,
        )

    def _export_final(self) -> None:
        hf_state = full_fp32_state_dict(self.engine, self.rank)
        if self.rank != 0:
            return
        from perceiver_core.hf import save_pretrained

        model = PerceiverForMaskedLM(self.model_config)
        model.load_state_dict(hf_state)
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            self._register(save_pretrained(model, Path(tmp) / HF_DIR), required=True)

    def _register(self, hf_dir: Path, *, required: bool) -> None:
        t = self.cfg.tracking
        if not t.register:
            return
        lineage = Lineage(
            run_id=self.job.run_id,
            step=self.step,
            data_fingerprint=self.job.data_fingerprint,
            config_hash=self.job.config_hash,
            code_version=self.job.code_version,
        )
        try:
            register_with_retry(
                self.job.tracking_uri,
                hf_dir,
                t.registered_model,
                lineage,
                timeout_s=t.close_timeout_s,
            )
        except Exception:
            if required:  # fails the attempt; a retry resumes from the final checkpoint
                raise
            log.exception("could not register the model of step %d; training goes on", self.step)

    # -- fault injection for tests ---------------------------------------------------------------

    def _maybe_pause(self) -> None:
        debug = self.cfg.debug
        if debug.pause_at_step != self.step or debug.marker_dir is None:
            return
        marker = Path(debug.marker_dir) / f"rank{self.rank}.pid"
        if marker.exists():  # once per run: a restarted worker passes this step normally
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        time.sleep(debug.pause_s)


def _load_init(model: PerceiverForMaskedLM, job: WorkerJob) -> None:
    """Starting weights for continued pretraining or MLM adaptation (a classifier's encoder
    keeps a fresh MLM head, which is logged)."""
    from perceiver_core.hf import load_into, load_state_dict

    folder = Path(job.init_dir or "")
    if not (folder / "config.json").is_file():  # not visible on this node: fetch it here
        from pipelines.tracking.models import resolve_model

        folder = resolve_model(str(job.cfg.model.init_from), tracking_uri=job.tracking_uri).hf_dir
    load_into(model, load_state_dict(folder), strict=False)


def _gather_positions(local: np.ndarray, world_size: int) -> np.ndarray:
    """Every rank's consumed stream positions, on every rank."""
    if world_size == 1:
        return local
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    return np.concatenate(gathered)


def _log_to_console() -> None:
    """This package's INFO lines on the worker's stderr (Ray forwards it to the driver)."""
    logger = logging.getLogger("pipelines")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray's root handler would print every line a second time


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
