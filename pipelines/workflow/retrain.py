"""What makes a retraining run: the champion it starts from must exist, and its name is a digest
of the data it learns from, so that running it again on the same data is a no-op."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.config import config_hash, load_config
from pipelines.workflow.spec import PipelineConfig
from pipelines.workflow.stages import start_from


class RetrainError(RuntimeError):
    """The retraining pipeline cannot start (no champion to continue from)."""


def _alias_sources(cfg: PipelineConfig) -> list[str]:
    return [
        str(s.params["init_from"])
        for s in cfg.stages
        if s.kind == "pretrain" and "@" in str(s.params.get("init_from") or "")
    ]


def check_champions(cfg: PipelineConfig) -> None:
    """Every ``models:/NAME@ALIAS`` a stage starts from resolves, or RetrainError saying so."""
    from pipelines.tracking import registry, runs

    client = runs.client_for(runs.resolve_tracking(cfg.tracking.tracking_uri))
    for source in _alias_sources(cfg):
        name, _, alias = source.removeprefix("models:/").partition("@")
        if registry.get_alias(client, name, alias) is None:
            raise RetrainError(
                f"{source} does not exist: retraining continues from a champion; run the "
                "pipeline once (python -m jobs.pipeline) or promote a version first"
            )


def data_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """The data fingerprint of every training stage (pretraining: its data index; fine-tuning:
    its training files)."""
    from pipelines.data.finetune import split_fingerprint
    from pipelines.data.index import build_index
    from pipelines.train.config import PretrainConfig
    from pipelines.train.finetune_config import FinetuneConfig

    out: dict[str, str] = {}
    for stage in cfg.stages:
        if stage.kind not in ("pretrain", "finetune"):
            continue
        overrides = list(stage.params.get("overrides", []))
        if stage.kind == "pretrain":
            if stage.params.get("init_from"):  # the checks must not resolve the model
                overrides += start_from("unused")
            pretrain = load_config(PretrainConfig, stage.params["config"], overrides)
            out[stage.name] = build_index(pretrain.data).fingerprint
        else:
            finetune = load_config(FinetuneConfig, stage.params["config"], overrides)
            out[stage.name] = split_fingerprint(finetune.data, finetune.splits.train)
    return out


def retrain_run_name(cfg: PipelineConfig) -> str:
    """``retrain-<digest>`` of the stages' data fingerprints and the pipeline's settings."""
    parts: dict[str, Any] = {
        "data": data_fingerprints(cfg),
        "config": config_hash(cfg, exclude=("pipeline.run_name", "tracking")),
    }
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=6)
    return f"retrain-{digest.hexdigest()}"
