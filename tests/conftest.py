"""Shared fixtures: tiny hand-made datasets and the real study files shrunk to CPU-seconds."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from harness.config import load_study

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Tiny CPU models run fastest on one thread, and tests then leave the other core to the
# DataLoader and subprocesses instead of fighting over both.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
STEMS = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
ENABLE_BROWSER_TESTS = "sudo apt-get install chromium"


def pytest_unconfigure(config) -> None:
    """Say loudly, on the run's last line (after the counts), when the browser tests could not run."""
    terminalreporter = config.pluginmanager.get_plugin("terminalreporter")
    if CHROMIUM is None and terminalreporter is not None:
        terminalreporter.write_line(f"BROWSER TESTS DID NOT RUN: no chromium on PATH; `{ENABLE_BROWSER_TESTS}` "
                                    "enables them", red=True, bold=True)


def harness_env(**extra: str) -> dict[str, str]:
    """The environment of a `harness` subprocess in the tests: one torch thread, W&B quiet."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}


HARNESS_STUDY = [sys.executable, "-m", "harness.cli", "study"]


def smoke_study_args(tmp_path: Path, shared_data: Path, *extra: str) -> list[str]:
    """Arguments of `harness study` for the default study's smoke variant on the session's data:
    3 epochs, no pruner, 1 s heartbeats (a killed process's trial goes stale in 3 s)."""
    return [str(REPO / "studies" / "default.yaml"), "--smoke",
            "--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"data.root={shared_data / 'default' / 'data'}",
            "--set", f"data.cache_dir={shared_data / 'cache'}", "--set", "search.heartbeat_s=1",
            "--set", "search.pruner.name=none", "--set", "train.epochs=3", *extra]


def wait_for(path: Path, process, timeout: float = 300) -> bool:
    """Wait until `path` exists (True) or the process ends or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    return path.exists()


def write_image(path: Path, seed: int, size=(24, 32)) -> None:
    """A small real image file (format from the suffix)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")


def write_person(images_dir: Path, folder: str, suffix=".jpg", stems=STEMS, seed=0) -> Path:
    person = images_dir / folder
    for i, stem in enumerate(stems):
        write_image(person / f"{stem}{suffix}", seed * 10 + i)
    return person


def write_competition(root: Path, folders: list[str], csv_rows: list[dict] | None = None) -> Path:
    """A competition-layout train set with the given person folders and a matching train.csv."""
    images = root / "train" / "images"
    for i, folder in enumerate(folders):
        write_person(images, folder, suffix=[".jpg", ".jpeg", ".png", ".JPG"][i % 4], seed=i)
    if csv_rows is None:
        csv_rows = []
        for folder in folders:
            ident, gender, race, age = folder.split("_")
            csv_rows.append(dict(id=ident, gender=gender, race=race, age=age, path=folder))
    pd.DataFrame(csv_rows).to_csv(root / "train" / "train.csv", index=False)
    return root


def people(n: int) -> list[str]:
    """n person folders cycling through genders and all three age groups."""
    ages = [22, 45, 63]
    return [f"{i:06d}_{['male', 'female'][i % 2]}_Asian_{ages[(i // 2) % 3]}" for i in range(n)]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> str:
    """A real PostgreSQL server for the session (the pgserver wheel's binaries on a loopback port), or the
    one HARNESS_TEST_POSTGRES_URL names; yields its URL. Tests create a database each (create_database)."""
    from harness.bench.postgres import running_postgres

    if os.environ.get("HARNESS_TEST_POSTGRES_URL"):
        yield os.environ["HARNESS_TEST_POSTGRES_URL"]
        return
    with running_postgres(tmp_path_factory.mktemp("postgres") / "server") as url:
        yield url


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """One folder for the smoke studies' synthetic data and decoded cache, shared by the session."""
    return tmp_path_factory.mktemp("shared-data")


@pytest.fixture
def smoke_study(tmp_path, shared_data):
    """A study file's smoke variant with its runs under tmp_path (data and cache shared by the session)."""

    def load(path: str | Path = REPO / "studies" / "default.yaml", **overrides):
        name = Path(path).stem
        return load_study(path, smoke=True, overrides={
            # a name of its own per test: W&B run ids derive from it, and one pytest process
            # shares one W&B service, which refuses an id that an earlier test still holds
            "name": f"{name}-{tmp_path.name}"[:90],
            "runs_dir": str(tmp_path / "runs"),
            "data.root": str(shared_data / name / "data"),
            "data.cache_dir": str(shared_data / "cache"),
            **overrides,
        })

    return load
