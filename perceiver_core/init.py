"""A starting point for masked-LM pretraining that leaves the byte-unigram plateau early.

From transformers' initialisation (every weight N(0, 0.02)), a byte-level Perceiver IO sits on the
plateau where it predicts byte frequencies for a long time: every latent starts out reading the
same average of the whole input, every decoder query the same average of the latents, and the
logits, tied to an embedding of std 0.02, barely move with what little reaches them. Measured on
a 2-core CPU (benchmarks/pretrain_recipe.py), the small preset stays there whatever the learning
rate; it cannot even learn to copy a masked byte from its neighbour (text with every character
doubled) in 300 steps.

``InitRecipe`` changes initial values only (shapes, and so the weights' compatibility with
transformers' ``PerceiverForMaskedLM``, are unchanged):

- routing: position codes (sinusoids over the crop) in a block of the input and latent channels,
  and attention projections that compare them, so that latent ``i`` starts out reading its window
  of ``crop_len / num_latents`` bytes (cross-attention head ``h`` its ``h``-th part) and decoder
  query ``p`` the latents around the one whose window holds ``p`` (head ``h`` at
  ``decoder_offsets[h]`` latents from it);
- ``embed_std``: the byte embedding, which the output logits are tied to, wide enough that the
  logits can express what the decoder reads;
- ``cross_value_std``: what the encoder's cross-attention writes into the latents (its value and
  output projections), large enough not to drown under the latents' own codes;
- ``zero_latent_branches``: the latent self-attention stack starts as the identity (its attention
  output and MLP output projections at zero, as in ReZero-style initialisations), so the bytes each
  latent read arrive at the decoder undiluted; training grows the branches from the first step;
- ``decoder_out_gain``: the decoder's attention output projection scaled up by this factor.

Removed one at a time from the five, routing, ``embed_std`` and ``decoder_out_gain`` each leave
the model on the plateau, and the other two each cost a little (benchmarks/pretrain_recipe.py's
docstring); with all five, on 128-byte crops, the small preset passes a byte-level BERT of
similar size (the README's figures).

``ngrams`` is a second starting point, which classifiers learn from (``benchmarks/
imdb_classifiers.py`` found it): the encoder as a shift-invariant n-gram reader. Latent ``j``
starts out reading the ``num_cross_attention_heads`` bytes from ``stride * j - (heads - 1) // 2``
on (``stride = length / num_latents``), cross-attention head ``h`` exactly one of them, and what
it makes of them does not depend on where they are: the values and the cross-attention block's
output leave the position channels alone, the latents' content part is zero, and the latent stack
starts as the identity. A byte CNN shares its kernel across positions the same way; from
transformers' initialisation "great" at byte 100 and at byte 300 are different features, which
5,000 reviews cannot teach apart, and the classifier stays at chance. In a masked LM the decoder
is routed too: query ``p``'s head ``h`` reads the latent ``decoder_offsets[h]`` windows from the
one at ``p``, through the position codes the latents carry in their first channels (its key
projection removes their mean, which the decoder's LayerNorm shifts with every latent's content;
without that, a query found its latent in about 60% of cases, with it 97%). Without the routed
decoder a masked LM from the n-gram start stays on the plateau; with it it leaves it (``python
benchmarks/pretrain_recipe.py --config jobs/configs/pretrain_demo.yaml``; the README has the
figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from perceiver_core.config import PerceiverConfig
from perceiver_core.model import PerceiverForMaskedLM, PerceiverForSequenceClassification
from perceiver_core.tokenizer import BYTE_OFFSET


@dataclass(frozen=True)
class InitRecipe:
    routing: bool = False
    # Max minus mean attention logit of a routed query: the encoder's on the input, the decoder's
    # on the latents' own codes, before the cross-attention writes into them: on the encoder's
    # output that comes to about 3 for pretrain_small_recipe.yaml. 8 on the output, with keys that
    # ignore the LayerNorm's mean, trained no better (2.83 / 0.265 against 2.82 / 0.269 after
    # make bench-recipe's 600 steps).
    route_sharpness: float = 8.0
    decoder_offsets: tuple[int, ...] = (0,)  # per decoder head, cycled
    code_scale: float = 0.5  # of the latents' position codes
    embed_std: float | None = None
    cross_value_std: float | None = None
    zero_latent_branches: bool = False
    decoder_out_gain: float | None = None
    ngrams: bool = False  # the encoder as a shift-invariant n-gram reader (the module docstring)

    def __post_init__(self) -> None:
        clashing = [k for k in ("routing", "embed_std", "cross_value_std") if getattr(self, k)]
        if self.ngrams and clashing:
            raise ValueError(
                f"ngrams sets the encoder's whole initialisation; drop {', '.join(clashing)}"
            )
        positive = ("route_sharpness", "code_scale", "embed_std", "cross_value_std",
                    "decoder_out_gain")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not self.decoder_offsets:
            raise ValueError("decoder_offsets must name at least one offset")

    @property
    def is_standard(self) -> bool:
        return self == InitRecipe()


def rotation(angle: torch.Tensor) -> torch.Tensor:
    """The linear map taking codes ``[cos a, sin a] / norm`` (one angle per frequency) to
    ``[cos(a + angle), sin(a + angle)] / norm``."""
    half = angle.shape[-1]
    cos, sin, i = torch.cos(angle), torch.sin(angle), torch.arange(half)
    rot = torch.zeros(2 * half, 2 * half)
    rot[i, i], rot[i, i + half] = cos, -sin
    rot[i + half, i], rot[i + half, i + half] = sin, cos
    return rot


def geometric_frequencies(dims: int, length: int) -> torch.Tensor:
    """``dims / 2`` angular frequencies, geometric from one period per ``length`` bytes to nearly
    one per 2 bytes: codes at these tell neighbouring bytes apart anywhere in ``length``."""
    low, high = math.log(2 * math.pi / length), math.log(0.9 * math.pi)
    return torch.exp(torch.linspace(low, high, dims // 2))


def geometric_codes(positions: torch.Tensor, dims: int, length: int) -> torch.Tensor:
    """(N,) positions -> (N, dims) unit-norm codes at ``geometric_frequencies``; the dot product of
    two peaks where the positions are equal."""
    angle = positions[:, None].float() * geometric_frequencies(dims, length)[None, :]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1) / math.sqrt(dims // 2)


def sinusoids(positions: torch.Tensor, dims: int, period: float) -> torch.Tensor:
    """(N,) positions -> (N, dims) codes [cos(2 pi k p / period), sin(...)], k = 1..dims/2, of
    unit norm per row."""
    k = torch.arange(1, dims // 2 + 1, dtype=torch.float32)
    angle = 2 * math.pi * positions[:, None].float() * k[None, :] / period
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1) / math.sqrt(dims // 2)


def shift(dims: int, by: float, period: float) -> torch.Tensor:
    """The linear map taking ``sinusoids(p)`` to ``sinusoids(p - by)``: one rotation per
    frequency."""
    angle = 2 * math.pi * by * torch.arange(1, dims // 2 + 1, dtype=torch.float32) / period
    return rotation(-angle)


def _logit_gap(attn, queries: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """Mean over queries and heads of (max - mean) attention logit."""
    q = attn.q(attn.q_norm(queries))
    k = attn.k((attn.q_norm if attn.kv_norm is None else attn.kv_norm)(keys))
    q = q.view(q.shape[0], heads, -1).transpose(0, 1)
    k = k.view(k.shape[0], heads, -1).transpose(0, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (logits.max(-1).values - logits.mean(-1)).mean()


def qk_per_head(c: PerceiverConfig) -> tuple[int, int]:
    """(encoder cross-attention, MLM decoder) query/key channels per head: the room each head has
    for position codes."""
    return (
        c.cross_attention_qk_channels // c.num_cross_attention_heads,
        c.decoder_qk_channels // c.decoder_num_heads,
    )


def check_fits(c: PerceiverConfig, recipe: InitRecipe, length: int) -> None:
    """Raise ValueError unless ``recipe`` can set up a model of config ``c`` for inputs of
    ``length`` bytes (run on the driver too, so that a config fails when it is loaded)."""
    dq, dqd = qk_per_head(c)
    if recipe.routing and (dq + dqd > c.d_latents or dq > c.d_model or dqd > c.d_model):
        raise ValueError(
            f"routing needs {dq} + {dqd} latent channels and {max(dq, dqd)} input channels for its "
            f"position codes; this model has {c.d_latents} and {c.d_model}"
        )
    if recipe.ngrams and (length % c.num_latents or dq >= min(c.d_model, c.d_latents) or dq > dqd):
        raise ValueError(
            f"ngrams needs num_latents ({c.num_latents}) to divide the input length ({length}), "
            f"fewer position channels per head ({dq}) than d_model ({c.d_model}) and d_latents "
            f"({c.d_latents}), and no more than the decoder's qk channels per head ({dqd})"
        )


@torch.no_grad()
def apply_init(
    model: PerceiverForMaskedLM | PerceiverForSequenceClassification,
    recipe: InitRecipe,
    crop_len: int,
) -> None:
    """Re-initialise ``model`` (freshly built, transformers' initialisation) by ``recipe`` for
    inputs of ``crop_len`` bytes. Deterministic given torch's seed. Only ``ngrams`` applies to a
    classifier."""
    enc, dec = model.encoder, model.decoder
    if isinstance(model, PerceiverForSequenceClassification) and not (
        recipe.ngrams or recipe.is_standard
    ):
        raise ValueError("a classifier's encoder starts either standard or as ngrams")
    check_fits(model.config, recipe, crop_len)
    if recipe.ngrams:
        _ngram_reader(model, crop_len)
        if isinstance(model, PerceiverForMaskedLM):
            _route_ngram_decoder(model, recipe, crop_len)
    if recipe.embed_std is not None:
        enc.embed.weight.normal_(std=recipe.embed_std)
    if recipe.zero_latent_branches:
        for layer in enc.layers:
            layer.attn.out.weight.zero_()
            layer.mlp.fc2.weight.zero_()
    if recipe.decoder_out_gain is not None:
        dec.block.attn.out.weight.mul_(recipe.decoder_out_gain)
    if recipe.cross_value_std is not None:
        for linear in (enc.cross.attn.v, enc.cross.attn.out):
            linear.weight.normal_(std=recipe.cross_value_std)
    if recipe.routing:
        _route(model, recipe, crop_len)


def _route(model: PerceiverForMaskedLM, recipe: InitRecipe, crop_len: int) -> None:
    c = model.config
    enc, dec = model.encoder, model.decoder
    cross, dattn = enc.cross.attn, dec.block.attn
    heads, dheads = c.num_cross_attention_heads, c.decoder_num_heads
    dq, dqd = qk_per_head(c)
    n, length = c.num_latents, crop_len
    window = length / n
    positions = torch.arange(c.max_position_embeddings)
    # Inputs: the position code in channels [0, dq), as large as a byte embedding.
    amplitude = enc.embed.weight.std() * math.sqrt(dq)
    enc.pos_embed.weight.zero_()
    enc.pos_embed.weight[:, :dq] = sinusoids(positions, dq, length) * amplitude
    # Latents: where their window starts in [0, dq), their index in [dq, dq + dqd).
    scale = recipe.code_scale
    starts = torch.arange(n).float() * window
    enc.latents[:, :dq] = sinusoids(starts, dq, length) * math.sqrt(dq) * scale
    enc.latents[:, dq : dq + dqd] = sinusoids(torch.arange(n), dqd, n) * math.sqrt(dqd) * scale
    # Encoder cross-attention head h: the latent's code moved to part h of its window, against
    # the input's position code.
    cross.q.bias.zero_()
    cross.k.bias.zero_()
    for h in range(heads):
        rows = slice(h * dq, (h + 1) * dq)
        cross.q.weight[rows] = 0
        cross.q.weight[rows, :dq] = shift(dq, -(h + 0.5) * window / heads, length)
        cross.k.weight[rows] = 0
        cross.k.weight[rows, :dq] = torch.eye(dq)
    byte_ids = torch.randint(0, c.vocab_size, (length,))
    sample = enc.embed.weight[byte_ids] + enc.pos_embed.weight[:length]
    cross.q.weight.mul_(recipe.route_sharpness / _logit_gap(cross, enc.latents, sample, heads))
    # Decoder query p: the index of the latent whose window holds p, in [0, dqd); head h compares
    # it with the latents' index codes shifted by its offset.
    owner = torch.clamp((positions.float() / window).floor(), max=n - 1)
    dec.queries[:, :dqd] = sinusoids(owner, dqd, n) * math.sqrt(dqd)
    dattn.q.bias.zero_()
    dattn.k.bias.zero_()
    offsets = recipe.decoder_offsets
    for h in range(dheads):
        rows = slice(h * dqd, (h + 1) * dqd)
        dattn.q.weight[rows] = 0
        dattn.q.weight[rows, :dqd] = torch.eye(dqd)
        dattn.k.weight[rows] = 0
        dattn.k.weight[rows, dq : dq + dqd] = shift(dqd, offsets[h % len(offsets)], n)
    gap = _logit_gap(dattn, dec.queries[:length], enc.latents, dheads)  # see route_sharpness
    dattn.q.weight.mul_(recipe.route_sharpness / gap)


NGRAM_SHARPNESS = 20.0  # logit of a head's own byte above the mean: it holds 98-99.7% of the weight
NGRAM_CONTENT_STD = 0.1  # what the cross-attention block writes into the latents


def _ngram_reader(model: PerceiverForMaskedLM | PerceiverForSequenceClassification, length: int):
    c, enc = model.config, model.encoder
    cross, block = enc.cross.attn, enc.cross
    heads, qk = c.num_cross_attention_heads, qk_per_head(c)[0]
    stride = length // c.num_latents
    for module in model.modules():  # unit-variance outputs of unit-variance inputs
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(std=module.in_features**-0.5)
    # Bytes: content in channels [qk, d_model), the position code in [0, qk) at the same scale.
    enc.embed.weight.normal_(std=1.0)
    enc.embed.weight[:, :qk] = 0
    amplitude = enc.embed.weight[:, qk:].std() * math.sqrt(c.d_model)
    positions = torch.arange(c.max_position_embeddings)
    enc.pos_embed.weight.zero_()
    enc.pos_embed.weight[:, :qk] = geometric_codes(positions, qk, length) * amplitude
    # Latent j: where its window starts, and no content of its own.
    enc.latents.zero_()
    starts = torch.arange(c.num_latents) * stride
    enc.latents[:, :qk] = geometric_codes(starts, qk, length) * 0.3
    # Head h: the latent's code moved by h - (heads - 1) // 2 bytes, against the byte's code.
    omega = geometric_frequencies(qk, length)
    for projection in (cross.q, cross.k):
        projection.weight.zero_()
        projection.bias.zero_()
    for h in range(heads):
        rows = slice(h * qk, (h + 1) * qk)
        cross.q.weight[rows, :qk] = rotation(omega * (h - (heads - 1) // 2))
        cross.k.weight[rows, :qk] = torch.eye(qk)
    byte_ids = torch.randint(BYTE_OFFSET, 256 + BYTE_OFFSET, (length,))
    sample = enc.embed.weight[byte_ids] + enc.pos_embed.weight[:length]
    cross.q.weight.mul_(NGRAM_SHARPNESS / _logit_gap(cross, enc.latents, sample, heads))
    # Content in, content out: nothing of the position reaches what the latents read.
    for linear in (cross.v, cross.out, block.mlp.fc1, block.mlp.fc2):
        linear.weight.normal_(std=NGRAM_CONTENT_STD)
    cross.v.weight[:, :qk] = 0
    # The input LayerNorm subtracts a mean that depends on the position code; value rows that sum
    # to zero over the content channels do not see it (the same n-gram at two places then reads
    # within about 1% of the same, 15% without).
    cross.v.weight[:, qk:] -= cross.v.weight[:, qk:].mean(1, keepdim=True)
    cross.out.weight[:qk] = 0
    block.mlp.fc1.weight[:, :qk] = 0
    block.mlp.fc2.weight[:qk] = 0
    for layer in enc.layers:  # the latent stack starts as the identity
        layer.attn.out.weight.zero_()
        layer.mlp.fc2.weight.zero_()
    if isinstance(model, PerceiverForSequenceClassification):
        model.decoder.block.attn.q.weight.zero_()  # the read-out starts as a mean


@torch.no_grad()
def unit_scale_head(model: PerceiverForSequenceClassification) -> None:
    """Re-initialise a classifier's head as ``ngrams`` starts it: every linear layer at
    1/sqrt(fan-in), so that its outputs are on the scale of its inputs, and the query projection
    at zero, so that it reads the exact mean of the latents. For a head put on an n-gram encoder
    when fine-tuning: transformers' initialisation (std 0.02, also close to a mean) passes the
    encoder's features on so weakly that the encoder's first gradients starve and the classifier
    stays at chance (3 epochs on 256 bytes of 5,000 IMDB reviews: 0.544 against 0.636)."""
    for module in model.decoder.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(std=module.in_features**-0.5)
    model.decoder.block.attn.q.weight.zero_()


def _route_ngram_decoder(model: PerceiverForMaskedLM, recipe: InitRecipe, length: int) -> None:
    """Decoder query ``p``'s head ``h`` reads the latent whose n-gram starts
    ``decoder_offsets[h]`` windows from ``p``, through the position codes that ``_ngram_reader``
    left in the latents' first channels (the latent stack starts as the identity, so they reach
    the decoder intact)."""
    c, dattn = model.config, model.decoder.block.attn
    dheads = c.decoder_num_heads
    qk, dqd = qk_per_head(c)
    stride = length // c.num_latents
    positions = torch.arange(c.max_position_embeddings)
    model.decoder.queries[:, :qk] = geometric_codes(positions, qk, length) * math.sqrt(c.d_model)
    omega = geometric_frequencies(qk, length)
    for projection in (dattn.q, dattn.k):
        projection.weight.zero_()
        projection.bias.zero_()
    offsets = recipe.decoder_offsets
    for h in range(dheads):
        rows = slice(h * dqd, h * dqd + qk)
        dattn.q.weight[rows, :qk] = rotation(omega * offsets[h % len(offsets)] * stride)
        dattn.k.weight[rows, :qk] = torch.eye(qk) - 1 / qk
    # The keys are the encoder's output (codes plus what the latents read, layer-normed): the
    # sharpness is measured on it.
    training = model.training
    model.eval()
    latents = model.encoder(torch.randint(BYTE_OFFSET, 256 + BYTE_OFFSET, (1, length)))[0]
    model.train(training)
    gap = _logit_gap(dattn, model.decoder.queries[:length], latents, dheads)
    dattn.q.weight.mul_(NGRAM_SHARPNESS / gap)
