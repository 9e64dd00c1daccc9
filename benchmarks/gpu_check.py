"""The GPU check in one call: parity with transformers on the device, training throughput of ours
and of transformers' best setting, MFU, peak memory, and which SDPA kernel each attention takes.

Needs only PyTorch, transformers and this project's ``perceiver_core`` (no Ray, DeepSpeed or
MLflow), so that it runs on a bare GPU machine from a copy of the repository:

    python benchmarks/gpu_check.py                      # CUDA: the 201M preset, batches 8/32/64 x 2048
    python benchmarks/gpu_check.py --device cpu --preset tiny --batch-sizes 2 --seq 128 --steps 1

What it measures, on the same weights and batches for both sides:
- parity: MLM logits of ours against transformers' ``PerceiverForMaskedLM`` in fp32 (TF32 off), the
  largest difference over real positions, checked against 1e-4; and under bf16 autocast, where both
  sides round differently, ours must stay within 2% of the largest fp32 logit of the fp32
  reference, or twice transformers' own bf16 error, whichever is larger;
- sdpa: per attention of our model (encoder cross-attention, latent self-attention, decoder
  cross-attention), its shapes (per-head query/key and value widths differ in the latent stack:
  32 and 160 for the 201M model) and the kernel ``scaled_dot_product_attention`` picks for them,
  with the kernels that accept them; where the fused flash kernel refuses, the same attention with
  queries and keys zero-padded to the value width (the same function: the scale stays
  1/sqrt(width before padding)) is timed against the default, so the choice is a measurement;
- throughput per batch size: bytes/s of each side's settings (transformers: fp32 (TF32 on CUDA),
  bf16 autocast; ours: bf16 autocast decoding only the masked positions, eager and with compiled
  blocks), each side's best, the ratio, MFU of ours against the measured bf16 matmul peak, and peak
  memory. A setting that runs out of memory says so instead of a figure.

Progress goes to stderr; stdout is one JSON line. CI runs it on CPU with the tiny preset so that it
never rots (tests/test_benchmarks.py); it never depends on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

# A bare GPU machine has a copy of the repository and no installation of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe
from model_throughput import hf_loss, make_batches, model_builders, ours_loss, time_training

import perceiver_core.model as perceiver_model
from perceiver_core import hf
from perceiver_core.config import PerceiverConfig, get_preset
from perceiver_core.flops import measured_matmul_flops, step_flops
from perceiver_core.model import PerceiverForMaskedLM

FP32_TOLERANCE = 1e-4
# bf16 keeps 8 significant bits; after a few dozen layers either side's logits move by a few tenths
# of a percent of their range. Ours may differ from the fp32 reference by 2% of the largest logit,
# or by twice what transformers' own bf16 run differs, whichever is larger.
BF16_RELATIVE_TOLERANCE = 0.02


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def significant(value: float, digits: int = 3) -> float:
    """Three significant digits, so that a tiny preset on a slow CPU does not round to zero."""
    return float(f"{value:.{digits}g}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 (CUDA's default for convolutions)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def twins(config: PerceiverConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours with random weights (random biases too) and transformers' model with the same ones."""
    torch.manual_seed(0)
    ours = PerceiverForMaskedLM(config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.02)
    theirs = transformers.PerceiverForMaskedLM(
        transformers.PerceiverConfig(**hf.config_to_hf(config, "PerceiverForMaskedLM"))
    )
    theirs.load_state_dict(hf.ours_to_hf(ours.state_dict()), strict=True)
    return ours.to(device).eval(), theirs.to(device).eval()


def parity(config: PerceiverConfig, device: torch.device, seq: int) -> dict[str, Any]:
    ours, theirs = twins(config, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, config.vocab_size, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    ids[1, seq * 2 // 3 :], mask[1, seq * 2 // 3 :] = 0, 0  # a padded row
    ids, mask = ids.to(device), mask.to(device)
    real = mask.bool()

    def logits(bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            a = ours(ids, mask, decode="all").logits.float()
            b = theirs(inputs=ids, attention_mask=mask).logits[:, :seq].float()
        return a, b

    with exact_fp32():
        ours_fp32, theirs_fp32 = logits(bf16=False)
    ours_bf16, theirs_bf16 = logits(bf16=True)

    def error(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).abs()[real].max())

    fp32 = error(ours_fp32, theirs_fp32)
    theirs_bf16_error = error(theirs_bf16, theirs_fp32)
    scale = float(theirs_fp32.abs()[real].max())
    bf16_tolerance = max(2 * theirs_bf16_error, BF16_RELATIVE_TOLERANCE * scale)
    ours_bf16_error = error(ours_bf16, theirs_fp32)
    return {
        "fp32_max_abs_diff": fp32,
        "fp32_tolerance": FP32_TOLERANCE,
        "fp32_ok": fp32 <= FP32_TOLERANCE,
        "bf16_ours_vs_fp32_reference": ours_bf16_error,
        "bf16_transformers_vs_fp32_reference": theirs_bf16_error,
        "bf16_tolerance": bf16_tolerance,
        "bf16_ok": ours_bf16_error <= bf16_tolerance,
        "logit_scale": scale,
    }


# -- SDPA kernels ------------------------------------------------------------------------------


def attention_calls(config: PerceiverConfig, device: torch.device, seq: int) -> dict[str, dict]:
    """The (q, k, v, bias) shapes of each distinct attention in one forward pass of ours."""
    model = PerceiverForMaskedLM(config).to(device).eval()
    seen: dict[tuple, dict] = {}
    original = perceiver_model.attend

    def recording(q, k, v, bias, dropout):
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), bias is not None)
        seen.setdefault(key, {"q": q, "k": k, "v": v, "bias": bias})
        return original(q, k, v, bias, dropout)

    ids = torch.randint(6, config.vocab_size, (2, seq), device=device)
    perceiver_model.attend = recording
    try:
        with torch.no_grad():
            model(ids, torch.ones_like(ids), decode="all")
    finally:
        perceiver_model.attend = original
    names = ["encoder_cross_attention", "latent_self_attention", "decoder_cross_attention"]
    # One call per distinct shape, in the order the forward pass made them.
    return {
        names[i] if i < len(names) else f"attention_{i}": c for i, c in enumerate(seen.values())
    }


def _backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


def _accepts(backend: Any, q, k, v, bias) -> bool:
    from torch.nn.attention import sdpa_kernel

    try:
        with sdpa_kernel([backend]), warnings_off():
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return True
    except RuntimeError:
        return False


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _time(fn: Callable[[], Any], device: torch.device, repeat: int = 20) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def sdpa_report(config: PerceiverConfig, device: torch.device, seq: int, batch: int) -> dict:
    """Per attention: shapes, the kernel SDPA picks, the kernels that accept the shapes; where
    flash refuses because the widths differ, the padded variant timed against the default."""
    calls = attention_calls(config, device, seq)
    report: dict[str, Any] = {"attend_uses_sdpa": device.type != "cpu"}
    for name, call in calls.items():
        # The batch of the throughput runs, in bf16 as training runs.
        def grown(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t[:1].expand(batch, *t.shape[1:]).to(torch.bfloat16).contiguous()

        q, k, v, bias = (grown(call[x]) for x in ("q", "k", "v", "bias"))
        entry: dict[str, Any] = {
            "q": list(q.shape),
            "k": list(k.shape),
            "v": list(v.shape),
            "mask": bias is not None,
        }
        try:
            choice = torch._fused_sdp_choice(q, k, v, bias, 0.0, False)
            entry["chosen"] = {int(b): n for n, b in _backends().items()}.get(int(choice), choice)
        except Exception as error:  # a private API: report, do not fail
            entry["chosen"] = f"unknown ({type(error).__name__})"
        entry["accepted_by"] = [n for n, b in _backends().items() if _accepts(b, q, k, v, bias)]
        default_s = _time(
            lambda q=q, k=k, v=v, bias=bias: F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias
            ),
            device,
        )
        entry["default_ms"] = round(default_s * 1e3, 3)
        if q.shape[-1] != v.shape[-1] and "flash" not in entry["accepted_by"]:
            entry.update(padded_variant(q, k, v, bias, device))
        report[name] = entry
    return report


def padded_variant(q, k, v, bias, device: torch.device) -> dict[str, Any]:
    """The narrower of (queries and keys) and values zero-padded to the wider width: the same
    function. Zeros added to queries and keys add nothing to a dot product (the scale stays that
    of the unpadded width); zero value columns give output columns that are cut off again."""
    width, scale, v_width = max(q.shape[-1], v.shape[-1]), q.shape[-1] ** -0.5, v.shape[-1]
    qp, kp, vp = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))

    def padded() -> torch.Tensor:
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, scale=scale)[
            ..., :v_width
        ]

    out: dict[str, Any] = {}
    with warnings_off():
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).float()
        out["padded_max_abs_diff"] = float((padded().float() - reference).abs().max())
    out["padded_accepted_by"] = [n for n, b in _backends().items() if _accepts(b, qp, kp, vp, bias)]
    out["padded_ms"] = round(_time(padded, device) * 1e3, 3)
    return out


# -- training throughput ----------------------------------------------------------------------


def throughput(
    config: PerceiverConfig,
    device: torch.device,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    compile_ours: bool,
    peak_bf16: float,
) -> dict[str, Any]:
    batches = [
        tuple(t.to(device) for t in b) for b in make_batches(config, batch, seq, steps + warmup)
    ]
    masked = int(max((b[2] != -100).sum(dim=1).max() for b in batches))
    torch.manual_seed(0)
    initial = PerceiverForMaskedLM(config).state_dict()
    transformers_model, ours_model = model_builders(config, initial, device)
    masked_loss = ours_loss("masked")

    settings: dict[str, tuple[Callable[[], torch.nn.Module], Callable, bool]] = {
        "hf_fp32": (transformers_model, hf_loss, False),
        "hf_bf16": (transformers_model, hf_loss, True),
        "ours_bf16_decode_masked": (lambda: ours_model(False), masked_loss, True),
    }
    if compile_ours:
        settings["ours_bf16_decode_masked_compiled"] = (
            lambda: ours_model(True),
            masked_loss,
            True,
        )
    seconds: dict[str, float] = {}
    memory: dict[str, float] = {}
    failures: dict[str, str] = {}
    for label, (build, loss_fn, bf16) in settings.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            model = build()
            seconds[label] = time_training(model, loss_fn, batches, bf16, warmup, device).seconds
        except torch.OutOfMemoryError:
            failures[label] = "out of memory"
            log(f"[batch {batch}] {label}: out of memory")
            continue
        finally:
            model = None
        if device.type == "cuda":
            memory[label] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        log(f"[batch {batch}] {label}: {batch * seq / seconds[label]:,.0f} bytes/s")
    result: dict[str, Any] = {
        "batch": batch,
        "seq_len": seq,
        "bytes_per_s": {k: round(batch * seq / v, 1) for k, v in seconds.items()},
        "peak_memory_gib": memory,
        "failed": failures,
    }
    hf_side = {k: v for k, v in seconds.items() if k.startswith("hf")}
    ours_side = {k: v for k, v in seconds.items() if k.startswith("ours")}
    if hf_side and ours_side:
        hf_best, ours_best = min(hf_side, key=hf_side.get), min(ours_side, key=ours_side.get)
        flops = step_flops(config, batch, seq, decoded_positions=masked).total
        result.update(
            hf_best_setting=hf_best,
            ours_best_setting=ours_best,
            speedup=round(hf_side[hf_best] / ours_side[ours_best], 3),
            ours_tflops=significant(flops / ours_side[ours_best] / 1e12),
            ours_mfu_vs_measured_bf16_peak=significant(flops / ours_side[ours_best] / peak_bf16),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--preset", default="language-perceiver")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--no-compile", action="store_true", help="skip ours with compiled blocks")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device)
    config = get_preset(args.preset, attention_probs_dropout_prob=0.0)
    seq = min(args.seq, config.max_position_embeddings)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": describe(),
        "preset": args.preset,
        "parameters": sum(p.numel() for p in PerceiverForMaskedLM(config).parameters()),
    }
    result["parity"] = parity(config, device, min(seq, 512))
    log(f"parity: {result['parity']}")
    peak = measured_matmul_flops(device, torch.bfloat16, n=8192 if device.type == "cuda" else 1024)
    result["measured_bf16_matmul_tflops"] = significant(peak / 1e12)
    result["sdpa"] = sdpa_report(config, device, seq, args.batch_sizes[0])
    log(f"sdpa: {result['sdpa']}")
    result["throughput"] = [
        throughput(
            config,
            device,
            batch,
            seq,
            args.steps,
            args.warmup,
            not args.no_compile,
            peak,
        )
        for batch in args.batch_sizes
    ]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0 if result["parity"]["fp32_ok"] and result["parity"]["bf16_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
