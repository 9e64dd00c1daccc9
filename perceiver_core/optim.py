"""The paper's optimizer and learning-rate schedule, in plain torch: they run in any training loop
(``benchmarks/pretrain_recipe.py`` uses them in one of a few lines) and are what
``pipelines.train.engine`` hands to DeepSpeed or DDP.

The paper trains with LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning") at lr
1.25e-3, weight decay 0.01, 1,000 warm-up steps and cosine decay. ``Lamb`` below is a plain torch
optimizer rather than DeepSpeed's ``FusedLamb``: DeepSpeed JIT-compiles its fused optimizers with
the CUDA toolkit (minutes, and impossible on CPU), while a torch optimizer handed to
``deepspeed.initialize`` needs no build and runs on every device.

LAMB's layer-wise trust ratio needs the norm of each parameter tensor. ZeRO stages 1-3 hand the
optimizer one flat shard of all parameters per rank, where per-tensor norms no longer exist, so
the training configs offer LAMB only with ZeRO stage 0 (and reject the combination before any
worker starts). AdamW works at every stage. The 201M recipe fits a GPU without sharding (about
3.2 GB of weights and optimizer state), so stage 0 with LAMB is the paper's setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """Optimizer and schedule.

    name: ``lamb`` (the paper) or ``adamw``.
    lr: peak learning rate, reached at the end of warm-up.
    weight_decay: decoupled decay on matrices and embeddings; biases and LayerNorm parameters
        (1-D tensors) are not decayed, as is usual for transformers.
    warmup_steps: linear warm-up from 0 to ``lr`` over this many optimizer steps.
    schedule: ``cosine`` decays from ``lr`` to ``lr * min_lr_ratio`` at the last step;
        ``linear`` does the same in a straight line (the usual fine-tuning schedule);
        ``constant`` stays at ``lr`` after warm-up.
    """

    name: Literal["lamb", "adamw"] = "lamb"
    lr: float = 1.25e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam's update, rescaled per parameter tensor by the trust ratio ||w|| / ||update||.

    Follows algorithm 2 of the paper with bias correction; the update includes decoupled weight
    decay before the trust ratio is taken, and a tensor whose weight or update norm is zero gets a
    ratio of 1 (so freshly zero-initialised biases still move).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                weight = p.float()
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(weight, alpha=group["weight_decay"])
                w_norm, u_norm = weight.norm(), update.norm()
                trust = torch.where(
                    (w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)
                )
                p.add_((update * (-group["lr"] * trust)).to(p.dtype))
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices/embeddings, and undecayed 1-D tensors (biases, LayerNorms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    # foreach=False: DeepSpeed's ZeRO optimizers hand over one flat fp32 shard per group, so
    # there is nothing to batch, and the single-tensor path is the one DeepSpeed tests.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def lr_factor(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Multiplier of ``cfg.lr`` after ``step`` optimizer steps: linear warm-up, then cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(
    cfg: OptimizerConfig, total_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A factory DeepSpeed calls with the optimizer it wraps; DeepSpeed steps the schedule once per
    optimizer step and saves its position in its checkpoints."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps, cfg)
        )

    return make
