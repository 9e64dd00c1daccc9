"""perceiver_core.init: the pretraining recipe's initialisation routes what it promises, changes
values only (transformers still loads the weights and gives the same logits), and nothing when
left at its defaults."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from perceiver_core import hf
from perceiver_core.config import get_preset
from perceiver_core.init import InitRecipe, apply_init
from perceiver_core.model import PerceiverForMaskedLM

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
def test_a_masked_byte_starts_out_depending_on_its_neighbours_not_on_far_bytes() -> None:
    """What the plateau lacks: at initialisation, the output at p moves with the byte beside it."""
    model = routed()
    ids = torch.randint(6, 262, (4, CROP), generator=torch.Generator().manual_seed(2))
    base = model(ids, decode="all").logits[:, 40]
    moved = {}
    for offset in (1, 40):
        other = ids.clone()
        other[:, 40 + offset] = torch.where(ids[:, 40 + offset] == 38, 107, 38)
        moved[offset] = float((model(other, decode="all").logits[:, 40] - base).norm(dim=-1).mean())
    assert moved[1] > 5 * moved[40], moved


def test_values_change_not_shapes_and_transformers_gives_the_same_logits(tmp_path) -> None:
    model = routed()
    reference = PerceiverForMaskedLM(model.config).state_dict()
    state = model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    out = hf.save_pretrained(model, tmp_path / "routed")
    theirs = transformers.PerceiverForMaskedLM.from_pretrained(out).eval()
    ids = torch.randint(6, 262, (2, CROP), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(inputs=ids).logits[:, :CROP]
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
