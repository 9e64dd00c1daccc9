"""perceiver_core.init: the pretraining recipe's initialisation routes what it promises, changes
values only (transformers still loads the weights and gives the same logits), and nothing when
left at its defaults."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from perceiver_core import hf
from perceiver_core.config import PerceiverConfig, get_preset
from perceiver_core.init import InitRecipe, apply_init, unit_scale_head
from perceiver_core.model import PerceiverForMaskedLM, PerceiverForSequenceClassification

RECIPE = InitRecipe(
    routing=True,
    decoder_offsets=(0, -1, 1, -2, 2, 0, -1, 1),
    embed_std=0.3,
    cross_value_std=0.07,
    zero_latent_branches=True,
    decoder_out_gain=10.0,
)
CROP = 96


def routed(seed: int = 0) -> PerceiverForMaskedLM:
    torch.manual_seed(seed)
    model = PerceiverForMaskedLM(get_preset("tiny", num_latents=12))
    apply_init(model, RECIPE, CROP)
    return model.eval()


def attention(attn, queries: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads, queries, keys) attention weights of one example."""
    q = attn.q(attn.q_norm(queries))
    k = attn.k((attn.q_norm if attn.kv_norm is None else attn.kv_norm)(keys))
    q = q.view(q.shape[0], heads, -1).transpose(0, 1)
    k = k.view(k.shape[0], heads, -1).transpose(0, 1)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


@torch.no_grad()
def test_latents_read_their_windows_and_queries_the_latents_holding_them() -> None:
    model = routed()
    c, enc, dec = model.config, model.encoder, model.decoder
    window = CROP // c.num_latents  # 8 bytes
    ids = torch.randint(6, c.vocab_size, (CROP,), generator=torch.Generator().manual_seed(1))
    inputs = enc.embed(ids) + enc.pos_embed.weight[:CROP]
    read = attention(enc.cross.attn, enc.latents, inputs, c.num_cross_attention_heads)
    # Latent i reads its own window (uniform attention would put 1/12 of it there).
    mean = read.mean(0)
    for i in range(c.num_latents):
        assert i * window <= int(mean[i].argmax()) < (i + 1) * window, i
        assert float(mean[i, i * window : (i + 1) * window].sum()) > 0.4, i
    # Decoder head h attends to the latent decoder_offsets[h] away from the one holding p.
    latents = enc(ids[None])[0]
    looked = attention(dec.block.attn, dec.queries[:CROP], latents, c.decoder_num_heads).argmax(-1)
    owner = torch.arange(CROP) // window
    for h, offset in enumerate(RECIPE.decoder_offsets):
        target = owner + offset
        inside = (target >= 0) & (target < c.num_latents)
        hit = (looked[h][inside] == target[inside]).float().mean()
        assert hit >= 0.9, (h, offset, float(hit))


@torch.no_grad()
@pytest.mark.parametrize("start", ["routing", "ngrams"])
def test_a_masked_byte_starts_out_depending_on_its_neighbours_not_on_far_bytes(start) -> None:
    """What the plateau lacks: at initialisation, the output at p moves with the byte beside it."""
    model = routed() if start == "routing" else ngram_masked_lm()
    ids = torch.randint(6, 262, (4, 64), generator=torch.Generator().manual_seed(2))
    base = model(ids, decode="all").logits[:, 20]
    moved = {}
    for offset in (1, 40):
        other = ids.clone()
        other[:, 20 + offset] = torch.where(ids[:, 20 + offset] == 38, 107, 38)
        moved[offset] = float((model(other, decode="all").logits[:, 20] - base).norm(dim=-1).mean())
    assert moved[1] > 5 * moved[40], moved


@pytest.mark.parametrize("start", ["routing", "ngrams"])
def test_values_change_not_shapes_and_transformers_gives_the_same_logits(tmp_path, start) -> None:
    model = routed() if start == "routing" else ngram_masked_lm()
    crop = 64
    reference = PerceiverForMaskedLM(model.config).state_dict()
    state = model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    out = hf.save_pretrained(model, tmp_path / "routed")
    theirs = transformers.PerceiverForMaskedLM.from_pretrained(out).eval()
    ids = torch.randint(6, 262, (2, crop), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(inputs=ids).logits[:, :crop]
        got = model(ids, decode="all").logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_the_same_seed_gives_the_same_weights_and_the_default_recipe_changes_nothing() -> None:
    first, second = routed(seed=5).state_dict(), routed(seed=5).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(get_preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_init(model, InitRecipe(), CROP)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_recipes_are_refused_with_the_key() -> None:
    with pytest.raises(ValueError, match="embed_std"):
        InitRecipe(embed_std=0)
    with pytest.raises(ValueError, match="decoder_offsets"):
        InitRecipe(decoder_offsets=())
    torch.manual_seed(0)
    narrow = PerceiverForMaskedLM(
        get_preset("tiny", d_latents=32, v_channels=32)
    )  # no room for the codes
    with pytest.raises(ValueError, match="routing needs"):
        apply_init(narrow, InitRecipe(routing=True), CROP)


NGRAM_LM = InitRecipe(
    ngrams=True, decoder_offsets=(0, -1, 1, -2, 2, 0, -1, 1), decoder_out_gain=0.1
)


def ngram_config(length: int = 64, stride: int = 4) -> PerceiverConfig:
    return PerceiverConfig(
        max_position_embeddings=length, d_model=64, num_latents=length // stride, d_latents=128,
        num_self_attends_per_block=1, num_self_attention_heads=4, num_cross_attention_heads=8,
        qk_channels=128, v_channels=128, cross_attention_widening_factor=2,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip


def ngram_masked_lm(seed: int = 0) -> PerceiverForMaskedLM:
    torch.manual_seed(seed)
    model = PerceiverForMaskedLM(ngram_config())
    apply_init(model, NGRAM_LM, 64)
    return model.eval()


def ngram_classifier(ngrams: bool, length: int = 64, stride: int = 4):
    torch.manual_seed(0)
    model = PerceiverForSequenceClassification(ngram_config(length, stride))
    if ngrams:
        apply_init(model, InitRecipe(ngrams=True), length)
    return model.eval()


@torch.no_grad()
def test_ngrams_latents_read_their_own_bytes_the_same_way_wherever_they_are() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 259, (1, 64), generator=g)
    changed = ids.clone()
    changed[0, 30] = (ids[0, 30] + 4) % 256 + 3
    # Four random bytes in front: every byte moves one latent's stride along.
    shifted = torch.cat([torch.randint(3, 259, (1, 4), generator=g), ids[:, :-4]], dim=1)
    for ngrams in (True, False):
        model = ngram_classifier(ngrams)
        z = model.encoder(ids)[0, :, 16:]  # the content channels (16 position channels per head)
        moved = (model.encoder(changed)[0, :, 16:] - z).norm(dim=-1) / z.norm(dim=-1)
        z_shifted = model.encoder(shifted)[0, :, 16:]
        # Latents 1-13 read inside the input either way (latent j: bytes 4j - 3 ... 4j + 4).
        drift = (z_shifted[2:15] - z[1:14]).norm(dim=-1) / z[1:14].norm(dim=-1)
        if ngrams:  # byte 30 is in the windows of latents 7 (25-32) and 8 (29-36) only
            assert moved[7] > 0.2 and moved[8] > 0.2
            assert moved[[i for i in range(16) if i not in (7, 8)]].max() < 1e-3
            assert drift.max() < 0.05
        else:  # transformers' initialisation: every latent reads a bit of everything, by place
            assert moved.min() > 0.01 and drift.mean() > 0.5
        logits = model(ids).logits
        assert torch.isfinite(logits).all()
    # The read-out starts as the mean of the latents.
    assert not ngram_classifier(True).decoder.block.attn.q.weight.any()


@torch.no_grad()
def test_an_ngram_masked_lms_decoder_reads_the_latents_around_each_byte() -> None:
    """Without this routing a masked LM from the n-gram start stays on the byte-unigram plateau:
    its decoder queries, random, read the same mean of the latents wherever they are."""
    model = ngram_masked_lm()
    c, enc, dec = model.config, model.encoder, model.decoder
    ids = torch.randint(6, c.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    weights = attention(dec.block.attn, dec.queries[:64], enc(ids)[0], c.decoder_num_heads)
    starts = torch.arange(0, 64, 4)  # byte 4j starts latent j's window (stride 4)
    for h, offset in enumerate(NGRAM_LM.decoder_offsets):
        target = starts // 4 + offset
        inside = (target >= 0) & (target < c.num_latents)
        read = weights[h, starts[inside], target[inside]]
        assert read.min() > 0.5, (h, offset, read.min())


def test_ngrams_refuses_what_it_cannot_do() -> None:
    with pytest.raises(
        ValueError, match="ngrams sets the encoder's whole initialisation; drop routing"
    ):
        InitRecipe(ngrams=True, routing=True)
    model = ngram_classifier(False, length=64, stride=4)
    with pytest.raises(ValueError, match=r"num_latents \(16\) to divide the input length \(60\)"):
        apply_init(model, InitRecipe(ngrams=True), 60)
    with pytest.raises(
        ValueError, match="a classifier's encoder starts either standard or as ngrams"
    ):
        apply_init(model, InitRecipe(embed_std=0.5), 64)


def test_a_pretraining_config_whose_model_cannot_take_its_init_fails_at_load() -> None:
    from pipelines.config import ConfigError, load_config
    from pipelines.train.config import PretrainConfig

    tiny = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "pretrain_tiny.yaml"
    ngrams = ["model.init.ngrams=true"]
    assert load_config(PretrainConfig, tiny, ngrams).model.init.ngrams
    with pytest.raises(ConfigError, match=r"model.init: ngrams needs num_latents \(12\)"):
        load_config(PretrainConfig, tiny, [*ngrams, "model.overrides.num_latents=12"])
    with pytest.raises(ConfigError, match="drop routing"):
        load_config(PretrainConfig, tiny, [*ngrams, "model.init.routing=true"])


def test_a_unit_scale_head_reads_the_latents_mean_at_their_scale() -> None:
    """``unit_scale_head`` (the head a classifier gets on an n-gram encoder): the logits depend on
    the latents' mean only (reordering them changes nothing) and vary between inputs as much as
    the latents do; transformers' head passes them on hundreds of times more weakly."""
    torch.manual_seed(0)
    model = PerceiverForSequenceClassification(get_preset("tiny", num_labels=2)).eval()
    latents = torch.randn(16, model.config.num_latents, model.config.d_latents)
    shuffled = latents[:, torch.randperm(latents.shape[1])]
    with torch.no_grad():
        standard = model.decoder(latents).std(0).mean()
    unit_scale_head(model)
    with torch.no_grad():
        logits = model.decoder(latents)
        assert torch.allclose(logits, model.decoder(shuffled), atol=1e-5)
        unit = logits.std(0).mean()
    assert unit > 0.1 and unit > 30 * standard, (float(unit), float(standard))
