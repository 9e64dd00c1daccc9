"""MLflow tracking: the buffered rank-0 sink against a real server that goes away and comes back,
resumed sinks that must not log a step twice, and run bookkeeping."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_train import MlflowServer

from pipelines.tracking import runs
from pipelines.tracking.sink import MlflowSink, NullSink, build_sink


def new_run(uri: str, name: str = "sink") -> str:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = runs.experiment_id(client, "tracking-tests", None)
    return client.create_run(experiment, run_name=name).info.run_id


def history(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.fixture
def fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the training workers get from TrackingConfig.worker_env: fail fast, the sink retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture
def restartable_server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The session's tracking server, which a test may stop: it runs again afterwards, at the
    same address, with everything it held."""
    try:
        yield mlflow_server
    finally:
        if not mlflow_server.healthy():
            mlflow_server.stop()
            mlflow_server.start()


@pytest.mark.slow
def test_outage_is_buffered_reported_and_delivered_once(
    restartable_server: MlflowServer, fast_http, caplog: pytest.LogCaptureFixture
) -> None:
    """One outage, two sinks: one holds everything logged meanwhile and delivers it once; the
    other, with a buffer too small for the outage, drops its oldest steps and says which."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="pipelines.tracking.sink")
    server = restartable_server
    run_id, overflow_id = new_run(server.uri), new_run(server.uri, "overflow")
    sink = MlflowSink(run_id, server.uri, flush_interval_s=0.2, outage_report_s=1.0)
    for step in range(1, 11):
        sink.log(step, {"loss": 1.0 / step, "lr": 0.1})
    assert sink.flush(timeout_s=30)

    server.stop()
    started = time.perf_counter()
    for step in range(11, 31):
        sink.log(step, {"loss": 1.0 / step, "lr": 0.1})
    assert time.perf_counter() - started < 0.5  # training never waits for the server
    small = MlflowSink(overflow_id, server.uri, buffer_size=10, flush_interval_s=0.2)
    for step in range(1, 26):
        small.log(step, {"loss": float(step)})
    assert small.dropped == 15
    assert any(r.levelno == logging.ERROR and "dropped" in r.message for r in caplog.records)
    time.sleep(3)
    assert sink.pending() == 40  # 20 steps x 2 keys, held
    assert any("MLflow unreachable" in r.message for r in caplog.records)
    assert any("unreachable for" in r.message for r in caplog.records)  # the outage goes on

    server.start()
    assert sink.flush(timeout_s=60) and small.flush(timeout_s=60)
    sink.close()
    small.close()
    assert any("reachable again" in r.message for r in caplog.records)
    assert history(server.uri, run_id) == [(s, 1.0 / s) for s in range(1, 31)]
    assert [s for s, _ in history(server.uri, run_id, "lr")] == list(range(1, 31))
    assert sink.dropped == 0
    assert [s for s, _ in history(server.uri, overflow_id)] == list(range(16, 26))
    tags = MlflowClient(server.uri).get_run(overflow_id).data.tags
    assert tags["metrics.dropped_values"] == "15"
    assert tags["metrics.dropped_steps"] == "1-15"


def test_close_reports_what_was_not_delivered(
    fast_http, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="pipelines.tracking.sink")
    # Nothing listens on this port: every request fails at once.
    client = MlflowClient("http://127.0.0.1:9")
    sink = MlflowSink("0" * 32, client=client, flush_interval_s=0.1, close_timeout_s=1.0)
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert any("not delivered: 1 values still buffered" in r.message for r in caplog.records)


def test_a_resumed_sink_skips_steps_the_run_already_has(mlflow_server) -> None:
    run_id = new_run(mlflow_server.uri, "resumed")
    first = MlflowSink(run_id, mlflow_server.uri, flush_interval_s=0.1)
    for step in range(1, 11):
        first.log(step, {"loss": float(step)})
    first.close()
    # The job died after step 10 and resumed from its step-4 checkpoint: steps 5-10 run again.
    second = MlflowSink(run_id, mlflow_server.uri, flush_interval_s=0.1)
    for step in range(5, 16):
        second.log(step, {"loss": 100.0 + step, "val/loss": 1.0})
    second.close()
    assert second.skipped == 6
    logged = history(mlflow_server.uri, run_id)
    assert [s for s, _ in logged] == list(range(1, 16))  # one value per step
    assert dict(logged)[7] == 7.0 and dict(logged)[11] == 111.0
    # A key the run did not have yet is logged from its first step.
    assert [s for s, _ in history(mlflow_server.uri, run_id, "val/loss")] == list(range(5, 16))


def test_only_rank_zero_gets_a_real_sink() -> None:
    made = []
    assert isinstance(build_sink(1, lambda: made.append(1)), NullSink)
    build_sink(0, lambda: made.append(0))
    assert made == [0]


def test_default_store_is_sqlite_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    target = runs.resolve_tracking(None, tmp_path)
    assert target.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert target.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert runs.resolve_tracking(None, tmp_path).tracking_uri == "http://127.0.0.1:5000"
    assert runs.resolve_tracking("http://other:1", tmp_path).tracking_uri == "http://other:1"


def test_runs_resume_by_name_and_keep_their_parameters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = runs.resolve_tracking(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    client = runs.client_for(target)
    experiment = runs.experiment_id(client, "exp", target.artifact_location)
    run_id, resumed = runs.start_or_resume_run(client, experiment, "r", {"a": "1"})
    assert not resumed
    runs.log_params(client, run_id, runs.flatten({"train": {"lr": 0.1, "betas": [0.9, 0.99]}}))
    client.set_terminated(run_id, "KILLED")
    again, resumed = runs.start_or_resume_run(client, experiment, "r", {})
    assert (again, resumed) == (run_id, True)
    assert client.get_run(run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING):
        runs.log_params(client, run_id, {"train.lr": "0.2", "train.steps": "5"})
    params = client.get_run(run_id).data.params
    assert params == {"train.lr": "0.1", "train.betas": "[0.9, 0.99]", "train.steps": "5"}
    assert "train.lr" in caplog.text
    other, resumed = runs.start_or_resume_run(client, experiment, "other", {})
    assert other != run_id and not resumed


def test_flatten_names_list_items_by_index() -> None:
    flat = runs.flatten({"sources": [{"name": "c4"}, {"name": "wiki"}], "x": None, "e": {}})
    assert flat == {"sources.0.name": "c4", "sources.1.name": "wiki", "x": "null", "e": "{}"}
