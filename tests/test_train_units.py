"""The pieces of the training pipeline that need neither Ray nor a cluster: config checks, the
schedule and LAMB, data-position bookkeeping, micro-batching, checkpoint state, metric maths."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceiver_core.config import get_preset
from perceiver_core.model import PerceiverForMaskedLM
from perceiver_core.optim import Lamb, OptimizerConfig, lr_factor, parameter_groups
from pipelines.config import ConfigError, config_hash, load_config
from pipelines.data.feed import StreamWindow
from pipelines.train.checkpoint import CheckpointError, TrainState, rng_state, set_rng_state
from pipelines.train.config import HASH_EXCLUDE, PretrainConfig
from pipelines.train.engine import deepspeed_config, resolve_precision
from pipelines.train.metrics import bits_per_byte
from pipelines.train.mlm import masked_lm_sums

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


# -- config ---------------------------------------------------------------------------------------


def test_shipped_configs_load() -> None:
    tiny = load_config(PretrainConfig, CONFIGS / "pretrain_tiny.yaml")
    assert (tiny.train.num_workers, tiny.train.zero_stage, tiny.data.packing.crop_len) == (
        2,
        2,
        128,
    )
    base = load_config(PretrainConfig, CONFIGS / "pretrain_base.yaml")
    assert base.model.perceiver_config() == get_preset("language-perceiver")
    assert (base.train.optimizer.name, base.train.optimizer.lr) == ("lamb", 1.25e-3)
    assert base.train.crops_per_step == 512 and base.data.packing.crop_len == 2048


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.zero_stage=2", "train: optimizer.name: lamb needs whole parameter tensors"),
        ("train.zero_stage=4", "train: zero_stage must be 0, 1, 2 or 3"),
        ("train.optimizer.lr=0", "train.optimizer: lr must be positive"),
        (
            "train.precision=fp8",
            "train.precision: expected one of ['auto', 'bf16', 'fp16', 'fp32']",
        ),
        ("model.preset=huge", "model: preset must be one of"),
        ("model.overrides.d_modle=3", "model: overrides.d_modle: unknown PerceiverConfig field"),
        ("data.packing.crop_len=4096", "data.packing.crop_len (4096) exceeds the model's"),
        ("checkpoint.export_at=[600000]", "checkpoint.export_at: steps [600000] are after"),
        ("train.optimiser.lr=1", "train.optimiser: unknown key; expected one of"),
        ("debug.pause_after_steps=3", "debug: marker_dir must be set with pause_after_steps"),
        ("train.num_workers=[4,2]", "train: num_workers must be a positive number or [min, max]"),
        (
            "train.num_workers=[4,8]",
            "train: micro_batch_size: a batch of 512 does not split into micro-batches of 64 on 5",
        ),
    ],
)
def test_bad_configs_fail_at_load_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, CONFIGS / "pretrain_base.yaml", [override])
    assert message in str(info.value)


def test_continuing_keeps_the_starting_models_own_shapes(tmp_path: Path) -> None:
    # A masked LM whose decoder attention transformers cannot express (kept in config.json's
    # perceiver_core section): continuing it must build that decoder, or its weights do not fit.
    from perceiver_core.hf import save_pretrained
    from pipelines.train.pretrain import resolve_start

    config = get_preset("tiny").replace(decoder_qk_channels=32, decoder_num_heads=2)
    folder = save_pretrained(PerceiverForMaskedLM(config), tmp_path / "mlm")
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain_tiny.yaml", [f"model.init_from={folder}"])
    shapes, start, _ = resolve_start(cfg, tracking_uri=f"file:{tmp_path}/mlruns")
    assert (shapes.decoder_qk_channels, shapes.decoder_num_heads) == (32, 2)
    assert start is not None and start.source == str(folder)


def test_an_elastic_group_keeps_its_global_batch() -> None:
    tiny = CONFIGS / "pretrain_tiny.yaml"
    cfg = load_config(PretrainConfig, tiny, ["train.num_workers=[1,2]", "train.zero_stage=0"])
    assert cfg.train.workers == (1, 2) and cfg.train.elastic
    assert cfg.train.crops_per_step == 64  # the most workers' batch, accumulated by fewer
    with pytest.raises(ConfigError, match="ZeRO-2 checkpoints hold each worker's shard"):
        load_config(PretrainConfig, tiny, ["train.num_workers=[1,2]"])


def test_config_hash_ignores_where_and_how_the_run_is_tracked() -> None:
    a = load_config(PretrainConfig, CONFIGS / "pretrain_tiny.yaml")
    b = load_config(
        PretrainConfig,
        CONFIGS / "pretrain_tiny.yaml",
        ["run.name=other", "run.storage_path=/x", "tracking.experiment=e", "debug.pause_s=1"],
    )
    assert config_hash(a, HASH_EXCLUDE) == config_hash(b, HASH_EXCLUDE)
    c = load_config(PretrainConfig, CONFIGS / "pretrain_tiny.yaml", ["train.optimizer.lr=1e-3"])
    assert config_hash(a, HASH_EXCLUDE) != config_hash(c, HASH_EXCLUDE)


# -- schedule and optimizer -----------------------------------------------------------------------


def test_warmup_then_cosine() -> None:
    cfg = OptimizerConfig(warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, 110, cfg) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(factors[:10]))
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    constant = OptimizerConfig(warmup_steps=0, schedule="constant")
    assert {lr_factor(s, 50, constant) for s in range(50)} == {1.0}


def test_lamb_scales_each_tensor_by_its_trust_ratio() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.zeros(3))  # zero norm: ratio 1, so it still moves
    start_w = w.detach().clone()
    opt = Lamb(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.01
    )
    grad_w, grad_b = torch.randn(4, 3), torch.randn(3)
    w.grad, b.grad = grad_w.clone(), grad_b.clone()
    opt.step()
    # First step: m_hat = g, v_hat = g^2, so Adam's update is g / (|g| + eps), plus decay.
    update = grad_w / (grad_w.abs() + 1e-6) + 0.1 * start_w
    expected = start_w - 0.01 * (start_w.norm() / update.norm()) * update
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(b.detach(), -0.01 * grad_b / (grad_b.abs() + 1e-6))


def test_lamb_trains_a_small_model_and_decay_skips_1d_tensors() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    groups = parameter_groups(model, 0.01)
    assert [p.dim() for p in groups[0]["params"]] == [2, 2]
    assert [p.dim() for p in groups[1]["params"]] == [1, 1] and groups[1]["weight_decay"] == 0.0
    opt = Lamb(groups, lr=0.02)
    x = torch.randn(256, 8)
    y = x.sum(dim=1, keepdim=True)
    losses = []
    for _ in range(200):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_deepspeed_config_and_precision() -> None:
    cfg = deepspeed_config(
        micro_batch_size=4,
        grad_accum_steps=2,
        world_size=3,
        zero_stage=3,
        precision="bf16",
        grad_clip=1.0,
    )
    assert cfg["train_batch_size"] == 24
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert resolve_precision("auto", True) == "bf16"
    assert resolve_precision("auto", False) == "fp16"
    with pytest.raises(ValueError, match="bf16"):
        resolve_precision("bf16", False)


def test_ddp_engine_accumulates_to_the_same_step_as_one_batch(tmp_path: Path) -> None:
    """Two micro-batches of 4 accumulated give the optimizer step of one batch of 8 (one process:
    no process group, so the engine runs the plain module)."""
    from perceiver_core.model import PerceiverForSequenceClassification
    from pipelines.train.engine import DdpEngine

    config = get_preset("tiny", attention_probs_dropout_prob=0.0)
    ids = torch.randint(6, 262, (8, 16))
    labels = torch.randint(0, 2, (8,))
    engines = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = PerceiverForSequenceClassification(config)
        opt = OptimizerConfig(name="adamw", lr=1e-2, warmup_steps=0, schedule="constant")
        engine = DdpEngine(
            model, opt, 10, precision="fp32", grad_clip=1.0, grad_accum_steps=accum, rank=0
        )
        for part in torch.arange(8).chunk(accum):
            engine.backward(engine(input_ids=ids[part], labels=labels[part]).loss)
            assert engine.get_global_grad_norm() is None  # nothing stepped before the last
            engine.step()
        engines.append(engine)
    one, two = engines
    for (name, a), b in zip(
        one.module.state_dict().items(), two.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert one.get_global_grad_norm() == pytest.approx(two.get_global_grad_norm(), rel=1e-5)
    two.save_checkpoint(str(tmp_path), "t")
    torch.manual_seed(1)
    fresh = DdpEngine(
        PerceiverForSequenceClassification(config),
        opt,
        10,
        precision="fp32",
        grad_clip=1.0,
        grad_accum_steps=2,
        rank=0,
    )
    assert fresh.load_checkpoint(str(tmp_path), "t")[0] is not None
    for a, b in zip(
        fresh.module.state_dict().values(), two.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# -- data position and micro-batches --------------------------------------------------------------


def rows(positions: np.ndarray, crop_len: int = 8) -> dict[str, np.ndarray]:
    n = len(positions)
    ids = np.full((n, crop_len), 10, dtype=np.uint16)
    labels = np.full((n, crop_len), -100, dtype=np.int16)
    labels[:, 1] = 10
    return {"input_ids": ids, "labels": labels, "position": positions.astype(np.int64)}


def test_stream_window_serves_each_position_once_in_any_order() -> None:
    blocks = [rows(np.arange(a, b)) for a, b in [(6, 10), (10, 11), (11, 20), (20, 23)]]
    window = StreamWindow(iter(blocks), start=6)
    # Two ranks of a step, the second asking first; a micro-batch spanning three blocks.
    assert window.take(10, 4)["position"].tolist() == [10, 11, 12, 13]
    assert window.take(6, 4)["position"].tolist() == [6, 7, 8, 9]
    assert window.first == 11  # the first two blocks are all served and dropped
    assert window.take(14, 8)["input_ids"].shape == (8, 8)
    with pytest.raises(RuntimeError, match="served already"):
        window.take(8, 2)
    with pytest.raises(EOFError, match="ended at position 23"):
        window.take(22, 2)


def test_a_failed_stream_gives_every_rank_its_cause() -> None:
    """The rank that reads the failure gets it; the next ones get it as their cause, not a
    stream that seems to have ended (what rank 0 reported when Ray Data timed out for rank 1)."""

    def stalled() -> Iterator[dict[str, np.ndarray]]:
        yield rows(np.arange(0, 4))
        raise TimeoutError("Dataset execution made no progress for at least 1800s")

    window = StreamWindow(stalled(), start=0)
    assert window.take(0, 4)["position"].tolist() == [0, 1, 2, 3]
    with pytest.raises(TimeoutError, match="no progress"):
        window.take(4, 4)
    with pytest.raises(RuntimeError, match="failed at position 4: Dataset execution") as info:
        window.take(8, 4)
    assert isinstance(info.value.__cause__, TimeoutError)


def test_stream_window_refuses_a_gap_in_the_stream() -> None:
    window = StreamWindow(iter([rows(np.arange(0, 4)), rows(np.arange(5, 9))]), start=0)
    with pytest.raises(RuntimeError, match="skipped from 4 to 5"):
        window.take(2, 4)


# -- checkpoint state -----------------------------------------------------------------------------


def test_train_state_round_trips_and_refuses_other_versions() -> None:
    progress = {"evals": 2, "best_score": 0.5, "best_step": 10}
    state = TrainState(12, "run", "hash", 2, progress, {"position": {"watermark": 7, "extra": []}})
    assert TrainState.from_json(state.to_json()) == state
    with pytest.raises(CheckpointError, match="checkpoint format 1 is not 2"):
        TrainState.from_json(state.to_json().replace('"format_version": 2', '"format_version": 1'))


def test_the_checkpoint_key_comes_from_the_environment_or_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    from pipelines.signing import SigningError, checkpoint_key

    monkeypatch.setenv("PERCEIVER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("PERCEIVER_CHECKPOINT_KEY", raising=False)
    key = checkpoint_key()
    path = tmp_path / "config" / "checkpoint.key"
    assert len(key) == 64 and checkpoint_key() == key  # made once, then read
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.key"]  # no temporary left
    monkeypatch.setenv("PERCEIVER_CHECKPOINT_KEY", "from-a-secret")
    assert checkpoint_key() == b"from-a-secret"
    monkeypatch.delenv("PERCEIVER_CHECKPOINT_KEY")
    path.write_text("")
    with pytest.raises(SigningError, match=r"checkpoint\.key is empty"):
        checkpoint_key()


def test_rng_state_is_json_and_restores_every_generator() -> None:
    import json
    import random

    saved = json.loads(json.dumps(rng_state()))  # only JSON values: nothing to unpickle
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(draws[0], again[0])
    assert np.array_equal(draws[1], again[1]) and draws[2] == again[2]


# -- metrics --------------------------------------------------------------------------------------


def test_validation_sums_match_the_model_loss() -> None:
    torch.manual_seed(0)
    model = PerceiverForMaskedLM(get_preset("tiny")).eval()
    ids = torch.randint(6, 262, (3, 32))
    labels = torch.full_like(ids, -100)
    labels[0, :5], labels[1, 3:4], labels[2, 10:20] = ids[0, :5], ids[1, 3:4], ids[2, 10:20]
    with torch.no_grad():
        out = model(ids, labels=labels)
    nll, correct, count = masked_lm_sums(out.logits, out.targets).tolist()
    assert count == 16 and 0 <= correct <= 16
    assert nll / count == pytest.approx(out.loss.item(), rel=1e-5)
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)


def test_the_job_rejects_a_bad_config_before_starting_anything() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.pretrain",
            "--config",
            str(CONFIGS / "pretrain_tiny.yaml"),
            "--set",
            "train.optimizer.lrr=1",
        ],
        cwd=CONFIGS.parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "train.optimizer.lrr: unknown key; expected one of" in done.stderr
    assert "ray" not in done.stdout.lower()
