"""Analytic FLOPs of a training or inference step, for model FLOPs utilisation (MFU).

Counts the matrix multiplications (2 FLOPs per multiply-add), which is what MFU conventionally
counts and what ``torch.utils.flop_counter.FlopCounterMode`` measures; LayerNorm, GELU, softmax and
embedding lookups are left out (a fraction of a percent here). Attention is counted dense, padding
included, because the kernels compute it. A backward pass costs twice the forward: one matmul for the
input gradient, one for the weight gradient (or, in attention, for each operand).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from perceiver_core.config import PerceiverConfig

if TYPE_CHECKING:  # the analytic half runs without torch (the data half imports it)
    import torch


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs per part for one batch, and the totals with and without backward."""

    encoder_cross_attention: int
    latent_layers: int
    decoder: int
    backward_multiplier: int

    @property
    def forward(self) -> int:
        return self.encoder_cross_attention + self.latent_layers + self.decoder

    @property
    def total(self) -> int:
        return self.forward * (1 + self.backward_multiplier)


def _attention(n_q: int, n_kv: int, q_dim: int, kv_dim: int, qk: int, v: int, out: int) -> int:
    projections = n_q * q_dim * qk + n_kv * kv_dim * (qk + v) + n_q * v * out
    scores_and_mix = n_q * n_kv * (qk + v)
    return 2 * (projections + scores_and_mix)


def _mlp(n: int, dim: int, widening: int) -> int:
    return 2 * 2 * n * dim * dim * widening


def step_flops(
    config: PerceiverConfig,
    batch_size: int,
    seq_len: int,
    *,
    decoded_positions: int | None = None,
    task: str = "mlm",
    backward: bool = True,
) -> StepFlops:
    """FLOPs of one step on ``batch_size`` sequences of ``seq_len`` bytes.

    ``decoded_positions`` is the number of MLM queries decoded per sequence (``seq_len`` when all
    positions are decoded; about 15% of it when only masked positions are). ``task`` is ``"mlm"`` or
    ``"classification"``.
    """
    c = config
    n, d, e = c.num_latents, c.d_latents, c.d_model
    cross = _attention(
        n, seq_len, d, e, c.cross_attention_qk_channels, c.cross_attention_v_channels, d
    ) + _mlp(n, d, c.cross_attention_widening_factor)
    qk, v = c.self_attention_qk_channels, c.self_attention_v_channels
    latent = _attention(n, n, d, d, qk, v, v) + _mlp(n, d, c.self_attention_widening_factor)
    if task == "mlm":
        p = seq_len if decoded_positions is None else decoded_positions
        decoder = _attention(p, n, e, d, c.decoder_qk_channels, e, e) + _mlp(p, e, 1)
        decoder += 2 * p * e * c.vocab_size  # logits tied to the byte embedding
    elif task == "classification":
        decoder = _attention(1, n, d, d, d, d, d) + _mlp(1, d, 1) + 2 * d * c.num_labels
    else:
        raise ValueError(f"task must be 'mlm' or 'classification', got {task!r}")
    return StepFlops(
        encoder_cross_attention=batch_size * cross,
        latent_layers=batch_size * latent * c.num_latent_layers,
        decoder=batch_size * decoder,
        backward_multiplier=2 if backward else 0,
    )


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved matmul FLOP/s over the hardware's peak."""
    if seconds_per_step <= 0 or peak_flops_per_s <= 0:
        raise ValueError("seconds_per_step and peak_flops_per_s must be positive")
    return flops_per_step / seconds_per_step / peak_flops_per_s


# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, per GPU, matched
# against ``torch.cuda.get_device_name()``; longest name first so "H100 PCIe" beats "H100".
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
}


def measured_matmul_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    n: int = 1024,
    seconds: float = 0.5,
) -> float:
    """FLOP/s of an ``n x n`` matmul in ``dtype`` (default fp32) on ``device`` with this
    process's threads: the machine's practical peak, which a model's smaller matmuls do not
    exceed."""
    import torch

    device = torch.device(device)
    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # kernel selection, allocation
    _synchronize(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        calls += 1
        if calls % 8 == 0:
            _synchronize(device)
    _synchronize(device)
    return 2 * n**3 * calls / (time.perf_counter() - start)


def peak_flops(device: torch.device | str, dtype: torch.dtype | None = None) -> float:
    """The MFU denominator for one worker: a known GPU's data-sheet peak (bf16/fp16 dense; half of
    it for fp32, which runs on TF32 tensor cores at half the rate), otherwise the measured matmul
    rate in ``dtype`` (default fp32)."""
    import torch

    device = torch.device(device)
    dtype = dtype or torch.float32
    if device.type == "cuda":
        known = gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
        return known or measured_matmul_flops(device, dtype, n=8192, seconds=1.0)
    return measured_matmul_flops(device, dtype)


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The data-sheet peak of the GPU named ``device_name`` in ``dtype``, if it is known."""
    import torch

    for model in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if model in device_name:
            return GPU_PEAK_FLOPS[model] / (2 if dtype == torch.float32 else 1)
    return None


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
