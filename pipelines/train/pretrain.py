"""Masked-language-model pretraining on Ray Train, tracked in MLflow: the driver's side.

    result = run_pretraining(load_config(PretrainConfig, "jobs/configs/pretrain_tiny.yaml"))

runs on the Ray cluster the process is connected to (``jobs/pretrain.py`` connects). The driver
resolves everything a worker could fail on late (the data index, the stream's length, the starting
model, the MLflow run), trains through the training core (``pipelines.train.launch``), then
registers the final checkpoint's model with its lineage and validation metrics.

Resuming needs nothing but the same ``run.name`` and ``run.storage_path``: Ray Train restores the
latest checkpoint, the stream restarts at the crop its step ends on (``pipelines.train.mlm``), the
MLflow run of that name is reopened, and the data index saved beside the checkpoints is reused
(so the stream is the same even if files were added since).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceiver_core.config import PerceiverConfig
from perceiver_core.hf import read_config
from pipelines import storage
from pipelines.config import ConfigError, config_hash
from pipelines.data.feed import StreamSpec, held_out
from pipelines.data.index import DataIndex, run_index
from pipelines.data.pretrain import plan_stream, pretraining_dataset
from pipelines.data.sources import files_digest
from pipelines.signing import checkpoint_key
from pipelines.tracking import registry, runs
from pipelines.tracking.models import resolve_model
from pipelines.tracking.sink import section
from pipelines.train import export
from pipelines.train.checkpoint import HF_DIR, checkpoint_name
from pipelines.train.config import HASH_EXCLUDE, PretrainConfig
from pipelines.train.job import Schedule, StartingWeights, WorkerJob
from pipelines.train.launch import fit, open_run
from pipelines.train.mlm import MaskedLMSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    run_id: str
    steps: int
    metrics: dict[str, Any]  # those reported with the final checkpoint
    checkpoint_path: str  # the final checkpoint (local path or URI)
    hf_path: str  # its consolidated Hugging Face export
    registered_model: registry.RegisteredModel | None
    data_fingerprint: str
    config_hash: str


def run_pretraining(
    cfg: PretrainConfig, *, workdir: Path | None = None, signing_key: bytes | None = None
) -> PretrainResult:
    """Train (or resume) the run ``cfg.run.name``; returns when the last step is checkpointed and
    its model registered. Needs a connected Ray runtime (``ray.init``). ``signing_key``: of the
    checkpoints, as the caller resolved it (default: ``checkpoint_key()`` in this process)."""
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = f"{storage.resolve(cfg.run.storage_path, workdir)}/{cfg.run.name}"
    index = run_index(cfg.data, run_dir)
    eval_crops = check_data(cfg, index)
    validation = pretraining_dataset(cfg.data, index, split="validation")
    digest = config_hash(cfg, exclude=HASH_EXCLUDE)
    target = runs.resolve_tracking(cfg.tracking.tracking_uri, workdir)
    model_config, start, parent = resolve_start(cfg, target.tracking_uri)
    sources = [
        runs.DataSource(name=s.name, uri=s.path, digest=files_digest(index.sources[i].files))
        for i, s in enumerate(cfg.data.sources)
    ]
    client, run_id = open_run(
        target,
        cfg.tracking.experiment,
        cfg.run.name,
        cfg,
        tags={"config_hash": digest, "data.fingerprint": index.fingerprint},
        sources=sources,
    )
    client.log_dict(run_id, index.counters("train"), "data/train_counters.json")
    t = cfg.train
    lineage = registry.Lineage(
        run_id=run_id,
        step=t.steps,
        data_fingerprint=index.fingerprint,
        config_hash=digest,
        code_version=registry.code_version(),
        parent=parent,
        task="mlm",
    )
    job = WorkerJob(
        name=cfg.run.name,
        run_id=run_id,
        tracking_uri=target.tracking_uri,
        run_dir=run_dir,
        seed=cfg.run.seed,
        task=MaskedLMSpec(
            model_config=model_config,
            stream=StreamSpec(
                data=cfg.data,
                index=index,
                crops=t.steps * t.crops_per_step,
                prefetch_batches=t.prefetch_batches,
                buffer_mb=t.data_buffer_mb,  # object-store memory filled ahead of training
            ),
            # The first eval_crops crops of the held-out split, the same at every validation.
            validation=held_out.remote(validation, eval_crops, cfg.eval.batch_size),
            start=start,
            init=cfg.model.init,
        ),
        engine=t,
        optimizer=t.optimizer,
        batch_size=t.crops_per_step,
        micro_batch_size=t.micro_batch_size,
        schedule=Schedule(
            steps=t.steps,
            eval_every=cfg.eval.every,
            checkpoint_every=cfg.checkpoint.every,
            export_at=tuple(cfg.checkpoint.export_at),
        ),
        tracking=cfg.tracking,
        config_hash=digest,
        signing_key=signing_key or checkpoint_key(),
        register_as=cfg.tracking.registered_model if cfg.tracking.register else None,
        lineage=lineage,
        debug=cfg.debug,
    )
    try:
        result = fit(
            job,
            datasets={},  # the task reads its own: the stream (CropFeed) and held-out crops
            keep=cfg.checkpoint.keep,
            max_failures=cfg.run.max_failures,
        )
        location = f"{run_dir}/{checkpoint_name(t.steps)}"  # the last one (as core names it)
        metrics = dict(result.metrics or {})
        registered = None
        if cfg.tracking.register:
            registered = export.register(
                target.tracking_uri,
                f"{location}/{HF_DIR}",
                cfg.tracking.registered_model,
                dataclasses.replace(lineage, metrics=section(metrics)),
                timeout_s=cfg.tracking.close_timeout_s,
            )
    except BaseException:
        runs.finish_run(client, run_id, "FAILED")
        raise
    runs.finish_run(client, run_id)
    return PretrainResult(
        run_id=run_id,
        steps=t.steps,
        metrics=metrics,
        checkpoint_path=location,
        hf_path=f"{location}/{HF_DIR}",
        registered_model=registered,
        data_fingerprint=index.fingerprint,
        config_hash=digest,
    )


def resolve_start(
    cfg: PretrainConfig, tracking_uri: str
) -> tuple[PerceiverConfig, StartingWeights | None, str | None]:
    """The model's shapes and, with ``model.init_from``, its starting weights and their registry
    URI. A missing or unreadable starting model fails here, before any worker starts."""
    if cfg.model.init_from is None:
        return cfg.model.perceiver_config(), None, None
    resolved = resolve_model(cfg.model.init_from, tracking_uri=tracking_uri)
    config = read_config(resolved.hf_dir)[0].replace(**cfg.model.overrides)
    if cfg.data.packing.crop_len > config.max_position_embeddings:
        raise ConfigError(
            f"data.packing.crop_len ({cfg.data.packing.crop_len}) exceeds the starting model's "
            f"max_position_embeddings ({config.max_position_embeddings}) ({cfg.model.init_from})"
        )
    log.info("starting from %s (%s)", cfg.model.init_from, resolved.hf_dir)
    start = StartingWeights(str(resolved.hf_dir), cfg.model.init_from, tracking_uri)
    parent = resolved.registered.registry_uri if resolved.registered else cfg.model.init_from
    return config, start, parent


def check_data(cfg: PretrainConfig, index: DataIndex) -> int:
    """Fail now if the stream is too short for the run; returns the validation crops to use."""
    needed = cfg.train.steps * cfg.train.crops_per_step
    length = plan_stream(cfg.data, index, "train").length
    if length < needed:
        raise ConfigError(
            f"data: the training stream has {length} crops and the run needs {needed} "
            f"(train.steps x {cfg.train.crops_per_step} crops per step); set "
            "data.mixture.stopping_strategy=cycle and data.mixture.max_crops, or add data"
        )
    held_out = int(index.counters("validation")["crops"])
    if held_out == 0:
        raise ConfigError("data.split.validation_fraction: the held-out split has no crops")
    if held_out < cfg.eval.crops:
        log.warning(
            "validation uses all %d held-out crops (eval.crops=%d)", held_out, cfg.eval.crops
        )
    return min(held_out, cfg.eval.crops)
