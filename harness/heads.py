"""Heads: what sits on the backbone's pooled features, one registered object per kind.

A head owns everything that depends on its kind: its layers (`build`), how its logits
become class log-probabilities (`class_log_probs`) and per-task logits (`task_logits`),
and the training loss over its logits (`loss`). Adding a kind means registering one
more `Head`; nothing else in the harness names head kinds.

    multiclass   one linear layer over the C classes (any dataset)
    multihead    one linear layer per task, mask 3 | gender 2 | age 3 (the competition's 18 classes)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.data.labels import NUM_CLASSES, TASKS
from harness.losses import LOSSES, ClassLoss, MultiTaskLoss
from harness.registry import Registry


def _task_slices() -> dict[str, slice]:
    """Where each task's logits sit in the multihead output: mask 0:3, gender 3:5, age 5:8."""
    slices, start = {}, 0
    for task, size in TASKS.items():
        slices[task] = slice(start, start + size)
        start += size
    return slices


TASK_SLICES = _task_slices()


class Head(ABC):
    """One kind of head. `needs_tasks`: it only works on data with the mask/gender/age tasks."""

    needs_tasks = False

    @abstractmethod
    def build(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
        """The layers, from pooled features (B, num_features) to this head's logits."""

    @abstractmethod
    def class_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) log-probabilities over the classes."""

    @abstractmethod
    def task_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task logits {"mask": (B, 3), "gender": (B, 2), "age": (B, 3)}."""

    @abstractmethod
    def loss(self, name: str, num_classes: int, focal_gamma: float, label_smoothing: float,
             task_weights: Sequence[float]) -> nn.Module:
        """The loss `name` (a LOSSES entry) over this head's logits, called as loss(logits, class target)."""


HEADS: Registry[Head] = Registry("head")


class MulticlassHead(Head):
    """Dropout then one linear layer over the classes; works for any number of classes."""

    def build(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
        return nn.Sequential(nn.Dropout(drop_rate), nn.Linear(num_features, num_classes))

    def class_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=1)

    def task_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The log of each task's marginal probability (valid logits for that task too); 18 classes only."""
        if logits.shape[1] != NUM_CLASSES:
            raise ValueError(f"task logits need the {NUM_CLASSES} competition classes, got {logits.shape[1]}")
        joint = F.log_softmax(logits, dim=1).view(-1, *TASKS.values())  # (B, mask, gender, age)
        return {"mask": joint.logsumexp(dim=(2, 3)), "gender": joint.logsumexp(dim=(1, 3)),
                "age": joint.logsumexp(dim=(1, 2))}

    def loss(self, name: str, num_classes: int, focal_gamma: float, label_smoothing: float,
             task_weights: Sequence[float]) -> nn.Module:
        return ClassLoss(name, LOSSES.get(name)(num_classes, focal_gamma, label_smoothing), num_classes)


class MultiTaskHead(nn.Module):
    """One linear layer per task (mask 3, gender 2, age 3); outputs their logits side by side."""

    def __init__(self, num_features: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(drop_rate)
        self.tasks = nn.ModuleDict({task: nn.Linear(num_features, size) for task, size in TASKS.items()})

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.dropout(features)
        return torch.cat([layer(features) for layer in self.tasks.values()], dim=1)


class MultiheadHead(Head):
    """A layer per task; class m*6+g*3+a gets log p(mask=m) + log p(gender=g) + log p(age=a)."""

    needs_tasks = True

    def build(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
        self._check_classes(num_classes)
        return MultiTaskHead(num_features, drop_rate)

    def class_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        mask, gender, age = (F.log_softmax(part, dim=1) for part in self.task_logits(logits).values())
        joint = mask[:, :, None, None] + gender[:, None, :, None] + age[:, None, None, :]
        return joint.flatten(1)  # row-major over (mask, gender, age) = m*6 + g*3 + a

    def task_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {task: logits[:, part] for task, part in TASK_SLICES.items()}

    def loss(self, name: str, num_classes: int, focal_gamma: float, label_smoothing: float,
             task_weights: Sequence[float]) -> nn.Module:
        self._check_classes(num_classes)
        if len(task_weights) != len(TASKS):
            raise ValueError(
                f"task_weights needs one weight per task {list(TASKS)}, got {len(task_weights)}: {tuple(task_weights)}")
        factory = LOSSES.get(name)
        return MultiTaskLoss(name, [factory(size, focal_gamma, label_smoothing) for size in TASKS.values()],
                             task_weights)

    @staticmethod
    def _check_classes(num_classes: int) -> None:
        if num_classes != NUM_CLASSES:
            raise ValueError(
                f"head 'multihead' predicts mask x gender x age = {NUM_CLASSES} classes, but num_classes={num_classes}; "
                "use head 'multiclass' for data without the three tasks")


HEADS.register("multiclass")(MulticlassHead())
HEADS.register("multihead")(MultiheadHead())


def build_loss(name: str, head: str, num_classes: int = NUM_CLASSES, focal_gamma: float = 2.0,
               label_smoothing: float = 0.1, task_weights: Sequence[float] = (1.0, 1.0, 1.0)) -> nn.Module:
    """The loss `name` for a `head` kind, called as loss(logits, target) with class targets."""
    return HEADS.get(head).loss(name, num_classes, focal_gamma, label_smoothing, task_weights)
