"""Training losses: ce, focal, soft macro F1, label smoothing; per-task sum for the multi-head model.

Every entry of ``LOSSES`` is a factory ``(num_classes, focal_gamma, label_smoothing) -> loss_fn``
where ``loss_fn(logits (B, C), target (B,)) -> scalar``. A head (harness.heads) wraps the loss
functions it needs into an ``nn.Module`` the training loop calls as ``loss(logits, target)`` with
18-class (or, for other datasets, C-class) targets: `ClassLoss` or `MultiTaskLoss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.data.labels import TASKS
from harness.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossFactory = Callable[[int, float, float], LossFn]

LOSSES: Registry[LossFactory] = Registry("loss")

F1_EPS = 1e-7


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma * log p_t; gamma = 0 is cross-entropy."""
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    if gamma == 0:
        return -log_p.mean()
    # clamp: (1 - p)^gamma has an infinite slope at p = 1 when gamma < 1
    weight = (1 - log_p.exp()).clamp(min=1e-12) ** gamma
    return -(weight * log_p).mean()


def soft_f1_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """1 - soft macro F1 over all ``num_classes`` classes of this batch.

    Softmax probabilities stand in for hard predictions in per-class TP/FP/FN. A class absent
    from the batch has TP = FN = 0 and so F1 = 0, as the competition metric counts it
    (zero_division=0); it adds a constant and no gradient.
    Unlike cross-entropy its gradient vanishes on confidently wrong samples (saturated softmax),
    so from a saturated start it can stall with a few samples still wrong.
    """
    probs = F.softmax(logits, dim=1)
    truth = F.one_hot(target, num_classes).to(probs.dtype)
    true_pos = (probs * truth).sum(0)
    false_pos = (probs * (1 - truth)).sum(0)
    false_neg = ((1 - probs) * truth).sum(0)
    f1 = 2 * true_pos / (2 * true_pos + false_pos + false_neg + F1_EPS)
    return 1 - f1.mean()


@LOSSES.register("ce")
def _cross_entropy(num_classes: int, focal_gamma: float, label_smoothing: float) -> LossFn:
    return F.cross_entropy


@LOSSES.register("focal")
def _focal(num_classes: int, focal_gamma: float, label_smoothing: float) -> LossFn:
    return lambda logits, target: focal_loss(logits, target, focal_gamma)


@LOSSES.register("f1")
def _soft_f1(num_classes: int, focal_gamma: float, label_smoothing: float) -> LossFn:
    return lambda logits, target: soft_f1_loss(logits, target, num_classes)


@LOSSES.register("label_smoothing")
def _label_smoothing(num_classes: int, focal_gamma: float, label_smoothing: float) -> LossFn:
    return lambda logits, target: F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def decode_tasks(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, gender, age) from 18-class labels; the torch twin of harness.data.labels.decode."""
    return (target // 6) % 3, (target // 3) % 2, target % 3


class ClassLoss(nn.Module):
    """One loss over the classes of a multiclass head."""

    def __init__(self, name: str, loss_fn: LossFn, num_classes: int) -> None:
        super().__init__()
        self.name, self.loss_fn, self.num_classes = name, loss_fn, num_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, self.num_classes, "multiclass")
        return self.loss_fn(logits, target)

    def extra_repr(self) -> str:
        return f"{self.name}, num_classes={self.num_classes}"


class MultiTaskLoss(nn.Module):
    """Weighted sum of one loss per task over the multi-head logits [mask 3 | gender 2 | age 3]."""

    def __init__(self, name: str, task_fns: Sequence[LossFn], task_weights: Sequence[float]) -> None:
        super().__init__()
        self.name, self.task_fns, self.task_weights = name, list(task_fns), tuple(task_weights)
        self.task_sizes = tuple(TASKS.values())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, sum(self.task_sizes), "multihead")
        task_logits = logits.split(self.task_sizes, dim=1)
        parts = [
            weight * loss_fn(part, task_target)
            for loss_fn, weight, part, task_target in zip(
                self.task_fns, self.task_weights, task_logits, decode_tasks(target), strict=True
            )
        ]
        return torch.stack(parts).sum()

    def extra_repr(self) -> str:
        return f"{self.name}, tasks={dict(zip(TASKS, self.task_weights, strict=True))}"


def _check_logits(logits: torch.Tensor, width: int, head: str) -> None:
    if logits.ndim != 2 or logits.shape[1] != width:
        raise ValueError(
            f"{head} loss expects logits of shape (batch, {width}), got {tuple(logits.shape)}; "
            "check that the model head and the loss were built with the same head kind and num_classes"
        )

