"""Training and validation numbers: what is accumulated per worker, how it is combined across
workers, and the progress line on the console.

Per log interval every worker adds up its masked-token loss, real bytes, FLOPs, data-wait time and
compute time; one all-reduce combines them, and rank 0 derives the logged metrics:

    train/loss, train/bits_per_byte   mean cross-entropy over the interval's masked bytes
    train/lr, train/grad_norm         schedule value, and the mean pre-clipping gradient norm
    perf/bytes_per_s                  real (non-padding) input bytes per second, all workers
    perf/bytes_per_s_per_worker       the same divided by the number of workers
    perf/mfu                          model FLOPs (perceiver_core.flops, decoding only the masked
                                      positions) over elapsed time and the configured peak
    perf/data_wait_fraction           share of step time spent waiting for the next batch
    perf/step_time_s                  mean time of a step (data wait, forward, backward, update)
    perf/wall_s_per_step              wall time since the previous log per step: everything the
                                      loop did, validation, checkpoints and logging included
    val/loss, val/accuracy, val/bits_per_byte   on the held-out crops (masked bytes only)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from perceiver_core.config import PerceiverConfig
from perceiver_core.flops import step_flops
from perceiver_core.masking import IGNORE_INDEX

LN2 = math.log(2.0)

progress = logging.getLogger("pipelines.train.progress")


def bits_per_byte(nats_per_byte: float) -> float:
    return nats_per_byte / LN2


@dataclass
class Interval:
    """One worker's running sums since the last log."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)  # sum over micro-batches of loss * masked count
    masked: int = 0
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

    def add_micro(self, loss: torch.Tensor, masked: int, real_bytes: int, flops: float) -> None:
        self.loss_sum += loss.detach().double() * masked
        self.masked += masked
        self.real_bytes += real_bytes
        self.flops += flops

    def reduce(self, world_size: int) -> dict[str, float]:
        """Sums over all workers (a collective: every rank calls it at the same step)."""
        local = torch.tensor(
            [self.masked, self.real_bytes, self.flops, self.data_wait_s, self.step_time_s],
            dtype=torch.float64,
            device=self.device,
        )
        values = torch.cat([self.loss_sum.reshape(1), local])
        if world_size > 1:
            dist.all_reduce(values)
        keys = ("loss_sum", "masked", "real_bytes", "flops", "data_wait_s", "step_time_s")
        return dict(zip(keys, values.tolist(), strict=True))


def interval_metrics(
    interval: Interval,
    totals: Mapping[str, float],
    *,
    world_size: int,
    lr: float,
    peak_flops_per_worker: float,
) -> dict[str, float]:
    """The logged numbers of one interval from its all-reduced ``totals``."""
    steps = max(1, interval.steps)
    # Wall time of the interval's steps, as rank 0 saw them (ranks move in lockstep).
    elapsed = max(interval.step_time_s, 1e-9)
    loss = totals["loss_sum"] / max(1.0, totals["masked"])
    mean_step_time = totals["step_time_s"] / world_size
    return {
        "train/loss": loss,
        "train/bits_per_byte": bits_per_byte(loss),
        "train/lr": lr,
        "train/grad_norm": interval.grad_norm_sum / steps,
        "perf/bytes_per_s": totals["real_bytes"] / elapsed,
        "perf/bytes_per_s_per_worker": totals["real_bytes"] / elapsed / world_size,
        "perf/mfu": totals["flops"] / elapsed / (peak_flops_per_worker * world_size),
        "perf/data_wait_fraction": totals["data_wait_s"] / max(totals["step_time_s"], 1e-9),
        "perf/step_time_s": mean_step_time / steps,
        "perf/wall_s_per_step": (time.perf_counter() - interval.started) / steps,
    }


class FlopsCounter:
    """Training FLOPs of a micro-batch, by the number of positions it decodes (cached)."""

    def __init__(self, config: PerceiverConfig, batch_size: int, seq_len: int) -> None:
        self.config, self.batch_size, self.seq_len = config, batch_size, seq_len
        self._cache: dict[int, int] = {}

    def __call__(self, decoded_positions: int) -> int:
        if decoded_positions not in self._cache:
            self._cache[decoded_positions] = step_flops(
                self.config, self.batch_size, self.seq_len, decoded_positions=decoded_positions
            ).total
        return self._cache[decoded_positions]


@torch.no_grad()
def masked_lm_sums(
    logits: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """[summed cross-entropy (nats), correct predictions, count] over the decoded masked bytes."""
    pos = positions.expand(labels.shape[0], -1) if positions.dim() == 1 else positions
    targets = labels.gather(1, pos).long()
    if valid is not None:
        targets = targets.masked_fill(~valid, IGNORE_INDEX)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    counted = flat_targets != IGNORE_INDEX
    correct = ((flat_logits.argmax(dim=-1) == flat_targets) & counted).sum()
    return torch.stack([nll.double(), correct.double(), counted.sum().double()])


def validation_metrics(sums: torch.Tensor) -> dict[str, float]:
    nll, correct, count = (float(v) for v in sums.tolist())
    loss = nll / max(count, 1.0)
    return {
        "val/loss": loss,
        "val/accuracy": correct / max(count, 1.0),
        "val/bits_per_byte": bits_per_byte(loss),
    }


class ConsoleSink:
    """The progress line: step, loss, rate and ETA, written by the logging rank."""

    def __init__(self, total_steps: int, start_step: int) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        parts = [f"step {step}/{self.total_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
            parts.append(f"lr {metrics['train/lr']:.2e}")
            parts.append(f"{_si(metrics['perf/bytes_per_s'])}B/s")
            parts.append(f"mfu {metrics['perf/mfu']:.1%}")
        if "val/loss" in metrics:
            parts.append(f"val loss {metrics['val/loss']:.4f} acc {metrics['val/accuracy']:.3f}")
        if done > 0:
            rate = done / elapsed
            parts.append(f"{rate:.2f} steps/s")
            parts.append(f"ETA {duration((self.total_steps - step) / rate)}")
        # A logger, not print: Ray Train routes a worker's print through its own logging and
        # echoes it as well, which shows every line twice.
        progress.info(" | ".join(parts))

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


def _si(value: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(value) < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} P"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
