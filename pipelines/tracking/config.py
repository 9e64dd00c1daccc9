"""Settings of experiment tracking (MLflow), shared by pretraining and later stages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrackingConfig:
    """Where runs, metrics and models go, and how an unreachable server is ridden out.

    tracking_uri: an MLflow server (``http://...``) or store URI. Unset: ``MLFLOW_TRACKING_URI``,
        else an SQLite store ``mlflow.db`` and artifact folder ``mlartifacts/`` in the working
        directory of the job's driver.
    experiment: MLflow experiment of the run (created on first use).
    registered_model: registry name that each exported model becomes a new version of.
    register: log and register models at all (off for quick experiments).
    buffer_size: metric values held in memory while the server is unreachable; beyond it the
        oldest are dropped, counted and reported (never silently).
    flush_interval_s: how often buffered metrics are sent.
    outage_report_s: while the server stays unreachable, report the outage this often.
    close_timeout_s: at the end, how long to wait for buffered metrics to reach the server.
    checkpoint_flush_s: at each checkpoint, how long to wait for the metrics logged so far to reach
        the server (a run resumed from the checkpoint does not log those steps again).
    http_retries / http_timeout_s: MLflow's own HTTP retry count and timeout in the training
        workers (its default retries for about 4 minutes inside one call, which would hide an
        outage from the buffering above and stall a flush at the end).
    """

    tracking_uri: str | None = None
    experiment: str = "perceiver-pretraining"
    registered_model: str = "perceiver-mlm"
    register: bool = True
    buffer_size: int = 100_000
    flush_interval_s: float = 2.0
    outage_report_s: float = 60.0
    close_timeout_s: float = 120.0
    checkpoint_flush_s: float = 30.0
    http_retries: int = 0
    http_timeout_s: int = 15

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment must be a non-empty name")
        if not self.registered_model:
            raise ValueError("registered_model must be a non-empty name")
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")
        for name in (
            "flush_interval_s",
            "outage_report_s",
            "close_timeout_s",
            "checkpoint_flush_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.http_retries < 0 or self.http_timeout_s < 1:
            raise ValueError("http_retries must be >= 0 and http_timeout_s >= 1")

    def worker_env(self) -> dict[str, str]:
        """Environment for processes that log while training (bounded MLflow HTTP retries)."""
        return {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.http_retries),
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.http_timeout_s),
        }
