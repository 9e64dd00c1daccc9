"""A registered classifier served every way a user can fetch it, with the same answers: in a fresh
process through ``mlflow.transformers`` (a transformers pipeline), ``mlflow.pyfunc``, and our own
``load_model`` + ``perceiver_core.predict.classify``; then over HTTP from a real
``mlflow models serve``. And ``python -m jobs.predict`` end to end.

``predictions_four_ways`` and ``serve_predictions`` take any registry URI, so that a really
fine-tuned model can be checked the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pytest
from fixtures_train import REPO, free_port
from test_models import LABELS, lineage, new_run, save_tiny

from pipelines.tracking import registry

pytestmark = pytest.mark.slow

TEXTS = [
    "A wonderful, moving film.",
    "Dull and far too long.",
    "ok",
    "I would watch it again tomorrow!",
    "zzzz",
    "The plot made no sense at all",
]
# Longer than the tiny preset's 128 positions: every way truncates it to what they cover, [CLS] and
# [SEP] included, so it scores exactly as its first 126 bytes do (the next entry).
LONG_REVIEW = (
    "I went in expecting very little from this one, and for the first half hour it delivered "
    "exactly that: a slow opening, a lead who mumbles, a score that never stops. Then the second "
    "act arrives and everything changes; the writing sharpens, the cast wakes up, and by the end "
    "I was sorry to see it finish. Flawed, but worth your evening."
)
LONG_TEXTS = [LONG_REVIEW, LONG_REVIEW[:126]]
Predictions = list[tuple[str, float]]

# Run in a fresh interpreter: what a user's process does, with nothing cached from the tests.
_FRESH_PROCESS = r"""
import json, sys
import mlflow
from perceiver_core.predict import classify
from pipelines.tracking.models import load_model

uri, texts = sys.argv[1], json.loads(sys.argv[2])
pipe = mlflow.transformers.load_model(uri)
transformers_out = [(r["label"], float(r["score"])) for r in pipe(texts, truncation=True)]
frame = mlflow.pyfunc.load_model(uri).predict(texts)
pyfunc_out = [(str(l), float(s)) for l, s in zip(frame["label"], frame["score"])]
loaded = load_model(uri, expect="classifier")
ours = [(p.label, p.score) for p in classify(loaded.model, texts)]
print("RESULT " + json.dumps({"transformers": transformers_out, "pyfunc": pyfunc_out, "ours": ours}))
"""


def _env(tracking_uri: str | None, cache: Path) -> dict[str, str]:
    env = {**os.environ, "PERCEIVER_MODEL_CACHE": str(cache)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def fresh_process_predictions(
    model_uri: str, texts: Sequence[str], tracking_uri: str, workdir: Path
) -> dict[str, Predictions]:
    """``transformers`` / ``pyfunc`` / ``ours`` predictions of ``model_uri``, in a new process."""
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, model_uri, json.dumps(list(texts))],
        cwd=REPO,
        env=_env(tracking_uri, workdir / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return {k: [(label, score) for label, score in v] for k, v in json.loads(line[7:]).items()}


@contextlib.contextmanager
def model_server(
    model_uri: str, tracking_uri: str, workdir: Path, timeout_s: float = 240.0
) -> Iterator[str]:
    """A real ``mlflow models serve`` on 127.0.0.1, in its own session; yields its base URL and
    stops the whole process group (the server and its uvicorn workers) at the end."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri),
        *("--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)),
    ]
    log_path = workdir / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=_env(tracking_uri, workdir / "cache"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _ping(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not start:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def serve_predictions(
    model_uri: str, texts: Sequence[str], tracking_uri: str, workdir: Path
) -> Predictions:
    """Predictions of ``model_uri`` from a real ``mlflow models serve`` (POST /invocations)."""
    with model_server(model_uri, tracking_uri, workdir) as url:
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": list(texts)}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"/invocations: {error.code} {error.read()[:2000]!r}") from error
    return [(row["label"], float(row["score"])) for row in body["predictions"]]


def predictions_four_ways(
    model_uri: str, texts: Sequence[str], tracking_uri: str, workdir: Path
) -> dict[str, Predictions]:
    """``transformers``, ``pyfunc``, ``ours`` (fresh process) and ``served`` (HTTP) predictions."""
    results = fresh_process_predictions(model_uri, texts, tracking_uri, workdir)
    results["served"] = serve_predictions(model_uri, texts, tracking_uri, workdir)
    return results


def assert_agree(results: dict[str, Predictions], tolerance: float = 1e-4) -> None:
    """Every way gives the same labels and, within ``tolerance``, the same scores."""
    reference = results["ours"]
    for way, predictions in results.items():
        assert [label for label, _ in predictions] == [label for label, _ in reference], way
        for (_, score), (_, expected) in zip(predictions, reference, strict=True):
            assert score == pytest.approx(expected, abs=tolerance), way


# -- the tests -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls without ``cache_dir`` download here, not into the user's ~/.cache."""
    monkeypatch.setenv("PERCEIVER_MODEL_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def served_classifier(mlflow_server, tmp_path_factory: pytest.TempPathFactory):
    """A random tiny classifier whose labels differ between TEXTS, registered as champion."""
    root = tmp_path_factory.mktemp("serving")
    cls_dir = save_tiny("classifier", root / "cls", seed=2, initializer_range=0.2)
    run_id = new_run(mlflow_server.uri, "serving")
    model = registry.log_and_register(
        mlflow_server.uri, cls_dir, "serving-cls", lineage(run_id, metrics={"accuracy": 0.5})
    )
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    registry.promote(client, model.name, model.version, metric="accuracy", higher_is_better=True)
    return mlflow_server.uri, model, root


def test_registered_classifier_gives_the_same_answers_four_ways(served_classifier) -> None:
    uri, model, root = served_classifier
    texts = TEXTS + LONG_TEXTS
    results = predictions_four_ways(f"models:/{model.name}@champion", texts, uri, root / "four")
    for way, predictions in results.items():  # a long text answers as its covered prefix does
        (label, score), (prefix_label, prefix_score) = predictions[-2:]
        assert label == prefix_label and score == pytest.approx(prefix_score, abs=1e-6), way
    ours = results["ours"]
    # Meaningful only if the labels differ and no score sits on the fence between them.
    assert {label for label, _ in ours} == set(LABELS)
    assert all(abs(score - 0.5) > 0.01 for _, score in ours)
    assert_agree(results)
    assert set(results) == {"transformers", "pyfunc", "ours", "served"}


def run_predict(
    args: Sequence[str], tracking_uri: str | None, cache: Path
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.predict", *args],
        cwd=REPO,
        env=_env(tracking_uri, cache),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_jobs_predict_classifies_by_registry_uri(served_classifier, tmp_path: Path) -> None:
    from perceiver_core.predict import classify
    from pipelines.tracking.models import load_model

    uri, model, _ = served_classifier
    out = run_predict(["--model", model.registry_uri, "--json", *TEXTS], uri, tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    loaded = load_model(model.registry_uri, tracking_uri=uri, cache_dir=tmp_path / "cache")
    expected = classify(loaded.model, TEXTS)
    assert [r["text"] for r in rows] == TEXTS
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert [r["score"] for r in rows] == pytest.approx([p.score for p in expected], abs=1e-6)

    plain = run_predict(["--model", model.registry_uri, TEXTS[0]], uri, tmp_path)
    label, score, text = plain.stdout.strip().split("\t")
    assert (label, text) == (expected[0].label, TEXTS[0])
    assert float(score) == pytest.approx(expected[0].score, abs=1e-4)


def test_jobs_predict_fills_the_model_card_example(mlflow_server, tmp_path: Path) -> None:
    from perceiver_core.predict import fill_mask, masked_spans
    from pipelines.tracking.models import load_model

    mlm_dir = save_tiny("mlm", tmp_path / "mlm", seed=0, initializer_range=0.2)
    text = "This is an incomplete sentence where some words are missing."
    out = run_predict(["--model", str(mlm_dir), "--mask", " missing.", text], None, tmp_path)
    assert out.returncode == 0, out.stderr
    clean, spans = masked_spans(text, substring=" missing.")
    assert spans == [(51, 60)]
    expected = fill_mask(load_model(str(mlm_dir)).model, clean, spans)
    lines = out.stdout.splitlines()
    assert lines[0] == expected.text
    assert lines[0].startswith("This is an incomplete sentence where some words are")
    assert repr(expected.predictions[0]) in lines[1]


def test_jobs_predict_reports_a_bad_source_in_one_line(mlflow_server, tmp_path: Path) -> None:
    out = run_predict(
        ["--model", "models:/no-such-model@champion", "hi"], mlflow_server.uri, tmp_path
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: models:/no-such-model@champion: no registered model named 'no-such-model'"
    ]


def _scoring_inputs(shared_data: Path, folder: Path) -> pa.Table:
    """SST-2's validation sentences in three files of the kinds batch inference reads: parquet,
    gzipped JSON lines, and JSON lines in a subfolder. Returns the whole table."""
    import gzip

    import pyarrow.parquet as pq

    table = pq.read_table(shared_data / "glue" / "sst2" / "validation.parquet")
    (folder / "sub").mkdir(parents=True)
    pq.write_table(table.slice(0, 400), folder / "part-0.parquet")
    with gzip.open(folder / "part-1.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in table.slice(400, 300).to_pylist())
    (folder / "sub" / "part-2.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in table.slice(700).to_pylist())
    )
    return table


def test_batch_inference_from_the_registry_scores_s3_files_once(
    served_classifier, ray_session, s3_server, shared_data: Path, tmp_path: Path, capsys
) -> None:
    import pyarrow.fs
    import pyarrow.parquet as pq
    from fixtures_s3 import BUCKET

    from jobs.predict import main
    from perceiver_core.predict import classify
    from pipelines.tracking.models import load_model

    uri, model, _ = served_classifier
    table = _scoring_inputs(shared_data, tmp_path / "in")
    inputs = s3_server.upload(tmp_path / "in", "predict/in")
    outputs = f"{BUCKET}/predict/out"
    args = ["--model", f"models:/{model.name}@champion", "--tracking-uri", uri]
    args += ["--input", inputs, "--output", f"s3://{outputs}"]
    args += ["--text-column", "sentence", "--id-column", "idx"]
    fs = s3_server.filesystem()

    def run() -> str:
        assert main(args) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    def written() -> dict[str, pyarrow.fs.FileInfo]:
        found = fs.get_file_info(pyarrow.fs.FileSelector(outputs, recursive=True))
        return {i.path.removeprefix(f"{outputs}/"): i for i in found if i.is_file}

    assert run().startswith("scored 872 rows of 3 files (0 already scored)")
    first = written()
    assert sorted(first) == ["part-0.parquet", "part-1.parquet", "sub/part-2.parquet"]
    scored = {name: pq.read_table(f"{outputs}/{name}", filesystem=fs) for name in first}
    for name, out in scored.items():
        assert out.column_names == ["row", "idx", "label", "score"]
        assert out.column("row").to_pylist() == list(range(out.num_rows)), name
        source = f"{inputs}/{name.replace('part-1.parquet', 'part-1.jsonl.gz')}"
        if name.startswith("sub/"):
            source = source.replace(".parquet", ".jsonl")
        assert out.schema.metadata[b"perceiver.input"].decode() == source
    result = pa.concat_tables(scored[n] for n in sorted(first))  # the input's order
    assert result.column("idx").to_pylist() == table.column("idx").to_pylist()
    loaded = load_model(model.registry_uri, tracking_uri=uri, cache_dir=tmp_path / "cache")
    expected = classify(loaded.model, table.column("sentence").to_pylist())
    assert result.column("label").to_pylist() == [p.label for p in expected]
    assert result.column("score").to_pylist() == pytest.approx(
        [p.score for p in expected], abs=1e-6
    )
    assert set(result.column("label").to_pylist()) == set(LABELS)  # else the check is weak

    assert run().startswith("scored 0 rows of 0 files (3 already scored)")
    assert {n: i.mtime for n, i in written().items()} == {n: i.mtime for n, i in first.items()}

    fs.delete_file(f"{outputs}/part-1.parquet")  # lost: scored again, the others kept
    assert run().startswith("scored 300 rows of 1 files (2 already scored)")
    again = written()
    assert again["part-0.parquet"].mtime == first["part-0.parquet"].mtime
    assert pq.read_table(f"{outputs}/part-1.parquet", filesystem=fs).equals(
        scored["part-1.parquet"]
    )


def test_a_model_saved_for_windows_answers_long_texts_with_all_of_them(
    tmp_path: Path, capsys
) -> None:
    """``long_text: windows`` travels in config.json: jobs.predict averages the windows of a long
    review by default, and ``--long-text truncate`` keeps only its beginning."""
    from jobs.predict import main
    from perceiver_core.hf import from_pretrained, save_pretrained
    from perceiver_core.model import PerceiverForSequenceClassification
    from perceiver_core.predict import classify

    plain = save_tiny("classifier", tmp_path / "plain", seed=2, initializer_range=0.2)
    model = from_pretrained(PerceiverForSequenceClassification, plain, long_text="windows")
    folder = save_pretrained(model, tmp_path / "windows")

    def score(*extra: str) -> float:
        assert main(["--model", str(folder), "--json", *extra, LONG_REVIEW]) == 0
        return json.loads(capsys.readouterr().out)["score"]

    windows = classify(model, [LONG_REVIEW], long_text="windows")[0].score
    truncated = classify(model, [LONG_REVIEW], long_text="truncate")[0].score
    assert abs(windows - truncated) > 1e-3  # else the check below could not tell them apart
    assert score() == pytest.approx(windows, abs=1e-6)
    assert score("--long-text", "truncate") == pytest.approx(truncated, abs=1e-6)
