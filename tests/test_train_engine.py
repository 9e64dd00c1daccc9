"""The DeepSpeed engine on CPU, one process: mixed-precision training and the consolidated fp32
export. Each case runs in a subprocess, because DeepSpeed's communication setup is once per
process (and must not leak into the test session's Ray driver)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fixtures_train import run_single_process_script

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch
    from perceiver_core.config import get_preset
    from perceiver_core.model import PerceiverForMaskedLM
    from pipelines.train.engine import (
        create_engine, deepspeed_config, full_fp32_state_dict, global_grad_norm,
        needs_manual_grad_norm,
    )
    from perceiver_core.optim import OptimizerConfig

    def case(stage, precision, optimizer):
        torch.manual_seed(0)
        model = PerceiverForMaskedLM(get_preset("tiny", attention_probs_dropout_prob=0.0))
        cfg = deepspeed_config(micro_batch_size=4, grad_accum_steps=2, world_size=1,
                               zero_stage=stage, precision=precision, grad_clip=1.0)
        engine = create_engine(model, cfg, OptimizerConfig(name=optimizer, lr=1e-2, warmup_steps=2), 10)
        ids = torch.randint(6, 262, (4, 64))
        labels = torch.where(torch.rand(4, 64) < 0.2, ids, torch.full_like(ids, -100))
        losses, norms = [], []
        for step in range(6):
            for _ in range(2):
                out = engine(ids, labels=labels)
                engine.backward(out.loss)
                manual = needs_manual_grad_norm(engine) and engine.is_gradient_accumulation_boundary()
                norm = global_grad_norm(engine) if manual else None
                engine.step()
            norms.append(norm if norm is not None else global_grad_norm(engine))
            losses.append(out.loss.item())
        state = full_fp32_state_dict(engine, 0)
        module = {k: v.detach().float() for k, v in engine.module.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="t")
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            reference = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="t") if stage else None
        result = {
            "losses": losses,
            "norms": norms,
            "lr": engine.get_lr()[0],
            "dtypes": sorted({str(v.dtype) for v in state.values()}),
            "max_diff_module": max((state[k] - module[k]).abs().max().item() for k in state),
            "max_diff_reference": None if reference is None else
                max((state[k] - reference[k].float()).abs().max().item() for k in state),
        }
        return result

    cases = json.loads(sys.argv[1])
    print("RESULT" + json.dumps([case(*c) for c in cases]))
    """
)


CASES = [(0, "bf16", "lamb"), (0, "fp32", "lamb"), (2, "bf16", "adamw"), (3, "bf16", "adamw")]


def shm_build_lock() -> Path:
    """Where torch keeps the build lock of DeepSpeed's ``deepspeed_shm_comm`` op (CPU builds)."""
    import torch

    from pipelines.train.engine import extension_build_root

    assert torch.version.cuda is None, "the CPU build of torch is what the tests run on"
    version = f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_cpu"
    return extension_build_root() / version / "deepspeed_shm_comm" / "lock"


@pytest.fixture(scope="module")
def results() -> dict[tuple[int, str, str], dict]:
    """All cases in one subprocess: DeepSpeed starts once and builds a new engine per case. It
    starts after a first run that was killed while it built DeepSpeed's C++ op: that run's lock,
    an hour old, is still there (torch would wait for it forever)."""
    lock = shm_build_lock()
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    outcomes = run_single_process_script(SCRIPT, json.dumps(CASES))
    return dict(zip(CASES, outcomes, strict=True))


@pytest.mark.slow
def test_a_lock_left_by_a_killed_op_build_does_not_hang_the_next_run(results: dict) -> None:
    assert len(results) == len(CASES)  # the engines started: the stale lock was removed
    assert not shm_build_lock().exists()  # and the build that followed released its own


def test_a_build_lock_younger_than_a_build_is_left_to_its_build(tmp_path: Path) -> None:
    from pipelines.train.engine import clear_stale_build_locks

    fresh, stale = (tmp_path / "py311_cpu" / f"deepspeed_{n}" / "lock" for n in ("a", "b"))
    for lock in (fresh, stale):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(stale, (time.time() - 900, time.time() - 900))
    clear_stale_build_locks(tmp_path)
    assert fresh.exists() and not stale.exists()


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision", "optimizer"), CASES)
def test_engine_trains_and_exports_the_fp32_masters(
    results: dict, stage: int, precision: str, optimizer: str
) -> None:
    r = results[(stage, precision, optimizer)]
    assert r["losses"][-1] < r["losses"][0]
    assert all(n > 0 for n in r["norms"])
    assert r["dtypes"] == ["torch.float32"]
    if precision == "bf16":
        # The export holds the fp32 masters, not the bf16 copies the module computes with.
        assert 0 < r["max_diff_module"] < 0.05
    else:
        assert r["max_diff_module"] == 0
    if r["max_diff_reference"] is not None:  # DeepSpeed's own offline converter agrees
        assert r["max_diff_reference"] == 0
