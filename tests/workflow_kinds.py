"""Toy stage kinds for tests/test_workflow.py: they add numbers, sleep, meet at a barrier, fail
while a marker file exists, and record every execution as a JSON file under
``<workdir>/events/``, which is how the tests count executions and see when each ran.

No ``from __future__ import annotations`` here: the tests send this module's code to Ray workers
by value (tests/ is not importable there), and string annotations could not be resolved on a
worker, where this module is not in ``sys.modules``.
"""

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.workflow import NoInputs, NoParams, StageContext, StageKind


@dataclass(frozen=True)
class StepParams:
    """value: added to the inputs. barrier / parties: wait (up to 60 s) until ``parties`` stages
    have reached the barrier folder of that name, proving they run at the same time.
    fail_marker: fail while this file (relative to the workdir) exists."""

    value: int = 1
    sleep_s: float = 0.0
    barrier: str | None = None
    parties: int = 2
    fail_marker: str | None = None


@dataclass(frozen=True)
class StepInputs:
    left: int = 0
    right: float = 0.0  # an int output fits a float input


@dataclass(frozen=True)
class StepOutputs:
    value: int
    model_uri: str
    seen: dict[str, float]


def step(ctx: StageContext, params: StepParams, inputs: StepInputs) -> StepOutputs:
    record: dict[str, Any] = {
        "stage": ctx.stage,
        "run_name": ctx.run_name,
        "run_id": ctx.run_id,
        "parent_run_id": ctx.parent_run_id,
        "resumed": ctx.resumed,
        "inputs": {"left": inputs.left, "right": inputs.right},
        "started": time.time(),
    }
    if params.barrier:
        _meet(ctx.workdir / params.barrier, ctx.stage, params.parties)
    if params.fail_marker and (ctx.workdir / params.fail_marker).exists():
        _save(ctx.workdir, {**record, "failed": True, "ended": time.time()})
        raise RuntimeError(f"{ctx.stage} failed on purpose")
    time.sleep(params.sleep_s)
    _save(ctx.workdir, {**record, "failed": False, "ended": time.time()})
    return StepOutputs(
        value=params.value + inputs.left + int(inputs.right),
        model_uri=f"runs:/{ctx.run_id}/model",
        seen={"left": inputs.left, "right": inputs.right},
    )


def _meet(folder: Path, stage: str, parties: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / stage).touch()
    deadline = time.monotonic() + 60
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stage}: the other stages never reached barrier {folder.name}")
        time.sleep(0.05)


def _save(workdir: Path, record: dict[str, Any]) -> None:
    events = workdir / "events"
    events.mkdir(exist_ok=True)
    path = events / f"{record['stage']}.{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(record))


@dataclass(frozen=True)
class TextOutputs:
    text: str


def text(ctx: StageContext, params: NoParams, inputs: NoInputs) -> TextOutputs:
    return TextOutputs(text=ctx.stage)


@dataclass(frozen=True)
class NeedsInputs:
    model_uri: str  # no default: a stage of this kind must be given it


def needs(ctx: StageContext, params: NoParams, inputs: NeedsInputs) -> TextOutputs:
    return TextOutputs(text=inputs.model_uri)


@dataclass(frozen=True)
class GatherInputs:
    values: list[int] = field(default_factory=list)  # several stages' output fields
    whole: list[dict[str, Any]] = field(default_factory=list)  # several stages' whole outputs


def gather(ctx: StageContext, params: NoParams, inputs: GatherInputs) -> StepOutputs:
    return StepOutputs(
        value=sum(inputs.values),
        model_uri=",".join(sorted(w["model_uri"] for w in inputs.whole)),
        seen={f"value{i}": float(v) for i, v in enumerate(inputs.values)},
    )


KINDS = {
    kind.name: kind
    for kind in (
        StageKind("step", step, StepParams, StepInputs, StepOutputs),
        StageKind("text", text, NoParams, NoInputs, TextOutputs),
        StageKind("needs", needs, NoParams, NeedsInputs, TextOutputs),
        StageKind("gather", gather, NoParams, GatherInputs, StepOutputs),
    )
}
