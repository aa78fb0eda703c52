"""Security basics: files the harness reads never run code, secrets never land in its outputs,
and paths read from data files stay inside the data root.

The payloads below are harmless (they create a marker folder) so that a test can prove that the
same payload *would* run through an unsafe loader, and then that the harness refuses it.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, people, write_competition, write_image
from harness.cli import parse_overrides
from harness.config import ConfigError, load_study, parse_study
from harness.data.readers import DataError, read_competition_eval, read_competition_train, read_csv_index
from harness.io import atomic_torch_save, load_checkpoint
from harness.promotion.ensemble import run_ensemble
from harness.report import write_report
from harness.runtime import redact
from harness.study import run_study, status
from harness.train import run_trial

FAKE_WANDB_KEY = "5ec12e7a" * 5  # the shape of a W&B API key (40 hex characters)
FAKE_TOKEN = "hf_SeCrEtToKeNnEvErWrItTeN0123456789"


# ------------------------------------------------------------------ loaders never run code


class Payload:
    """Unpickling this calls os.mkdir(marker): proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


UNSAFE_CALLS = {  # (module, function) -> why it is banned in harness/
    ("pickle", "load"): "unpickles arbitrary objects", ("pickle", "loads"): "unpickles arbitrary objects",
    ("yaml", "load"): "can construct Python objects", ("yaml", "unsafe_load"): "constructs Python objects",
    ("yaml", "full_load"): "not the safe loader", ("yaml", "load_all"): "can construct Python objects",
    ("marshal", "loads"): "runs code objects", ("builtins", "eval"): "runs code", ("builtins", "exec"): "runs code",
}


def harness_sources() -> list[Path]:
    sources = sorted((REPO / "harness").rglob("*.py"))
    assert len(sources) > 10
    return sources


def module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it refers to: 'torch' for `import torch as th`, 'torch.load' for `from torch import load`."""
    aliases = {"eval": "builtins.eval", "exec": "builtins.exec"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                aliases[name.asname or name.name] = name.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for name in node.names:
                aliases[name.asname or name.name] = f"{node.module}.{name.name}"
    return aliases


def called_name(call: ast.Call, aliases: dict[str, str]) -> str | None:
    """'torch.load' for torch.load(...), th.load(...) or load(...) after `from torch import load`."""
    func = call.func
    if isinstance(func, ast.Name):
        return aliases.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{aliases.get(func.value.id, func.value.id)}.{func.attr}"
    return None


def keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def test_every_torch_load_in_harness_is_weights_only():
    loads, unsafe = [], []
    for path in harness_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = module_aliases(tree)
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            name, where = called_name(call, aliases), f"{path.relative_to(REPO)}:{call.lineno}"
            if name == "torch.load":
                loads.append(where)
                if not keyword_is(call, "weights_only", True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            elif name in ("numpy.load", "np.load") and keyword_is(call, "allow_pickle", True):
                unsafe.append(f"{where}: np.load(allow_pickle=True)")
            elif name and tuple(name.rsplit(".", 1)) in UNSAFE_CALLS:
                unsafe.append(f"{where}: {name} {UNSAFE_CALLS[tuple(name.rsplit('.', 1))]}")
    assert loads, "expected harness/io.py load_checkpoint to call torch.load"
    assert not unsafe, unsafe


@pytest.fixture
def poisoned_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A last.pt-shaped checkpoint with an object inside whose unpickling runs os.mkdir."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "last.pt"
    atomic_torch_save({"model": {"w": torch.zeros(2)}, "next_epoch": 1, "extra": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it ...
    assert marker.is_dir()
    marker.rmdir()
    return path, marker


def test_load_checkpoint_refuses_a_pickled_object(poisoned_checkpoint):
    path, marker = poisoned_checkpoint
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)  # ... the harness's loader does not
    assert not marker.exists()


def test_a_trial_resuming_from_a_poisoned_checkpoint_fails_without_running_it(poisoned_checkpoint, tmp_path):
    path, marker = poisoned_checkpoint
    root = write_competition(tmp_path / "data", people(12))
    cfg = parse_study(f"name: poisoned\nruns_dir: {tmp_path / 'runs'}\n"
                      f"data: {{root: {root}, cache_dir: {tmp_path / 'cache'}, cache_workers: 1,"
                      " image_size: {height: 32, width: 24}}\n"
                      "params: {backbone: resnet10t, pretrained: false}\ntrain: {epochs: 1}\n")
    run_dir = tmp_path / "runs" / "trial"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(path.read_bytes())
    result = run_trial(cfg, run_dir=run_dir)
    assert result.state == "failed" and "Weights only load failed" in result.reason, result.reason
    assert not marker.exists()


YAML_PAYLOADS = [
    "seed: !!python/object/apply:os.mkdir ['{marker}']",
    "seed: !!python/object/new:os.mkdir ['{marker}']",
    "seed: !!python/name:os.system",
]


@pytest.mark.parametrize("payload", YAML_PAYLOADS, ids=["object-apply", "object-new", "name"])
def test_a_study_file_with_a_python_tag_is_refused_and_runs_nothing(payload, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: evil\nruns_dir: {tmp_path / 'runs'}\n" + payload.format(marker=marker) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML: could not determine a constructor for the tag"):
        load_study(path)
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_a_set_override_with_a_python_tag_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    with pytest.raises((ConfigError, yaml.YAMLError)):  # ConfigError once parse_overrides wraps YAML errors
        parse_overrides([f"seed=!!python/object/apply:os.mkdir ['{marker}']"])
    assert not marker.exists()


# ------------------------------------------------------------------------- secrets


def test_secrets_from_the_environment_never_land_in_study_outputs(smoke_study, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = smoke_study(**{"search.trials": 2, "train.epochs": 1, "train.max_train_batches": 2,
                         "params.backbone": "resnet10t", "search.space": {"lr": {"type": "float", "low": 0.001,
                                                                                  "high": 0.01, "log": True}}})
    # as `harness study` does: W&B's staging and cache folders inside the study folder, so they are searched too
    monkeypatch.setenv("WANDB_DATA_DIR", str(cfg.study_dir / "wandb" / "data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(cfg.study_dir / "wandb" / "cache"))
    run_study(cfg, progress=False)
    status(cfg)
    run_ensemble(cfg)
    write_report(cfg)

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "result.json", "metrics.csv", "last.pt", "trials.csv", "report.html"} <= names
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "debug-internal.log" for p in files)
    for secret in (FAKE_WANDB_KEY, FAKE_TOKEN):
        holding = [str(p.relative_to(tmp_path)) for p in files if secret.encode() in p.read_bytes()]
        assert not holding, f"{secret[:6]}... written to {holding}"


@pytest.mark.parametrize("url, shown", [
    ("postgresql://harness:hunter2@db.example:5432/studies", "postgresql://harness:***@db.example:5432/studies"),
    ("postgresql+psycopg://harness:hun:ter@2@db:5432/s", "postgresql+psycopg://harness:***@db:5432/s"),
    ("mysql+pymysql://root:hunter2@127.0.0.1/optuna?charset=utf8", "mysql+pymysql://root:***@127.0.0.1/optuna?charset=utf8"),
    ("sqlite:////work/runs/s/study.db", "sqlite:////work/runs/s/study.db"),
    ("postgresql://harness@db/studies?password=hunter2", "postgresql://harness@db/studies?password=***"),
], ids=["postgres", "password-with-colon-and-at", "mysql-with-query", "sqlite", "password-in-query"])
def test_storage_urls_are_shown_without_their_password(url, shown):
    assert redact(url) == shown
    assert "hunter2" not in redact(url) and "ter@2" not in redact(url)


# ------------------------------------------------------------- paths inside the data root

OUTSIDE = "outside.jpg"  # written next to the data root: what an escaping path reaches


def escaping(kind: str, tmp_path: Path, depth: int) -> str:
    """A path `depth` folders below the root that reaches the outside image: '../' form or absolute."""
    write_image(tmp_path / OUTSIDE, 0)
    return "../" * depth + OUTSIDE if kind == "relative" else str(tmp_path / OUTSIDE)


def refused(source: Path, path: str) -> str:
    return rf"^{re.escape(str(source))}: path {re.escape(repr(path))} escapes the data root"


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_correction_target_outside_the_data_root_is_refused(kind, tmp_path):
    root = write_competition(tmp_path / "data", people(2))
    target = escaping(kind, tmp_path, depth=3)  # targets are relative to train/images
    corrections = root / "fix.csv"
    pd.DataFrame([dict(target=target, gender="male", age="", mask="")]).to_csv(corrections, index=False)
    with pytest.raises(DataError, match=refused(corrections, target)):
        read_competition_train(root, corrections=corrections)


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_an_eval_image_id_outside_the_data_root_is_refused(kind, tmp_path):
    root = tmp_path / "data"
    image_id = escaping(kind, tmp_path, depth=3)  # image ids are relative to eval/images
    write_image(root / "eval" / "images" / ("a" * 40 + ".jpg"), 1)
    info = root / "eval" / "info.csv"
    info.write_text(f"ImageID,ans\n{'a' * 40}.jpg,0\n{image_id},0\n")
    with pytest.raises(DataError, match=refused(info, image_id)):
        read_competition_eval(root)


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_csv_index_path_outside_the_data_root_is_refused(kind, tmp_path):
    root = tmp_path / "data"
    image = escaping(kind, tmp_path, depth=1)  # index paths are relative to the root
    write_image(root / "cats" / "a.jpg", 2)
    index = root / "index.csv"
    index.write_text(f"path,label\ncats/a.jpg,cat\n{image},dog\n")
    with pytest.raises(DataError, match=refused(index, image)):
        read_csv_index(root, Path("index.csv"))


def test_a_path_that_only_passes_through_dot_dot_inside_the_root_is_fine(tmp_path):
    root = tmp_path / "data"
    write_image(root / "cats" / "a.jpg", 2)
    (root / "index.csv").write_text("path,label\ncats/../cats/a.jpg,cat\n")
    frame = read_csv_index(root, Path("index.csv")).frame
    assert frame["path"].tolist() == [str((root / "cats" / "a.jpg").resolve())]


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/abs", ".hidden"])
def test_a_study_name_cannot_leave_the_runs_folder(name, tmp_path):
    with pytest.raises(ConfigError, match=r"name: String should match pattern"):
        parse_study(f"name: '{name}'\nruns_dir: {tmp_path}\n")
