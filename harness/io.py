"""Atomic writes: a file is either the old version or the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _commit(temp: Path, path: Path) -> None:
    os.replace(temp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    temp = _temp_for(path)
    try:
        with open(temp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _commit(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    temp = _temp_for(path)
    try:
        with open(temp, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        _commit(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace (timm's checkpoint saver does the same)."""
    path = Path(path)
    temp = _temp_for(path)
    try:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _commit(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Checkpoints are read with weights_only=True: tensors and plain containers, never code."""
    return torch.load(path, map_location=map_location, weights_only=True)
