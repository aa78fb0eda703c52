"""The competition's label encoding: 18 classes = mask x gender x age."""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 18
TASKS = {"mask": 3, "gender": 2, "age": 3}
MASK_NAMES = ("wear", "incorrect", "not_worn")
GENDER_NAMES = ("male", "female")
AGE_NAMES = ("young", "middle", "old")

# file stem -> mask state: mask1..mask5 worn, incorrect_mask, normal (no mask)
MASK_OF_STEM = {**{f"mask{i}": 0 for i in range(1, 6)}, "incorrect_mask": 1, "normal": 2}
GENDER_OF_WORD = {"male": 0, "female": 1}


def encode(mask, gender, age):
    """18-class label from task labels (scalars or arrays)."""
    return np.asarray(mask) * 6 + np.asarray(gender) * 3 + np.asarray(age)


def decode(label):
    """(mask, gender, age) from 18-class labels (scalars or arrays)."""
    label = np.asarray(label)
    return (label // 6) % 3, (label // 3) % 2, label % 3


def age_group(age, bounds: tuple[int, int] = (30, 60)):
    """0 below bounds[0], 1 up to bounds[1] (exclusive), 2 from bounds[1] on."""
    low, high = bounds
    age = np.asarray(age)
    return (age >= low).astype(int) + (age >= high).astype(int)


def class_name(label: int) -> str:
    mask, gender, age = (int(x) for x in decode(label))
    return f"{MASK_NAMES[mask]}/{GENDER_NAMES[gender]}/{AGE_NAMES[age]}"
