"""A plain PyTorch DistributedDataParallel engine with the slice of DeepSpeed's engine interface
the fine-tuning loop uses (call, backward, step, learning rate, save and load a checkpoint).

Fine-tuning a 201M model needs no sharding, and some users want the engine they know: with
``train.strategy: ddp`` Ray Train's ``prepare_model`` wraps the model in DDP (gloo on CPU, NCCL on
GPU), and optimisation is a torch optimizer, our schedule, gradient clipping and bf16 autocast.
A checkpoint is one file per rank with model, optimizer, schedule and gradient-norm state, at
``<dir>/<tag>/rank_XXXXX.pt``, so the same save/report/restore code serves both engines.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.train.optim import OptimizerConfig, build_optimizer, build_scheduler


class DdpEngine:
    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerConfig,
        total_steps: int,
        *,
        precision: str,
        grad_clip: float,
        rank: int,
    ) -> None:
        import ray.train.torch

        if precision == "fp16":
            raise ValueError("train.precision: fp16 needs DeepSpeed's loss scaling; use bf16/fp32")
        self.rank = rank
        self.precision = precision
        self.grad_clip = grad_clip
        self.module = model
        self.wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, optimizer)
        self.scheduler = build_scheduler(optimizer, total_steps)(self.optimizer)
        self._grad_norm: float | None = None

    def __call__(self, **inputs: torch.Tensor) -> Any:
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else nullcontext()
        )
        with autocast:
            return self.wrapped(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
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
