"""Running a pipeline: Ray runs the stages, MLflow keeps their state.

There is no scheduler here. Each stage that has to run becomes one Ray task, and the results of the
stages it depends on are passed to it as ``ObjectRef`` arguments: Ray starts it when they are ready
and runs independent stages side by side. Stages that finished in an earlier attempt of the same
``pipeline.run_name`` (same settings) are not run again; their outputs, read back from their MLflow
runs, are passed as plain values. The driver only waits for all tasks, reports, and records.

The task itself (``execute_stage``, on a worker) moves its stage's MLflow run to RUNNING, calls
the kind's function, stores the outputs and closes the run, so a stage's result is kept even if
the driver dies right after.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.config import config_hash, from_dict, to_dict, to_yaml
from pipelines.signing import checkpoint_key
from pipelines.tracking import runs
from pipelines.workflow import state
from pipelines.workflow.plan import PlannedStage, plan_pipeline, stage_hashes
from pipelines.workflow.spec import PipelineConfig, Reference, StageContext, StageKind

log = logging.getLogger("pipelines.workflow")

StageStatus = Literal["finished", "skipped", "failed", "not_run"]


@dataclass(frozen=True)
class StageResult:
    """status: finished (ran now), skipped (finished in an earlier attempt, outputs read back),
    failed, or not_run (a stage it depends on failed). run_id: its MLflow child run (None only
    for a stage that never got one)."""

    status: StageStatus
    outputs: dict[str, Any] | None
    run_id: str | None
    error: str | None = None


@dataclass(frozen=True)
class PipelineResult:
    pipeline: str
    run_name: str
    parent_run_id: str
    stages: dict[str, StageResult]

    @property
    def ok(self) -> bool:
        return all(s.status in ("finished", "skipped") for s in self.stages.values())


class PipelineError(RuntimeError):
    """A pipeline that cannot run or did not finish; ``result`` holds every stage's state when
    stages ran (None when the pipeline was refused before anything ran)."""

    def __init__(self, message: str, result: PipelineResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class StageTask:
    """Everything a worker needs to run one stage (pickled into its Ray task)."""

    ctx: StageContext
    kind: StageKind[Any, Any, Any]
    params: Any
    references: dict[str, Reference | list[Reference]]
    path: str


@dataclass(frozen=True)
class StageReturn:
    """What a stage's Ray task returns: its outputs, and when it ran (epoch seconds)."""

    outputs: dict[str, Any]
    started: float
    ended: float


def execute_stage(task: StageTask, upstream: tuple[str, ...], *values: StageReturn) -> StageReturn:
    """The body of a stage's Ray task; ``values`` are the results of the ``upstream`` stages."""
    from pipelines.console import quiet

    quiet()
    ctx = task.ctx
    client = ctx.mlflow_client()
    client.update_run(ctx.run_id, status="RUNNING")
    started = time.time()
    try:
        produced = {name: value.outputs for name, value in zip(upstream, values, strict=True)}

        def value(key: str, stage: str, output: str | None) -> Any:
            if output is None:
                return produced[stage]
            if output not in produced[stage]:
                raise ValueError(
                    f"{task.path}.inputs.{key}: stage {stage!r} produced no output {output!r}"
                )
            return produced[stage][output]

        data = {
            key: [value(key, *r) for r in refs] if isinstance(refs, list) else value(key, *refs)
            for key, refs in task.references.items()
        }
        inputs = from_dict(task.kind.inputs, data, f"{task.path}.inputs")
        outputs = _json_outputs(task, task.kind.fn(ctx, task.params, inputs))
        state.write_outputs(client, ctx.run_id, outputs)
        runs.finish_run(client, ctx.run_id, "FINISHED")
    except BaseException as error:  # KeyboardInterrupt too: a cancelled stage did not finish
        with contextlib.suppress(Exception):
            state.set_error(client, ctx.run_id, describe(error))
        with contextlib.suppress(Exception):
            runs.finish_run(client, ctx.run_id, "FAILED")
        raise
    return StageReturn(outputs, started, time.time())


def _json_outputs(task: StageTask, result: Any) -> dict[str, Any]:
    """The outputs as JSON values, exactly as a later attempt will read them back from MLflow."""
    expected = task.kind.outputs
    if not isinstance(result, expected):
        raise TypeError(
            f"stage {task.ctx.stage!r}: kind {task.kind.name!r} returned "
            f"{type(result).__name__}, expected {expected.__name__}"
        )
    try:
        return json.loads(json.dumps(to_dict(result)))
    except (TypeError, ValueError) as error:
        raise TypeError(f"stage {task.ctx.stage!r}: outputs are not JSON values: {error}") from None


def describe(error: BaseException) -> str:
    """``Type: message`` of the error a stage raised (unwrapped from Ray's RayTaskError)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_pipeline(
    cfg: PipelineConfig,
    kinds: Mapping[str, StageKind[Any, Any, Any]],
    *,
    workdir: Path | None = None,
    poll_s: float = 5.0,
    parent_run_id: str | None = None,
    signing_key: bytes | None = None,
) -> PipelineResult:
    """Run the stages of ``cfg`` that have not finished yet under its ``pipeline.run_name``.

    Raises PipelineError before anything runs when a finished stage's settings changed, and after
    all stages that could run have ended when some stage failed. ``workdir`` (default: the current
    directory) is where relative paths and the default SQLite tracking store are. ``poll_s``: how
    often the driver looks for stages that started, for its progress lines. ``parent_run_id``: an
    existing MLflow run (a stage of an enclosing pipeline) to hold the stage runs, instead of a
    parent run found or created by name; its status stays its owner's. ``signing_key``: the
    checkpoint key the stages get (default: ``checkpoint_key()`` here). Ray must be initialised by
    the caller.
    """
    plan = plan_pipeline(cfg, kinds)  # every config mistake is found before any side effect
    workdir = (workdir or Path.cwd()).resolve()
    driver = _Driver(cfg, plan, workdir, poll_s, parent_run_id, signing_key or checkpoint_key())
    return driver.run()


class _Driver:
    """One attempt of a pipeline run, on the driver: decide, submit, wait, record."""

    def __init__(
        self,
        cfg: PipelineConfig,
        plan: list[PlannedStage],
        workdir: Path,
        poll_s: float,
        parent_run_id: str | None,
        signing_key: bytes,
    ) -> None:
        self.cfg, self.plan, self.workdir, self.poll_s = cfg, plan, workdir, poll_s
        self.signing_key = signing_key
        self.nested = parent_run_id is not None
        self.hashes = stage_hashes(plan)
        self.target = runs.resolve_tracking(cfg.tracking.tracking_uri, workdir)
        self.client = runs.client_for(self.target)
        self.experiment_id = runs.experiment_id(
            self.client, cfg.tracking.experiment, self.target.artifact_location
        )
        self.name, self.run_name = cfg.pipeline.name, cfg.pipeline.run_name
        self.prefix = f"pipeline {self.name!r} run {self.run_name!r}"
        self.run_ids: dict[str, str] = {}
        self.reported: set[str] = set()  # failures already logged as they happened
        self.parent_id = parent_run_id or ""

    def run(self) -> PipelineResult:
        if self.nested:
            parent = self.client.get_run(self.parent_id)
        else:
            parent = state.find_parent(self.client, self.experiment_id, self.name, self.run_name)
        children = (
            state.find_children(self.client, self.experiment_id, parent.info.run_id)
            if parent is not None
            else {}
        )
        skipped = self._reusable(children)  # raises before anything changes
        if not self.nested:
            self.parent_id = self._open_parent(parent)
        to_run = [s for s in self.plan if s.name not in skipped]
        log.info(
            "%s: parent run %s (%s); %d stage(s) to run, %d finished before",
            self.prefix,
            self.parent_id,
            "the recipe's" if self.nested else "resumed" if parent is not None else "new",
            len(to_run),
            len(skipped),
        )
        for stage in self.plan:
            if stage.name in skipped:
                self.run_ids[stage.name] = children[stage.name].info.run_id
                log.info("%s: stage %r skipped (finished before)", self.prefix, stage.name)
        pending: dict[Any, str] = {}
        try:
            self._submit(to_run, skipped, children, pending)
            outcomes = self._wait(pending)
        except BaseException:  # the driver is interrupted: stop the stages, record it
            self._abandon(pending)
            raise
        return self._record(skipped, outcomes)

    def _reusable(self, children: Mapping[str, Any]) -> dict[str, StageReturn]:
        """Outputs of the stages finished before with the same settings; refuses a finished stage
        whose settings changed, which would otherwise be silently redone or reused."""
        reuse: dict[str, StageReturn] = {}
        problems = []
        for stage in self.plan:
            run = children.get(stage.name)
            # FINISHED without outputs: the stage's own work closed the run (a training job
            # finishes the run it logs to) but the task died before storing its outputs.
            if (
                run is None
                or run.info.status != "FINISHED"
                or state.TAG_OUTPUTS not in run.data.tags
            ):
                continue
            before = run.data.tags.get(state.TAG_STAGE_HASH)
            rerun = [u for u in stage.config.upstream() if u not in reuse]
            if before != self.hashes[stage.name]:
                problems.append(
                    f"stage {stage.name!r} finished with other settings (stage hash {before}, "
                    f"now {self.hashes[stage.name]}); use a new pipeline.run_name"
                )
            elif rerun:
                problems.append(
                    f"stage {stage.name!r} finished, but stage(s) {rerun} it depends on must run "
                    "again; use a new pipeline.run_name"
                )
            else:
                outputs = state.read_outputs(self.client, run)
                ended = (run.info.end_time or run.info.start_time) / 1000
                reuse[stage.name] = StageReturn(outputs, run.info.start_time / 1000, ended)
        if problems:
            raise PipelineError(f"{self.prefix}: " + "; ".join(problems))
        return reuse

    def _open_parent(self, parent: Any | None) -> str:
        tags = {
            state.TAG_PIPELINE: self.name,
            state.TAG_CONFIG_HASH: config_hash(self.cfg, exclude=["pipeline.run_name"]),
        }
        if parent is None:
            run_id = self.client.create_run(
                self.experiment_id, run_name=self.run_name, tags=tags
            ).info.run_id
        else:
            run_id = parent.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        self.client.log_text(run_id, to_yaml(self.cfg), state.CONFIG_ARTIFACT)
        return run_id

    def _open_child(self, stage: PlannedStage, run: Any | None) -> StageContext:
        """The stage's child run, new or reopened (same id: its own work can resume), SCHEDULED
        until its task starts."""
        tags = {
            state.TAG_PARENT: self.parent_id,
            state.TAG_STAGE: stage.name,
            state.TAG_KIND: stage.kind.name,
            state.TAG_STAGE_HASH: self.hashes[stage.name],
        }
        run_name = f"{self.run_name}-{stage.name}"
        if run is None:
            run_id = self.client.create_run(
                self.experiment_id, run_name=run_name, tags=tags
            ).info.run_id
        else:
            run_id = run.info.run_id
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
            if state.TAG_ERROR in run.data.tags:
                self.client.delete_tag(run_id, state.TAG_ERROR)
        self.client.update_run(run_id, status="SCHEDULED")
        self.run_ids[stage.name] = run_id
        return StageContext(
            pipeline=self.name,
            pipeline_run_name=self.run_name,
            stage=stage.name,
            kind=stage.kind.name,
            run_name=run_name,
            parent_run_id=self.parent_id,
            run_id=run_id,
            resumed=run is not None,
            tracking_uri=self.target.tracking_uri,
            experiment=self.cfg.tracking.experiment,
            experiment_id=self.experiment_id,
            workdir=self.workdir,
            signing_key=self.signing_key,
        )

    def _submit(
        self,
        to_run: list[PlannedStage],
        skipped: Mapping[str, StageReturn],
        children: Mapping[str, Any],
        pending: dict[Any, str],
    ) -> None:
        """One Ray task per stage, with its upstream stages' results as arguments: ObjectRefs of
        the tasks submitted just before (Ray waits for them), values of the skipped stages.
        ``pending`` gets each task's ref as it is submitted."""
        import ray

        remote = ray.remote(execute_stage)
        results: dict[str, Any] = dict(skipped)
        for stage in to_run:  # dependency order: every upstream is in results already
            task = StageTask(
                ctx=self._open_child(stage, children.get(stage.name)),
                kind=stage.kind,
                params=stage.params,
                references=stage.config.references(),
                path=stage.path,
            )
            upstream = tuple(stage.config.upstream())
            options = {
                **stage.config.ray_options(),
                "name": f"{self.name}/{self.run_name}/{stage.name}",
            }
            ref = remote.options(**options).remote(task, upstream, *(results[u] for u in upstream))
            results[stage.name] = ref
            pending[ref] = stage.name
            waits = f" after {list(upstream)}" if upstream else ""
            log.info("%s: stage %r submitted%s", self.prefix, stage.name, waits)

    def _wait(self, pending: dict[Any, str]) -> dict[str, StageReturn | BaseException]:
        """Every submitted stage's result or error, logging each as it ends; waits for all of
        them, so that stages independent of a failed one still finish."""
        import ray

        outcomes: dict[str, StageReturn | BaseException] = {}
        started: set[str] = set()
        begin = last_poll = time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_s)
            for ref in ready:
                name = pending.pop(ref)
                started.add(name)
                try:
                    outcomes[name] = ray.get(ref)
                except Exception as error:
                    outcomes[name] = error
                self._log_end(name, outcomes, time.monotonic() - begin)
            if pending and time.monotonic() - last_poll >= self.poll_s:
                last_poll = time.monotonic()
                self._log_started(set(pending.values()) - started, started)
        return outcomes

    def _log_end(
        self, name: str, outcomes: Mapping[str, StageReturn | BaseException], at: float
    ) -> None:
        outcome = outcomes[name]
        if isinstance(outcome, StageReturn):
            took = outcome.ended - outcome.started
            log.info("%s: stage %r finished in %.1f s (at +%.1f s)", self.prefix, name, took, at)
        elif all(isinstance(outcomes.get(u), StageReturn) for u in self._upstream(name)):
            # Otherwise it is (most likely) a stage that never ran; _record says which.
            self.reported.add(name)
            log.error("%s: stage %r FAILED: %s", self.prefix, name, describe(outcome))

    def _log_started(self, waiting: set[str], started: set[str]) -> None:
        """Progress lines for stages whose task has begun (its child run is RUNNING)."""
        if not waiting:
            return
        try:
            running = self.client.search_runs(
                [self.experiment_id],
                filter_string=(
                    f"tags.`{state.TAG_PARENT}` = '{self.parent_id}' "
                    "and attributes.status = 'RUNNING'"
                ),
            )
        except Exception as error:  # progress lines are not worth failing a pipeline for
            log.warning("%s: could not poll stage runs: %s", self.prefix, error)
            return
        for run in running:
            name = run.data.tags.get(state.TAG_STAGE)
            if name in waiting:
                started.add(name)
                log.info("%s: stage %r started (run %s)", self.prefix, name, run.info.run_id)

    def _upstream(self, name: str) -> list[str]:
        return self.cfg.stage(name).upstream()

    def _record(
        self,
        skipped: Mapping[str, StageReturn],
        outcomes: Mapping[str, StageReturn | BaseException],
    ) -> PipelineResult:
        """Every stage's final state, on the result and on the MLflow runs; raises when some
        stage failed."""
        results: dict[str, StageResult] = {}
        failures = []
        for stage in self.plan:
            name, run_id = stage.name, self.run_ids.get(stage.name)
            outcome = skipped[name] if name in skipped else outcomes[name]
            blocked = [u for u in stage.config.upstream() if results[u].status in _NOT_DONE]
            if isinstance(outcome, StageReturn):
                status: StageStatus = "skipped" if name in skipped else "finished"
                results[name] = StageResult(status, outcome.outputs, run_id)
            elif blocked:
                error = f"not run: stage(s) {blocked} it depends on did not finish"
                log.warning("%s: stage %r %s", self.prefix, name, error)
                self._close_child(run_id, "KILLED", error)
                results[name] = StageResult("not_run", None, run_id, error)
            else:
                error = describe(outcome)
                if name not in self.reported:
                    log.error("%s: stage %r FAILED: %s", self.prefix, name, error)
                failures.append((name, error, outcome))
                self._close_child(run_id, "FAILED", error)
                results[name] = StageResult("failed", None, run_id, error)
        result = PipelineResult(self.name, self.run_name, self.parent_id, results)
        if not self.nested:
            runs.finish_run(self.client, self.parent_id, "FAILED" if failures else "FINISHED")
        counts = {s: sum(r.status == s for r in results.values()) for s in _STATUSES}
        log.info("%s: %s (%s)", self.prefix, "FAILED" if failures else "finished", counts)
        if failures:
            named = "; ".join(f"{name}: {error}" for name, error, _ in failures)
            cause = failures[0][2]
            raise PipelineError(f"{self.prefix}: stage(s) failed: {named}", result) from cause
        return result

    def _close_child(self, run_id: str | None, status: str, error: str) -> None:
        # The task closes its run itself when it runs; this covers tasks that never started
        # (upstream failed, worker lost) and leaves a reason on the run.
        if run_id is None:
            return
        state.set_error(self.client, run_id, error)
        runs.finish_run(self.client, run_id, status)

    def _abandon(self, pending: Mapping[Any, str]) -> None:
        import ray

        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        with contextlib.suppress(Exception):
            for name in pending.values():
                self._close_child(self.run_ids.get(name), "KILLED", "driver interrupted")
            if not self.nested:
                runs.finish_run(self.client, self.parent_id, "KILLED")
        log.error("%s: interrupted; %d stage(s) cancelled", self.prefix, len(pending))


_NOT_DONE = ("failed", "not_run")
_STATUSES: tuple[StageStatus, ...] = ("finished", "skipped", "failed", "not_run")
