"""Pipelines on real Ray and a real MLflow server: stages run in parallel when they can, their state
lands on MLflow runs, a second run of the same ``run_name`` runs only what did not finish, and every
config mistake is refused before anything runs. The toy stage kinds are in workflow_kinds.py; they
record each execution as a file, which is how executions are counted here.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import workflow_kinds
import yaml
from workflow_kinds import KINDS

from pipelines.config import ConfigError
from pipelines.workflow import (
    NoInputs,
    NoParams,
    PipelineError,
    PipelineResult,
    StageKind,
    load_pipeline,
    run_pipeline,
)
from pipelines.workflow.spec import assignable

POLL_S = 0.3


@pytest.fixture(scope="module")
def kinds(ray_session) -> Iterator[dict[str, StageKind]]:
    """The toy kinds, with their module's code shipped to the workers by value: tests/ is not a
    package that Ray workers can import (the real kinds live in pipelines/ and are imported)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(workflow_kinds)
    yield KINDS
    ray.cloudpickle.unregister_pickle_by_value(workflow_kinds)


def write_pipeline(
    folder: Path, stages: list[dict[str, Any]], run_name: str = "r1", uri: str | None = None
) -> Path:
    data = {
        "pipeline": {"name": "demo", "run_name": run_name},
        "tracking": {"tracking_uri": uri, "experiment": f"wf-{folder.name}"},
        "stages": stages,
    }
    path = folder / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def executions(workdir: Path, stage: str | None = None) -> list[dict[str, Any]]:
    """Every recorded execution (of one stage), in the order they started."""
    events = workdir / "events"
    if not events.is_dir():
        return []
    records = [json.loads(p.read_text()) for p in events.glob("*.json")]
    return sorted(
        (r for r in records if stage is None or r["stage"] == stage), key=lambda r: r["started"]
    )


def mlflow_runs(uri: str, result: PipelineResult) -> tuple[Any, dict[str, Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    return parent, {c.data.tags["workflow.stage"]: c for c in children}


def statuses(result: PipelineResult) -> dict[str, str]:
    return {name: s.status for name, s in result.stages.items()}


# -------------------------------------------------------------------------------------------------
# A diamond a -> (b, c) -> d, run once for the tests below, then run again
# -------------------------------------------------------------------------------------------------

DIAMOND = [
    {"name": "a", "kind": "step", "params": {"value": 1}},
    {
        "name": "b",
        "kind": "step",
        "inputs": {"left": "a.value"},
        "params": {"value": 10, "sleep_s": 2, "barrier": "bc"},
    },
    {
        "name": "c",
        "kind": "step",
        "inputs": {"left": "a.value"},
        "params": {"value": 100, "sleep_s": 2, "barrier": "bc"},
    },
    {"name": "d", "kind": "step", "inputs": {"left": "b.value", "right": "c.value"}},
]


@dataclass
class Diamond:
    workdir: Path
    uri: str
    path: Path
    result: PipelineResult
    log: list[str]


@pytest.fixture(scope="module")
def diamond(kinds, mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Diamond:
    workdir = tmp_path_factory.mktemp("diamond")
    path = write_pipeline(workdir, DIAMOND, uri=mlflow_server.uri)
    cfg = load_pipeline(path, kinds)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pipelines.workflow")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = run_pipeline(cfg, kinds, workdir=workdir, poll_s=POLL_S)
    finally:
        logger.removeHandler(handler)
    return Diamond(workdir, mlflow_server.uri, path, result, lines)


def test_diamond_runs_b_and_c_side_by_side_and_d_sees_both(diamond: Diamond) -> None:
    assert statuses(diamond.result) == dict.fromkeys("abcd", "finished")
    runs = {s: executions(diamond.workdir, s) for s in "abcd"}
    assert all(len(r) == 1 for r in runs.values()), runs
    a, b, c, d = (runs[s][0] for s in "abcd")
    # Both reached the barrier (neither timed out waiting for the other) and their runs overlap.
    assert b["started"] < c["ended"] and c["started"] < b["ended"]
    assert b["ended"] - b["started"] >= 2 and c["ended"] - c["started"] >= 2
    assert a["ended"] <= min(b["started"], c["started"])
    assert d["started"] >= max(b["ended"], c["ended"])
    assert d["inputs"] == {"left": 11, "right": 101.0}
    outputs = diamond.result.stages["d"].outputs
    assert outputs is not None and outputs["value"] == 1 + 11 + 101
    assert outputs["seen"] == {"left": 11, "right": 101.0}
    # Progress lines on the driver for each stage's start and end.
    for stage in "bc":
        assert any(f"stage '{stage}' started" in line for line in diamond.log), diamond.log
    for stage in "abcd":
        assert any(f"stage '{stage}' finished in" in line for line in diamond.log), diamond.log


def test_mlflow_holds_parent_and_child_runs_with_outputs(diamond: Diamond) -> None:
    from mlflow import MlflowClient

    result = diamond.result
    parent, children = mlflow_runs(diamond.uri, result)
    assert parent.info.run_name == "r1" and parent.info.status == "FINISHED"
    assert parent.data.tags["workflow.pipeline"] == "demo"
    assert len(parent.data.tags["workflow.config_hash"]) == 16
    assert sorted(children) == list("abcd")
    hashes = set()
    for stage, run in children.items():
        tags = run.data.tags
        assert run.info.run_name == f"r1-{stage}"
        assert run.info.status == "FINISHED"
        assert run.info.run_id == result.stages[stage].run_id
        assert tags["workflow.kind"] == "step"
        hashes.add(tags["workflow.stage_hash"])
        assert json.loads(tags["workflow.outputs"]) == result.stages[stage].outputs
        stored = MlflowClient(diamond.uri).download_artifacts(
            run.info.run_id, "workflow/outputs.json", str(diamond.workdir / f"dl-{stage}")
        )
        assert json.loads(Path(stored).read_text()) == result.stages[stage].outputs
        # The stage function saw its stable name and its own run.
        (seen,) = executions(diamond.workdir, stage)
        assert (seen["run_name"], seen["run_id"]) == (f"r1-{stage}", run.info.run_id)
        assert seen["parent_run_id"] == result.parent_run_id and seen["resumed"] is False
    assert len(hashes) == 4


def test_rerun_with_the_same_run_name_runs_nothing(diamond: Diamond, kinds) -> None:
    before = executions(diamond.workdir)
    again = run_pipeline(
        load_pipeline(diamond.path, kinds), kinds, workdir=diamond.workdir, poll_s=POLL_S
    )
    assert executions(diamond.workdir) == before
    assert statuses(again) == dict.fromkeys("abcd", "skipped")
    assert again.parent_run_id == diamond.result.parent_run_id
    for stage in "abcd":
        assert again.stages[stage].outputs == diamond.result.stages[stage].outputs
        assert again.stages[stage].run_id == diamond.result.stages[stage].run_id
    parent, _ = mlflow_runs(diamond.uri, again)
    assert parent.info.status == "FINISHED"


# -------------------------------------------------------------------------------------------------
# Failure, then resume
# -------------------------------------------------------------------------------------------------


def test_failed_stage_stops_its_dependants_only_and_resumes_in_its_run(
    kinds, mlflow_server, tmp_path: Path
) -> None:
    stages = [
        {"name": "a", "kind": "step"},
        {
            "name": "b",
            "kind": "step",
            "inputs": {"left": "a.value"},
            "params": {"fail_marker": "m"},
        },
        {"name": "c", "kind": "step", "inputs": {"left": "a.value"}, "params": {"sleep_s": 1.5}},
        {"name": "d", "kind": "step", "inputs": {"left": "b.value", "right": "c.value"}},
    ]
    cfg = load_pipeline(write_pipeline(tmp_path, stages, uri=mlflow_server.uri), kinds)
    (tmp_path / "m").touch()
    with pytest.raises(
        PipelineError, match=r"stage\(s\) failed: b: RuntimeError: b failed on"
    ) as error:
        run_pipeline(cfg, kinds, workdir=tmp_path, poll_s=POLL_S)
    first = error.value.result
    assert first is not None
    assert statuses(first) == {"a": "finished", "b": "failed", "c": "finished", "d": "not_run"}
    assert first.stages["b"].error == "RuntimeError: b failed on purpose"
    assert [len(executions(tmp_path, s)) for s in "abcd"] == [1, 1, 1, 0]
    # The driver waited for the independent stage, which ended after b had failed.
    (b,), (c,) = executions(tmp_path, "b"), executions(tmp_path, "c")
    assert c["failed"] is False and c["ended"] > b["ended"]
    parent, children = mlflow_runs(mlflow_server.uri, first)
    assert parent.info.status == "FAILED"
    assert children["b"].info.status == "FAILED"
    assert children["b"].data.tags["workflow.error"] == "RuntimeError: b failed on purpose"
    assert children["c"].info.status == "FINISHED"
    assert children["d"].info.status == "KILLED"
    assert "workflow.outputs" not in children["b"].data.tags

    (tmp_path / "m").unlink()
    done = run_pipeline(cfg, kinds, workdir=tmp_path, poll_s=POLL_S)
    assert statuses(done) == {"a": "skipped", "b": "finished", "c": "skipped", "d": "finished"}
    assert [len(executions(tmp_path, s)) for s in "abcd"] == [1, 2, 1, 1]
    assert done.parent_run_id == first.parent_run_id
    for stage in "abcd":  # the failed and the not-run stage reopened their child runs
        assert done.stages[stage].run_id == first.stages[stage].run_id
    again = executions(tmp_path, "b")[-1]
    assert (again["run_id"], again["resumed"]) == (first.stages["b"].run_id, True)
    assert done.stages["c"].outputs == first.stages["c"].outputs
    assert done.stages["d"].outputs["value"] == 1 + 2 + 2  # type: ignore[index]
    parent, children = mlflow_runs(mlflow_server.uri, done)
    assert parent.info.status == "FINISHED"
    assert {s: r.info.status for s, r in children.items()} == dict.fromkeys("abcd", "FINISHED")
    assert "workflow.error" not in children["b"].data.tags
    assert "workflow.error" not in children["d"].data.tags


def test_changed_settings_of_a_finished_stage_are_refused(
    kinds, mlflow_server, tmp_path: Path
) -> None:
    stages = [
        {"name": "a", "kind": "step"},
        {"name": "b", "kind": "step", "inputs": {"left": "a.value"}},
    ]
    path = write_pipeline(tmp_path, stages, uri=mlflow_server.uri)
    run_pipeline(load_pipeline(path, kinds), kinds, workdir=tmp_path, poll_s=POLL_S)
    changed = load_pipeline(path, kinds, ["stages.1.params.value=5"])
    with pytest.raises(PipelineError, match="stage 'b' finished with other settings") as error:
        run_pipeline(changed, kinds, workdir=tmp_path, poll_s=POLL_S)
    assert "use a new pipeline.run_name" in str(error.value)
    # Upstream settings count too: b's outputs would come from a different a.
    changed = load_pipeline(path, kinds, ["stages.0.params.value=5"])
    with pytest.raises(
        PipelineError,
        match=r"stage 'a' finished with other settings.*stage 'b' finished with other",
    ):
        run_pipeline(changed, kinds, workdir=tmp_path, poll_s=POLL_S)
    assert [len(executions(tmp_path, s)) for s in "ab"] == [1, 1]
    # A new run_name starts afresh.
    fresh = load_pipeline(path, kinds, ["stages.1.params.value=5", "pipeline.run_name=r2"])
    result = run_pipeline(fresh, kinds, workdir=tmp_path, poll_s=POLL_S)
    assert result.stages["b"].outputs["value"] == 5 + 1  # type: ignore[index]


# -------------------------------------------------------------------------------------------------
# Load-time validation (no Ray, no MLflow)
# -------------------------------------------------------------------------------------------------

BASE = [
    {"name": "a", "kind": "step"},
    {"name": "b", "kind": "step", "inputs": {"left": "a.value"}},
]


def _with(index: int, **changes: Any) -> list[dict[str, Any]]:
    stages = [dict(s) for s in BASE]
    stages[index].update(changes)
    return stages


INVALID = {
    "unknown kind": (
        _with(1, kind="stepp"),
        r"stages\.1\.kind: stage 'b' has unknown kind 'stepp'",
    ),
    "duplicate name": (
        [*BASE, {"name": "a", "kind": "text"}],
        r"stages\.2\.name: duplicate stage name 'a' \(also stages\.0\)",
    ),
    "unknown stage": (
        _with(1, inputs={"left": "z.value"}),
        r"stages\.1\.inputs\.left: stage 'b' refers to unknown stage 'z'",
    ),
    "unknown after": (
        _with(1, after=["z"]),
        r"stages\.1\.after\.0: stage 'b' waits for unknown stage 'z'",
    ),
    "unknown output": (
        _with(1, inputs={"left": "a.valu"}),
        r"stages\.1\.inputs\.left: stage 'b': stage 'a' \(kind 'step'\) has no output 'valu'",
    ),
    "unknown input": (
        _with(1, inputs={"lefty": "a.value"}),
        r"stages\.1\.inputs\.lefty: stage 'b': kind 'step' has no input 'lefty'",
    ),
    "type mismatch": (
        [
            *BASE,
            {"name": "t", "kind": "text"},
            {"name": "u", "kind": "step", "inputs": {"left": "t.text"}},
        ],
        r"stages\.3\.inputs\.left: stage 'u': type mismatch: output t\.text is str but input "
        r"'left' of kind 'step' expects int",
    ),
    "missing input": (
        [*BASE, {"name": "n", "kind": "needs"}],
        r"stages\.2\.inputs: stage 'n' \(kind 'needs'\) needs input 'model_uri', which has no",
    ),
    "cycle": (
        _with(0, inputs={"left": "b.value"}),
        r"stages: dependency cycle (a -> b -> a|b -> a -> b)",
    ),
    "self cycle": (_with(1, after=["b"]), r"stages: dependency cycle b -> b"),
    "unknown param": (
        _with(1, params={"valu": 3}),
        r"stages\.1\.params\.valu: unknown key; expected one of \['barrier'",
    ),
    "bad param": (
        _with(1, params={"value": "many"}),
        r"stages\.1\.params\.value: expected an integer",
    ),
    "bad reference": (
        _with(1, inputs={"left": "a.not-a-field"}),
        r"stages\.1: inputs\.left: 'a\.not-a-field' is not a reference; write <stage>\.<output",
    ),
    "bad stage name": (_with(1, name="b.c"), r"stages\.1: name: 'b\.c' is not a valid stage name"),
    "negative resources": (
        _with(1, resources={"num_gpus": -1}),
        r"stages\.1: resources\.num_gpus: must be >= 0",
    ),
    "no stages": ([], r"stages: a pipeline needs at least one stage"),
}


def test_a_stage_gathers_several_stages_outputs(kinds, mlflow_server, tmp_path: Path) -> None:
    stages = [
        {"name": "a", "kind": "step", "params": {"value": 2}},
        {"name": "b", "kind": "step", "params": {"value": 30}},
        {"name": "sum", "kind": "gather", "inputs": {"values": ["a.value", "b.value"]}},
        {"name": "all", "kind": "gather", "inputs": {"whole": ["a", "b"], "values": ["sum.value"]}},
    ]
    cfg = load_pipeline(write_pipeline(tmp_path, stages, uri=mlflow_server.uri), kinds)
    result = run_pipeline(cfg, kinds, workdir=tmp_path, poll_s=POLL_S)
    outputs = {name: stage.outputs for name, stage in result.stages.items()}
    assert outputs["sum"]["value"] == 32  # in the order the references are listed
    assert outputs["sum"]["seen"] == {"value0": 2.0, "value1": 30.0}
    assert outputs["all"]["model_uri"] == ",".join(
        sorted([outputs["a"]["model_uri"], outputs["b"]["model_uri"]])
    )


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"left": ["a.value"]}, r"a list of references needs a list input, but input 'left'"),
        ({"left": "a"}, r"output a\.\* is dict\[str, Any\] but input 'left' of kind 'step'"),
        ({"values": ["a.value", "t.text"]}, r"output t\.text is str but input 'values'"),
    ],
)
def test_gathered_and_whole_references_are_type_checked(inputs, message, tmp_path: Path) -> None:
    stages = [
        {"name": "a", "kind": "step"},
        {"name": "t", "kind": "text"},
        {"name": "z", "kind": "gather" if "values" in inputs else "step", "inputs": inputs},
    ]
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_pipeline(tmp_path, stages), KINDS)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_config_mistakes_are_refused_at_load_time(case: str, tmp_path: Path) -> None:
    stages, message = INVALID[case]
    path = write_pipeline(tmp_path, stages)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path, KINDS)


def test_a_valid_pipeline_loads_and_orders_dependencies(tmp_path: Path) -> None:
    stages = [
        {"name": "late", "kind": "step", "inputs": {"left": "early.value"}, "after": ["x"]},
        {"name": "x", "kind": "text"},
        {"name": "early", "kind": "step", "resources": {"num_cpus": 1, "gpu_slot": 1}},
    ]
    cfg = load_pipeline(write_pipeline(tmp_path, stages), KINDS)
    assert [s.name for s in cfg.order()] == ["x", "early", "late"]
    assert cfg.stage("early").ray_options() == {"num_cpus": 1, "resources": {"gpu_slot": 1}}
    assert cfg.stage("late").ray_options() == {"num_cpus": 0}


def test_stage_kinds_take_json_values_only() -> None:
    @dataclass(frozen=True)
    class Pair:
        pair: tuple[int, int]

    with pytest.raises(TypeError, match="outputs field 'pair' has type tuple"):
        StageKind("pairs", lambda ctx, p, i: Pair((1, 2)), NoParams, NoInputs, Pair)
    with pytest.raises(TypeError, match="params must be a dataclass type"):
        StageKind("x", lambda ctx, p, i: None, dict, NoInputs, NoInputs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("src", "dst", "ok"),
    [
        (int, float, True),
        (float, int, False),
        (str, str | None, True),
        (str | None, str, False),
        (list[int], list[float], True),
        (dict[str, str], dict[str, int], False),
        (typing.Literal["a", "b"], str, True),
        (Any, int, True),
        (bool, int, False),
    ],
)
def test_output_types_fit_input_types(src: Any, dst: Any, ok: bool) -> None:
    assert assignable(src, dst) is ok
