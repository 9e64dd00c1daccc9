"""Data pipelines: pretraining crops and fine-tuning datasets as lazy Ray Datasets.

Pretraining (``config`` for its settings, ``pretrain`` for the stream, ``mixture`` for
interleaving, ``index`` for the index pass and a run's saved index, ``units`` for how documents
become crops, ``readers``/``sources`` for files, ``feed`` for the actor that serves a training run
its stream by position)::

    cfg = pipelines.config.load_config(PretrainDataConfig, "data.yaml", ["data_dir=../shared/data"])
    index = build_index(cfg)                       # executes; a run keeps its own (run_index)
    train = pretraining_dataset(cfg, index)        # lazy
    val = pretraining_dataset(cfg, index, split="validation")

Fine-tuning: ``finetune_dataset(FinetuneDataConfig(task="glue/sst2"), "train")``; ``rows`` holds
a split's rows in memory without padding (it imports torch, so it is not exported here).
"""

from pipelines.data.config import MixtureConfig, PretrainDataConfig
from pipelines.data.finetune import GLUE_TASKS, FinetuneDataConfig, finetune_dataset
from pipelines.data.index import DataIndex, build_index, build_index_local, run_index
from pipelines.data.inspect import render_crop
from pipelines.data.mixture import Schedule
from pipelines.data.pretrain import (
    CropCounters,
    crops_to_torch,
    local_crops,
    plan_stream,
    pretraining_dataset,
)
from pipelines.data.readers import (
    BadFileError,
    DataError,
    MissingColumnError,
    ReadConfig,
    WrongFormatError,
)
from pipelines.data.sources import SourceConfig, default_sources
from pipelines.data.units import SplitConfig

__all__ = [
    "GLUE_TASKS",
    "BadFileError",
    "CropCounters",
    "DataError",
    "DataIndex",
    "FinetuneDataConfig",
    "MissingColumnError",
    "MixtureConfig",
    "PretrainDataConfig",
    "ReadConfig",
    "Schedule",
    "SourceConfig",
    "SplitConfig",
    "WrongFormatError",
    "build_index",
    "build_index_local",
    "crops_to_torch",
    "default_sources",
    "finetune_dataset",
    "local_crops",
    "plan_stream",
    "pretraining_dataset",
    "render_crop",
    "run_index",
]
