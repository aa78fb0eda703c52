"""Metrics: the competition's macro F1 (absent classes count as 0), task F1, confusion, softmax helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.data.labels import NUM_CLASSES
from harness.metrics import (
    classification_metrics,
    confusion,
    log_softmax_np,
    per_class_f1,
    softmax_np,
)


def one_hot(pred, num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[np.asarray(pred)]


def test_macro_f1_by_hand_counts_absent_classes_as_zero():
    labels = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1 -> 0.8; class 2: missed -> 0; class 3: absent -> 0
    metrics = classification_metrics(one_hot(pred, 4), labels, tasks=False)

    assert metrics == pytest.approx({"f1": (0.5 + 0.8) / 4, "acc": 3 / 5})
    np.testing.assert_allclose(per_class_f1(pred, labels, 4), [0.5, 0.8, 0.0, 0.0])


def test_task_f1_decodes_predictions_and_labels():
    labels = np.array([0, 7, 14])  # (mask, gender, age): (0,0,0) (1,0,1) (2,0,2)
    pred = np.array([1, 7, 17])  # (0,0,1) (1,0,1) (2,1,2)

    metrics = classification_metrics(one_hot(pred, NUM_CLASSES), labels, tasks=True)

    assert metrics == pytest.approx(
        {
            "f1": 1 / NUM_CLASSES,  # only class 7 is right
            "acc": 1 / 3,
            "f1_mask": 1.0,
            "f1_gender": (0.8 + 0.0) / 2,  # male: tp 2, fn 1; female: predicted once, never true
            "f1_age": (0.0 + 2 / 3 + 1.0) / 3,  # young missed; middle tp 1 fp 1; old right
        }
    )


def test_confusion_rows_are_true_classes_and_sum_to_n():
    labels = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 0, 2])

    matrix = confusion(pred, labels, num_classes=4)

    assert matrix.shape == (4, 4) and matrix.sum() == len(labels)
    np.testing.assert_array_equal(matrix.sum(axis=1), [2, 1, 3, 0])
    assert matrix[2, 0] == 1 and np.trace(matrix) == 4


def test_probabilities_and_log_probabilities_give_the_same_metrics():
    rng = np.random.default_rng(0)
    logits = 3 * rng.normal(size=(200, NUM_CLASSES))
    labels = rng.integers(0, NUM_CLASSES, size=200)

    from_probs = classification_metrics(softmax_np(logits), labels, tasks=True)
    from_log_probs = classification_metrics(log_softmax_np(logits), labels, tasks=True)

    assert from_probs == from_log_probs
    assert set(from_probs) == {"f1", "acc", "f1_mask", "f1_gender", "f1_age"}


def test_softmax_helpers_are_stable_and_match_torch():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])

    log_probs = log_softmax_np(logits)

    assert np.isfinite(log_probs).all()
    np.testing.assert_allclose(log_probs, torch.log_softmax(torch.tensor(logits), 1).numpy(), atol=1e-12)
    np.testing.assert_allclose(softmax_np(logits).sum(axis=1), 1.0)


def test_bad_inputs_are_reported():
    scores = one_hot([0, 1], 3)
    with pytest.raises(ValueError, match="unknown labels"):
        classification_metrics(scores, np.array([0, -1]), tasks=False)
    with pytest.raises(ValueError, match="C=3"):
        classification_metrics(scores, np.array([0, 1]), tasks=True)
    with pytest.raises(ValueError, match=r"labels \(N,\)"):
        classification_metrics(scores, np.array([0, 1, 2]), tasks=False)
