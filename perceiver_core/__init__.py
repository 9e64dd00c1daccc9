"""Single-device heart of the project: byte tokenizer, packing, whole-word masking, the Perceiver IO
model, its Hugging Face interop and FLOPs count. PyTorch and NumPy only: no Ray, DeepSpeed or MLflow.
"""

from perceiver_core.config import PRESETS, PerceiverConfig, get_preset
from perceiver_core.flops import StepFlops, mfu, step_flops
from perceiver_core.hf import from_pretrained, save_pretrained
from perceiver_core.masking import IGNORE_INDEX, MaskingConfig, mask_batch
from perceiver_core.model import (
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    count_parameters,
)
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

__all__ = [
    "BOS",
    "CLS",
    "EOS",
    "IGNORE_INDEX",
    "MASK",
    "PAD",
    "PRESETS",
    "SEP",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "MaskingConfig",
    "PackedCrops",
    "PackingConfig",
    "PerceiverConfig",
    "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification",
    "StepFlops",
    "bytes_to_ids",
    "count_parameters",
    "from_pretrained",
    "get_preset",
    "mask_batch",
    "mfu",
    "pack_documents",
    "pack_texts",
    "save_pretrained",
    "step_flops",
]
