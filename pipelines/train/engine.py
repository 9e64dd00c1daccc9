"""The DeepSpeed engine of one training worker: its config, its creation, and reading its weights.

Everything that depends on how DeepSpeed lays out parameters (ZeRO stage, mixed-precision wrapper)
is in this module, so the training loop only sees ``engine(...)``, ``backward``, ``step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from pipelines.train.optim import OptimizerConfig, build_optimizer, build_scheduler

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

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
    ``deepspeed.initialize`` (see ``pipelines.train.optim``), so they are not named here."""
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
        "steps_per_print": 2**31 - 1,  # progress is ours (pipelines.train.metrics)
        "wall_clock_breakdown": False,
    }


def create_engine(
    model: nn.Module,
    ds_config: dict[str, Any],
    optimizer: OptimizerConfig,
    total_steps: int,
) -> DeepSpeedEngine:
    """``deepspeed.initialize`` with a torch optimizer (no JIT build of fused ops) and our schedule."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, optimizer),
        lr_scheduler=build_scheduler(optimizer, total_steps),
        config=ds_config,
    )
    return engine


def global_grad_norm(engine: DeepSpeedEngine) -> float:
    """The gradient norm of the last optimizer step (before clipping).

    The ZeRO and mixed-precision wrappers record it; plain fp32 at stage 0 does not, and there the
    gradients are still whole and averaged after the step's backward, so it is computed here. Call
    it before ``engine.step()`` at an accumulation boundary for the fp32 case; the recorded value
    is read after.
    """
    norm = engine.get_global_grad_norm()
    if norm is None:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else 0.0
    return float(norm)


def needs_manual_grad_norm(engine: DeepSpeedEngine) -> bool:
    return not engine.zero_optimization() and not (
        engine.bfloat16_enabled() or engine.fp16_enabled()
    )


@torch.no_grad()
def full_fp32_state_dict(engine: DeepSpeedEngine, rank: int) -> dict[str, torch.Tensor] | None:
    """The trained fp32 weights, whole, on rank 0 (None elsewhere). A collective: every rank calls.

    The fp32 master weights are what the optimizer updates; the module's bf16/fp16 copies are
    rounded from them. ZeRO 1-3 shard the masters: ``safe_get_full_fp32_param`` gathers one
    parameter at a time (peak memory one parameter, not the model). At stage 0 with bf16/fp16 the
    unfused wrapper keeps per-parameter masters in ``fp32_groups``; in plain fp32 the module
    parameters are the masters.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    optimizer = engine.optimizer
    if not engine.zero_optimization() and hasattr(optimizer, "fp32_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
            masters.update({id(p): m for p, m in zip(low, high, strict=True)})
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            full = masters.get(id(param), param)
        if rank == 0:
            state[name] = full.detach().float().cpu().clone()
    return state if rank == 0 else None
