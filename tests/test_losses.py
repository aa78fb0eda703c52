"""Losses: every registered loss x head kind computes a finite, trainable, correctly-ordered scalar."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from harness.data.labels import NUM_CLASSES, TASKS, decode, encode
from harness.heads import build_loss
from harness.losses import LOSSES, decode_tasks

TASK_SIZES = tuple(TASKS.values())
# (head, num_classes): the competition's two heads and a plain 5-class dataset
HEADS = [("multiclass", NUM_CLASSES), ("multihead", NUM_CLASSES), ("multiclass", 5)]
CASES = [(name, head, classes) for name in LOSSES.names() for head, classes in HEADS]
CASE_IDS = [f"{name}-{head}-{classes}" for name, head, classes in CASES]


def logit_width(head: str, num_classes: int) -> int:
    return sum(TASK_SIZES) if head == "multihead" else num_classes


def confident_logits(target: torch.Tensor, head: str, num_classes: int, scale: float = 10.0) -> torch.Tensor:
    """Logits that put (almost) all probability on ``target`` (per task for the multihead)."""
    if head == "multiclass":
        return scale * F.one_hot(target, num_classes).float()
    parts = [F.one_hot(t, size).float() for t, size in zip(decode_tasks(target), TASK_SIZES, strict=True)]
    return scale * torch.cat(parts, dim=1)


def predicted_classes(logits: torch.Tensor, head: str) -> torch.Tensor:
    if head == "multiclass":
        return logits.argmax(1)
    mask, gender, age = (part.argmax(1) for part in logits.split(TASK_SIZES, dim=1))
    return torch.as_tensor(encode(mask.numpy(), gender.numpy(), age.numpy()))


def every_class_target(num_classes: int, per_class: int = 4) -> torch.Tensor:
    return torch.arange(num_classes).repeat(per_class)


@pytest.mark.parametrize("name,head,num_classes", CASES, ids=CASE_IDS)
def test_loss_is_finite_scalar_with_gradient_to_every_logit(name, head, num_classes):
    torch.manual_seed(0)
    target = every_class_target(num_classes, per_class=2)
    logits = torch.randn(len(target), logit_width(head, num_classes), requires_grad=True)

    loss = build_loss(name, head, num_classes)(logits, target)
    loss.backward()

    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).all()


@pytest.mark.parametrize("name,head,num_classes", CASES, ids=CASE_IDS)
def test_loss_is_lower_for_correct_confident_logits(name, head, num_classes):
    target = every_class_target(num_classes, per_class=1)
    loss = build_loss(name, head, num_classes)
    wrong = (target + 1) % num_classes
    if head == "multihead":  # shift every task so no task is right by accident
        mask, gender, age = decode(target.numpy())
        wrong = torch.as_tensor(encode((mask + 1) % 3, (gender + 1) % 2, (age + 1) % 3))

    right_loss = loss(confident_logits(target, head, num_classes), target)
    wrong_loss = loss(confident_logits(wrong, head, num_classes), target)

    assert right_loss < wrong_loss


@pytest.mark.parametrize("name,head,num_classes", CASES, ids=CASE_IDS)
def test_linear_model_learns_separable_toy_batch(name, head, num_classes):
    torch.manual_seed(0)
    target = every_class_target(num_classes, per_class=4)
    # one orthogonal cluster per class: every grouping of classes (each multihead task) stays
    # linearly separable with a margin
    features = 3 * F.one_hot(target, num_classes).float() + 0.1 * torch.randn(len(target), num_classes)
    model = torch.nn.Linear(num_classes, logit_width(head, num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = build_loss(name, head, num_classes)

    with torch.no_grad():
        first_loss = loss_fn(model(features), target).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = loss_fn(model(features), target)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        logits = model(features)
        final_loss = loss_fn(logits, target).item()
    accuracy = (predicted_classes(logits, head) == target).float().mean().item()
    assert final_loss < 0.5 * first_loss
    assert accuracy >= 0.95


@pytest.mark.parametrize("head,num_classes", HEADS)
def test_focal_with_gamma_zero_equals_cross_entropy(head, num_classes):
    torch.manual_seed(1)
    target = every_class_target(num_classes)
    logits = 3 * torch.randn(len(target), logit_width(head, num_classes))

    focal = build_loss("focal", head, num_classes, focal_gamma=0.0)(logits, target)
    cross_entropy = build_loss("ce", head, num_classes)(logits, target)

    torch.testing.assert_close(focal, cross_entropy)


def test_focal_matches_its_formula_and_survives_certain_predictions():
    torch.manual_seed(2)
    target = every_class_target(5)
    logits = 3 * torch.randn(len(target), 5)
    p_true = F.softmax(logits, 1)[torch.arange(len(target)), target]
    expected = (-((1 - p_true) ** 2) * p_true.log()).mean()

    torch.testing.assert_close(build_loss("focal", "multiclass", 5, focal_gamma=2.0)(logits, target), expected)

    # p_t rounds to exactly 1: (1 - p)^0.5 has an infinite slope there
    certain = confident_logits(target, "multiclass", 5, scale=200.0).requires_grad_()
    build_loss("focal", "multiclass", 5, focal_gamma=0.5)(certain, target).backward()
    assert torch.isfinite(certain.grad).all()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch(eps):
    torch.manual_seed(3)
    target = every_class_target(NUM_CLASSES)
    logits = 3 * torch.randn(len(target), NUM_CLASSES)

    loss = build_loss("label_smoothing", "multiclass", label_smoothing=eps)(logits, target)

    torch.testing.assert_close(loss, torch.nn.CrossEntropyLoss(label_smoothing=eps)(logits, target))


@pytest.mark.parametrize("num_classes", [3, 5, NUM_CLASSES])
def test_f1_loss_equals_one_minus_macro_f1_for_hard_predictions(num_classes):
    rng = np.random.default_rng(num_classes)
    # the batch misses class 0 entirely; predictions are partly wrong
    labels = rng.integers(1, num_classes, size=40)
    pred = np.where(rng.random(40) < 0.6, labels, rng.integers(0, num_classes, size=40))
    near_hard = confident_logits(torch.as_tensor(pred), "multiclass", num_classes, scale=50.0)

    loss = build_loss("f1", "multiclass", num_classes)(near_hard, torch.as_tensor(labels))

    expected = 1 - f1_score(labels, pred, labels=range(num_classes), average="macro", zero_division=0)
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_f1_multihead_loss_sums_one_minus_task_f1():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, NUM_CLASSES, size=50)
    pred = np.where(rng.random(50) < 0.5, labels, rng.integers(0, NUM_CLASSES, size=50))
    near_hard = confident_logits(torch.as_tensor(pred), "multihead", NUM_CLASSES, scale=50.0)
    weights = (0.5, 2.0, 1.5)

    loss = build_loss("f1", "multihead", task_weights=weights)(near_hard, torch.as_tensor(labels))

    expected = sum(
        weight * (1 - f1_score(task_labels, task_pred, labels=range(size), average="macro", zero_division=0))
        for weight, size, task_labels, task_pred in zip(weights, TASK_SIZES, decode(labels), decode(pred), strict=True)
    )
    assert loss.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", LOSSES.names())
def test_multihead_loss_is_weighted_sum_of_task_losses(name):
    torch.manual_seed(4)
    target = every_class_target(NUM_CLASSES)
    logits = 2 * torch.randn(len(target), sum(TASK_SIZES))
    weights = (0.5, 2.0, 1.5)

    loss = build_loss(name, "multihead", focal_gamma=1.5, label_smoothing=0.2, task_weights=weights)(logits, target)

    by_hand = 0.0
    mask_logits, gender_logits, age_logits = logits[:, :3], logits[:, 3:5], logits[:, 5:]
    for weight, size, task_logits, task_target in zip(
        weights, TASK_SIZES, (mask_logits, gender_logits, age_logits), decode(target.numpy()), strict=True
    ):
        task_loss = LOSSES.get(name)(size, 1.5, 0.2)
        by_hand += weight * task_loss(task_logits, torch.as_tensor(task_target))
    torch.testing.assert_close(loss, by_hand)


def test_multihead_cross_entropy_by_hand():
    # label 13 = mask 2, gender 0, age 1
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1.0, 0.5, 0.0, -0.5]])
    loss = build_loss("ce", "multihead", task_weights=(1.0, 2.0, 3.0))(logits, torch.tensor([13]))

    expected = (
        -F.log_softmax(logits[0, :3], 0)[2]
        - 2.0 * F.log_softmax(logits[0, 3:5], 0)[0]
        - 3.0 * F.log_softmax(logits[0, 5:], 0)[1]
    )
    torch.testing.assert_close(loss, expected)


def test_decode_tasks_matches_numpy_decode():
    labels = torch.arange(NUM_CLASSES)
    for ours, reference in zip(decode_tasks(labels), decode(labels.numpy()), strict=True):
        np.testing.assert_array_equal(ours.numpy(), reference)


def test_unknown_loss_name_lists_choices():
    with pytest.raises(KeyError) as error:
        build_loss("hinge", "multiclass")
    assert "hinge" in str(error.value)
    for name in ("ce", "f1", "focal", "label_smoothing"):
        assert name in str(error.value)


def test_bad_head_weights_and_shapes_are_reported():
    with pytest.raises(ValueError, match="unknown head"):
        build_loss("ce", "twohead")
    with pytest.raises(ValueError, match="num_classes=5"):
        build_loss("ce", "multihead", num_classes=5)
    with pytest.raises(ValueError, match="task_weights"):
        build_loss("ce", "multihead", task_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(batch, 8\)"):
        build_loss("ce", "multihead")(torch.zeros(2, NUM_CLASSES), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, 18\)"):
        build_loss("ce", "multiclass")(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))
