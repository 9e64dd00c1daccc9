"""Our model gives transformers' numbers for the same weights, and the weights move both ways."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from perceiver_core import hf
from perceiver_core.config import PerceiverConfig, get_preset
from perceiver_core.model import PerceiverForMaskedLM, PerceiverForSequenceClassification

ATOL = 1e-4


def hf_config(config: PerceiverConfig, architecture: str) -> transformers.PerceiverConfig:
    return transformers.PerceiverConfig(**hf.config_to_hf(config, architecture))


def twin_models(config: PerceiverConfig, task: str, seed: int = 0):
    """Our model with random weights, and a transformers model holding the same weights."""
    torch.manual_seed(seed)
    if task == "mlm":
        ours = PerceiverForMaskedLM(config)
        theirs = transformers.PerceiverForMaskedLM(hf_config(config, "PerceiverForMaskedLM"))
    else:
        ours = PerceiverForSequenceClassification(config)
        theirs = transformers.PerceiverForSequenceClassification(
            hf_config(config, "PerceiverForSequenceClassification")
        )
    # Biases are zero at init; randomise them so a swapped or dropped bias shows up.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.02)
    missing, unexpected = theirs.load_state_dict(hf.ours_to_hf(ours.state_dict()), strict=True)
    assert not missing and not unexpected
    return ours.eval(), theirs.eval()


def random_batch(config: PerceiverConfig, batch: int, length: int, padded: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        for row in range(1, batch):  # row 0 stays full; the others end with padding
            keep = int(length * (1 - 0.3 * row / batch))
            ids[row, keep:] = 0
            mask[row, keep:] = 0
    return ids, mask


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_mlm_logits_match_transformers(preset: str, padded: bool) -> None:
    config = get_preset(preset)
    ours, theirs = twin_models(config, "mlm")
    length = min(config.max_position_embeddings, 96)
    ids, mask = random_batch(config, 3, length, padded)
    with torch.no_grad():
        expected = theirs(inputs=ids, attention_mask=mask).logits[:, :length]
        got = ours(ids, mask, decode="all").logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_classifier_logits_match_transformers(num_labels: int, padded: bool) -> None:
    config = get_preset("tiny", num_labels=num_labels)
    ours, theirs = twin_models(config, "cls")
    ids, mask = random_batch(config, 4, config.max_position_embeddings, padded)
    with torch.no_grad():
        expected = theirs(inputs=ids, attention_mask=mask).logits
        got = ours(ids, mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_language_perceiver_preset_matches_transformers() -> None:
    """The 201M deepmind/language-perceiver shapes, MLM and classifier, padded input."""
    config = get_preset("language-perceiver")
    ours, theirs = twin_models(config, "mlm")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    ids, mask = random_batch(config, 2, 2048, padded=True)
    with torch.no_grad():
        expected = theirs(inputs=ids, attention_mask=mask).logits
        got = ours(ids, mask, decode="all").logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    del theirs
    # The classifier head on the same encoder weights.
    cls_theirs = transformers.PerceiverForSequenceClassification(
        hf_config(config, "PerceiverForSequenceClassification")
    ).eval()
    cls_ours = PerceiverForSequenceClassification(config).eval()
    hf.load_into(cls_ours, cls_theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            cls_ours(ids, mask).logits,
            cls_theirs(inputs=ids, attention_mask=mask).logits,
            atol=ATOL,
            rtol=0,
        )


def test_decoding_masked_positions_equals_decoding_all() -> None:
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(config).eval()
    ids, mask = random_batch(config, 3, 64, padded=True)
    labels = torch.full_like(ids, -100)
    labels[0, [3, 10, 40]] = ids[0, [3, 10, 40]]
    labels[2, [5]] = ids[2, [5]]  # row 1 has no labels at all
    with torch.no_grad():
        full = model(ids, mask, labels, decode="all")
        sub = model(ids, mask, labels, decode="masked")
    assert sub.logits.shape == (3, 3, config.vocab_size)
    # The labels at the decoded positions; -100 where a row decoded fewer than the others.
    valid = sub.targets != -100
    assert valid.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    for row in range(3):
        for j in range(3):
            if valid[row, j]:
                pos = sub.positions[row, j]
                torch.testing.assert_close(
                    sub.logits[row, j], full.logits[row, pos], atol=1e-5, rtol=0
                )
    torch.testing.assert_close(sub.loss, full.loss, atol=1e-5, rtol=0)


def test_save_pretrained_loads_in_transformers(tmp_path) -> None:
    for task, hf_cls in (
        ("mlm", transformers.PerceiverForMaskedLM),
        ("cls", transformers.PerceiverForSequenceClassification),
    ):
        config = get_preset("tiny", num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
        ours, _ = twin_models(config, task)
        out = hf.save_pretrained(ours, tmp_path / task)
        assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
        theirs = hf_cls.from_pretrained(out).eval()
        ids, mask = random_batch(config, 2, 50, padded=True)
        with torch.no_grad():
            expected = theirs(inputs=ids, attention_mask=mask).logits
            got = ours(ids, mask).logits if task == "cls" else ours(ids, mask, decode="all").logits
        torch.testing.assert_close(got, expected[:, : got.shape[1]], atol=ATOL, rtol=0)
        if task == "cls":
            assert theirs.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
        tokenizer = transformers.PerceiverTokenizer.from_pretrained(out)
        assert tokenizer("héllo").input_ids == [4, 110, 201, 175, 114, 114, 117, 5]


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_from_pretrained_reads_transformers_directories(tmp_path, fmt: str) -> None:
    config = get_preset("tiny")
    ours, theirs = twin_models(config, "mlm")
    if fmt == "sharded":
        theirs.save_pretrained(tmp_path, max_shard_size="50KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    elif fmt == "safetensors":
        theirs.save_pretrained(tmp_path)
    else:  # the layout deepmind/language-perceiver ships: config.json + pytorch_model.bin
        theirs.config.to_json_file(tmp_path / "config.json")
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = hf.from_pretrained(PerceiverForMaskedLM, tmp_path).eval()
    assert loaded.config == config.replace(
        id2label=loaded.config.id2label,
        attention_probs_dropout_prob=loaded.config.attention_probs_dropout_prob,
    )
    ids, mask = random_batch(config, 2, 40, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, mask, decode="all").logits,
            ours(ids, mask, decode="all").logits,
            atol=1e-6,
            rtol=0,
        )


def test_pickled_checkpoints_are_not_executed(tmp_path) -> None:
    class Exploit:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    config = get_preset("tiny")
    (tmp_path / "config.json").write_text(
        json.dumps(hf.config_to_hf(config, "PerceiverForMaskedLM"))
    )
    torch.save({"payload": Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"\(exec\); the file may be malicious and was not loaded"):
        hf.from_pretrained(PerceiverForMaskedLM, tmp_path)


def test_mlm_checkpoint_into_classifier_keeps_encoder(tmp_path) -> None:
    config = get_preset("tiny")
    mlm, _ = twin_models(config, "mlm")
    hf.save_pretrained(mlm, tmp_path)
    cls = hf.from_pretrained(PerceiverForSequenceClassification, tmp_path, num_labels=5)
    assert cls.config.num_labels == 5 and cls.decoder.adapter.proj.out_features == 5
    for key, value in mlm.encoder.state_dict().items():
        torch.testing.assert_close(cls.encoder.state_dict()[key], value, atol=0, rtol=0)
    with pytest.raises(ValueError, match="lacks parameters"):
        hf.from_pretrained(PerceiverForSequenceClassification, tmp_path, strict=True)


def test_unknown_checkpoint_keys_fail_loudly() -> None:
    with pytest.raises(ValueError, match="unexpected keys"):
        hf.hf_to_ours({"perceiver.input_preprocessor.conv.weight": torch.zeros(1)})


def test_training_losses_match_transformers_for_20_steps() -> None:
    config = get_preset("tiny", attention_probs_dropout_prob=0.0)
    ours, theirs = twin_models(config, "mlm")
    ours.train()
    theirs.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(7)
    length = config.max_position_embeddings
    for step in range(20):
        ids = torch.randint(6, config.vocab_size, (4, length), generator=g)
        selected = torch.rand(4, length, generator=g) < 0.15
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        inputs = torch.where(selected, torch.full_like(ids, 3), ids)
        mask = torch.ones_like(ids)
        loss_ours = ours(inputs, mask, labels).loss  # decodes the masked positions only
        loss_theirs = theirs(inputs=inputs, attention_mask=mask, labels=labels).loss
        assert abs(loss_ours.item() - loss_theirs.item()) < 1e-3, f"step {step}"
        for opt, loss in ((opt_ours, loss_ours), (opt_theirs, loss_theirs)):
            opt.zero_grad()
            loss.backward()
            opt.step()
