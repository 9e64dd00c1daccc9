"""The official metrics of each fine-tuning task, from all predictions of one evaluation pass.

Pure NumPy: the module itself imports no torch, Ray or MLflow, so a driver or an evaluation
script can compute metrics from saved logits. The metrics are the ones the GLUE benchmark reports
(the GLUE paper, and the ``compute_metrics`` of transformers' ``run_glue.py``), and accuracy for
IMDB:

    task          metrics                                  primary (early stopping, champion)
    imdb          accuracy                                 accuracy
    glue/cola     matthews_correlation, accuracy           matthews_correlation
    glue/sst2     accuracy                                 accuracy
    glue/mrpc     accuracy, f1, acc_and_f1                 acc_and_f1 (mean of the two)
    glue/qqp      accuracy, f1, acc_and_f1                 acc_and_f1
    glue/stsb     pearson, spearman, pearson_spearman      pearson_spearman (mean of the two)
    glue/mnli     accuracy                                 accuracy
    glue/qnli     accuracy                                 accuracy
    glue/rte      accuracy                                 accuracy
    glue/wnli     accuracy                                 accuracy
    files         accuracy, or for regression (num_labels == 1) as glue/stsb

``classification_metrics`` adds the loss of the logits (cross-entropy, or squared error for
regression), as training's evaluation logs it.

Undefined correlations (a constant prediction or target) are 0.0, not NaN, as sklearn does for the
Matthews correlation: a model that predicts one value has no correlation skill, and a NaN would make
every "is this checkpoint better" comparison False. The values match sklearn and scipy otherwise
(checked in tests/test_task_metrics.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACCURACY = "accuracy"
F1 = "f1"
ACC_AND_F1 = "acc_and_f1"
MATTHEWS = "matthews_correlation"
PEARSON = "pearson"
SPEARMAN = "spearman"
PEARSON_SPEARMAN = "pearson_spearman"

_GLUE_PRIMARY = {
    "cola": MATTHEWS,
    "sst2": ACCURACY,
    "mrpc": ACC_AND_F1,
    "qqp": ACC_AND_F1,
    "stsb": PEARSON_SPEARMAN,
    "mnli": ACCURACY,
    "qnli": ACCURACY,
    "rte": ACCURACY,
    "wnli": ACCURACY,
}
TASKS: tuple[str, ...] = ("imdb", *(f"glue/{name}" for name in _GLUE_PRIMARY), "files")


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _vector(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]  # a (N, 1) column, as a regression head returns it
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per example, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one example")
    return arr


def _pair(pred: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    p, y = _vector("pred", pred), _vector("labels", labels)
    if len(p) != len(y):
        raise ValueError(f"pred has {len(p)} values but labels has {len(y)}")
    return p, y


# --------------------------------------------------------------------------------------------------
# Classification metrics
# --------------------------------------------------------------------------------------------------


def accuracy(pred: object, labels: object) -> float:
    """Share of examples whose predicted class equals the label."""
    p, y = _pair(pred, labels)
    return float(np.mean(p == y))


def f1_binary(pred: object, labels: object, positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2 TP / (2 TP + FP + FN); 0.0 when it has no examples at all in
    either array (sklearn's ``zero_division`` default)."""
    p, y = _pair(pred, labels)
    pred_pos, true_pos = p == positive, y == positive
    tp = int(np.sum(pred_pos & true_pos))
    denominator = int(np.sum(pred_pos)) + int(np.sum(true_pos))  # = 2 TP + FP + FN
    return 2.0 * tp / denominator if denominator else 0.0


def matthews_corrcoef(pred: object, labels: object) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K, as sklearn computes it).

    With the confusion matrix C (rows = true class), t_k = row sums, p_k = column sums, c = trace
    and s = number of examples: (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)).
    For two classes this is the binary MCC that CoLA reports; 0.0 when undefined (all predictions or
    all labels one class).
    """
    p, y = _pair(pred, labels)
    # Class ids over both arrays: a class that is only predicted still counts.
    _, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = int(codes.max()) + 1
    true_codes, pred_codes = codes[: len(y)], codes[len(y) :]
    confusion = np.bincount(true_codes * k + pred_codes, minlength=k * k).reshape(k, k)
    # float64 throughout: s^2 * s^2 overflows int64 beyond ~55k examples (QQP has 40k, MNLI 393k).
    confusion = confusion.astype(np.float64)
    t_k, p_k = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = float(np.trace(confusion)), float(confusion.sum())
    cov_ytyp = c * s - float(p_k @ t_k)
    cov_ypyp = s * s - float(p_k @ p_k)
    cov_ytyt = s * s - float(t_k @ t_k)
    if cov_ypyp == 0.0 or cov_ytyt == 0.0:
        return 0.0
    return cov_ytyp / math.sqrt(cov_ypyp * cov_ytyt)


# --------------------------------------------------------------------------------------------------
# Regression metrics
# --------------------------------------------------------------------------------------------------


def pearson(x: object, y: object) -> float:
    """Pearson's r; 0.0 when either input is constant (scipy returns NaN there)."""
    a, b = (v.astype(np.float64) for v in _pair(x, y))
    # Test constancy on the inputs: after subtracting a rounded mean, a constant vector can leave
    # residues of 1e-17 whose "correlation" is noise.
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    a, b = a - np.mean(a), b - np.mean(b)
    # Scale to a maximum of 1 first: the sum of squares of values near 1e200 would overflow.
    a, b = a / np.max(np.abs(a)), b / np.max(np.abs(b))
    r = float((a / np.linalg.norm(a)) @ (b / np.linalg.norm(b)))
    return max(-1.0, min(1.0, r))  # rounding can step just outside [-1, 1]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span (scipy's ``rankdata`` default)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: object, y: object) -> float:
    """Spearman's rho: Pearson's r of the average ranks; 0.0 when either input is constant."""
    a, b = _pair(x, y)
    return pearson(_average_ranks(a), _average_ranks(b))


# --------------------------------------------------------------------------------------------------
# Per-task selection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskMetric:
    """The metric that ranks checkpoints of a task: early stopping, best checkpoint, champion."""

    name: str
    higher_is_better: bool

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TaskMetric.name must not be empty")

    def is_better(self, candidate: float, incumbent: float | None) -> bool:
        """Whether ``candidate`` beats ``incumbent`` (None or NaN: nothing to beat yet)."""
        if math.isnan(candidate):
            return False
        if incumbent is None or math.isnan(incumbent):
            return True
        return candidate > incumbent if self.higher_is_better else candidate < incumbent


def _check_task(task: str, num_labels: int) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    # The metric of a named task fixes its head: STS-B is regression, the others classify, and
    # binary F1 needs exactly two classes.
    if task == "glue/stsb" and num_labels != 1:
        raise ValueError(f"glue/stsb is a regression task: num_labels must be 1, got {num_labels}")
    if task not in ("glue/stsb", "files") and num_labels < 2:
        raise ValueError(f"{task} is a classification task: num_labels must be >= 2, got 1")
    if task in ("glue/mrpc", "glue/qqp") and num_labels != 2:
        raise ValueError(
            f"{task} is binary (F1 of class 1): num_labels must be 2, got {num_labels}"
        )


def primary_metric(task: str, num_labels: int) -> TaskMetric:
    """The metric a task is judged by (see the module docstring's table)."""
    _check_task(task, num_labels)
    if task.startswith("glue/"):
        name = _GLUE_PRIMARY[task[len("glue/") :]]
    elif task == "files" and num_labels == 1:
        name = PEARSON_SPEARMAN
    else:
        name = ACCURACY
    # Every metric here is a score (accuracy, F1, correlations): higher is better.
    return TaskMetric(name=name, higher_is_better=True)


def _predictions(num_labels: int, logits: object) -> np.ndarray:
    """Class ids (argmax) from (N, num_labels) logits, or the values of a regression head."""
    arr = np.asarray(logits)
    if num_labels == 1:
        return _vector("logits", arr).astype(np.float64)
    if arr.ndim != 2 or arr.shape[1] != num_labels:
        raise ValueError(f"logits must have shape (N, {num_labels}), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("logits is empty: metrics need at least one example")
    return np.argmax(arr, axis=1)


def _check_class_ids(labels: np.ndarray, num_labels: int) -> None:
    bad = labels[(labels < 0) | (labels >= num_labels) | (labels != np.round(labels))]
    if len(bad):
        value = bad[0].item()
        # -1 is what GLUE test splits carry: their labels are hidden.
        hint = " (GLUE test splits hide their labels as -1)" if value == -1 else ""
        raise ValueError(f"labels must be class ids in [0, {num_labels}), found {value!r}{hint}")


def task_metrics(
    task: str, num_labels: int, logits: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """All metrics of ``task`` (keys without prefix), the primary one included.

    ``logits``: (N, num_labels) raw classifier outputs, or (N, 1) / (N,) regression values.
    ``labels``: (N,) class ids, or regression targets.
    """
    _check_task(task, num_labels)
    pred = _predictions(num_labels, logits)
    y = _vector("labels", labels)
    if len(pred) != len(y):
        raise ValueError(f"logits has {len(pred)} rows but labels has {len(y)}")
    if num_labels > 1:
        _check_class_ids(y, num_labels)
    primary = primary_metric(task, num_labels).name
    if primary == PEARSON_SPEARMAN:
        r, rho = pearson(pred, y), spearman(pred, y)
        return {PEARSON: r, SPEARMAN: rho, PEARSON_SPEARMAN: (r + rho) / 2.0}
    out = {ACCURACY: accuracy(pred, y)}
    if primary == MATTHEWS:
        out[MATTHEWS] = matthews_corrcoef(pred, y)
    elif primary == ACC_AND_F1:
        out[F1] = f1_binary(pred, y, positive=1)
        out[ACC_AND_F1] = (out[ACCURACY] + out[F1]) / 2.0
    return out


def classification_metrics(task: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics (``task_metrics``) and the loss: mean cross-entropy of class logits (mean
    squared error for one regression output)."""
    metrics = task_metrics(task, logits.shape[-1], logits, labels)
    if logits.shape[-1] == 1:
        metrics["loss"] = float(np.mean((logits.reshape(-1) - labels.astype(np.float64)) ** 2))
        return metrics
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    metrics["loss"] = float(-log_probs[np.arange(len(labels)), labels.astype(np.int64)].mean())
    return metrics
