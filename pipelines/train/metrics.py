"""Training numbers: what each worker accumulates, and how the workers' sums are combined (the
console's progress line and MLflow receive them through ``pipelines.tracking.sink``).

Per log interval every worker adds up its loss (weighted by the targets it averages over: masked
bytes, or examples), examples, real bytes, FLOPs, data-wait time and step time; one all-reduce
combines them, and the logging rank derives:

    train/loss                        mean loss per target over the interval
    train/bits_per_byte               the same in bits (masked-language modelling)
    train/lr, train/grad_norm         schedule value, and the mean pre-clipping gradient norm
    perf/bytes_per_s                  real (non-padding) input bytes per second, all workers
    perf/bytes_per_s_per_worker       the same divided by the number of workers
    perf/examples_per_s               crops or examples per second, all workers
    perf/mfu                          model FLOPs (perceiver_core.flops; masked positions only for
                                      the MLM decoder) over elapsed time and the peak (configured,
                                      a known GPU's, or measured: ``perceiver_core.flops``)
    perf/data_wait_fraction           share of step time spent waiting for the next batch
    perf/step_time_s                  mean time of a step (data wait, forward, backward, update)
    perf/wall_s_per_step              wall time since the previous log per step: everything the
                                      loop did, evaluation, checkpoints and logging included
    val/<name>                        the task's evaluation (val/loss, val/accuracy, ...)
    best/<metric>, best/step          the best value so far of the metric that selects weights
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def bits_per_byte(nats_per_byte: float) -> float:
    return nats_per_byte / math.log(2.0)


@dataclass
class Interval:
    """One worker's running sums since the last log."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)  # sum over micro-batches of loss * targets
    targets: int = 0
    examples: int = 0
    real_bytes: int = 0
    flops: float = 0.0
    data_wait_s: float = 0.0
    step_time_s: float = 0.0
    steps: int = 0
    grad_norm_sum: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        # A device tensor: reading the loss every micro-batch would synchronise GPU and host.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, loss: torch.Tensor, targets: int, examples: int, real_bytes: int, flops: float):
        self.loss_sum += loss.detach().double() * targets
        self.targets += targets
        self.examples += examples
        self.real_bytes += real_bytes
        self.flops += flops

    def reduce(self, world_size: int) -> dict[str, float]:
        """Sums over all workers (a collective: every rank calls it at the same step)."""
        keys = ("targets", "examples", "real_bytes", "flops", "data_wait_s", "step_time_s")
        local = torch.tensor(
            [getattr(self, k) for k in keys], dtype=torch.float64, device=self.device
        )
        values = torch.cat([self.loss_sum.reshape(1), local])
        if world_size > 1:
            dist.all_reduce(values)
        return dict(zip(("loss_sum", *keys), values.tolist(), strict=True))


def interval_metrics(
    interval: Interval,
    totals: Mapping[str, float],
    *,
    world_size: int,
    lr: float,
    peak_flops_per_worker: float | None,
    per_byte_loss: bool,
) -> dict[str, float]:
    """The logged numbers of one interval from its all-reduced ``totals``."""
    steps = max(1, interval.steps)
    # Time of the interval's steps, as this rank saw them (ranks move in lockstep).
    elapsed = max(interval.step_time_s, 1e-9)
    loss = totals["loss_sum"] / max(1.0, totals["targets"])
    metrics = {
        "train/loss": loss,
        "train/lr": lr,
        "train/grad_norm": interval.grad_norm_sum / steps,
        "perf/bytes_per_s": totals["real_bytes"] / elapsed,
        "perf/bytes_per_s_per_worker": totals["real_bytes"] / elapsed / world_size,
        "perf/examples_per_s": totals["examples"] / elapsed,
        "perf/data_wait_fraction": totals["data_wait_s"] / max(totals["step_time_s"], 1e-9),
        "perf/step_time_s": totals["step_time_s"] / world_size / steps,
        "perf/wall_s_per_step": (time.perf_counter() - interval.started) / steps,
    }
    if per_byte_loss:
        metrics["train/bits_per_byte"] = bits_per_byte(loss)
    if totals["flops"] > 0 and peak_flops_per_worker:
        metrics["perf/mfu"] = totals["flops"] / elapsed / (peak_flops_per_worker * world_size)
    return metrics
