"""Training on Ray Train with DeepSpeed (ZeRO 0-3) or DDP, tracked in MLflow.

One training core runs on every worker (``core``: seeding, engine, restore, the step loop,
evaluation, checkpoints, exports, metrics); a task plugs into it (``mlm``: masked-language
modelling on the crop stream, ``classify``: sequence classification); ``job`` is the contract
between them and the drivers (``WorkerJob``, ``Task``). The drivers start runs
through one launcher (``launch``): ``pretrain.run_pretraining`` and the fine-tuning stages of
``finetune``, which ``pipelines.workflow.recipe`` chains into recipes.
"""

from pipelines.train.config import PretrainConfig
from pipelines.train.pretrain import PretrainResult, run_pretraining

__all__ = ["PretrainConfig", "PretrainResult", "run_pretraining"]
