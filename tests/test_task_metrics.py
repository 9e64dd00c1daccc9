"""Task metrics agree with sklearn and scipy, and each task is judged by its GLUE metric."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import special, stats
from sklearn import metrics as skm

from perceiver_core import task_metrics as tm
from pipelines.data.finetune import GLUE_TASKS

SEEDS = range(5)


def _quiet(fn, *args, **kwargs):
    """sklearn/scipy warn on undefined metrics; the values are what is compared."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _reference_corr(fn, x, y) -> float:
    value = float(_quiet(fn, x, y)[0])
    return 0.0 if math.isnan(value) else value  # our documented convention for constant input


def classification_cases():
    """(pred, labels) pairs: random binary and multi-class, constant, all-correct, all-wrong."""
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 300))
        for k in (2, 3, 5):
            labels = rng.integers(0, k, n)
            noisy = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))
            yield noisy, labels
    labels = np.array([0, 1, 1, 0, 1, 1, 1])
    yield np.ones_like(labels), labels  # constant prediction
    yield np.zeros_like(labels), labels  # constant prediction of the other class
    yield labels, labels  # perfect
    yield 1 - labels, labels  # always wrong
    yield np.ones(4, int), np.ones(4, int)  # one class everywhere
    yield np.zeros(4, int), np.zeros(4, int)  # no positive anywhere: F1 undefined
    yield np.array([2, 2, 0]), np.array([0, 1, 1])  # a class predicted that never occurs


CLASSIFICATION = list(classification_cases())


@pytest.mark.parametrize(("pred", "labels"), CLASSIFICATION)
def test_classification_metrics_match_sklearn(pred, labels) -> None:
    assert tm.accuracy(pred, labels) == pytest.approx(skm.accuracy_score(labels, pred))
    assert tm.matthews_corrcoef(pred, labels) == pytest.approx(
        _quiet(skm.matthews_corrcoef, labels, pred), abs=1e-12
    )
    for positive in (0, 1):
        if len(np.union1d(pred, labels)) > 2:  # sklearn's binary mode refuses 3+ classes
            expected = _quiet(skm.f1_score, labels, pred, labels=[positive], average="macro")
        else:
            expected = _quiet(skm.f1_score, labels, pred, pos_label=positive, average="binary")
        assert tm.f1_binary(pred, labels, positive=positive) == pytest.approx(expected)


def test_matthews_is_exact_on_a_hand_computed_case_and_large_inputs() -> None:
    # TP=3, TN=2, FP=1, FN=1: (3*2 - 1*1) / sqrt(4*4*3*3) = 5/12.
    pred = np.array([1, 1, 1, 1, 0, 0, 0])
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    assert tm.matthews_corrcoef(pred, labels) == pytest.approx(5 / 12)
    # s^4 overflows int64 beyond ~55k examples; MNLI-sized inputs must still be right.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400_000)
    pred = np.where(rng.random(len(labels)) < 0.7, labels, rng.integers(0, 3, len(labels)))
    assert tm.matthews_corrcoef(pred, labels) == pytest.approx(skm.matthews_corrcoef(labels, pred))


def regression_cases():
    """Continuous, heavily tied (STS-B labels come in steps of 0.2), and constant inputs."""
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 300))
        y = rng.normal(size=n)
        yield y + rng.normal(scale=0.8, size=n), y
        tied_y = np.round(rng.uniform(0, 5, n) * 5) / 5
        yield np.round(tied_y + rng.normal(size=n)), tied_y  # ties on both sides
    yield np.array([3.0, 3.0, 3.0, 3.0]), np.array([0.0, 1.0, 2.0, 5.0])  # constant prediction
    yield np.array([0.0, 1.0, 2.0]), np.array([4.0, 4.0, 4.0])  # constant target
    yield np.array([1e200, 2e200, 4e200]), np.array([1.0, 2.0, 3.0])  # sums of squares overflow
    yield np.array([5.0, 4.0, 3.0, 2.0]), np.array([1.0, 2.0, 3.0, 4.0])  # exactly -1


@pytest.mark.parametrize(("x", "y"), list(regression_cases()))
def test_correlations_match_scipy(x, y) -> None:
    assert tm.pearson(x, y) == pytest.approx(_reference_corr(stats.pearsonr, x, y), abs=1e-12)
    assert tm.spearman(x, y) == pytest.approx(_reference_corr(stats.spearmanr, x, y), abs=1e-12)


def test_average_ranks_match_scipy_rankdata() -> None:
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    np.testing.assert_array_equal(tm._average_ranks(values), stats.rankdata(values))


@pytest.mark.parametrize("fn", [tm.accuracy, tm.f1_binary, tm.matthews_corrcoef, tm.pearson])
def test_empty_and_mismatched_inputs_raise(fn) -> None:
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="3 values but labels has 2"):
        fn([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="shape"):
        fn(np.zeros((2, 2)), np.zeros((2, 2)))


EXPECTED_PRIMARY = {
    ("imdb", 2): "accuracy",
    ("glue/cola", 2): "matthews_correlation",
    ("glue/sst2", 2): "accuracy",
    ("glue/mrpc", 2): "acc_and_f1",
    ("glue/stsb", 1): "pearson_spearman",
    ("glue/qqp", 2): "acc_and_f1",
    ("glue/mnli", 3): "accuracy",
    ("glue/qnli", 2): "accuracy",
    ("glue/rte", 2): "accuracy",
    ("glue/wnli", 2): "accuracy",
    ("files", 2): "accuracy",
    ("files", 7): "accuracy",
    ("files", 1): "pearson_spearman",
}


@pytest.mark.parametrize(("task", "num_labels"), list(EXPECTED_PRIMARY))
def test_primary_metric_of_every_task(task: str, num_labels: int) -> None:
    metric = tm.primary_metric(task, num_labels)
    assert metric == tm.TaskMetric(EXPECTED_PRIMARY[task, num_labels], higher_is_better=True)


def test_every_task_the_data_layer_knows_has_a_metric() -> None:
    tasks = {"imdb", "files"} | {f"glue/{name}" for name in GLUE_TASKS}
    assert set(tm.TASKS) == tasks
    for name, columns in GLUE_TASKS.items():
        tm.primary_metric(f"glue/{name}", columns.num_labels)  # the data layer's label count fits


@pytest.mark.parametrize(
    ("task", "num_labels", "message"),
    [
        ("glue/foo", 2, "unknown task 'glue/foo'"),
        ("sst2", 2, "unknown task"),
        ("glue/stsb", 2, "regression task: num_labels must be 1"),
        ("glue/sst2", 1, "classification task"),
        ("imdb", 1, "classification task"),
        ("glue/mrpc", 3, "binary"),
        ("files", 0, "positive int"),
    ],
)
def test_primary_metric_rejects_bad_tasks(task: str, num_labels: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tm.primary_metric(task, num_labels)
    with pytest.raises(ValueError, match=message):
        tm.task_metrics(task, num_labels, np.zeros((2, max(num_labels, 1))), [0, 1])


def _logits_for(pred: np.ndarray, num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Random logits whose argmax is ``pred``."""
    logits = rng.normal(size=(len(pred), num_labels))
    logits[np.arange(len(pred)), pred] = logits.max(axis=1) + rng.uniform(0.1, 1.0, len(pred))
    return logits


@pytest.mark.parametrize(("task", "num_labels"), [k for k in EXPECTED_PRIMARY if k[1] > 1])
def test_task_metrics_of_classification_tasks(task: str, num_labels: int) -> None:
    rng = np.random.default_rng(num_labels)
    labels = rng.integers(0, num_labels, 200)
    pred = np.where(rng.random(200) < 0.7, labels, rng.integers(0, num_labels, 200))
    got = tm.task_metrics(task, num_labels, _logits_for(pred, num_labels, rng), labels)
    acc = skm.accuracy_score(labels, pred)
    expected = {"accuracy": acc}
    if task == "glue/cola":
        expected["matthews_correlation"] = skm.matthews_corrcoef(labels, pred)
    if task in ("glue/mrpc", "glue/qqp"):
        f1 = skm.f1_score(labels, pred)
        expected.update(f1=f1, acc_and_f1=(acc + f1) / 2)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert all(type(v) is float for v in got.values())  # plain floats: JSON and MLflow take them


@pytest.mark.parametrize("task", ["glue/stsb", "files"])
@pytest.mark.parametrize("shape", ["column", "flat"])
def test_task_metrics_of_regression(task: str, shape: str) -> None:
    rng = np.random.default_rng(3)
    labels = np.round(rng.uniform(0, 5, 150) * 5) / 5
    values = labels + rng.normal(scale=1.0, size=150)
    logits = values[:, None] if shape == "column" else values
    got = tm.task_metrics(task, 1, logits.astype(np.float32), labels)
    r = stats.pearsonr(values.astype(np.float32), labels)[0]
    rho = stats.spearmanr(values.astype(np.float32), labels)[0]
    assert got == pytest.approx({"pearson": r, "spearman": rho, "pearson_spearman": (r + rho) / 2})


def test_task_metrics_rejects_bad_shapes_and_labels() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        tm.task_metrics("glue/mnli", 3, np.zeros((4, 2)), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="4 rows but labels has 3"):
        tm.task_metrics("glue/mnli", 3, np.zeros((4, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        tm.task_metrics("imdb", 2, np.zeros((0, 2)), [])
    with pytest.raises(ValueError, match="empty"):
        tm.task_metrics("glue/stsb", 1, np.zeros(0), [])
    with pytest.raises(ValueError, match="hide their labels"):
        tm.task_metrics("glue/rte", 2, np.zeros((2, 2)), [-1, -1])
    with pytest.raises(ValueError, match="found 3"):
        tm.task_metrics("glue/rte", 2, np.zeros((2, 2)), [0, 3])


def test_is_better_handles_first_value_and_nan() -> None:
    higher = tm.TaskMetric("accuracy", higher_is_better=True)
    lower = tm.TaskMetric("loss", higher_is_better=False)
    assert higher.is_better(0.5, None) and higher.is_better(0.5, math.nan)
    assert higher.is_better(0.6, 0.5) and not higher.is_better(0.5, 0.5)
    assert lower.is_better(0.4, 0.5) and not lower.is_better(0.6, 0.5)
    assert not higher.is_better(math.nan, 0.1) and not higher.is_better(math.nan, None)
    with pytest.raises(ValueError, match=r"TaskMetric\.name"):
        tm.TaskMetric("", higher_is_better=True)


def test_module_imports_only_numpy_and_the_standard_library() -> None:
    # A driver or an evaluation script computes metrics from saved logits without torch.
    tree = ast.parse(Path(tm.__file__).read_text())
    roots = {
        alias.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for alias in n.names
    }
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert roots == {"__future__", "dataclasses", "math", "numpy"}


def test_classification_metrics_add_the_loss_of_the_logits() -> None:
    logits = np.array([[2.0, -1.0], [0.5, 1.5], [0.0, 0.1]])
    labels = np.array([0, 1, 0])
    metrics = tm.classification_metrics("imdb", logits, labels)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    expected = -special.log_softmax(logits, axis=1)[np.arange(3), labels].mean()
    assert metrics["loss"] == pytest.approx(expected)
    regression = tm.classification_metrics(
        "glue/stsb", np.array([[1.0], [2.0]]), np.array([1.5, 2.0])
    )
    assert regression["loss"] == pytest.approx(0.125)  # mean squared error
