"""Single-device heart of the project: byte tokenizer, packing, whole-word masking, the Perceiver IO
model, its Hugging Face interop, FLOPs count, and the official metrics of the fine-tuning tasks.
PyTorch and NumPy only: no Ray, DeepSpeed or MLflow.

The data half (tokenizer, packing, masking, config, flops, task_metrics) needs only NumPy; names from the model
half are imported on first use (PEP 562), so a Ray Data worker that imports
``perceiver_core.masking`` does not pay for importing torch (2-3 s and ~300 MB per process).
"""

from __future__ import annotations

import importlib
from typing import Any

from perceiver_core.config import PRESETS, PerceiverConfig, get_preset
from perceiver_core.flops import StepFlops, mfu, step_flops
from perceiver_core.masking import IGNORE_INDEX, MaskingConfig, mask_batch
from perceiver_core.packing import PackedCrops, PackingConfig, pack_documents, pack_texts
from perceiver_core.tokenizer import (
    BOS,
    CLS,
    EOS,
    MASK,
    PAD,
    SEP,
    VOCAB_SIZE,
    ByteTokenizer,
    bytes_to_ids,
)

_LAZY = {
    "PerceiverForMaskedLM": "perceiver_core.model",
    "PerceiverForSequenceClassification": "perceiver_core.model",
    "compile_blocks": "perceiver_core.model",
    "count_parameters": "perceiver_core.model",
    "from_pretrained": "perceiver_core.hf",
    "save_pretrained": "perceiver_core.hf",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perceiver_core' has no attribute {name!r}")


__all__ = [
    "BOS", "CLS", "EOS", "IGNORE_INDEX", "MASK", "PAD", "PRESETS", "SEP", "VOCAB_SIZE",
    "ByteTokenizer", "MaskingConfig", "PackedCrops", "PackingConfig", "PerceiverConfig",
    "PerceiverForMaskedLM", "PerceiverForSequenceClassification", "StepFlops", "bytes_to_ids",
    "compile_blocks", "count_parameters", "from_pretrained", "get_preset", "mask_batch", "mfu",
    "pack_documents", "pack_texts", "save_pretrained", "step_flops",
]  # fmt: skip
