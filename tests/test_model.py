"""The model's own behaviour: configs, training modes, and the FLOPs count."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from perceiver_core.config import PRESETS, PerceiverConfig, get_preset
from perceiver_core.flops import gpu_peak_flops, mfu, peak_flops, step_flops
from perceiver_core.model import (
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    compile_blocks,
    count_parameters,
    masked_positions,
)


def mlm_batch(config: PerceiverConfig, batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, config.vocab_size, (batch, length), generator=g)
    selected = torch.rand(batch, length, generator=g) < 0.15
    selected[:, 0] = True  # every row has a target
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return torch.where(selected, torch.full_like(ids, 3), ids), labels


def test_language_perceiver_preset_has_201m_parameters() -> None:
    # Counting on the meta device builds no weights: the check is instant.
    with torch.device("meta"):
        model = PerceiverForMaskedLM(get_preset("language-perceiver"))
    assert round(count_parameters(model) / 1e6, 1) == 201.1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("d_latents", 0, "positive int"),
        ("v_channels", 640, "must equal d_latents"),
        ("num_self_attention_heads", 7, "not divisible"),
        ("hidden_act", "relu", "only 'gelu'"),
        ("cross_attention_shape_for_attention", "x", "'kv' or 'q'"),
    ],
)
def test_bad_configs_fail_with_the_field_name(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **{field: value})


def test_unknown_preset_and_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match=r"unknown keys \['d_modle'\]"):
        PerceiverConfig.from_dict({"d_modle": 3})
    assert PerceiverConfig.from_dict(PRESETS["small"].to_dict()) == PRESETS["small"]


def test_inputs_longer_than_positions_are_rejected() -> None:
    config = get_preset("tiny")
    model = PerceiverForMaskedLM(config)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.zeros(1, config.max_position_embeddings + 1, dtype=torch.long))


def test_masked_positions_left_packs_each_rows_labels() -> None:
    labels = torch.tensor([[-100, 7, -100, 9], [-100, -100, -100, -100], [5, -100, -100, 6]])
    positions, valid = masked_positions(labels)
    assert positions.tolist() == [[1, 3], [0, 0], [0, 3]]
    assert valid.tolist() == [[True, True], [False, False], [True, True]]


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    config = get_preset("tiny", attention_probs_dropout_prob=0.0)
    ids, labels = mlm_batch(config, 2, 64)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PerceiverForMaskedLM(config.replace(activation_checkpointing=checkpointing))
        model.train()(ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)


def test_trains_under_bf16_autocast() -> None:
    """bf16 autocast keeps fp32 weights and loss, learns, and tracks the fp32 run closely."""
    config = get_preset("tiny", attention_probs_dropout_prob=0.0)
    ids, labels = mlm_batch(config, 8, 64)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = PerceiverForMaskedLM(config).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(30):  # one batch, seen again and again: the loss must fall
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(ids, labels=labels)
            assert out.logits.dtype == dtype and out.loss.dtype == torch.float32
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs[dtype] = losses
    bf16, fp32 = runs[torch.bfloat16], runs[torch.float32]
    assert bf16[-1] < bf16[0] - 1.0
    assert abs(bf16[-1] - fp32[-1]) < 0.05 * fp32[-1]


def test_classifier_regression_and_classification_losses() -> None:
    torch.manual_seed(0)
    ids = torch.randint(6, 262, (4, 32))
    reg = PerceiverForSequenceClassification(get_preset("tiny", num_labels=1))
    out = reg(ids, labels=torch.tensor([0.5, 1.0, 2.0, 3.0]))
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(
        out.loss, ((out.logits[:, 0] - torch.tensor([0.5, 1, 2, 3])) ** 2).mean()
    )
    cls = PerceiverForSequenceClassification(get_preset("tiny", num_labels=3))
    out = cls(ids, labels=torch.tensor([0, 2, 1, 0]))
    torch.testing.assert_close(
        out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1, 0]))
    )


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("decode", ["all", "masked"])
def test_flops_count_matches_torch_flop_counter(preset: str, decode: str) -> None:
    config = get_preset(preset)
    model = PerceiverForMaskedLM(config)
    ids, labels = mlm_batch(config, 2, 100)
    positions = 100 if decode == "all" else int((labels != -100).sum(dim=1).max())
    with FlopCounterMode(display=False) as forward_only:
        model(ids, labels=labels, decode=decode)
    with FlopCounterMode(display=False) as train_step:
        model(ids, labels=labels, decode=decode).loss.backward()
    expected = step_flops(config, 2, 100, decoded_positions=positions)
    assert forward_only.get_total_flops() == expected.forward
    assert train_step.get_total_flops() == expected.total
    assert (
        step_flops(config, 2, 100, decoded_positions=positions, backward=False).total
        == expected.forward
    )


def test_flops_count_for_the_classifier() -> None:
    config = get_preset("tiny", num_labels=3)
    model = PerceiverForSequenceClassification(config)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(6, 262, (3, 50)), labels=torch.tensor([0, 1, 2])).loss.backward()
    assert counter.get_total_flops() == step_flops(config, 3, 50, task="classification").total


def test_the_mfu_peak_is_a_known_gpus_or_measured() -> None:
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert gpu_peak_flops("NVIDIA H200", torch.float32) == 989e12 / 2  # TF32
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080", torch.bfloat16) is None
    # On a CPU: what a 1024 x 1024 matmul achieves, at least what a single thread's scalar code
    # would (1 GFLOP/s) and at most what any CPU this runs on could (100 TFLOP/s).
    assert 1e9 < peak_flops("cpu", torch.float32) < 1e14


def test_mfu_is_achieved_over_peak() -> None:
    assert mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 1e12)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_numbers() -> None:
    config = get_preset("tiny", attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    eager = PerceiverForMaskedLM(config)
    compiled = PerceiverForMaskedLM(config)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    for seed in (0, 1):  # two batches with different numbers of masked positions
        ids, labels = mlm_batch(config, 2, 64, seed=seed)
        expected, got = eager(ids, labels=labels), compiled(ids, labels=labels)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
        got.loss.backward()
    assert all(p.grad is not None for p in compiled.parameters())
