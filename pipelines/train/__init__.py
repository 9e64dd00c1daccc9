"""MLM pretraining with Ray Train and DeepSpeed (see ``pretrain.run_pretraining``)."""

from pipelines.train.config import PretrainConfig
from pipelines.train.pretrain import PretrainResult, run_pretraining

__all__ = ["PretrainConfig", "PretrainResult", "run_pretraining"]
