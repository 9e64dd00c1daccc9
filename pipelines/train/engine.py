"""The engine of one training worker: DeepSpeed (ZeRO 0-3) or plain DistributedDataParallel.

Both present DeepSpeed's slice of an interface that the training core uses: ``engine(**inputs)``,
``backward(loss)`` and ``step()`` once per micro-batch (the optimizer steps at the end of each
accumulation), ``get_lr``, ``save_checkpoint`` / ``load_checkpoint``, ``train`` / ``eval``, and
``module``. Everything that depends on how DeepSpeed lays out parameters (ZeRO stage,
mixed-precision wrapper) is in this module.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from perceiver_core.optim import OptimizerConfig, build_optimizer, build_scheduler
from pipelines.train.config import EngineSection

log = logging.getLogger(__name__)

# DeepSpeed builds its C++ ops in about 2 minutes on 2 cores (PLATFORM-NOTES); a build lock older
# than this was left by a build that was killed.
STALE_BUILD_LOCK_S = 600.0

Precision = Literal["bf16", "fp16", "fp32"]


def resolve_precision(requested: str, bf16_supported: bool) -> Precision:
    """``auto`` is bf16 where the device has it and fp16 elsewhere (older GPUs); explicit choices
    are kept, except bf16 on a device without it, which is an error rather than a silent fp16."""
    if requested == "auto":
        return "bf16" if bf16_supported else "fp16"
    if requested == "bf16" and not bf16_supported:
        raise ValueError("train.precision: bf16 requested but this device does not support it")
    return requested  # type: ignore[return-value]


def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    zero_stage: int,
    precision: Precision,
    grad_clip: float,
    on_gpu: bool = True,
) -> dict[str, Any]:
    """The DeepSpeed JSON config. The optimizer and schedule are torch objects passed to
    ``deepspeed.initialize`` (see ``perceiver_core.optim``), so they are not named here."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage and not on_gpu:
        # Copying every gradient into one contiguous buffer avoids memory fragmentation on GPUs;
        # on CPU it is only an extra copy (about 8% of a step of the small preset here).
        zero["contiguous_gradients"] = False
    if zero_stage == 3:
        # Lets save_16bit_model gather the shards; the consolidated export below does not need it,
        # but tools people point at these checkpoints do.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling for fp16 (loss_scale 0), starting at 2**16.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # progress is ours (pipelines.tracking.sink)
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: nn.Module,
    settings: EngineSection,
    optimizer: OptimizerConfig,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    total_steps: int,
    rank: int,
) -> tuple[Any, Precision]:
    """The engine ``settings.strategy`` names around ``model``, and the precision it runs in."""
    _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    precision = resolve_precision(settings.precision, accelerator.is_bf16_supported())
    if settings.strategy == "ddp":
        if settings.use_gpu:
            model = model.to(accelerator.current_device_name())
        engine = DdpEngine(
            model,
            optimizer,
            total_steps,
            precision=precision,
            grad_clip=settings.grad_clip,
            grad_accum_steps=grad_accum_steps,
            rank=rank,
        )
        return engine, precision
    ds_config = deepspeed_config(
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        world_size=world_size,
        zero_stage=settings.zero_stage,
        precision=precision,
        grad_clip=settings.grad_clip,
        on_gpu=settings.use_gpu,
    )
    return create_engine(model, ds_config, optimizer, total_steps), precision


def _import_deepspeed() -> None:
    """Import DeepSpeed without letting it import MLflow: its autotuner (which a training run
    never starts) imports mlflow whenever it is installed, four seconds of every worker's start on
    2 cores, paid again by the ranks that never log. The rank that logs imports it for its sink."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # ``import mlflow`` raises ImportError
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def create_engine(
    model: nn.Module, ds_config: dict[str, Any], optimizer: OptimizerConfig, total_steps: int
) -> Any:
    """``deepspeed.initialize`` with a torch optimizer (no JIT build of fused ops) and our schedule."""
    import deepspeed

    clear_stale_build_locks()

    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, optimizer),
        lr_scheduler=build_scheduler(optimizer, total_steps),
        config=ds_config,
    )
    return engine


def extension_build_root() -> Path:
    """Where torch builds C++ extensions (DeepSpeed's ops among them), one folder per Python and
    CUDA version below it."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(
    root: Path | None = None, max_age_s: float = STALE_BUILD_LOCK_S
) -> None:
    """Remove the lock of a DeepSpeed op build that was killed (a first run interrupted while it
    compiled ``deepspeed_shm_comm``): torch waits for that lock to go, without a word, so every
    later run on the machine would hang at DeepSpeed's start. A lock younger than ``max_age_s``
    may belong to a build in progress (another rank on this node) and is left alone."""
    for lock in (root or extension_build_root()).glob("*/deepspeed_*/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                log.warning("removed %s, left %.0f min ago by a DeepSpeed op build that did not "
                            "finish; the op builds again now", lock, age / 60)  # fmt: skip
        except FileNotFoundError:  # another rank removed it first
            pass


def global_grad_norm(engine: Any) -> float:
    """The gradient norm of the last optimizer step (before clipping).

    The ZeRO and mixed-precision wrappers and the DDP engine record it; DeepSpeed in plain fp32 at
    stage 0 does not, and there the gradients are still whole and averaged after the step's
    backward, so it is computed here. Call it before ``engine.step()`` at an accumulation boundary
    for that case (``needs_manual_grad_norm``); the recorded value is read after.
    """
    norm = engine.get_global_grad_norm()
    if norm is None:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else 0.0
    return float(norm)


def needs_manual_grad_norm(engine: Any) -> bool:
    if isinstance(engine, DdpEngine):  # records the norm it clips with
        return False
    return not engine.zero_optimization() and not (
        engine.bfloat16_enabled() or engine.fp16_enabled()
    )


@torch.no_grad()
def full_fp32_state_dict(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """The trained fp32 weights, whole, on rank 0 (None elsewhere). A collective: every rank calls.

    The fp32 master weights are what the optimizer updates; the module's bf16/fp16 copies are
    rounded from them. ZeRO 1-3 shard the masters: ``safe_get_full_fp32_param`` gathers one
    parameter at a time (peak memory one parameter, not the model). At stage 0 with bf16/fp16 the
    unfused wrapper keeps per-parameter masters in ``fp32_groups``; in plain fp32, and under DDP,
    the module parameters are the masters.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    optimizer = engine.optimizer
    if not engine.zero_optimization() and hasattr(optimizer, "fp32_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            masters.update({id(p): m for p, m in zip(low, high, strict=True)})
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if engine.zero_optimization() else None
        if full is None:
            full = masters.get(id(param), param)
        if rank == 0:
            state[name] = full.detach().float().cpu().clone()
    return state if rank == 0 else None


class DdpEngine:
    """torch DistributedDataParallel (over the process group Ray Train sets up: gloo on CPU, NCCL
    on GPU) with a torch optimizer, our schedule, gradient clipping, bf16 autocast and gradient
    accumulation, behind the engine interface above. Fine-tuning a 201M model needs no sharding,
    and some users want the engine they know. A checkpoint is one file per rank,
    ``<dir>/<tag>/rank_XXXXX.pt``, read back with ``weights_only=True``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerConfig,
        total_steps: int,
        *,
        precision: str,
        grad_clip: float,
        grad_accum_steps: int,
        rank: int,
    ) -> None:
        if precision == "fp16":
            raise ValueError("train.precision: fp16 needs DeepSpeed's loss scaling; use bf16/fp32")
        self.rank = rank
        self.precision = precision
        self.grad_clip = grad_clip
        self.accum = grad_accum_steps
        self.module = model
        self.device = next(model.parameters()).device
        self.wrapped: nn.Module = model
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = build_optimizer(model, optimizer)
        self.scheduler = build_scheduler(optimizer, total_steps)(self.optimizer)
        self._micro = 0  # micro-batches since the last optimizer step
        self._grad_norm: float | None = None

    def __call__(self, **inputs: torch.Tensor) -> Any:
        bf16 = self.precision == "bf16"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        # Gradients are reduced across workers only in the accumulation's last backward (DDP
        # decides that in the forward pass).
        accumulate = not self.is_gradient_accumulation_boundary() and hasattr(
            self.wrapped, "no_sync"
        )
        with autocast, self.wrapped.no_sync() if accumulate else nullcontext():
            return self.wrapped(**inputs)

    def is_gradient_accumulation_boundary(self) -> bool:
        return self._micro + 1 == self.accum

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()  # the mean over the accumulated micro-batches

    def step(self) -> None:
        if not self.is_gradient_accumulation_boundary():
            self._micro += 1
            return
        self._micro = 0
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        self._grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def zero_optimization(self) -> bool:
        return False

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def save_checkpoint(self, folder: str, tag: str) -> None:
        path = Path(folder) / tag
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, path / f"rank_{self.rank:05d}.pt")

    def load_checkpoint(self, folder: str, tag: str) -> tuple[str | None, dict]:
        path = Path(folder) / tag / f"rank_{self.rank:05d}.pt"
        if not path.exists():  # another rank's file (a changed world size): rank 0's is complete
            path = Path(folder) / tag / "rank_00000.pt"
        if not path.exists():
            return None, {}
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return str(path), {}
