"""MLM pretraining on Ray Train + DeepSpeed, tracked in MLflow: the pipeline's entry point.

    result = run_pretraining(load_config(PretrainConfig, "jobs/configs/pretrain_tiny.yaml"))

runs on the Ray cluster the process is connected to (``jobs/pretrain.py`` connects). On the driver
it resolves everything a worker could fail on late (the data index, the stream's length, the
MLflow run), then starts ``train.num_workers`` Ray Train workers running
``pipelines.train.loop.train_loop_per_worker``.

Resuming needs nothing but the same ``run.name`` and ``run.storage_path``: Ray Train restores the
latest checkpoint, the stream factory restarts the data at its position, the MLflow run of that
name is reopened, and the data index saved beside the checkpoints is reused (so the stream is the
same even if files were added since).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceiver_core.config import PerceiverConfig
from pipelines.config import config_hash, to_dict, to_yaml
from pipelines.data.index import DataIndex, build_index
from pipelines.data.pretrain import PretrainDataConfig, plan_stream
from pipelines.tracking import registry, runs
from pipelines.train.checkpoint import HF_DIR, ResumePointer
from pipelines.train.config import HASH_EXCLUDE, PretrainConfig
from pipelines.train.data import TrainStreamFactory, stream_slack, validation_dataset
from pipelines.train.loop import WorkerJob, train_loop_per_worker

log = logging.getLogger(__name__)

INDEX_FILE = "data_index.json"


@dataclass(frozen=True)
class PretrainResult:
    run_name: str
    run_id: str
    tracking_uri: str
    steps: int
    metrics: dict[str, Any]  # those reported with the final checkpoint
    checkpoint_path: str  # the final checkpoint (local path or URI)
    hf_path: str  # its consolidated Hugging Face export
    registered_model: registry.RegisteredModel | None
    data_fingerprint: str
    config_hash: str


def run_pretraining(cfg: PretrainConfig, *, workdir: Path | None = None) -> PretrainResult:
    """Train (or resume) the run ``cfg.run.name``; returns when the last step is checkpointed and
    its model registered. Needs a connected Ray runtime (``ray.init``)."""
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = f"{storage_root(cfg.run.storage_path, workdir)}/{cfg.run.name}"
    index = load_or_build_index(cfg.data, run_dir)
    eval_crops = check_data(cfg, index)
    digest = config_hash(cfg, exclude=HASH_EXCLUDE)
    target = runs.resolve_tracking(cfg.tracking.tracking_uri, workdir)
    model_config, init_dir = resolve_model_config(cfg, target.tracking_uri)
    client = runs.client_for(target)
    run_id = _open_run(client, target, cfg, index, digest)
    job = WorkerJob(
        cfg=cfg,
        run_id=run_id,
        tracking_uri=target.tracking_uri,
        run_dir=run_dir,
        config_hash=digest,
        data_fingerprint=index.fingerprint,
        code_version=registry.code_version(),
        eval_crops=eval_crops,
        model_config=model_config,
        init_dir=init_dir,
    )
    trainer = _trainer(cfg, job, index, run_dir)
    try:
        result = trainer.fit()
    except BaseException:
        runs.finish_run(client, run_id, "FAILED")
        raise
    runs.finish_run(client, run_id)
    return _result(cfg, job, result, client)


def resolve_model_config(
    cfg: PretrainConfig, tracking_uri: str
) -> tuple[PerceiverConfig, str | None]:
    """The model's shapes and, with ``model.init_from``, the local folder of its starting weights.
    A missing or unreadable starting model fails here, before any worker starts."""
    if cfg.model.init_from is None:
        return cfg.model.perceiver_config(), None
    from perceiver_core.hf import config_from_hf
    from pipelines.tracking.models import resolve_model

    resolved = resolve_model(cfg.model.init_from, tracking_uri=tracking_uri)
    values = json.loads((resolved.hf_dir / "config.json").read_text())
    config = config_from_hf(values).replace(**cfg.model.overrides)
    if cfg.data.packing.crop_len > config.max_position_embeddings:
        raise ValueError(
            f"data.packing.crop_len ({cfg.data.packing.crop_len}) exceeds the starting model's "
            f"max_position_embeddings ({config.max_position_embeddings}) ({cfg.model.init_from})"
        )
    log.info("starting from %s (%s)", cfg.model.init_from, resolved.hf_dir)
    return config, str(resolved.hf_dir)


def storage_root(storage_path: str, workdir: Path) -> str:
    """Ray Train's storage as an absolute local path or a URI (``s3://...``)."""
    if "://" in storage_path:
        return storage_path.rstrip("/")
    path = Path(storage_path)
    return str(path if path.is_absolute() else (workdir / path).resolve())


def load_or_build_index(data: PretrainDataConfig, run_dir: str) -> DataIndex:
    """The run's data index: the one saved with the run (resume), else built now and saved."""
    import pyarrow.fs

    fs, folder = pyarrow.fs.FileSystem.from_uri(run_dir)
    path = f"{folder}/{INDEX_FILE}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        with fs.open_input_stream(path) as f:
            index = DataIndex.from_json(f.read().decode())
        try:
            index.check_matches(data)
        except ValueError as error:
            raise ValueError(
                f"data: {error}. The run {run_dir} was started with other data settings; "
                "resume it with those, or start a new run.name"
            ) from error
        log.info("reusing the run's data index %s", index.fingerprint)
        return index
    index = build_index(data)
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(index.to_json().encode())
    counters = index.counters("train")
    log.info(
        "built data index %s: %d documents, %d training crops",
        index.fingerprint,
        counters["docs"],
        counters["crops"],
    )
    return index


def check_data(cfg: PretrainConfig, index: DataIndex) -> int:
    """Fail now if the stream is too short for the run; returns the validation crops to use."""
    needed = cfg.train.steps * cfg.train.crops_per_step
    length = plan_stream(cfg.data, index, "train").length
    if length < needed:
        raise ValueError(
            f"data: the training stream has {length} crops and the run needs {needed} "
            f"(train.steps x {cfg.train.crops_per_step} crops per step); set "
            "data.mixture.stopping_strategy=cycle and data.mixture.max_crops, or add data"
        )
    held_out = int(index.counters("validation")["crops"])
    if held_out == 0:
        raise ValueError("data.split.validation_fraction: the held-out split has no crops")
    if held_out < cfg.eval.crops:
        log.warning(
            "validation uses all %d held-out crops (eval.crops=%d)", held_out, cfg.eval.crops
        )
    return min(held_out, cfg.eval.crops)


def _open_run(
    client: Any, target: runs.TrackingTarget, cfg: PretrainConfig, index: DataIndex, digest: str
) -> str:
    experiment = runs.experiment_id(client, cfg.tracking.experiment, target.artifact_location)
    tags = {"config_hash": digest, "data.fingerprint": index.fingerprint}
    run_id, resumed = runs.start_or_resume_run(client, experiment, cfg.run.name, tags)
    if resumed:
        previous = client.get_run(run_id).data.tags.get("config_hash")
        if previous != digest:
            log.warning(
                "resuming run %s with a changed config (%s -> %s)", run_id, previous, digest
            )
            client.set_tag(run_id, "config_hash", digest)
    runs.log_params(client, run_id, runs.flatten(to_dict(cfg)))
    client.log_text(run_id, to_yaml(cfg), "config/resolved.yaml")
    client.log_dict(run_id, index.counters("train"), "data/train_counters.json")
    sources = [
        runs.DataSource(name=s.name, uri=s.path, digest=_source_digest(index, i))
        for i, s in enumerate(cfg.data.sources)
    ]
    runs.log_data_sources(client, run_id, sources)
    return run_id


def _source_digest(index: DataIndex, source: int) -> str:
    import hashlib

    src = index.sources[source]
    text = "|".join(f"{f.relpath}:{f.size}:{f.version}" for f in src.files)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _trainer(cfg: PretrainConfig, job: WorkerJob, index: DataIndex, run_dir: str) -> Any:
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchTrainer

    t = cfg.train
    env = {**cfg.tracking.worker_env(), "PERCEIVER_CODE_VERSION": job.code_version}
    for name in ("TORCH_EXTENSIONS_DIR",):  # DeepSpeed's op build cache, if the driver sets one
        if name in os.environ:
            env[name] = os.environ[name]
    storage, _, name = run_dir.rpartition("/")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            worker_runtime_env={"env_vars": env},
        ),
        datasets={
            "train": TrainStreamFactory(
                cfg.data,
                index,
                ResumePointer(run_dir),
                needed=t.steps * t.crops_per_step,
                slack=stream_slack(
                    cfg.data, cfg.checkpoint.every * t.crops_per_step, t.num_workers
                ),
            ),
            "validation": validation_dataset(cfg.data, index, job.eval_crops),
        },
        # Only the training stream is split; every worker reads the same validation crops and
        # evaluates its share. Order is kept so that the stream is the same on every run.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options={
                "train": ExecutionOptions(
                    preserve_order=True,
                    resource_limits=ExecutionResources(
                        object_store_memory=t.data_buffer_mb * 2**20
                    ),
                ),
                "validation": ExecutionOptions(preserve_order=True),
            },
        ),
    )


def _result(cfg: PretrainConfig, job: WorkerJob, result: Any, client: Any) -> PretrainResult:
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    version = None
    if cfg.tracking.register:
        found = registry.find_version(
            client, cfg.tracking.registered_model, job.run_id, cfg.train.steps
        )
        if found is not None:
            version = registry.RegisteredModel(
                cfg.tracking.registered_model, str(found.version), found.source
            )
    return PretrainResult(
        run_name=cfg.run.name,
        run_id=job.run_id,
        tracking_uri=job.tracking_uri,
        steps=cfg.train.steps,
        metrics=dict(result.metrics or {}),
        checkpoint_path=checkpoint.path,
        hf_path=f"{checkpoint.path}/{HF_DIR}",
        registered_model=version,
        data_fingerprint=job.data_fingerprint,
        config_hash=job.config_hash,
    )
