"""Benchmarks that must not rot: the GPU check runs on CPU with the tiny preset (one JSON line with
parity, SDPA kernels and throughput; no speed is asserted), and the pretraining recipe's
comparison and the IMDB classifiers' comparison run a few steps of each model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fixtures_train import REPO


def test_gpu_check_runs_on_cpu_with_the_tiny_preset() -> None:
    command = [
        *(sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--preset", "tiny"),
        *("--batch-sizes", "2", "--seq", "128", "--steps", "1", "--warmup", "1", "--no-compile"),
    ]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    parity = result["parity"]
    assert parity["fp32_ok"] and parity["fp32_max_abs_diff"] <= 1e-4
    assert parity["bf16_ok"] and parity["bf16_ours_vs_fp32_reference"] <= parity["bf16_tolerance"]
    sdpa = result["sdpa"]
    assert not sdpa["attend_uses_sdpa"]  # on CPU attend is the plain matmul path
    for name in ("encoder_cross_attention", "latent_self_attention", "decoder_cross_attention"):
        entry = sdpa[name]
        assert entry["chosen"] in entry["accepted_by"]
        # The widths differ in every attention of the tiny preset: the padded variant is the
        # same function (up to bf16 rounding) and is timed.
        assert entry["q"][-1] != entry["v"][-1]
        assert entry["padded_max_abs_diff"] < 1e-2 and entry["padded_ms"] > 0
    (run,) = result["throughput"]
    assert set(run["bytes_per_s"]) == {"hf_fp32", "hf_bf16", "ours_bf16_decode_masked"}
    assert run["speedup"] > 0 and run["ours_tflops"] > 0


@pytest.mark.shared_data
def test_the_recipe_benchmark_prints_its_curves_and_writes_the_plot(shared_data, tmp_path) -> None:
    """A few steps of each model on a few documents: the JSON the README's figures come from, and
    the PNG it shows (no learning is asserted in so few steps)."""
    plot = tmp_path / "curves.png"
    command = [
        *(sys.executable, "benchmarks/pretrain_recipe.py", "--steps", "4", "--eval-every", "2"),
        *("--docs", "300", "--plot", str(plot)),
    ]
    env = {**os.environ, "PERCEIVER_SHARED_DATA": str(shared_data)}
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["results"]) == {"recipe", "standard", "bert"}
    for run in result["results"].values():
        assert [p["step"] for p in run["curve"]] == [2, 4]
        assert 0.0 < run["end"]["val_loss"] < 10 and 0.0 <= run["end"]["accuracy"] <= 1.0
    assert result["settings"]["init"]["routing"] is True  # read from the recipe's config
    assert {"cpu", "amx", "threads", "versions"} <= set(result["machine"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.shared_data
def test_the_imdb_benchmark_scores_every_classifier_on_the_same_reviews(shared_data) -> None:
    """One epoch on 128 reviews, scored on 64: the JSON the README's figures come from (no
    accuracy is asserted on so few)."""
    command = [
        *(sys.executable, "benchmarks/imdb_classifiers.py", "--train", "128", "--test", "64"),
        *("--epochs", "1"),
    ]
    env = {**os.environ, "PERCEIVER_SHARED_DATA": str(shared_data)}
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["settings"]["test"] == 64
    assert set(result["results"]) == {
        "bag_of_bytes", "bag_of_words", "byte_cnn", "perceiver_standard", "perceiver_recipe",
        "perceiver_windows",
    }  # fmt: skip
    for name, run in result["results"].items():
        assert 0.0 <= run["accuracy"] <= 1.0, name
        assert round(run["accuracy"] * 64) == pytest.approx(run["accuracy"] * 64, abs=0.01)
    assert len(result["results"]["perceiver_recipe"]["train_loss_by_epoch"]) == 1
    assert {"cpu", "amx", "threads", "versions"} <= set(result["machine"])
