"""One clear line for every bad input: each case below is a file or config a user could hand the
project, and each must end in one line naming the file (or key) and what is wrong, never in a
traceback, whether it is found in the driver or inside a Ray Data task.

The data cases run the real index pass on the session's Ray (what ``jobs.pretrain`` does before it
trains) and check the error a job prints: ``pipelines.errors.user_error`` of what Ray raised. Two
of them also run as the job itself, as a user meets them; a missing or empty source is found
before Ray starts. The model cases load through the registry loader and ``jobs.predict``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_train import REPO, cpus_freed
from test_models import save_tiny

from pipelines.data.config import PretrainDataConfig
from pipelines.data.readers import ReadConfig
from pipelines.data.sources import SourceConfig
from pipelines.errors import first_line, surface_user_errors, user_error

DOCS = [f"A document of the bad-input tests, number {i}. " * 12 for i in range(120)]


def _parquet(path: Path, column: str = "text") -> bytes:
    pq.write_table(pa.table({column: DOCS}), path)
    return path.read_bytes()


def _jsonl() -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()


def make_case(case: str, folder: Path) -> Path:
    """A source folder holding one bad file of the kind ``case`` names; the bad file's path."""
    folder.mkdir(parents=True)
    if case == "corrupt parquet":
        data = _parquet(folder / "a.parquet")
        (folder / "a.parquet").write_bytes(data[: len(data) // 2] + b"\0" * 64 + data[-8:])
        return folder / "a.parquet"
    if case == "truncated parquet":
        data = _parquet(folder / "a.parquet")
        (folder / "a.parquet").write_bytes(data[: len(data) // 2])
        return folder / "a.parquet"
    if case == "parquet without the text column":
        _parquet(folder / "a.parquet", column="body")
        return folder / "a.parquet"
    if case == "malformed JSON line":
        lines = _jsonl().decode().splitlines()
        lines[40] = '{"text": "cut off'
        (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
        return folder / "a.jsonl"
    if case == "truncated gzip":
        data = gzip.compress(_jsonl())
        (folder / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
        return folder / "a.jsonl.gz"
    if case == "contents not matching the extension":
        (folder / "a.parquet").write_bytes(_jsonl())
        return folder / "a.parquet"
    raise ValueError(case)


EXPECTED = {
    "corrupt parquet": "corrupt parquet file",
    "truncated parquet": "corrupt parquet file",
    "parquet without the text column": "has no column 'text' (its columns: body;",
    "malformed JSON line": "invalid JSON in line 41",
    "truncated gzip": "Compressed file ended before the end-of-stream marker",
    "contents not matching the extension": "is not a parquet file",
}


def source_config(folder: Path, on_bad_file: str = "raise") -> PretrainDataConfig:
    return PretrainDataConfig(
        sources=[SourceConfig(name="s", path=str(folder), config=None)],
        task_crops=256,
        block_crops=64,
        read=ReadConfig(on_bad_file=on_bad_file),
    )


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_bad_data_file_is_one_line_naming_it(case: str, ray_session, tmp_path: Path) -> None:
    from pipelines.data.index import build_index

    bad = make_case(case, tmp_path / "src")
    cfg = source_config(tmp_path / "src")
    surface_user_errors()
    with pytest.raises(Exception) as raised:
        build_index(cfg)
    found = user_error(raised.value)
    assert found is not None, f"{case}: no user error in {raised.value!r}"
    line = first_line(found)
    assert str(bad) in line and EXPECTED[case] in line, line  # what the job prints


def test_a_source_whose_every_file_was_skipped_is_one_line(ray_session, tmp_path: Path) -> None:
    from pipelines.data.index import build_index
    from pipelines.data.mixture import EmptySourceError
    from pipelines.data.pretrain import pretraining_dataset

    folder = tmp_path / "src"
    make_case("truncated parquet", folder)
    shutil.copy(folder / "a.parquet", folder / "b.parquet")
    cfg = source_config(folder, on_bad_file="skip")
    surface_user_errors()
    index = build_index(cfg)  # both files skipped, and counted
    with pytest.raises(EmptySourceError, match=r"source 's' has no train crops: every file"):
        pretraining_dataset(cfg, index, split="train")


def run_job(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def job_config(tmp_path: Path, source: Path) -> Path:
    config = {
        "run": {"name": "bad-input", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": "tiny"},
        "data": {
            "sources": [{"name": "s", "path": str(source), "config": None}],
            "packing": {"crop_len": 128},
            "task_crops": 256,
            "block_crops": 64,
        },
        "train": {"steps": 2, "num_workers": 1, "micro_batch_size": 4, "precision": "fp32"},
        "eval": {"every": 0, "crops": 8, "batch_size": 8},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "register": False},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_jobs_pretrain_prints_one_line_for_a_corrupt_file(tmp_path: Path) -> None:
    bad = make_case("corrupt parquet", tmp_path / "src")
    out = run_job(["jobs.pretrain", "--config", str(job_config(tmp_path, tmp_path / "src"))], REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "INFO" not in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot read {bad}"), out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_an_empty_source_is_refused_before_ray_starts(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.md").write_text("no data here")
    out = run_job(["jobs.pretrain", "--config", str(job_config(tmp_path, tmp_path / "src"))], REPO)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'src'}: no data files: nothing matches '{tmp_path / 'src'}/**' (a "
        "folder is read for .parquet, .json/.jsonl/.ndjson and .txt files, each optionally .gz; "
        "set files: or format: for other names)"
    ]
    assert not (tmp_path / "runs").exists()  # nothing started


def test_inspect_data_names_the_line_of_a_yaml_syntax_error(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("data_dir: ../shared/data\nsources: [unclosed\npacking: {}\n")
    out = run_job(["jobs.inspect_data", "--config", str(config)], REPO)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"config error: {config}: not valid YAML: line 3, column 8:"), line


# -- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("classifier", tmp_path_factory.mktemp("bad-models") / "good", seed=0)


def model_case(case: str, good: Path, folder: Path) -> Path:
    shutil.copytree(good, folder)
    if case == "corrupt safetensors":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif case == "weights of the wrong shape":
        config = json.loads((folder / "config.json").read_text())
        config["num_latents"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("corrupt safetensors", "model.safetensors: not a readable safetensors file"),
        ("weights of the wrong shape", "encoder.latents is (8, 48) in the checkpoint, (16, 48)"),
    ],
)
def test_a_bad_model_folder_is_one_line(
    case: str, expected: str, good_model: Path, tmp_path: Path
) -> None:
    from pipelines.tracking.models import ModelSourceError, load_model

    folder = model_case(case, good_model, tmp_path / "model")
    with pytest.raises(ModelSourceError) as raised:
        load_model(str(folder))
    message = str(raised.value)
    assert "\n" not in message and str(folder) in message and expected in message, message


def test_a_pickle_with_code_is_refused_as_possibly_malicious(
    good_model: Path, tmp_path: Path
) -> None:
    folder = model_case("pickle", good_model, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    planted = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {planted}",))

    torch.save({"weights": Payload()}, folder / "pytorch_model.bin")
    out = run_job(["jobs.predict", "--model", str(folder), "hello"], REPO)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "the file may be malicious and was not loaded" in line and "weights_only" not in line
    assert "pytorch_model.bin" in line
    assert not planted.exists()


# -- batch inference -----------------------------------------------------------------------------


def test_batch_inference_refuses_bad_columns_and_outputs_of_another_model(
    good_model: Path, ray_session, tmp_path: Path, capsys
) -> None:
    from jobs.predict import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    _parquet(inputs / "a.parquet", column="review")
    args = ["--model", str(good_model), "--input", str(inputs)]
    free = ray_session.available_resources().get("CPU", 0.0)

    # A text column the file lacks: found by the actor that reads it, reported as one line.
    assert main([*args, "--output", str(tmp_path / "out1")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {inputs / 'a.parquet'} has no column 'text'"), line
    assert not (tmp_path / "out1" / "a.parquet").exists()
    # The failed execution's actors are gone, their CPUs free for what runs next in this driver
    # (a leaked pool once kept a CPU, and later training waited for ever for it).
    assert cpus_freed(ray_session, free), "the failed scoring's actor pool still holds CPUs"

    # An output another model (or other settings) made is neither skipped nor overwritten.
    made = tmp_path / "out2" / "a.parquet"
    made.parent.mkdir()
    other = pa.table({"row": [0]}).replace_schema_metadata(
        {b"perceiver.predict_digest": b"0123", b"perceiver.model": b"models:/other/1"}
    )
    pq.write_table(other, made)
    before = made.read_bytes()
    assert main([*args, "--output", str(made.parent), "--text-column", "review"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{made}: already made by another model or with other settings" in line, line
    assert "models:/other/1" in line and made.read_bytes() == before


def test_finetuning_from_a_hub_id_that_cannot_be_fetched_stops_before_ray(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(tmp_path / "ray"),  # where a Ray started by the job would write
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
    }
    command = ["jobs.finetune", "--config", "jobs/configs/finetune_imdb_tiny.yaml"]
    command += ["--set", "init=nobody/no-such-perceiver"]
    out = subprocess.run(
        [sys.executable, "-m", *command], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1 and errors[0].startswith("error: nobody/no-such-perceiver"), errors
    assert "HF_HUB_OFFLINE is set and the model is not in the local Hub cache" in errors[0]
    assert not (tmp_path / "ray").exists()
