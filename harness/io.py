"""Atomic writes: a file is either the old version or the new one, never half of either."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: W&B and report code use this module without it
    import torch


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file beside `path`, fsync, then os.replace it over `path`.

    A process killed at any moment leaves either the old file or the new one (plus at worst a
    hidden temp file named with its pid, never read, which `remove_dead_temporaries` deletes);
    the same pattern as timm's checkpoint saver.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def remove_dead_temporaries(folder: Path) -> None:
    """Delete the temp files of `atomic_file` in `folder` whose writing process is gone (killed)."""
    for temporary in Path(folder).glob(".*.tmp"):
        if writer_gone(temporary.name.removesuffix(".tmp").rsplit(".", 2)[-2]):
            temporary.unlink(missing_ok=True)


def writer_gone(pid_text: str) -> bool:
    """Whether the process whose pid a temporary's name carries can no longer be writing it.

    True when that process is not running, or is this one (a process sweeping its own leftovers
    is not in the middle of writing them); False for a running process or a name without a pid.
    """
    if not pid_text.isdigit():
        return False
    return int(pid_text) == os.getpid() or not process_alive(int(pid_text))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def json_ready(value: Any) -> Any:
    """A JSON-friendly copy: numpy values as Python ones, paths and times as text, NaN/inf as None
    (strict JSON has neither, and W&B charts and tables read them badly)."""
    if isinstance(value, np.generic):
        value = value.item()
    if (isinstance(value, float) and not math.isfinite(value)) or type(value).__name__ == "NAType":
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [json_ready(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if hasattr(value, "isoformat"):  # datetime / pandas Timestamp
        return None if str(value) == "NaT" else value.isoformat()
    if hasattr(value, "total_seconds"):  # timedelta
        return value.total_seconds()
    return value


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True):
    """A tqdm bar for a step that takes more than a few seconds, drawn only where someone watches (stderr a
    terminal): logs and tests stay free of bar noise."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or not sys.stderr.isatty())


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as handle:
        np.save(handle, array)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    try:
        with atomic_file(path) as handle:
            torch.save(obj, handle)
    except RuntimeError as error:
        # torch.save wraps a failed write (disk full, file too large) in a RuntimeError; surface the cause
        cause = error.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, f"cannot write checkpoint {path}: {cause.strerror}; "
                          "free disk space (the previous checkpoint is kept)") from error
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Checkpoints are read with weights_only=True: tensors and plain containers, never code."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)
