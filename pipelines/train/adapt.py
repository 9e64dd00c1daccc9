"""MLM adaptation: a fine-tuning recipe's ``mlm`` stage as a pretraining run on the task's text.

The paper's IMDB result (about 94% accuracy) came from masked-LM training on IMDB's own reviews
before fine-tuning. That is pretraining with one source, the task's training split (its first
text column, labels unused), starting from the recipe's current weights; so it runs through
``run_pretraining`` unchanged: the same packing, whole-word masking, checkpoints and resume.
"""

from __future__ import annotations

import dataclasses

from perceiver_core.masking import MaskingConfig
from perceiver_core.packing import PackingConfig
from pipelines.data.mixture import MixtureConfig
from pipelines.data.pretrain import PretrainDataConfig
from pipelines.data.sources import SourceConfig
from pipelines.data.units import SplitConfig
from pipelines.train.config import (
    CheckpointSection,
    EvalSection,
    ModelSection,
    PretrainConfig,
    RunSection,
    TrainConfig,
)
from pipelines.train.finetune_config import FinetuneConfig, StageConfig


def adaptation_config(
    cfg: FinetuneConfig, stage: StageConfig, source: str, run_name: str, tracking_uri: str
) -> PretrainConfig:
    """The PretrainConfig of an ``mlm`` stage: run ``run_name`` in the recipe's storage and MLflow
    experiment, from ``source``, on the task's training text; nothing registered."""
    data = cfg.data
    path, hub_config = data.location()
    text_source = SourceConfig(
        name=data.task.replace("/", "-"),
        path=path,
        config=hub_config,
        hub_split=cfg.splits.train,
        files=data.files,
        format=data.format,
        text_column=data.columns().text,
        sample_by="document",
    )
    t = cfg.train
    every = max(1, stage.steps // 4)
    return PretrainConfig(
        run=RunSection(
            name=run_name,
            storage_path=cfg.run.storage_path,
            seed=cfg.run.seed,
            max_failures=cfg.run.max_failures,
        ),
        model=ModelSection(init_from=source),
        data=PretrainDataConfig(
            sources=[text_source],
            data_dir=data.data_dir,
            packing=dataclasses.replace(PackingConfig(), crop_len=stage.crop_len),
            masking=dataclasses.replace(MaskingConfig(), mask_prob=stage.mask_probability),
            split=SplitConfig(validation_fraction=0.02),
            # A task's text is small: pass over it as often as the stage's steps need.
            mixture=MixtureConfig(stopping_strategy="cycle", max_crops=10_000_000),
        ),
        train=TrainConfig(
            steps=stage.steps,
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            cpus_per_worker=t.cpus_per_worker,
            micro_batch_size=stage.batch_size // t.num_workers,
            zero_stage=t.zero_stage,
            precision=t.precision,
            grad_clip=t.grad_clip,
            optimizer=stage.optimizer,
            log_every=t.log_every,
        ),
        eval=EvalSection(every=every, crops=256, batch_size=t.eval_batch_size),
        checkpoint=CheckpointSection(every=every, keep=2),
        tracking=dataclasses.replace(
            cfg.tracking,
            tracking_uri=tracking_uri,
            experiment=cfg.tracking.experiment,
            register=False,
        ),
    )
