"""Experiment tracking with MLflow: the rank-0 metrics sink, runs, model logging and registry."""

from pipelines.tracking.config import TrackingConfig
from pipelines.tracking.sink import MetricsSink, MlflowSink, MultiSink, NullSink, build_sink

__all__ = ["MetricsSink", "MlflowSink", "MultiSink", "NullSink", "TrackingConfig", "build_sink"]
