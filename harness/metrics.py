"""Classification metrics: the competition's macro F1 (absent classes count as 0), per task, per class;
and the objectives a study can maximise.

An objective is a number made of macro F1s on valid "views": `valid` (the valid images as they are)
and `bgswap` (the same images, each person pasted onto another valid person's background; see
harness.train). Trials are ranked, pruned and promoted, and ensembles selected, by the objective.

    val/f1          macro F1 on valid: what a leaderboard-like split rewards, background shortcut and all
    val/f1_bgswap   macro F1 on the background-swapped valid images: what survives new backgrounds
    robust/f1       the smaller of the two: no credit for what the background gives, nor for a model
                    that only looks robust because it is bad on its own valid images
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from harness.data.labels import NUM_CLASSES, TASKS, decode
from harness.registry import Registry


@dataclass(frozen=True)
class Objective:
    """`views` it needs, and how their F1s (floats or arrays of candidates' F1s) combine into one number."""

    views: tuple[str, ...]
    combine: Callable[[dict], float | np.ndarray]

    def __call__(self, f1: dict):
        return self.combine(f1)


OBJECTIVES: Registry[Objective] = Registry("objective")
OBJECTIVES.register("val/f1")(Objective(("valid",), lambda f1: f1["valid"]))
OBJECTIVES.register("val/f1_bgswap")(Objective(("bgswap",), lambda f1: f1["bgswap"]))
OBJECTIVES.register("robust/f1")(Objective(("valid", "bgswap"), lambda f1: np.minimum(f1["valid"], f1["bgswap"])))


def log_softmax_np(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax (shifting by the max keeps exp from overflowing)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_np(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable softmax."""
    return np.exp(log_softmax_np(logits, axis=axis))


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Macro F1 over all ``num_classes`` classes; a class never seen nor predicted scores 0."""
    return float(f1_score(labels, pred, labels=range(num_classes), average="macro", zero_division=0))


def macro_f1_batch(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 of each row of `preds` (K, N) against `labels` (N,): one bincount for all K.

    Equals `macro_f1` row by row: per class 2TP / (2TP + FP + FN) = 2TP / (predicted + actual),
    0 for a class never seen nor predicted. Ensemble selection scores thousands of blends with it.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    k = preds.shape[0]
    cells = (np.arange(k)[:, None] * num_classes + labels[None, :]) * num_classes + preds
    counts = np.bincount(cells.ravel(), minlength=k * num_classes * num_classes).reshape(k, num_classes, num_classes)
    true_positives = np.diagonal(counts, axis1=1, axis2=2)
    predicted_plus_actual = counts.sum(axis=1) + counts.sum(axis=2)
    f1 = np.divide(2.0 * true_positives, predicted_plus_actual, out=np.zeros(true_positives.shape),
                   where=predicted_plus_actual > 0)
    return f1.mean(axis=1)


def per_class_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """F1 of each class 0..num_classes-1 (0 for absent classes)."""
    return f1_score(labels, pred, labels=range(num_classes), average=None, zero_division=0)


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows are true classes, columns predicted classes."""
    return confusion_matrix(labels, pred, labels=range(num_classes))


def classification_metrics(scores: np.ndarray, labels: np.ndarray, tasks: bool) -> dict[str, float]:
    """{"f1", "acc"} plus {"f1_mask", "f1_gender", "f1_age"} when ``tasks``.

    ``scores`` are (N, C) probabilities or log-probabilities: only their argmax is used.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    _check_inputs(scores, labels, tasks)
    num_classes = scores.shape[1]
    pred = scores.argmax(axis=1)
    metrics = {"f1": macro_f1(pred, labels, num_classes), "acc": float((pred == labels).mean())}
    if tasks:
        for (task, size), task_pred, task_labels in zip(TASKS.items(), decode(pred), decode(labels), strict=True):
            metrics[f"f1_{task}"] = macro_f1(task_pred, task_labels, size)
    return metrics


def _check_inputs(scores: np.ndarray, labels: np.ndarray, tasks: bool) -> None:
    if scores.ndim != 2 or labels.shape != (len(scores),) or len(scores) == 0:
        raise ValueError(f"expected scores (N, C) and labels (N,) with N > 0, got {scores.shape} and {labels.shape}")
    num_classes = scores.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}; "
            "drop rows with unknown labels (-1) before scoring"
        )
    if tasks and num_classes != NUM_CLASSES:
        raise ValueError(f"task metrics decode {NUM_CLASSES} mask/gender/age classes, got C={num_classes}")
