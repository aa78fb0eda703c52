"""The synthetic generator writes the competition's layout, its proportions, its junk and its traps."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import f1_score

from harness.data import synthetic
from harness.data.labels import MASK_OF_STEM, age_group, decode, encode
from harness.data.synthetic import STEMS, make_synthetic, read_truth

FOLDER = re.compile(r"^(\d{6})_(male|female)_Asian_(\d+)$")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small") / "data"
    return root, make_synthetic(root, people=24, seed=0, width=96, height=128)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """120 people in tiny pictures, 120 more in eval: enough persons for proportions and statistics."""
    root = tmp_path_factory.mktemp("medium") / "data"
    make_synthetic(root, people=120, seed=0, width=48, height=64, eval_images=120 * 7)
    return root


def person_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "train" / "images").iterdir() if p.is_dir())


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def labelled_train_images(root: Path):
    """(path, person folder, 18-class label) for every train image, from folder and file names."""
    for folder in person_folders(root):
        _, gender, age = FOLDER.match(folder.name).groups()
        for path in images_of(folder):
            label = encode(MASK_OF_STEM[path.stem], gender == "female", age_group(int(age)))
            yield path, folder.name, int(label)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_layout_is_the_competitions(small):
    root, summary = small
    folders = person_folders(root)
    assert len(folders) == 24 == summary["people"]
    suffixes = Counter()
    for folder in folders:
        assert FOLDER.match(folder.name), folder.name
        images = images_of(folder)
        assert sorted(p.stem for p in images) == sorted(STEMS)
        suffixes.update(p.suffix for p in images)
        for image in images:
            assert cv2.imread(str(image)).shape == (128, 96, 3)
    assert set(suffixes) == {".jpg", ".jpeg", ".png", ".JPG"}
    assert suffixes[".jpg"] > sum(suffixes.values()) / 2
    assert summary["train_images"] == 24 * 7


def test_macos_junk_sits_beside_the_images(small):
    root, summary = small
    forks = sorted(root.glob("train/images/*/._*"))
    stores = sorted(root.glob("train/images/**/.DS_Store"))
    assert forks and stores
    for fork in forks:
        assert (fork.parent / fork.name[2:]).is_file()  # ._mask1.jpg beside mask1.jpg
        assert fork.stat().st_size < 100 and cv2.imread(str(fork)) is None
    assert summary["junk_files"] == len(forks) + len(stores)


def test_train_csv_lists_every_folder_and_one_id_names_two_persons(small):
    root, summary = small
    table = pd.read_csv(root / "train" / "train.csv", dtype=str)
    assert list(table.columns) == ["id", "gender", "race", "age", "path"]
    assert len(table) == 24
    assert sorted(table["path"]) == [f.name for f in person_folders(root)]
    assert (table["path"] == table["id"] + "_" + table["gender"] + "_" + table["race"] + "_" + table["age"]).all()
    shared = table[table.duplicated("id", keep=False)]
    assert len(shared) == 2 and summary["duplicate_ids"] == 1
    assert shared["gender"].nunique() == 2
    assert len(set(age_group(shared["age"].astype(int)))) == 2


def test_people_follow_the_competitions_proportions(medium):
    matches = [FOLDER.match(f.name).groups() for f in person_folders(medium)]
    groups = Counter(int(age_group(int(age))) for _, _, age in matches)
    genders = Counter(gender for _, gender, _ in matches)
    assert groups[2] < groups[1] and groups[2] < groups[0]  # old is rarest
    assert groups == {0: 57, 1: 55, 2: 8}  # 1281 / 1227 / 192 of 120
    assert genders["female"] > genders["male"]
    assert 0.55 < genders["female"] / 120 < 0.67
    ages = [int(age) for _, _, age in matches]
    assert min(ages) >= 18 and max(ages) <= 70
    assert len({a for a in ages if 30 <= a < 50}) > 3  # the middle group is not only next to the bounds


def test_same_seed_same_bytes_whatever_the_workers_other_seed_differs(tmp_path):
    first = make_synthetic(tmp_path / "a", people=24, seed=3, width=64, height=96, workers=1)
    # two worker processes, called from a script without an `if __name__ == "__main__"` guard
    script = tmp_path / "unguarded.py"
    script.write_text("from harness.data.synthetic import make_synthetic\n"
                      f"make_synthetic({str(tmp_path / 'b')!r}, people=24, seed=3, width=64, height=96, workers=2)\n")
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    make_synthetic(tmp_path / "c", people=24, seed=4, width=64, height=96, workers=1)
    a, b, c = (digests(tmp_path / name) for name in "abc")
    photos = first["train_images"] + first["eval_images"]
    # + 4 csv files (train, label_noise, info, gt); + the truth: a mask per photo, faces.csv; + synthetic.json
    assert len(a) == photos + first["junk_files"] + 4 + photos + 1 + 1
    assert a == b
    shared_files = set(a) & set(c)
    assert set(a) != set(c)  # other folder names and eval names
    assert all(a[f] != c[f] for f in shared_files if f.endswith((".jpg", ".png", ".jpeg", ".JPG")))


def test_eval_files_match_info_and_ground_truth(tmp_path):
    root = tmp_path / "data"
    summary = make_synthetic(root, people=60, seed=0, width=48, height=64)
    files = sorted(p.name for p in (root / "eval" / "images").iterdir())
    info = pd.read_csv(root / "eval" / "info.csv")
    truth = pd.read_csv(root / "eval" / "gt.csv")
    assert list(info.columns) == list(truth.columns) == ["ImageID", "ans"]
    assert sorted(info["ImageID"]) == files and list(truth["ImageID"]) == list(info["ImageID"])
    assert all(re.fullmatch(r"[0-9a-f]{40}\.jpg", name) for name in files)
    assert (info["ans"] == 0).all()
    assert truth["ans"].between(0, 17).all() and truth["ans"].nunique() >= 10
    assert len(files) == summary["eval_images"] == 7 * 24  # ceil(0.4 * 60) new persons
    train_names = {p.name for p in (root / "train" / "images").rglob("*")}
    assert not train_names & set(files)


def test_eval_images_can_be_sized(tmp_path):
    summary = make_synthetic(tmp_path / "data", people=8, seed=0, width=48, height=64, eval_images=30)
    assert summary["eval_images"] == 30 == len(list((tmp_path / "data" / "eval" / "images").iterdir()))
    assert len(pd.read_csv(tmp_path / "data" / "eval" / "gt.csv")) == 30


def border_colour(path: Path) -> np.ndarray:
    """Mean colour of the top rows: background only, whatever the pose."""
    image = cv2.imread(str(path)).astype(float)
    return image[: image.shape[0] // 12].mean(axis=(0, 1))


def share_explained(values, groups) -> float:
    """eta squared: share of the variance of values explained by the group means."""
    values, groups = np.asarray(values), np.asarray(groups)
    centred = values - values.mean(axis=0)
    between = sum((groups == g).sum() * ((values[groups == g].mean(axis=0) - values.mean(axis=0)) ** 2).sum()
                  for g in np.unique(groups))
    return between / (centred ** 2).sum()


def test_background_follows_age_in_train_but_not_in_eval(medium):
    train = list(labelled_train_images(medium))
    train_colours = [border_colour(path) for path, _, _ in train]
    train_ages = decode(np.array([label for _, _, label in train]))[2]
    truth = pd.read_csv(medium / "eval" / "gt.csv")
    eval_colours = [border_colour(medium / "eval" / "images" / name) for name in truth["ImageID"]]
    eval_ages = decode(truth["ans"].to_numpy())[2]
    in_train = share_explained(train_colours, train_ages)
    in_eval = share_explained(eval_colours, eval_ages)
    assert in_train > 0.2 and in_eval < 0.1 and in_train > 4 * in_eval


def test_a_pixel_model_learns_masks_for_eval_but_ages_partly_from_the_background(medium):
    """Linear model on 12x16 pixels. Masks: held-out train persons and eval score alike.
    Age: eval scores well below held-out train persons, who share the backgrounds of their group."""
    train = list(labelled_train_images(medium))
    pixels = np.array([small_pixels(path) for path, _, _ in train])
    labels = np.array([label for _, _, label in train])
    persons = np.array([person for _, person, _ in train])
    fold = np.searchsorted(np.unique(persons), persons) % 4  # persons split: no person in two folds
    truth = pd.read_csv(medium / "eval" / "gt.csv")
    eval_pixels = np.array([small_pixels(medium / "eval" / "images" / name) for name in truth["ImageID"]])
    scores = {}
    for task in (0, 2):  # mask, age
        target = decode(labels)[task]
        held_out = np.empty_like(target)
        for k in range(4):
            model = RidgeClassifier(alpha=1.0).fit(pixels[fold != k], target[fold != k])
            held_out[fold == k] = model.predict(pixels[fold == k])
        on_eval = RidgeClassifier(alpha=1.0).fit(pixels, target).predict(eval_pixels)
        scores[task] = (f1_score(target, held_out, average="macro"),
                        f1_score(decode(truth["ans"].to_numpy())[task], on_eval, average="macro"))
    mask_valid, mask_eval = scores[0]
    age_valid, age_eval = scores[2]
    assert mask_eval > 0.7 and abs(mask_valid - mask_eval) < 0.1  # chance is 0.33
    assert age_eval < age_valid - 0.08


def test_without_the_trap_the_same_people_sit_on_backgrounds_that_say_nothing(medium, tmp_path):
    """trap_strength 0: the same persons (same folders, same faces) but backgrounds independent of age."""
    free = tmp_path / "free"
    make_synthetic(free, people=120, seed=0, width=48, height=64, eval_images=120 * 7, trap_strength=0.0)
    assert [p.name for p in person_folders(free)] == [p.name for p in person_folders(medium)]
    train = list(labelled_train_images(free))
    ages = decode(np.array([label for _, _, label in train]))[2]
    assert share_explained([border_colour(path) for path, _, _ in train], ages) < 0.1  # trapped: > 0.2 above
    truth = pd.read_csv(medium / "eval" / "gt.csv")
    for name in truth["ImageID"][:20]:  # eval never had the trap: the same files
        assert (free / "eval" / "images" / name).read_bytes() == (medium / "eval" / "images" / name).read_bytes()
    assert json.loads((free / "synthetic.json").read_text())["trap_strength"] == 0.0


def test_the_truth_of_each_photo_is_written_beside_it(small):
    root, _ = small
    faces = pd.read_csv(root / "truth" / "faces.csv")
    images = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                    and "images" in p.parts and not p.name.startswith("."))
    assert sorted(faces["image"]) == images  # one face box per photo, train and eval
    boxes, masks = read_truth(root, [str(root / image) for image in images[:10]], 128, 96)
    assert masks.shape == (10, 128, 96) and (0.15 < masks.mean(axis=(1, 2))).all() and (masks.mean(axis=(1, 2)) < 0.7).all()
    for box, mask in zip(boxes, masks, strict=True):  # the face box sits inside the person
        x0, y0, x1, y1 = box.round().astype(int)
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 128 and mask[y0:y1, x0:x1].mean() > 0.75  # an ellipse fills pi/4 of its box


def small_pixels(path: Path) -> np.ndarray:
    return cv2.resize(cv2.imread(str(path)), (12, 16), interpolation=cv2.INTER_AREA).ravel() / 255.0


def test_refuses_a_non_empty_root_and_leaves_it_alone(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic(root, people=4, width=32, height=32)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


def test_fills_an_empty_root_and_leaves_no_partial_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    make_synthetic(root, people=4, width=32, height=32)
    assert (root / "train" / "train.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def encode_then_fail(image, name):
        calls.append(name)
        if len(calls) > 10:
            raise OSError("disk full")
        return real_encode(image, name)

    real_encode = synthetic._encode
    monkeypatch.setattr(synthetic, "_encode", encode_then_fail)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic(tmp_path / "data", people=4, width=32, height=32, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="people"):
        make_synthetic(tmp_path / "a", people=1)
    with pytest.raises(ValueError, match="too small"):
        make_synthetic(tmp_path / "b", width=16, height=16)


def test_planted_label_errors_change_only_the_labels_and_are_listed(tmp_path):
    clean, noisy = synthetic.plan_train(24, 0), synthetic.plan_train(24, 0, label_noise=0.25)
    planted = [n for c, n in zip(clean, noisy) if c != n]
    assert len(planted) == 6  # a quarter of the persons, one error each
    for c, n in zip(clean, noisy):  # everything but the planted labels is drawn as without them
        assert replace(n, labelled_gender=None, swapped_masks=False) == c
    root = tmp_path / "data"
    make_synthetic(root, people=24, seed=0, width=48, height=64, label_noise=0.25)
    truth = pd.read_csv(root / "train" / "label_noise.csv")
    assert list(truth.columns) == ["target", "task", "given", "true"]
    assert (truth["given"] != truth["true"]).all()
    swapped = [p for p in planted if p.swapped_masks]
    assert len(truth) == sum(p.labelled_gender is not None for p in planted) + 2 * len(swapped)
    train = pd.read_csv(root / "train" / "train.csv")
    for row in truth[truth["task"] == "gender"].itertuples():  # folder and train.csv carry the wrong gender
        assert (root / "train" / "images" / row.target).is_dir()
        assert train.loc[train["path"] == row.target, "gender"].item() == row.given
    for row in truth[truth["task"] == "mask"].itertuples():
        assert (root / "train" / "images" / row.target).is_file()


def test_every_gender_and_age_group_has_two_persons_even_in_small_sets():
    for people in (12, 24, 120):
        counts = Counter((p.gender, age_group(p.age)) for p in synthetic.plan_train(people, 0))
        assert len(counts) == 6 and min(counts.values()) >= synthetic.MIN_PER_STRATUM == 2, (people, counts)
