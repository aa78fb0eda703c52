"""Shortcut measures that know where they apply: the portrait-only probe and remedies are refused on data
without faces, before any compute and without touching a study; the context audit flags labels that the
background predicts and stays quiet where it does not, on data with no person at all."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from conftest import harness_env
from harness.applicability import foreground_users
from harness.config import load_study, parse_study
from harness.context_audit import audit_views, corner_region, describe, sample_rows
from harness.data.prepare import prepare_data
from harness.remedies import run_remedies
from harness.runtime import default_storage

ROOT = Path(__file__).resolve().parents[1]


def digits_as_user(tmp_path: Path, name: str = "copied", **extra) -> Path:
    """studies/default.yaml copied onto scikit-learn's digits, as a user would: the data pointed elsewhere,
    multihead and the portrait crops removed, robust/f1 and the swap probability kept."""
    cfg = load_study(ROOT / "studies" / "default.yaml", overrides={
        "name": name, "runs_dir": str(tmp_path / "runs"), "data.format": "imagefolder", "data.synthetic": None,
        "data.sample": "digits", "data.root": str(tmp_path.parent / "digits-shared"),
        "data.cache_dir": str(tmp_path.parent / "digits-cache"), "data.image_size": {"height": 32, "width": 32},
        "search.space.head.choices": ["multiclass"], "params.preprocess": "none",
        "search.space.preprocess.choices": ["none", "center_crop"], "search.enqueue": [], "tracking.mode": "disabled",
        **extra})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def test_the_default_study_on_digits_is_refused_before_any_compute_naming_the_share_and_the_fix(tmp_path):
    study_file = digits_as_user(tmp_path)
    cfg = load_study(study_file)
    assert foreground_users(cfg) == ["search.objective robust/f1", "search.space.bgswap_p"]
    storage = default_storage(cfg)
    cfg.study_dir.mkdir(parents=True)
    existing = optuna.create_study(study_name="someone-elses", storage=storage)
    existing.set_user_attr("kept", True)
    database = Path(storage.removeprefix("sqlite:///"))
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    result = subprocess.run([sys.executable, "-m", "harness.cli", "study", str(study_file)], capture_output=True,
                            text=True, env=harness_env(), timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "faces found in 0% of a sample of 64 of 1797 images (needs >= 80%)" in result.stderr
    assert "search.objective robust/f1, search.space.bgswap_p" in result.stderr
    assert "to fix: set `search.objective: val/f1`" in result.stderr and "Traceback" not in result.stderr
    assert not (cfg.study_dir / "trials").exists()
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before
    assert optuna.get_all_study_names(storage) == ["someone-elses"]


def test_a_study_that_uses_no_person_measure_skips_the_foreground_and_the_probe(tmp_path):
    cfg = load_study(digits_as_user(tmp_path, "plain", **{"search.objective": "val/f1", "params.bgswap_p": 0.0}))
    cfg = cfg.replace({"search.space": {k: v.model_dump(mode="json") for k, v in cfg.search.space.items()
                                        if k != "bgswap_p"}})
    assert foreground_users(cfg) == []
    data = prepare_data(cfg, progress=False)
    assert data.foreground is None and data.applicability is None
    assert not list(Path(cfg.data.cache_dir).glob("*.fg*.json"))  # no face or mask was searched for


def test_remedies_that_need_faces_are_reported_as_not_applying(tmp_path):
    # the default study's objective, which reads the swapped view
    cfg = load_study(digits_as_user(tmp_path, "remedies"), overrides={"search.objective": "robust/f1"})
    table = run_remedies(cfg, names=["face_crop", "remove_background", "bgswap_aug"])
    assert [row["applies"] for row in table["rows"]] == [False, False, False]
    assert all("faces found in 0%" in row["reason"] for row in table["rows"])
    assert not (cfg.study_dir / "remedies").exists()
    assert table["objective"] == "val/f1" and "not the study's objective robust/f1" in table["note"]


def test_a_person_objective_on_portraits_still_applies(smoke_study):
    cfg = smoke_study()
    users = foreground_users(cfg)
    assert users == ["search.objective robust/f1", "search.space.bgswap_p", "params.preprocess remove_background",
                     "search.space.preprocess face_crop"]
    data = prepare_data(cfg, progress=False)
    assert data.foreground is not None and data.applicability.applies
    assert data.applicability.face_share >= 0.8


# ------------------------------------------------------------------------------ the audit


def context_dataset(count: int, trap: bool, seed: int = 0):
    """Two classes told apart by a bright or dark square in the middle; the background's hue follows the
    class in `trap` data and is random otherwise. Three images per group."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, 2, count // 3), 3)
    groups = np.repeat(np.arange(count // 3), 3).astype(str)
    hues = np.where(rng.random(len(labels)) < 0.9, labels, rng.integers(0, 2, len(labels))) if trap else \
        rng.integers(0, 2, len(labels))
    images = rng.integers(0, 60, (len(labels), 32, 32, 3)).astype(np.uint8)
    images[..., 0] += (hues * 120).astype(np.uint8)[:, None, None]  # the background: reddish or bluish
    images[..., 2] += ((1 - hues) * 120).astype(np.uint8)[:, None, None]
    images[:, 10:22, 10:22] = np.where(labels == 1, 230, 20)[:, None, None, None]  # the object
    frame = pd.DataFrame({"person": groups, "label": labels})
    frame.attrs.update(tasks=False)
    return images, frame


def test_the_audit_flags_a_background_that_follows_the_label_and_not_one_that_does_not():
    images, frame = context_dataset(240, trap=True)
    trapped = audit_views(images, frame, None, ["none", "center_crop"], folds=4, permutations=8)
    assert [(item.view, item.region, item.task) for item in trapped] == [("as loaded", "corners", "label"),
                                                                        ("center_crop", "corners", "label")]
    assert all(item.flagged for item in trapped)
    assert trapped[0].f1 > 0.8 and trapped[0].low > trapped[0].chance_high
    images, frame = context_dataset(240, trap=False)
    free = audit_views(images, frame, None, ["none"], folds=4, permutations=8)
    assert not free[0].flagged and free[0].whole_f1 > 0.9  # the object is there; the context says nothing


def test_a_large_set_is_audited_on_a_sample_of_whole_persons_with_the_same_verdict():
    images, frame = context_dataset(600, trap=True)  # 200 persons of 3 images
    every = audit_views(images, frame, None, ["none"], folds=4, permutations=8)
    sample = audit_views(images, frame, None, ["none"], folds=4, permutations=8, max_images=300)
    assert every[0].flagged and sample[0].flagged and every[0].sampled == ""
    assert sample[0].sampled == "300 of 600 images"
    assert "on 300 of 600 images: whole persons" in describe(sample)[0]
    rows = sample_rows(frame["person"].to_numpy(), 300, seed=0)
    chosen = set(frame["person"].to_numpy()[rows])
    assert len(rows) == 300 and len(chosen) == 100  # whole persons: all three images of each
    assert np.array_equal(rows, sample_rows(frame["person"].to_numpy(), 300, seed=0))  # the same every run


def test_a_foreground_taken_at_rows_is_the_foreground_of_those_images():
    from harness.foreground import Foreground

    count = 5
    fg = Foreground(np.arange(count * 4, dtype=np.float32).reshape(count, 4), np.array([1, 0, 1, 1, 0], bool),
                    np.arange(count, dtype=np.uint8)[:, None, None] * np.ones((count, 2, 2), np.uint8),
                    np.zeros((count, 2, 2, 3), np.uint8), {"images": count, "mask_fallback_rows": [1, 4]})
    taken = fg.take(np.array([4, 0, 1]))
    assert taken.faces[:, 0].tolist() == [16, 0, 4] and taken.found.tolist() == [False, True, False]
    assert taken.masks[:, 0, 0].tolist() == [4, 0, 1]
    assert taken.stats["mask_fallback_rows"] == [0, 2] and taken.stats["images"] == 3
    assert taken.counts() == {"images": 3, "no_face": 2, "mask_fallback": 2}


def test_the_audit_stays_quiet_where_the_object_itself_reaches_the_corners(tmp_path):
    cfg = parse_study(f"name: d\ndata: {{format: imagefolder, sample: digits, root: {tmp_path / 'digits'}, "
                      f"cache_dir: {tmp_path / 'cache'}, image_size: {{height: 32, width: 32}}}}\n")
    data = prepare_data(cfg, progress=False)
    rows = np.arange(0, len(data.frame), 3)  # a third of the scans keeps the test short
    frame = data.frame.iloc[rows].reset_index(drop=True)
    frame.attrs.update(data.frame.attrs)
    found = audit_views(np.asarray(data.cache.images)[rows], frame, None, ["none"], folds=4, permutations=8)
    assert found[0].f1 > found[0].chance_high  # the corners hold a little of each digit's strokes...
    assert not found[0].flagged and found[0].share < 0.5  # ...far less than the whole scan: no shortcut


def test_corner_patches_are_the_corners():
    region = corner_region(32, 32)
    assert region[0, 0] and region[-1, -1] and region[0, -1] and region[-1, 0]
    assert not region[16, 16] and not region[0, 16] and region.sum() == 4 * 2 * 2


@pytest.mark.parametrize("name", ["default", "mask", "digits"])
def test_every_study_file_states_what_needs_portraits(name):
    cfg = load_study(ROOT / "studies" / f"{name}.yaml")
    users = foreground_users(cfg)
    if cfg.data.format == "competition":
        assert users and cfg.shortcuts.min_face_share > 0
    else:
        assert users == []


def test_the_real_photo_trap_puts_labels_on_backgrounds_in_train_only(tmp_path):
    import pandas as pd

    from harness.data.realphoto import TRAPPED, make_realphoto

    trapped, free = tmp_path / "trap", tmp_path / "free"
    assert make_realphoto(trapped, trap_strength=1.0, size=48) == 800
    make_realphoto(free, trap_strength=0.0, size=48)
    truth = {name: pd.read_csv(root / "truth.csv") for name, root in (("trap", trapped), ("free", free))}
    for table in truth.values():
        table["split"] = table["path"].str.split("/").str[1]
        table["label"] = np.where(table["face"], "face", "non_face")
        table["follows"] = [kind in TRAPPED[label] for kind, label in zip(table["background"], table["label"])]
    trap, twin = truth["trap"], truth["free"]
    assert trap.loc[trap["split"] == "train", "follows"].all()  # every train background follows its label
    assert 0.3 < trap.loc[trap["split"] == "eval", "follows"].mean() < 0.7  # eval backgrounds are random
    assert 0.3 < twin.loc[twin["split"] == "train", "follows"].mean() < 0.7
    assert (trap[["path", "x0", "y0", "x1", "y1"]] == twin[["path", "x0", "y0", "x1", "y1"]]).all().all()  # same poses
    train = pd.read_csv(trapped / "train.csv")
    assert len(train) == 560 and train["group"].nunique() == 140 and set(train["label"]) == {"face", "non_face"}
    assert not set(train["group"]) & set(pd.read_csv(trapped / "eval.csv")["group"])  # no subject on both sides
