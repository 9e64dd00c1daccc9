"""A pipeline config checked against its stage kinds, before anything runs.

Every mistake a config can hold is found here, on the driver, with the stage's dotted path in the
message: an unknown kind, a params key the kind does not have, an input the kind does not take, a
reference to an output its stage's kind does not produce or of a type the input does not accept,
and a required input left out. A pipeline that would fail on its third stage after hours of
pretraining fails at submission instead.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, config_hash, from_dict, load_config, to_dict
from pipelines.workflow.spec import (
    PipelineConfig,
    StageConfig,
    StageKind,
    assignable,
    field_types,
    required_fields,
    type_name,
)


@dataclass(frozen=True)
class PlannedStage:
    """A stage with its kind and its params built; ``path`` is its place in the config."""

    config: StageConfig
    kind: StageKind[Any, Any, Any]
    params: Any
    path: str

    @property
    def name(self) -> str:
        return self.config.name


def load_pipeline(
    path: str | Path, kinds: Mapping[str, StageKind[Any, Any, Any]], overrides: Sequence[str] = ()
) -> PipelineConfig:
    """A pipeline config from YAML plus ``KEY=VALUE`` overrides, checked against ``kinds``."""
    cfg = load_config(PipelineConfig, path, overrides)
    plan_pipeline(cfg, kinds)
    return cfg


def plan_pipeline(
    cfg: PipelineConfig, kinds: Mapping[str, StageKind[Any, Any, Any]]
) -> list[PlannedStage]:
    """The stages in dependency order with kinds and params resolved; ConfigError on any mistake."""
    for key, kind in kinds.items():
        if key != kind.name:
            raise ValueError(f"kinds[{key!r}] is the kind named {kind.name!r}; key it by its name")
    paths = {s.name: f"stages.{i}" for i, s in enumerate(cfg.stages)}
    kind_of = {}
    for stage in cfg.stages:
        if stage.kind not in kinds:
            raise ConfigError(
                f"{paths[stage.name]}.kind: stage {stage.name!r} has unknown kind {stage.kind!r}; "
                f"expected one of {sorted(kinds)}"
            )
        kind_of[stage.name] = kinds[stage.kind]
    planned = []
    for stage in cfg.order():
        path = paths[stage.name]
        params = from_dict(kind_of[stage.name].params, stage.params, f"{path}.params")
        _check_inputs(stage, path, kind_of)
        planned.append(PlannedStage(stage, kind_of[stage.name], params, path))
    return planned


def _check_inputs(
    stage: StageConfig, path: str, kind_of: Mapping[str, StageKind[Any, Any, Any]]
) -> None:
    kind = kind_of[stage.name]
    accepted = field_types(kind.inputs)
    for key, refs in stage.references().items():
        where = f"{path}.inputs.{key}: stage {stage.name!r}"
        if key not in accepted:
            raise ConfigError(
                f"{where}: kind {kind.name!r} has no input {key!r}; "
                f"expected one of {sorted(accepted)}"
            )
        expected = accepted[key]
        if isinstance(refs, list):  # gathered: the input is a list of what each names
            if typing.get_origin(expected) is not list:
                raise ConfigError(
                    f"{where}: a list of references needs a list input, but input {key!r} of "
                    f"kind {kind.name!r} is {type_name(expected)}"
                )
            expected = (typing.get_args(expected) or (Any,))[0]
        for ref, output in refs if isinstance(refs, list) else [refs]:
            produced = field_types(kind_of[ref].outputs)
            if output is None:  # all of the stage's outputs, as one dict
                given: Any = dict[str, Any]
            elif output in produced:
                given = produced[output]
            else:
                raise ConfigError(
                    f"{where}: stage {ref!r} (kind {kind_of[ref].name!r}) has no output "
                    f"{output!r}; its outputs are {sorted(produced)}"
                )
            if not assignable(given, expected):
                raise ConfigError(
                    f"{where}: type mismatch: output {ref}.{output or '*'} is "
                    f"{type_name(given)} but input {key!r} of kind {kind.name!r} "
                    f"expects {type_name(expected)}"
                )
    missing = [name for name in required_fields(kind.inputs) if name not in stage.inputs]
    if missing:
        raise ConfigError(
            f"{path}.inputs: stage {stage.name!r} (kind {kind.name!r}) needs input "
            f"{missing[0]!r}, which has no default; give it as {missing[0]}: <stage>.<output>"
        )


def stage_hashes(plan: Sequence[PlannedStage]) -> dict[str, str]:
    """Each stage's settings digest: its kind, params (defaults included), input references and
    the digests of the stages it waits for. An upstream stage's digest stands for its outputs,
    which are not known before it runs; so a change anywhere upstream changes every digest below
    it, and a finished stage is reused only when everything that led to it is the same."""
    hashes: dict[str, str] = {}
    for stage in plan:  # dependency order: upstream digests are known
        hashes[stage.name] = config_hash(
            {
                "kind": stage.kind.name,
                "params": to_dict(stage.params),
                "inputs": dict(stage.config.inputs),
                "upstream": {name: hashes[name] for name in stage.config.upstream()},
            },
            exclude=[f"params.{key}" for key in stage.kind.hash_exclude],
        )
    return hashes
