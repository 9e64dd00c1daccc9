"""The one training core: the function Ray Train runs on each worker, for every task.

A ``Trainer`` owns what every training run needs: seeding, the engine (DeepSpeed ZeRO 0-3 or
DDP), restoring the last checkpoint, the step loop with gradient accumulation, the evaluation
cadence with best-score tracking and early stopping, checkpoint-and-report, exporting the weights
(the best ones, and the final and requested ones into their checkpoints), the metrics sinks and the
progress line. A task (``pipelines.train.mlm``, ``pipelines.train.classify``) supplies only its
data, its model, its evaluation and its own state.

Every collective (gradient reduction, metric all-reduce, evaluation, weight gathering, checkpoint
report) happens at the same step on every rank, decided by the step number and by evaluation
results that all ranks share, so the ranks never wait on each other forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
from torch import nn

from perceiver_core.flops import peak_flops
from perceiver_core.hf import save_pretrained
from pipelines.console import captured_stdout, log_to_console, quiet
from pipelines.tracking.sink import (
    MetricsSink,
    MlflowSink,
    MultiSink,
    ProgressLine,
    build_sink,
    progress,
    section,
)
from pipelines.train import export
from pipelines.train.checkpoint import HF_DIR, Checkpointer, TrainState
from pipelines.train.engine import (
    build_engine,
    full_fp32_state_dict,
    global_grad_norm,
    needs_manual_grad_norm,
)
from pipelines.train.job import WorkerJob
from pipelines.train.metrics import Interval, interval_metrics

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The core's state in a checkpoint."""

    evals: int = 0
    best_score: float | None = None
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0  # evaluations since the last improvement
    stopped_early: bool = False


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``TorchTrainer(train_loop_per_worker, {"job": ray.put(WorkerJob)})``.
    The job travels by reference: Ray Train's controller holds the config but never runs the
    training code, and unpickling a ``WorkerJob`` there would import torch and this module (five
    seconds before any worker could start)."""
    log_to_console()
    quiet()
    context = ray.train.get_context()
    job = ray.get(config["job"])
    Trainer(job, context.get_world_rank(), context.get_world_size()).run()


class Trainer:
    def __init__(self, job: WorkerJob, rank: int, world_size: int) -> None:
        self.job, self.rank, self.world_size = job, rank, world_size
        started = time.perf_counter()
        self.task = job.task.build(job, rank, world_size)
        self.micro = job.micro_batch_size or job.batch_size // world_size
        self.accum = job.batch_size // (self.micro * world_size)  # checked by EngineSection
        s = job.schedule
        self.epoch_steps = self.task.steps_per_epoch(job.batch_size)
        self.total = s.steps or s.epochs * self.epoch_steps
        if self.total < 1:
            raise ValueError(f"{job.name}: the data makes no batch of {job.batch_size}")
        _seed(job.seed)  # the same initial weights on every rank
        model = self.task.build_model()
        _seed(job.seed + 1 + rank)  # a different dropout stream per rank
        with captured_stdout(log):  # DeepSpeed prints as it builds its communication ops
            self.engine, precision = build_engine(
                model,
                job.engine,
                job.optimizer,
                micro_batch_size=self.micro,
                grad_accum_steps=self.accum,
                world_size=world_size,
                total_steps=self.total,
                rank=rank,
            )
        # The MFU denominator, on the rank that logs: configured, or measured here in the run's
        # precision (half a second) or known for the GPU.
        self.peak_flops = job.engine.peak_flops_per_worker
        if self.peak_flops is None and rank == 0:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            self.peak_flops = peak_flops(self.engine.device, dtype)
        self.checkpointer = Checkpointer(self.engine, rank, job.name, job.signing_key)
        state = self.checkpointer.restore(ray.train.get_checkpoint())
        if state and state.config_hash != job.config_hash and rank == 0:
            log.warning(
                "%s resumes from step %d, written with other settings (config %s, now %s)",
                job.name,
                state.step,
                state.config_hash,
                job.config_hash,
            )
        self.step = self.start_step = state.step if state else 0
        self.progress = Progress(**state.progress) if state else Progress()
        self.task.load_state_dict(state.task if state else {})
        self.sink: MetricsSink = build_sink(rank, self._make_sink)
        self.interval = Interval(self.engine.device)
        log.info(
            "rank %d/%d: %s engine ready (%s, %d threads, %d x %d per step) in %.1f s, at step "
            "%d/%d",
            rank,
            world_size,
            job.engine.strategy,
            precision,
            torch.get_num_threads(),
            self.accum,
            self.micro,
            time.perf_counter() - started,
            self.step,
            self.total,
        )

    def _make_sink(self) -> MetricsSink:
        line = ProgressLine(self.job.name, self.total, self.step, self.epoch_steps)
        mlflow = MlflowSink.from_config(self.job.run_id, self.job.tracking_uri, self.job.tracking)
        return MultiSink(line, mlflow)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while self.step < self.total and not self.progress.stopped_early:
                self._train_step()
                self.step += 1
                self._maybe_pause()
                metrics = self._log_metrics()
                evaluated = self._is_eval_step()
                if evaluated:
                    metrics.update(self._evaluate())
                if metrics:
                    self.sink.log(self.step, metrics)
                if self._is_checkpoint_step(evaluated):
                    self._checkpoint(metrics)
        finally:
            self.sink.close()

    def _train_step(self) -> None:
        """One optimizer step: ``accum`` micro-batches, each stepping the engine (which updates
        the weights after the last)."""
        started = time.perf_counter()
        manual_norm = needs_manual_grad_norm(self.engine)
        norm = 0.0
        for micro in range(self.accum):
            waited = time.perf_counter()
            batch = self.task.batch(self.step, micro, self.micro, self.engine.device)
            self.interval.data_wait_s += time.perf_counter() - waited
            out = self.engine(**batch.inputs)
            self.engine.backward(out.loss)
            if manual_norm and self.engine.is_gradient_accumulation_boundary():
                norm = global_grad_norm(self.engine)
            self.engine.step()
            self.interval.add(
                out.loss, batch.targets, batch.examples, batch.real_bytes, batch.flops
            )
        if not manual_norm:
            norm = global_grad_norm(self.engine)
        self.interval.grad_norm_sum += norm
        self.interval.steps += 1
        self.interval.step_time_s += time.perf_counter() - started

    def _log_metrics(self) -> dict[str, float]:
        if self.step % self.job.engine.log_every and self.step != self.total:
            return {}
        totals = self.interval.reduce(self.world_size)  # a collective
        metrics = interval_metrics(
            self.interval,
            totals,
            world_size=self.world_size,
            lr=float(self.engine.get_lr()[0]),
            peak_flops_per_worker=self.peak_flops,
            per_byte_loss=self.task.per_byte_loss,
        )
        if metrics.get("perf/mfu", 0.0) > 1.0:  # only a configured peak can be this wrong
            log.warning(
                "%s: train.peak_flops_per_worker=%.3g is below what the run achieves; MFU is "
                "not reported (leave it unset to measure the peak)",
                self.job.name,
                self.peak_flops,
            )
            self.peak_flops = None
            del metrics["perf/mfu"]
        self.interval = Interval(self.engine.device)
        return metrics

    def _is_eval_step(self) -> bool:
        every, step = self.job.schedule.eval_every, self.step
        epoch_end = bool(self.epoch_steps) and step % self.epoch_steps == 0
        return step == self.total or epoch_end or bool(every and step % every == 0)

    def _is_checkpoint_step(self, evaluated: bool) -> bool:
        s, step = self.job.schedule, self.step
        periodic = step % s.checkpoint_every == 0 if s.checkpoint_every else evaluated
        return periodic or step == self.total or step in s.export_at or self.progress.stopped_early

    # -- evaluation and the best weights -----------------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        self.engine.eval()
        try:
            values = self.task.evaluate(self.engine)
        finally:
            self.engine.train()
        p, metric, patience = self.progress, self.task.metric, self.job.schedule.patience
        p.evals += 1
        if p.best_score is None or metric.is_better(values[metric.name], p.best_score):
            p.best_score, p.best_step, p.best_metrics = values[metric.name], self.step, values
            p.bad_evals = 0
            if self.job.schedule.keep_best:
                self._export_best(values)
        else:
            p.bad_evals += 1
            p.stopped_early = bool(patience) and p.bad_evals >= patience
            if p.stopped_early and self.rank == 0:
                progress.info("%s | stopping early at step %d", self.job.name, self.step)
        logged = {f"val/{k}": v for k, v in values.items()}
        logged[f"best/{metric.name}"] = float(p.best_score)  # type: ignore[arg-type]
        logged["best/step"] = float(p.best_step)
        return logged

    def _export_best(self, metrics: dict[str, float]) -> None:
        weights = full_fp32_state_dict(self.engine, self.rank)  # a collective
        if self.rank == 0:
            export.write_best(self.job.run_dir, self.step, self._model(weights), metrics)

    def _model(self, weights: dict[str, torch.Tensor] | None) -> nn.Module:
        """A plain model of the trained class holding ``weights`` (rank 0)."""
        module = self.engine.module
        with torch.random.fork_rng(devices=[]):  # its initialisation must not move the RNG
            model = type(module)(module.config)
        model.load_state_dict(weights)
        return model

    # -- checkpoints -----------------------------------------------------------------------------

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        # Metrics of the steps up to this checkpoint must be stored before it can be committed:
        # a run resumed from it does not run those steps again. During an outage the wait is
        # bounded and the values stay buffered (lost only if this process dies before the server
        # is back, which the sink reports).
        if not self.sink.flush(self.job.tracking.checkpoint_flush_s):
            log.warning("metrics up to step %d not yet stored in MLflow", self.step)
        state = TrainState(
            step=self.step,
            run_id=self.job.run_id,
            config_hash=self.job.config_hash,
            world_size=self.world_size,
            progress=dataclasses.asdict(self.progress),
            task=self.task.state_dict(),
        )
        final = self.step == self.total or self.progress.stopped_early
        requested = self.step in self.job.schedule.export_at
        weights = full_fp32_state_dict(self.engine, self.rank) if final or requested else None
        write = partial(save_pretrained, self._model(weights)) if weights is not None else None
        register = None
        if requested and not final and self.job.register_as and self.rank == 0:
            register = partial(self._register, metrics=metrics)  # the driver registers the final

        report = {**metrics, "step": float(self.step)}
        self.checkpointer.save(
            state, report if self.rank == 0 else {}, export=write, after_report=register
        )

    def _register(self, folder: Path, metrics: dict[str, float]) -> None:
        assert self.job.lineage is not None and self.job.register_as is not None
        lineage = dataclasses.replace(self.job.lineage, step=self.step, metrics=section(metrics))
        try:
            export.register(
                self.job.tracking_uri,
                str(folder / HF_DIR),
                self.job.register_as,
                lineage,
                timeout_s=self.job.tracking.close_timeout_s,
            )
        except Exception:
            log.exception("could not register the model of step %d; training goes on", self.step)

    # -- fault injection for tests ---------------------------------------------------------------

    def _maybe_pause(self) -> None:
        debug = self.job.debug
        if debug.pause_after_steps is None or debug.marker_dir is None:
            return
        if self.step != self.start_step + debug.pause_after_steps:
            return
        marker = Path(debug.marker_dir) / f"rank{self.rank}-of-{self.world_size}.pid"
        if marker.exists():  # once per group size: a group of that size started again passes
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        time.sleep(debug.pause_s)


def gather_arrays(local: np.ndarray, world_size: int) -> np.ndarray:
    """Every rank's ``local`` array, concatenated in rank order, on every rank (a collective).
    Empty arrays are left out, so a rank with nothing may send any empty shape."""
    if world_size == 1:
        return local
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    return np.concatenate([part for part in gathered if len(part)] or [local])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
