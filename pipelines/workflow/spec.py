"""What a pipeline is made of: stage kinds (typed functions) and the YAML config that chains stages.

A stage kind is a plain function ``fn(ctx, params, inputs) -> outputs`` with three dataclasses that
say what it takes and returns. ``params`` are the stage's settings from YAML; ``inputs`` are filled
from earlier stages' outputs, named in YAML as ``<stage>.<output field>`` (or ``<stage>`` for all
of its outputs as one dict), or as a list of such references for an input of type ``list[...]``
(several stages' outputs gathered into one, such as the trials of a sweep); ``outputs`` hold what
later stages need (model URIs, run ids, metrics), JSON values only, because they are stored on the
stage's MLflow run and read back from there when a pipeline is run again.

The config alone is checked here as it loads (names, references, cycles); the checks that need the
kinds (their params, inputs and output types) are in ``plan.py``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipelines.config import ConfigError
from pipelines.tracking.config import TrackingConfig

P = TypeVar("P")
I = TypeVar("I")  # noqa: E741 (the inputs of a kind, beside P and O)
O = TypeVar("O")  # noqa: E741

# Stage names end up in MLflow run names, Ray task names and checkpoint folders, and references
# split "<stage>.<field>" at the dot: letters, digits, "_" and "-" only.
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JSON_SCALARS = (str, int, float, bool, type(None))
_RESOURCE_OPTIONS = ("num_cpus", "num_gpus", "memory")


@dataclass(frozen=True)
class NoParams:
    """The params of a kind that has no settings."""


@dataclass(frozen=True)
class NoInputs:
    """The inputs of a kind that takes nothing from earlier stages."""


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs, handed to its function on a Ray worker (picklable, plain values).

    run_name: ``<pipeline run_name>-<stage>``, the same on every attempt: the name a stage gives its
        own checkpoints and training runs so that a rerun resumes them.
    run_id: the stage's MLflow child run (reopened, same id, when an unfinished stage runs again);
        resumed says whether it existed before this attempt.
    tracking_uri: resolved and absolute; workers run in other directories than the driver.
    workdir: the driver's working directory (absolute), for relative paths in params.
    signing_key: the key that signs training checkpoints (``pipelines.train.checkpoint``),
        resolved once on the driver, so that every stage signs and verifies with the same key on
        whichever node Ray runs it.
    """

    pipeline: str
    pipeline_run_name: str
    stage: str
    kind: str
    run_name: str
    parent_run_id: str
    run_id: str
    resumed: bool
    tracking_uri: str
    experiment: str
    experiment_id: str
    workdir: Path
    signing_key: bytes = field(default=b"", repr=False)

    def mlflow_client(self) -> Any:
        """An ``MlflowClient`` for this pipeline's tracking server (log to ``run_id`` with it)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


@dataclass(frozen=True)
class StageKind(Generic[P, I, O]):
    """A kind of stage: ``fn(ctx, params, inputs) -> outputs`` and its three dataclasses.

    ``fn`` runs on a Ray worker, which imports it by its module: define it at module level in an
    installed package (``pipelines/...``), not in a script or a notebook. ``hash_exclude``: dotted
    params keys that do not change what the stage produces (where it keeps files, how often it
    may retry), left out of its settings digest.
    """

    name: str
    fn: Callable[[StageContext, P, I], O]
    params: type[P]
    inputs: type[I]
    outputs: type[O]
    hash_exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _STAGE_NAME.match(self.name or ""):
            raise ValueError(f"stage kind name {self.name!r}: use letters, digits, '_' and '-'")
        if not callable(self.fn):
            raise TypeError(f"stage kind {self.name!r}: fn must be callable, got {self.fn!r}")
        for role in ("params", "inputs", "outputs"):
            cls = getattr(self, role)
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise TypeError(f"stage kind {self.name!r}: {role} must be a dataclass type")
        # Inputs and outputs travel between workers and are stored as JSON on MLflow runs.
        for role in ("inputs", "outputs"):
            for name, tp in field_types(getattr(self, role)).items():
                problem = json_type_problem(tp)
                if problem:
                    raise TypeError(
                        f"stage kind {self.name!r}: {role} field {name!r} has type "
                        f"{type_name(tp)}; {problem}"
                    )


@dataclass
class PipelineSection:
    """name: the pipeline (tag ``workflow.pipeline`` on its MLflow runs).
    run_name: the resume key: running again with the same run_name skips the finished stages."""

    name: str
    run_name: str

    def __post_init__(self) -> None:
        for key in ("name", "run_name"):
            if not _RUN_NAME.match(getattr(self, key)):
                raise ValueError(
                    f"{key}: {getattr(self, key)!r} is not a valid name; use letters, digits, "
                    "'_', '-' and '.'"
                )


@dataclass
class StageConfig:
    """One stage of a pipeline.

    inputs: ``{input field: "<stage>.<output field>"}``; the stages named here run first.
    after: more stages that must finish first, for ordering without data.
    params: the kind's settings, checked against its params dataclass once the kinds are known.
    resources: what the stage's Ray task holds while it runs: ``num_cpus``, ``num_gpus``,
        ``memory`` (bytes) or custom resource names. None by default: a stage that launches Ray
        Train or Ray Data work holds nothing itself, its workers ask for their own.
    """

    name: str
    kind: str
    inputs: dict[str, str | list[str]] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _STAGE_NAME.match(self.name):
            raise ValueError(
                f"name: {self.name!r} is not a valid stage name; use letters, digits, '_' and '-'"
            )
        if not self.kind:
            raise ValueError(f"kind: stage {self.name!r} needs a kind")
        for key, refs in self.inputs.items():
            if not _FIELD_NAME.match(key):
                raise ValueError(f"inputs.{key}: not a valid input field name")
            for ref in refs if isinstance(refs, list) else [refs]:
                stage, dot, output = ref.partition(".")
                if not _STAGE_NAME.match(stage) or (dot and not _FIELD_NAME.match(output)):
                    raise ValueError(
                        f"inputs.{key}: {ref!r} is not a reference; write <stage>.<output field>"
                        " (e.g. pretrain.model_uri) or <stage> for all of its outputs"
                    )
        for key, amount in self.resources.items():
            if amount < 0:
                raise ValueError(f"resources.{key}: must be >= 0, got {amount}")

    def references(self) -> dict[str, Reference | list[Reference]]:
        """``{input field: (stage, output field or None for all outputs)}``, or a list of them."""
        refs: dict[str, Reference | list[Reference]] = {}
        for key, value in self.inputs.items():
            parsed = [_reference(ref) for ref in (value if isinstance(value, list) else [value])]
            refs[key] = parsed if isinstance(value, list) else parsed[0]
        return refs

    def upstream(self) -> list[str]:
        """The stages this one waits for: those its inputs name, then ``after``, each once."""
        names = [ref[0] for ref in _flat(self.references().values())] + list(self.after)
        return list(dict.fromkeys(names))

    def ray_options(self) -> dict[str, Any]:
        """Options of the stage's Ray task; it holds no CPU unless ``resources`` says so."""
        options: dict[str, Any] = {"num_cpus": 0}
        custom = {}
        for key, amount in self.resources.items():
            if key == "memory":
                options["memory"] = int(amount)
            elif key in _RESOURCE_OPTIONS:
                options[key] = amount
            else:
                custom[key] = amount
        if custom:
            options["resources"] = custom
        return options


Reference = tuple[str, str | None]  # (stage, output field); None: all of the stage's outputs


def _reference(text: str) -> Reference:
    stage, dot, output = text.partition(".")
    return stage, (output if dot else None)


def _flat(values: Any) -> list[Reference]:
    out: list[Reference] = []
    for value in values:
        out.extend(value if isinstance(value, list) else [value])
    return out


@dataclass
class PipelineConfig:
    """A pipeline: its name and run name, where MLflow keeps its state, and its stages."""

    pipeline: PipelineSection
    stages: list[StageConfig]
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages: a pipeline needs at least one stage")
        index: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in index:
                raise ConfigError(
                    f"stages.{i}.name: duplicate stage name {stage.name!r} "
                    f"(also stages.{index[stage.name]})"
                )
            index[stage.name] = i
        for i, stage in enumerate(self.stages):
            for key, refs in stage.references().items():
                for ref, _ in refs if isinstance(refs, list) else [refs]:
                    if ref in index:
                        continue
                    raise ConfigError(
                        f"stages.{i}.inputs.{key}: stage {stage.name!r} refers to unknown stage "
                        f"{ref!r}; stages are {sorted(index)}"
                    )
            for j, ref in enumerate(stage.after):
                if ref not in index:
                    raise ConfigError(
                        f"stages.{i}.after.{j}: stage {stage.name!r} waits for unknown stage "
                        f"{ref!r}; stages are {sorted(index)}"
                    )
        self.order()  # raises on a cycle

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}")

    def order(self) -> list[StageConfig]:
        """The stages in an order where each comes after its upstream, config order otherwise."""
        done: set[str] = set()
        order: list[StageConfig] = []
        remaining = list(self.stages)
        while remaining:
            ready = [s for s in remaining if all(u in done for u in s.upstream())]
            if not ready:
                raise ConfigError(f"stages: dependency cycle {_find_cycle(remaining)}")
            for stage in ready:
                done.add(stage.name)
                order.append(stage)
            remaining = [s for s in remaining if s.name not in done]
        return order


def _find_cycle(stages: list[StageConfig]) -> str:
    """One cycle among ``stages`` (each of which waits on another of them), as ``a -> b -> a``."""
    upstream = {s.name: [u for u in s.upstream() if u in {t.name for t in stages}] for s in stages}
    path = [stages[0].name]
    while path[-1] not in path[:-1]:
        path.append(upstream[path[-1]][0])
    start = path.index(path[-1])
    # Reversed so that it reads in the direction the work flows: a -> b means b waits for a.
    return " -> ".join(reversed(path[start:]))


# -------------------------------------------------------------------------------------------------
# Field types: which are JSON values, and which output type an input field accepts
# -------------------------------------------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """Init fields of a dataclass and their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def required_fields(cls: type) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def json_type_problem(tp: Any) -> str | None:
    """None if values of type ``tp`` are JSON values, else why not."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp in _JSON_SCALARS:
        return None
    if origin is typing.Literal:
        ok = all(isinstance(a, _JSON_SCALARS) for a in args)
        return None if ok else "Literal values must be str, int, float, bool or None"
    if _is_union(tp):
        return next((p for p in map(json_type_problem, args) if p), None)
    if origin is list or tp is list:
        return json_type_problem(args[0]) if args else None
    if origin is dict or tp is dict:
        if args and args[0] is not str:
            return "JSON object keys are strings: use dict[str, ...]"
        return json_type_problem(args[1]) if args else None
    return "use str, int, float, bool, None, or list[...] / dict[str, ...] of those"


def assignable(src: Any, dst: Any) -> bool:
    """Whether every value of the output type ``src`` fits the input type ``dst``."""
    if dst is Any or src is Any:
        return True  # Any is checked when the value arrives (from_dict coerces and rejects)
    if _is_union(src):
        return all(assignable(s, dst) for s in typing.get_args(src))
    if _is_union(dst):
        return any(assignable(src, d) for d in typing.get_args(dst))
    if typing.get_origin(src) is typing.Literal:
        return all(
            assignable(type(v), dst) or v in _literal_values(dst) for v in typing.get_args(src)
        )
    if src is dst or (src is int and dst is float):  # a JSON number is a fine float
        return True
    src_origin, dst_origin = typing.get_origin(src) or src, typing.get_origin(dst) or dst
    if src_origin is not dst_origin or src_origin not in (list, dict):
        return False
    src_args, dst_args = typing.get_args(src), typing.get_args(dst)
    if not src_args or not dst_args:
        return True
    return all(assignable(s, d) for s, d in zip(src_args, dst_args, strict=True))


def _literal_values(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return "None" if tp is type(None) else tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")
