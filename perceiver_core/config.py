"""Model configuration: the shapes of a byte-level Perceiver IO and the presets we ship.

Field names follow ``transformers.PerceiverConfig`` where one exists, so that a ``config.json`` from
the Hub maps onto this class without a translation table (see ``perceiver_core.hf``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from perceiver_core.tokenizer import VOCAB_SIZE

LONG_TEXT_MODES = ("truncate", "windows")


@dataclass(frozen=True)
class PerceiverConfig:
    """Shapes of the encoder, the MLM decoder and the classification decoder.

    The defaults are ``deepmind/language-perceiver`` (201.1M parameters, Perceiver IO paper §4.1).
    """

    vocab_size: int = VOCAB_SIZE  # UTF-8 bytes + 6 special ids
    max_position_embeddings: int = 2048  # input positions, and the MLM decoder's output queries
    d_model: int = 768  # width of the byte embeddings the encoder cross-attends to
    num_latents: int = 256  # the latent array is what makes cost linear in input length
    d_latents: int = 1280
    num_blocks: int = 1  # the latent stack is applied num_blocks times with shared weights
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    # None means "derive as transformers does": qk from the side named by
    # cross_attention_shape_for_attention, v equal to qk.
    qk_channels: int | None = 256
    v_channels: int | None = 1280
    cross_attention_shape_for_attention: str = "kv"
    cross_attention_widening_factor: int = 1
    self_attention_widening_factor: int = 1
    use_query_residual: bool = True  # residual around the encoder's cross-attention
    # The MLM decoder's attention shape is fixed in the released model (8 heads x 32 qk channels).
    decoder_qk_channels: int = 256
    decoder_num_heads: int = 8
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    num_labels: int = 2
    # Label names of a classifier; empty means LABEL_0..LABEL_{n-1}.
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None  # "regression" for STS-B style targets, else classification
    # How a classifier answers a text longer than its positions (``perceiver_core.predict``):
    # "truncate" (its beginning) or "windows" (consecutive windows, their logits averaged).
    # Written to config.json with the model, so that it travels to the registry and back.
    long_text: str = "truncate"
    # Training only, not part of the exported config: recompute each latent layer's activations in
    # the backward pass instead of keeping them (about a third more compute, far less memory).
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "max_position_embeddings",
            "d_model",
            "num_latents",
            "d_latents",
            "num_blocks",
            "num_self_attends_per_block",
            "num_self_attention_heads",
            "num_cross_attention_heads",
            "cross_attention_widening_factor",
            "self_attention_widening_factor",
            "decoder_qk_channels",
            "decoder_num_heads",
            "num_labels",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PerceiverConfig.{name} must be a positive int, got {value!r}")
        if self.cross_attention_shape_for_attention not in ("kv", "q"):
            raise ValueError(
                "PerceiverConfig.cross_attention_shape_for_attention must be 'kv' or 'q', "
                f"got {self.cross_attention_shape_for_attention!r}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(
                f"PerceiverConfig.hidden_act: only 'gelu' is supported, got {self.hidden_act!r}"
            )
        if not 0.0 <= self.attention_probs_dropout_prob < 1.0:
            raise ValueError("PerceiverConfig.attention_probs_dropout_prob must be in [0, 1)")
        if self.long_text not in LONG_TEXT_MODES:
            raise ValueError(
                f"PerceiverConfig.long_text must be one of {LONG_TEXT_MODES}, got {self.long_text!r}"
            )
        if self.problem_type not in (None, "regression", "single_label_classification"):
            raise ValueError(f"PerceiverConfig.problem_type: unsupported {self.problem_type!r}")
        self._check_divisible()
        # The latent self-attention adds its output to its input, so its value width is the latent width.
        if self.self_attention_v_channels != self.d_latents:
            raise ValueError(
                f"PerceiverConfig.v_channels ({self.v_channels}) must equal d_latents "
                f"({self.d_latents}): the latent self-attention output is added to the latents"
            )
        # JSON round trips turn int keys into strings; store them as ints.
        object.__setattr__(self, "id2label", {int(k): str(v) for k, v in self.id2label.items()})

    def _check_divisible(self) -> None:
        checks = (
            (
                "cross-attention qk",
                self.cross_attention_qk_channels,
                self.num_cross_attention_heads,
            ),
            ("cross-attention v", self.cross_attention_v_channels, self.num_cross_attention_heads),
            ("self-attention qk", self.self_attention_qk_channels, self.num_self_attention_heads),
            ("self-attention v", self.self_attention_v_channels, self.num_self_attention_heads),
            ("decoder qk", self.decoder_qk_channels, self.decoder_num_heads),
            ("decoder v (d_model)", self.d_model, self.decoder_num_heads),
        )
        for what, channels, heads in checks:
            if channels % heads:
                raise ValueError(
                    f"PerceiverConfig: {what} channels ({channels}) not divisible by {heads} heads"
                )

    # Derived attention shapes, resolved exactly as transformers resolves its None defaults.
    @property
    def cross_attention_qk_channels(self) -> int:
        if self.qk_channels is not None:
            return self.qk_channels
        return self.d_model if self.cross_attention_shape_for_attention == "kv" else self.d_latents

    @property
    def cross_attention_v_channels(self) -> int:
        return self.v_channels if self.v_channels is not None else self.cross_attention_qk_channels

    @property
    def self_attention_qk_channels(self) -> int:
        return self.qk_channels if self.qk_channels is not None else self.d_latents

    @property
    def self_attention_v_channels(self) -> int:
        return self.v_channels if self.v_channels is not None else self.self_attention_qk_channels

    @property
    def num_latent_layers(self) -> int:
        return self.num_blocks * self.num_self_attends_per_block

    def label_names(self) -> list[str]:
        return [self.id2label.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    def replace(self, **changes: object) -> PerceiverConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> PerceiverConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"PerceiverConfig: unknown keys {unknown}")
        return cls(**values)  # type: ignore[arg-type]


PRESETS: dict[str, PerceiverConfig] = {
    # deepmind/language-perceiver: 201.1M parameters.
    "language-perceiver": PerceiverConfig(),
    # A few million parameters: trains on a laptop CPU in minutes, for demos and CI.
    "small": PerceiverConfig(
        max_position_embeddings=2048,
        d_model=128,
        num_latents=64,
        d_latents=256,
        num_self_attends_per_block=4,
        num_self_attention_heads=4,
        num_cross_attention_heads=4,
        qk_channels=128,
        v_channels=256,
    ),
    # Shapes for unit tests: every code path, milliseconds per step. Presets keep the MLM decoder's
    # 8 heads x 256 qk channels, which transformers hard-codes, so every preset exports to it.
    "tiny": PerceiverConfig(
        max_position_embeddings=128,
        d_model=32,
        num_latents=8,
        d_latents=48,
        num_self_attends_per_block=2,
        num_self_attention_heads=2,
        num_cross_attention_heads=2,
        qk_channels=16,
        v_channels=48,
    ),
}


def get_preset(name: str, **overrides: object) -> PerceiverConfig:
    """A preset by name, with field overrides (``get_preset("small", num_labels=3)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
