"""Hugging Face interop: load ``transformers`` Perceiver checkpoints into our model and write ours
in a form that ``transformers.PerceiverForMaskedLM`` / ``PerceiverForSequenceClassification`` load.

The format is transformers' on-disk one: ``config.json`` plus ``model.safetensors`` (or sharded
safetensors with an index, or a ``pytorch_model.bin`` read with ``weights_only=True``: a pickle is
never executed). ``transformers`` itself is not imported here; tests check the files against it.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from perceiver_core.config import PerceiverConfig
from perceiver_core.model import PerceiverForMaskedLM, PerceiverForSequenceClassification
from perceiver_core.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

PerceiverModel = PerceiverForMaskedLM | PerceiverForSequenceClassification

# Suffixes inside one transformers PerceiverLayer -> ours (perceiver_core.model.Block).
_LAYER_KEYS = {
    "attention.self.layernorm1": "attn.q_norm",
    "attention.self.layernorm2": "attn.kv_norm",
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.out",
    "layernorm": "mlp_norm",
    "mlp.dense1": "mlp.fc1",
    "mlp.dense2": "mlp.fc2",
}
# Module prefixes: transformers -> ours, for the encoder and for each task's decoder.
_ENCODER = (
    ("perceiver.input_preprocessor.embeddings", "encoder.embed"),
    ("perceiver.input_preprocessor.position_embeddings", "encoder.pos_embed"),
    ("perceiver.embeddings.latents", "encoder.latents"),
    ("perceiver.encoder.cross_attention", "encoder.cross"),
    ("perceiver.encoder.self_attends", "encoder.layers"),
)
_DECODERS = {
    # PerceiverBasicDecoder and the tied-embedding bias.
    "mlm": (
        ("perceiver.decoder.output_position_encodings.position_embeddings", "decoder.queries"),
        ("perceiver.decoder.decoding_cross_attention", "decoder.block"),
        ("embedding_decoder.bias", "decoder.adapter.bias"),
    ),
    # PerceiverClassificationDecoder wraps a PerceiverBasicDecoder.
    "classifier": (
        (
            "perceiver.decoder.decoder.output_position_encodings.position_embeddings",
            "decoder.queries",
        ),
        ("perceiver.decoder.decoder.decoding_cross_attention", "decoder.block"),
        ("perceiver.decoder.decoder.final_layer", "decoder.adapter.proj"),
    ),
}
# The parameter that only each task's output adapter has, in our names.
_ADAPTER_KEYS = {"mlm": "decoder.adapter.bias", "classifier": "decoder.adapter.proj.weight"}
_ARCHITECTURES = {
    PerceiverForMaskedLM: "PerceiverForMaskedLM",
    PerceiverForSequenceClassification: "PerceiverForSequenceClassification",
}
# transformers' defaults for keys a config.json may leave out (ours differ for qk/v channels).
_HF_DEFAULTS: dict[str, object] = {"qk_channels": None, "v_channels": None}


def _longest_first(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Sorted so that a longer prefix wins over one it extends (``layernorm1`` before ``layernorm``)."""
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


# Sorted once: renaming runs for every key of a 201M checkpoint. transformers' names say which
# decoder they belong to; ours are the same for both (``decoder.*``), so writing needs the kind.
_TO_OURS = (
    _longest_first([*_ENCODER, *_DECODERS["mlm"], *_DECODERS["classifier"]]),
    _longest_first(_LAYER_KEYS.items()),
)
_TO_HF = {
    kind: (
        _longest_first((dst, src) for src, dst in (*_ENCODER, *heads)),
        _longest_first((dst, src) for src, dst in _LAYER_KEYS.items()),
    )
    for kind, heads in _DECODERS.items()
}


def head_kind(keys: Iterable[str]) -> str | None:
    """``mlm`` or ``classifier``: which task's decoder a state dict in our names holds, if any."""
    keys = set(keys)
    return next((kind for kind, key in _ADAPTER_KEYS.items() if key in keys), None)


def _rename(key: str, tables: tuple[tuple[tuple[str, str], ...], ...]) -> str | None:
    prefixes, layer_keys = tables
    for src, dst in prefixes:
        if key == src or key.startswith(src + "."):
            rest = key[len(src) :]
            m = re.match(r"^\.(\d+)(\..*)?$", rest)  # a layer index after the prefix
            index, rest = (f".{m.group(1)}", m.group(2) or "") if m else ("", rest)
            for s, d in layer_keys:
                if rest.startswith("." + s + "."):
                    rest = "." + d + rest[len(s) + 1 :]
                    break
            return dst + index + rest
    return None


def hf_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers Perceiver state dict to ours. Unknown keys raise: a silent drop would
    load a model with random weights where the user expects trained ones."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = _rename(key, _TO_OURS)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"not a text Perceiver checkpoint: unexpected keys {unknown[:5]}")
    return out


def ours_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tables = _TO_HF[head_kind(state_dict) or "mlm"]
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, tables)
        if new is None:
            raise ValueError(f"no transformers name for parameter {key!r}")
        out[new] = value
    return out


def config_from_hf(values: Mapping[str, object]) -> PerceiverConfig:
    """Our config from a transformers ``config.json`` dict; keys we do not model are ignored."""
    ours = {f: values.get(f, _HF_DEFAULTS.get(f)) for f in PerceiverConfig.__dataclass_fields__}
    ours = {k: v for k, v in ours.items() if v is not None or k in _HF_DEFAULTS}
    if "id2label" in values:
        ours["id2label"] = {int(k): v for k, v in dict(values["id2label"]).items()}
        ours["num_labels"] = len(ours["id2label"])
    return PerceiverConfig(**ours)


def config_to_hf(config: PerceiverConfig, architecture: str) -> dict[str, object]:
    """A ``config.json`` for transformers. The MLM decoder's attention shape is hard-coded there,
    so configs that change it cannot be expressed."""
    if (config.decoder_qk_channels, config.decoder_num_heads) != (256, 8):
        log.warning(
            "decoder_qk_channels=%d, decoder_num_heads=%d: transformers hard-codes 256 and 8, "
            "so its PerceiverForMaskedLM cannot load this model's MLM head",
            config.decoder_qk_channels,
            config.decoder_num_heads,
        )
    values = config.to_dict()
    values.update(
        model_type="perceiver",
        architectures=[architecture],
        id2label={str(i): name for i, name in enumerate(config.label_names())},
        label2id={name: i for i, name in enumerate(config.label_names())},
        # Our LayerNorms use torch's default eps 1e-5, as transformers' Perceiver does in fact.
        layer_norm_eps=1e-5,
        perceiver_core={
            "decoder_qk_channels": config.decoder_qk_channels,
            "decoder_num_heads": config.decoder_num_heads,
            "long_text": config.long_text,
        },
    )
    for key in (
        "decoder_qk_channels",
        "decoder_num_heads",
        "long_text",
        "num_labels",
        "activation_checkpointing",
    ):
        values.pop(key)
    if config.problem_type is None:
        values.pop("problem_type")
    return values


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a directory (safetensors, sharded safetensors, or pytorch_model.bin) or file."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).exists():
                return load_state_dict(path / name)
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        merged: dict[str, torch.Tensor] = {}
        for shard in shards:
            merged.update(_load_safetensors(path.parent / shard))
        return merged
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    # weights_only refuses arbitrary pickled objects: loading a checkpoint cannot run code.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, which would run whatever the file holds.
        refused = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({refused.group(1)})" if refused else ""
        raise ValueError(
            f"{path}: refused: it holds pickled objects other than tensors{what}; the file may be "
            "malicious and was not loaded (convert weights you trust to model.safetensors)"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable PyTorch weights file: {_first(error)}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path}: not a readable safetensors file ({_first(error)}); a download may have been "
            "cut short: fetch it again"
        ) from None


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_config(path: Path) -> tuple[PerceiverConfig, dict]:
    """A model folder's config (with our keys transformers has no place for) and its raw JSON."""
    raw = json.loads((Path(path) / "config.json").read_text())
    extra = raw.get("perceiver_core", {})
    cfg = config_from_hf(raw)
    return (cfg.replace(**extra) if extra else cfg), raw


def load_into(
    model: PerceiverModel, state_dict: Mapping[str, torch.Tensor], *, strict: bool
) -> None:
    """Load a transformers- or ours-named state dict; heads absent from it stay freshly initialised
    (an MLM checkpoint into a classifier), and that is logged — or an error when ``strict``."""
    if any(k.startswith(("perceiver.", "embedding_decoder.")) for k in state_dict):
        state_dict = hf_to_ours(state_dict)
    # The other task's decoder (a classifier checkpoint loaded as MLM, or the reverse) is dropped.
    if head_kind(state_dict) != head_kind(model.state_dict()):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("decoder.")}
    expected = model.state_dict()
    for key, value in state_dict.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"weights do not fit the config: {key} is {tuple(value.shape)} in the checkpoint, "
                f"{tuple(expected[key].shape)} in the model its config.json describes"
            )
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has parameters the model lacks: {result.unexpected_keys[:5]}")
    missing = result.missing_keys
    if any(k.startswith("encoder.") for k in missing) or (strict and missing):
        raise ValueError(f"checkpoint lacks parameters: {missing[:5]}")
    if missing:  # expected: a classifier started from a masked LM gets a new decoder
        log.info(
            "newly initialised (not in the checkpoint): %s",
            sorted({k.split(".")[0] for k in missing}),
        )


def from_pretrained(
    cls: type[PerceiverModel],
    path: str | Path,
    *,
    strict: bool = False,
    **config_overrides: object,
) -> PerceiverModel:
    """Load a transformers-format directory (config.json + weights) into ``cls``.

    ``config_overrides`` change the config before the model is built, for example ``num_labels=3``
    for a classifier on top of an MLM checkpoint.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config, raw = read_config(path)
    if config_overrides:
        if "num_labels" in config_overrides and "id2label" not in config_overrides:
            config_overrides["id2label"] = {}
        config = config.replace(**config_overrides)
    model = cls(config)
    load_into(model, load_state_dict(path), strict=strict)
    log.info("loaded %s (%s) from %s", cls.__name__, raw.get("architectures"), path)
    return model


def save_pretrained(model: PerceiverModel, path: str | Path) -> Path:
    """Write config.json, model.safetensors (transformers' names) and the tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    architecture = _ARCHITECTURES[type(model)]
    config = config_to_hf(model.config, architecture)
    state = {k: v.detach().contiguous().cpu() for k, v in ours_to_hf(model.state_dict()).items()}
    # Write to temporary names and rename, so a crash never leaves a half-written model behind.
    tmp_weights, tmp_config = path / "model.safetensors.tmp", path / "config.json.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp_weights.replace(path / "model.safetensors")
    tmp_config.replace(path / "config.json")
    # The tokenizer's limit is the model's, so ``truncation=True`` anywhere (transformers' pipelines,
    # an MLflow model's inference config) cuts a text to what the position embeddings cover.
    ByteTokenizer(model_max_length=model.config.max_position_embeddings).save_pretrained(path)
    return path
