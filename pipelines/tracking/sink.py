"""Metric sinks: where a training loop's numbers go, decided once per process.

The loop calls ``sink.log(step, {...})`` on every rank; ``build_sink`` decides at start-up which
rank really logs (rank 0) and gives the others a ``NullSink``, so no ``if rank == 0`` is scattered
through the loop (torchtitan's metrics component does the same). ``ProgressLine`` is the
console's sink (a line per training log and per evaluation); ``MlflowSink`` the tracking server's.

``MlflowSink`` sends metrics from a background thread, so a slow or unreachable tracking server
never stalls training:

- values wait in a bounded buffer; when the server is unreachable they accumulate, and once the
  buffer is full the oldest are dropped, counted, and reported in the log and, when the server is
  back, as the run tags ``metrics.dropped_values`` / ``metrics.dropped_steps``;
- an outage is reported when it starts, every ``outage_report_s`` while it lasts, and when it ends;
- ``close`` waits (bounded) for the buffer to drain and reports what could not be delivered.

Exactly one value per (key, step): when a run resumes from a checkpoint, the steps between that
checkpoint and the failure run again, and their metrics were already logged (or not, if they were
still in the buffer of the process that died). Before its first send the sink reads each key's
latest logged step from the run and drops values at or below it. MLflow's latest metric is the one
with the highest step, and this sink sends in step order, so that is a watermark.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pipelines.tracking.config import TrackingConfig

log = logging.getLogger(__name__)
# ProgressLine's lines: INFO under ``pipelines``, which training workers print to the console.
progress = logging.getLogger("pipelines.train.progress")

# MLflow's log_batch limit is 1000 metrics per request.
_MAX_METRICS_PER_REQUEST = 1000

_Item = tuple[int, int, str, float, int]  # sequence number, step, key, value, timestamp (ms)


class MetricsSink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (bounded) until what was logged is stored; False if it is not."""
        ...

    def close(self) -> None: ...


class NullSink:
    """What every rank but one gets."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


class MultiSink:
    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def flush(self, timeout_s: float | None = None) -> bool:
        return all([sink.flush(timeout_s) for sink in self.sinks])

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_sink(rank: int, make: Callable[[], MetricsSink]) -> MetricsSink:
    """``make()`` on rank 0, a ``NullSink`` elsewhere: the one place that decides who logs."""
    return make() if rank == 0 else NullSink()


class MlflowSink:
    """Buffered, resumable metric logging into one MLflow run (see the module docstring)."""

    @classmethod
    def from_config(cls, run_id: str, tracking_uri: str, cfg: TrackingConfig) -> MlflowSink:
        return cls(
            run_id,
            tracking_uri,
            buffer_size=cfg.buffer_size,
            flush_interval_s=cfg.flush_interval_s,
            outage_report_s=cfg.outage_report_s,
            close_timeout_s=cfg.close_timeout_s,
        )

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        *,
        buffer_size: int = 100_000,
        flush_interval_s: float = 2.0,
        outage_report_s: float = 60.0,
        close_timeout_s: float = 120.0,
        client: Any = None,
    ) -> None:
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
        self.client = client
        self.run_id = run_id
        self.buffer_size = buffer_size
        self.flush_interval_s = flush_interval_s
        self.outage_report_s = outage_report_s
        self.close_timeout_s = close_timeout_s
        # (sequence number, step, key, value, timestamp ms), in the order logged.
        self._buffer: collections.deque[_Item] = collections.deque()
        self._seq = 0
        self._cond = threading.Condition()
        self._closing = False
        self._flushing = 0  # callers waiting in flush(): send now rather than at the interval
        self._watermarks: dict[str, int] | None = None  # key -> last step the run already has
        self.sent = 0
        self.skipped = 0  # values at steps the run already had (a resumed run's re-done steps)
        self.dropped = 0
        self._dropped_steps: tuple[int, int] | None = None
        self._dropped_reported = 0
        self._outage_since: float | None = None
        self._last_outage_report = 0.0
        self._thread = threading.Thread(target=self._run, name="mlflow-sink", daemon=True)
        self._thread.start()

    # -- training thread -------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        with self._cond:
            for key, value in metrics.items():
                if value is None or not math.isfinite(float(value)):
                    # MLflow stores NaN, but a NaN loss is worth a line in the log as well.
                    log.warning("metric %s at step %d is %r", key, step, value)
                self._seq += 1
                self._buffer.append((self._seq, step, key, float(value), now))
            overflow = len(self._buffer) - self.buffer_size
            for _ in range(max(0, overflow)):
                self._note_dropped(self._buffer.popleft()[1])
            self._cond.notify()
        if overflow > 0 and self.dropped - self._dropped_reported >= self.buffer_size // 10 + 1:
            self._dropped_reported = self.dropped
            log.error(
                "MLflow unreachable and the metric buffer (%d values) is full: dropped %d "
                "values so far (steps %s); they will be reported in the run's tags",
                self.buffer_size,
                self.dropped,
                self._dropped_steps,
            )

    def pending(self) -> int:
        with self._cond:
            return len(self._buffer)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything logged so far has been sent; False on timeout."""
        deadline = time.monotonic() + (self.close_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._buffer:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.2))
            finally:
                self._flushing -= 1
        return True

    def close(self) -> None:
        delivered = self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=self.flush_interval_s + 30)
        if not delivered or self.dropped:
            log.error(
                "MLflow metrics not delivered: %d values still buffered at close, %d dropped "
                "during outages (steps %s)",
                len(self._buffer),
                self.dropped,
                self._dropped_steps,
            )

    # -- sender thread ---------------------------------------------------------------------------

    def _note_dropped(self, step: int) -> None:
        self.dropped += 1
        low, high = self._dropped_steps or (step, step)
        self._dropped_steps = (min(low, step), max(high, step))

    def _run(self) -> None:
        backoff = self.flush_interval_s
        while True:
            with self._cond:
                self._wait_for_work()
                if self._closing and not self._buffer:
                    return
                batch = list(itertools.islice(self._buffer, _MAX_METRICS_PER_REQUEST * 10))
            if not batch:
                continue
            try:
                self._send(batch)
            except Exception as error:  # any failure means: keep the values, retry later
                self._on_failure(error)
                if self._closing:
                    return  # close() already waited its timeout; the values are reported there
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = self.flush_interval_s
            self._on_success()
            with self._cond:
                # log() appends on the right and drops on the left: what was sent is a prefix,
                # less whatever was dropped meanwhile.
                while self._buffer and self._buffer[0][0] <= batch[-1][0]:
                    self._buffer.popleft()
                self._cond.notify_all()

    def _wait_for_work(self) -> None:
        """Hold the values for up to ``flush_interval_s`` (many small requests would load the
        server for nothing), unless a request's worth is waiting, or a flush or close asks."""
        deadline = time.monotonic() + self.flush_interval_s
        while not (
            self._closing or self._flushing or len(self._buffer) >= _MAX_METRICS_PER_REQUEST
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _send(self, batch: list[_Item]) -> None:
        from mlflow.entities import Metric

        if self._watermarks is None:
            self._watermarks = latest_steps(self.client, self.run_id)
        fresh = [item for item in batch if item[1] > self._watermarks.get(item[2], -1)]
        self.skipped += len(batch) - len(fresh)
        # Requests end at a step boundary where possible, so a step's values arrive together.
        # A retried request carries the same timestamps, and MLflow ignores exact duplicates, so
        # a request that succeeded but whose answer was lost does not log anything twice.
        for chunk in _chunks_by_step(fresh, _MAX_METRICS_PER_REQUEST):
            metrics = [Metric(key, value, ts, step) for _, step, key, value, ts in chunk]
            self.client.log_batch(self.run_id, metrics=metrics)
            for _, step, key, _, _ in chunk:
                self._watermarks[key] = max(step, self._watermarks.get(key, -1))
            self.sent += len(chunk)

    def _on_failure(self, error: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = self._last_outage_report = now
            log.warning(
                "MLflow unreachable (%s: %s); training goes on, metrics are buffered "
                "(up to %d values)",
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
                self.buffer_size,
            )
        elif now - self._last_outage_report >= self.outage_report_s:
            self._last_outage_report = now
            log.error(
                "MLflow unreachable for %.0f s: %d metric values buffered, %d dropped",
                now - self._outage_since,
                self.pending(),
                self.dropped,
            )

    def _on_success(self) -> None:
        if self._outage_since is not None:
            log.warning(
                "MLflow reachable again after %.0f s; sending %d buffered metric values",
                time.monotonic() - self._outage_since,
                self.pending(),
            )
            self._outage_since = None
        if self.dropped and self._dropped_steps is not None:
            try:
                self.client.set_tag(self.run_id, "metrics.dropped_values", str(self.dropped))
                low, high = self._dropped_steps
                self.client.set_tag(self.run_id, "metrics.dropped_steps", f"{low}-{high}")
            except Exception as error:  # the next success tries again
                log.debug("could not tag dropped metrics: %s", error)


def latest_steps(client: Any, run_id: str) -> dict[str, int]:
    """Each metric key of the run and the highest step logged for it."""
    run = client.get_run(run_id)
    # RunData keeps the latest Metric objects (with their steps); its proto is the public view.
    return {m.key: int(m.step) for m in run.data.to_proto().metrics}


def _chunks_by_step(items: list[_Item], limit: int) -> list[list[_Item]]:
    """Consecutive chunks of at most ``limit`` items, cut between steps unless one step alone is
    larger than ``limit``."""
    chunks: list[list[_Item]] = []
    current: list[_Item] = []
    for _, group in itertools.groupby(items, key=lambda item: item[1]):
        step_items = list(group)
        if current and len(current) + len(step_items) > limit:
            chunks.append(current)
            current = []
        while len(step_items) > limit:
            chunks.append(step_items[:limit])
            step_items = step_items[limit:]
        current.extend(step_items)
    if current:
        chunks.append(current)
    return chunks


def section(metrics: Mapping[str, float], prefix: str = "val/") -> dict[str, float]:
    """The metrics under ``prefix``, without it: ``{"val/loss": 3.1}`` -> ``{"loss": 3.1}``."""
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


class ProgressLine:
    """The console's view of a run, written by the logging rank: a line per training log (step,
    loss, rate, ETA) and a line per evaluation. A metrics sink like the MLflow one."""

    def __init__(self, name: str, total_steps: int, start_step: int, epoch_steps: int = 0) -> None:
        self.name = name
        self.total_steps = total_steps
        self.start_step = start_step
        self.epoch_steps = epoch_steps
        self.started = time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        # A logger, not print: Ray Train routes a worker's print through its own logging and
        # echoes it as well, which shows every line twice.
        if "train/loss" in metrics:
            progress.info(" | ".join([self.name, *self._train_parts(step, metrics)]))
        values = section(metrics)
        if values:
            parts = [f"{self.name} | step {step} | val " + _pairs(values)]
            best = {k: v for k, v in section(metrics, "best/").items() if k != "step"}
            if best:
                parts.append("best " + _pairs(best) + f" at step {int(metrics['best/step'])}")
            progress.info(" | ".join(parts))

    def _train_parts(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        where = f"step {step}/{self.total_steps}"
        if self.epoch_steps:
            epochs = self.total_steps // self.epoch_steps
            where += f" (epoch {step / self.epoch_steps:.2f}/{epochs})"
        parts = [
            where,
            f"loss {metrics['train/loss']:.4f}",
            f"lr {metrics['train/lr']:.2e}",
            f"{_si(metrics['perf/bytes_per_s'])}B/s",
            f"{metrics['perf/examples_per_s']:.1f} examples/s",
        ]
        if "perf/mfu" in metrics:
            parts.append(f"mfu {metrics['perf/mfu']:.1%}")
        done = step - self.start_step
        if done > 0:
            rate = done / (time.perf_counter() - self.started)
            parts.append(f"ETA {duration((self.total_steps - step) / rate)}")
        return parts

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


def _pairs(values: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))


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
