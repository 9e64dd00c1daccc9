"""Perceiver IO for bytes: an encoder into a small latent array, and a decoder whose queries read it.

The whole model is here and reads top to bottom: attention, the block that wraps it, the encoder,
the decoder (learned queries cross-attending to the latents) with its two output adapters (byte
logits tied to the input embedding, and class logits), and the task models that compose them.
Weight conversion to and from ``transformers`` lives in ``perceiver_core.hf``; FLOPs counting in
``perceiver_core.flops``.

Numerically this is ``transformers``' Perceiver (pre-LayerNorm with eps 1e-5, exact GELU, the same
residuals), with three differences that change speed, not results:
- attention runs through ``scaled_dot_product_attention`` (fused kernels, no materialised scores);
- the MLM head can decode only chosen positions (the masked ones) instead of all 2048 queries, which
  is exact because decoder queries never attend to each other;
- the latent layers can recompute their activations in the backward pass
  (``PerceiverConfig.activation_checkpointing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from perceiver_core.config import PerceiverConfig
from perceiver_core.masking import IGNORE_INDEX  # labels of positions that carry no loss


class Attention(nn.Module):
    """Pre-LayerNorm multi-head attention from queries ``x`` to keys/values ``kv`` (or to ``x``)."""

    def __init__(
        self,
        *,
        q_dim: int,
        kv_dim: int,
        qk_channels: int,
        v_channels: int,
        out_dim: int,
        num_heads: int,
        cross: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_norm = nn.LayerNorm(q_dim)
        # Self-attention normalises once; cross-attention normalises both sides.
        self.kv_norm = nn.LayerNorm(kv_dim) if cross else None
        self.q = nn.Linear(q_dim, qk_channels)
        self.k = nn.Linear(kv_dim, qk_channels)
        self.v = nn.Linear(kv_dim, v_channels)
        self.out = nn.Linear(v_channels, out_dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        kv_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.q_norm(x)
        kv = x if self.kv_norm is None else self.kv_norm(kv)
        q, k, v = self._heads(self.q(x)), self._heads(self.k(kv)), self._heads(self.v(kv))
        o = attend(q, k, v, kv_bias, self.dropout if self.training else 0.0)
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) mask, nonzero = real -> (B, 1, 1, N) additive bias: 0 on real keys, a very negative
    finite value on padding. Finite, not -inf, so that an all-padding row gives uniform attention
    (as transformers does) rather than NaNs that would poison the gradients of the whole batch."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias.masked_fill_(attention_mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over (B, H, N, d) heads.

    On accelerators this is ``scaled_dot_product_attention`` (fused kernels, no materialised
    scores). On CPU, PyTorch's SDPA has no fused kernel for a value width that differs from the
    query/key width (ours: 32 vs 160 per head), and its fallback upcasts bf16 to fp32: the plain
    matmul-softmax-matmul below measured 3.5x faster under bf16 autocast on 2 cores and equal in fp32
    (see benchmarks/model_throughput.py). Both compute the same function.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    # Scaling q, not the scores, and adding the bias in place: two fewer passes over the scores.
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if bias is not None:
        scores.add_(bias.to(scores.dtype))
    probs = torch.softmax(scores, dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout)
    return torch.matmul(probs.to(v.dtype), v)


class MLP(nn.Module):
    def __init__(self, dim: int, widening_factor: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * widening_factor)
        self.fc2 = nn.Linear(dim * widening_factor, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Attention (with an optional residual to the queries), then a pre-LayerNorm MLP with residual."""

    def __init__(
        self, attn: Attention, *, q_dim: int, widening_factor: int, query_residual: bool
    ) -> None:
        super().__init__()
        self.attn = attn
        self.query_residual = query_residual
        self.mlp_norm = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, widening_factor)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        kv_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn(x, kv, kv_bias)
        if self.query_residual:
            h = h + x
        return h + self.mlp(self.mlp_norm(h))


class PerceiverEncoder(nn.Module):
    """Bytes -> embeddings + positions -> cross-attention into the latents -> latent self-attention."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_position_embeddings, c.d_model)
        self.latents = nn.Parameter(torch.empty(c.num_latents, c.d_latents))
        cross = Attention(
            q_dim=c.d_latents,
            kv_dim=c.d_model,
            qk_channels=c.cross_attention_qk_channels,
            v_channels=c.cross_attention_v_channels,
            out_dim=c.d_latents,
            num_heads=c.num_cross_attention_heads,
            cross=True,
            dropout=c.attention_probs_dropout_prob,
        )
        self.cross = Block(
            cross,
            q_dim=c.d_latents,
            widening_factor=c.cross_attention_widening_factor,
            query_residual=c.use_query_residual,
        )
        self.layers = nn.ModuleList(
            Block(
                Attention(
                    q_dim=c.d_latents,
                    kv_dim=c.d_latents,
                    qk_channels=c.self_attention_qk_channels,
                    v_channels=c.self_attention_v_channels,
                    out_dim=c.self_attention_v_channels,
                    num_heads=c.num_self_attention_heads,
                    cross=False,
                    dropout=c.attention_probs_dropout_prob,
                ),
                q_dim=c.d_latents,
                widening_factor=c.self_attention_widening_factor,
                query_residual=True,
            )
            for _ in range(c.num_self_attends_per_block)
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) ids and optional (B, L) mask (nonzero = real byte) -> (B, num_latents, d_latents)."""
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"input length {n} exceeds max_position_embeddings ({self.config.max_position_embeddings})"
            )
        positions = torch.arange(n, device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(positions)
        bias = None if attention_mask is None else padding_bias(attention_mask, x.dtype)
        z = self.cross(self.latents.expand(b, -1, -1), x, bias)
        for _ in range(self.config.num_blocks):
            for layer in self.layers:
                # Recompute the layer's activations in backward: ~1/3 more compute, less memory.
                if (
                    self.config.activation_checkpointing
                    and self.training
                    and torch.is_grad_enabled()
                ):
                    z = checkpoint(layer, z, use_reentrant=False)
                else:
                    z = layer(z)
        return z


class PerceiverDecoder(nn.Module):
    """Learned output queries cross-attend to the latents; an output adapter turns what they read
    into the task's outputs. ``positions`` picks which queries to decode (all by default)."""

    def __init__(
        self,
        *,
        num_queries: int,
        query_dim: int,
        latent_dim: int,
        qk_channels: int,
        num_heads: int,
        query_residual: bool,
        dropout: float,
        adapter: nn.Module,
    ) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(num_queries, query_dim))
        attn = Attention(
            q_dim=query_dim,
            kv_dim=latent_dim,
            qk_channels=qk_channels,
            v_channels=query_dim,
            out_dim=query_dim,
            num_heads=num_heads,
            cross=True,
            dropout=dropout,
        )
        self.block = Block(attn, q_dim=query_dim, widening_factor=1, query_residual=query_residual)
        self.adapter = adapter

    def forward(
        self, z: torch.Tensor, positions: torch.Tensor | None = None, *adapter_args: torch.Tensor
    ) -> torch.Tensor:
        """Outputs for the queries at ``positions`` (B, P) or (P,), given latents ``z`` (B, N, D)."""
        queries = self.queries if positions is None else self.queries[positions]
        if queries.dim() == 2:
            queries = queries.expand(z.shape[0], -1, -1)
        return self.adapter(self.block(queries, z), *adapter_args)


class TiedByteLogits(nn.Module):
    """Masked-LM output adapter: logits over the byte vocabulary, tied to the input byte embedding
    (passed in by the model), plus a bias."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(h, embedding, self.bias)


class ClassLogits(nn.Module):
    """Classification output adapter: the single query's output, through a linear layer."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h[:, 0])


def masked_lm_decoder(c: PerceiverConfig) -> PerceiverDecoder:
    """One learned query per input position (as released: no residual from the queries, which are
    positions, not content)."""
    return PerceiverDecoder(
        num_queries=c.max_position_embeddings,
        query_dim=c.d_model,
        latent_dim=c.d_latents,
        qk_channels=c.decoder_qk_channels,
        num_heads=c.decoder_num_heads,
        query_residual=False,
        dropout=c.attention_probs_dropout_prob,
        adapter=TiedByteLogits(c.vocab_size),
    )


def classification_decoder(c: PerceiverConfig) -> PerceiverDecoder:
    """One learned query, one head, as ``transformers.PerceiverForSequenceClassification``."""
    return PerceiverDecoder(
        num_queries=1,
        query_dim=c.d_latents,
        latent_dim=c.d_latents,
        qk_channels=c.d_latents,
        num_heads=1,
        query_residual=True,
        dropout=c.attention_probs_dropout_prob,
        adapter=ClassLogits(c.d_latents, c.num_labels),
    )


@dataclass
class MaskedLMOutput:
    """``logits`` are (B, P, vocab) at ``positions`` (B, P) or (P,). ``targets`` (B, P), when labels
    were given, are the labels at those positions, -100 where there is none to predict (unlabelled
    positions, and the padding entries of rows that decoded fewer positions than others)."""

    logits: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor | None = None
    loss: torch.Tensor | None = None


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def init_weights(module: nn.Module, std: float) -> None:
    """transformers' Perceiver initialisation: N(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith(("latents", "queries")):
            nn.init.normal_(p, std=std)


def masked_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) indices of each row's labelled positions, left-packed, and a (B, P) validity mask.

    P is the largest count in the batch; shorter rows repeat position 0 and are marked invalid.
    """
    has_label = labels != IGNORE_INDEX
    counts = has_label.sum(dim=1)
    p = max(int(counts.max()), 1) if labels.numel() else 1
    # A stable descending sort on the 0/1 flags moves labelled positions first, in order.
    order = torch.sort(has_label.to(torch.uint8), dim=1, descending=True, stable=True).indices[
        :, :p
    ]
    valid = torch.arange(p, device=labels.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


class PerceiverForMaskedLM(nn.Module):
    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = PerceiverEncoder(config)
        self.decoder = masked_lm_decoder(config)
        init_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        decode: str = "masked",
        positions: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """Encode ``input_ids`` and decode logits.

        decode: ``"all"`` decodes every input position (as transformers does); ``"masked"`` decodes
        only the positions that carry a label (``labels != -100``), the training default, which
        gives the same loss for a fraction of the decoder's cost. Explicit ``positions`` (P,) or
        (B, P) override both. The loss is the mean cross-entropy over labelled positions.
        """
        z = self.encoder(input_ids, attention_mask)
        valid = None
        if positions is None:
            if decode == "masked" and labels is not None:
                positions, valid = masked_positions(labels)
            elif decode in ("all", "masked"):
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            else:
                raise ValueError(f"decode must be 'all' or 'masked', got {decode!r}")
        logits = self.decoder(z, positions, self.encoder.embed.weight)
        if labels is None:
            return MaskedLMOutput(logits=logits, positions=positions)
        rows = positions.expand(input_ids.shape[0], -1) if positions.dim() == 1 else positions
        targets = labels.gather(1, rows).long()
        if valid is not None:
            targets = targets.masked_fill(~valid, IGNORE_INDEX)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return MaskedLMOutput(logits=logits, positions=positions, targets=targets, loss=loss)


class PerceiverForSequenceClassification(nn.Module):
    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = PerceiverEncoder(config)
        self.decoder = classification_decoder(config)
        init_weights(self, config.initializer_range)

    @property
    def is_regression(self) -> bool:
        return self.config.problem_type == "regression" or self.config.num_labels == 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        logits = self.decoder(self.encoder(input_ids, attention_mask))
        loss = None
        if labels is not None:
            if self.is_regression:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
            else:
                loss = F.cross_entropy(logits.float(), labels.long().view(-1))
        return ClassifierOutput(logits=logits, loss=loss)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compile_blocks(model: PerceiverForMaskedLM | PerceiverForSequenceClassification) -> None:
    """``torch.compile`` each attention block in place (not the whole model).

    Per block, because the blocks are where the time goes and their shapes are static, while the
    masked-position gather and the loss have a shape that changes every batch; compiling the whole
    model would recompile or fall back on them. The MLM decoder block sees a different number of
    queries per batch, so it is compiled with dynamic shapes. Fusing LayerNorm, GELU, residual adds
    and dtype casts measured ~25% faster training on CPU under bf16 (benchmarks/model_throughput.py);
    the first step pays the compilation (about 30 s for the 201M preset on 2 cores).
    """
    encoder = model.encoder
    for layer in encoder.layers:
        layer.compile()
    encoder.cross.compile()
    model.decoder.block.compile(dynamic=isinstance(model, PerceiverForMaskedLM))
