"""A synthetic dataset in the competition's exact layout, with the competition's traps built in.

`make_synthetic(root)` writes::

    root/train/images/<id>_<gender>_Asian_<age>/{mask1..mask5,incorrect_mask,normal}.<ext>
    root/train/train.csv                      id,gender,race,age,path
    root/eval/images/<40 hex>.jpg
    root/eval/info.csv                        ImageID,ans   (ans = 0, as the competition ships it)
    root/eval/gt.csv                          ImageID,ans   (the true 18-class labels)
    root/truth/masks/<train|eval>/...png      where the person is in each photo (255 = person)
    root/truth/faces.csv                      image,x0,y0,x1,y1: each photo's face box in pixels
    root/train/label_noise.csv                target,task,given,true: the label errors planted (label_noise)
    root/synthetic.json                       what was asked for (checked when a study reuses root)

What it imitates (see docs in DESIGN.md, "The task the harness is built around"):
- people in the competition's proportions: age groups 1281/1227/192, about 61% female;
  ages 18-29, 30-59 (with a bump at 50-58, next to the bound teams argued about) and 60-70;
- mixed extensions (.jpg, .jpeg, .png, .JPG), macOS junk (`._mask1.jpg`, `.DS_Store`),
  one id shared by two folders (the folder is the person);
- a drawn face per person that keeps its look over the person's 7 photos; mask state,
  gender and age are visible but spread over many pixels:
    mask      worn = mask over nose and mouth; incorrect = mask under the nose (mouth or chin
              only); not worn = nose and mouth visible; mask1..mask5 are different masks;
    gender    hair length (long for most women, short for most men, with overlap), face
              width, eyebrow weight, lip colour;
    age       grey streaks in the hair from the late thirties, grey/white hair and wrinkles
              when old (a few old people dye their hair: then only the wrinkles tell);
  pose (shift, rotation, scale), lighting and sensor noise change from photo to photo;
- the background trap: a person's background KIND (brick, grass, gravel, gradient, stripes,
  wall) follows their gender and age group in train (with probability `trap_strength`, else
  it is drawn at random; 0 switches the trap off), but is drawn at random in eval, so a model
  that learns backgrounds scores high on a train split and lower on eval. Every other draw is
  the same whatever the strength: the same people in the same poses, on other backgrounds.
- the truth a real dataset lacks: each photo's person mask and face box, so that the quality of
  an estimated foreground mask or face detection is a measured figure;
- label errors of the real data's kinds (`label_noise`: a share of persons with their gender given
  as the other one, or their incorrect_mask and normal photos swapped), drawn from a stream of
  their own and listed in train/label_noise.csv, so that a label audit's recall is measured.

Eval persons are new persons. By default there are ceil(0.4 * people) of them with all 7
photos each (the competition's eval is 2/3 the size of train; 0.4 keeps test runs small);
`eval_images=N` takes ceil(N / 7) new persons and a seeded subset of N of their photos.

The output is a pure function of the arguments: the same seed gives the same bytes, whatever
the number of workers (each person and photo draws from its own seed derived from (seed,
split, person, photo)). The dataset is written beside root and renamed into place at the end,
so an interrupted run never leaves a half dataset at root.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from harness.config import SyntheticData
from harness.data.labels import GENDER_NAMES, MASK_NAMES, MASK_OF_STEM, age_group, encode
from harness.io import writer_gone

STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
MASK_SWAP = {"incorrect_mask": "normal", "normal": "incorrect_mask"}  # the real data's mislabelled file pairs
AGE_SHARES = (1281, 1227, 192)  # people per age group in the competition's train set
FEMALE_SHARE = 1658 / 2700
MIN_PER_STRATUM = 2  # persons per (gender, age group) in sets of 12 persons and more
EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG")
EXTENSION_ODDS = (0.80, 0.08, 0.07, 0.05)
JUNK_FOLDER_SHARE = 0.12  # folders with `._<image>` resource forks beside some images
DS_STORE_FOLDER_SHARE = 0.04
JPEG_QUALITY = 92
PNG_COMPRESSION = 1

BACKGROUND_KINDS = ("brick", "grass", "gravel", "gradient", "stripes", "wall")
# BGR base colour of each kind: the kinds differ in colour as well as texture, as real rooms do.
BACKGROUND_TINTS = {
    "brick": (70, 95, 165), "grass": (60, 140, 80), "gravel": (140, 140, 135),
    "gradient": (190, 140, 90), "stripes": (80, 190, 215), "wall": (175, 130, 165),
}
# default chance that a train person is photographed on their (gender, age group)'s kind: the study file's default
TRAP_STRENGTH = SyntheticData.model_fields["trap_strength"].default
FORMAT_VERSION = 2  # of what make_synthetic writes (2: truth masks and face boxes, trap_strength)

MASK_PALETTE = (  # BGR: white, light blue, black, pink, grey, navy, beige, mint
    (235, 235, 235), (230, 200, 150), (35, 35, 35), (200, 180, 240),
    (150, 150, 150), (100, 45, 25), (170, 200, 215), (190, 230, 170),
)

# Faces are drawn in a 384 x 512 reference frame and mapped onto the requested size.
REF_W, REF_H = 384.0, 512.0
FACE_X, FACE_Y = 192.0, 230.0
POSE_CENTRE = (192.0, 260.0)

_SPLIT_CODE = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class Look:
    """What stays the same over one person's photos."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]  # already greyed by age
    streaks: int  # grey streaks in the hair (middle age)
    hair_length: float  # 0 = cropped, 1 = shoulder length
    face_w: float  # face half-axes in reference pixels
    face_h: float
    fringe: float  # how far the fringe comes down, 0..1
    brow: float  # eyebrow thickness
    lips: tuple[float, float, float]
    clothes: tuple[float, float, float]
    wrinkles: int  # 0 none, 1 one faint forehead line, 2 old: forehead, cheeks, eyes
    masks: tuple[tuple[float, float, float], ...]  # colour of mask1..mask5
    chin_only: bool  # incorrect mask: under the mouth (True) or under the nose
    background: str
    tint: tuple[float, float, float]


@dataclass(frozen=True)
class Person:
    seed: int  # the dataset's seed
    split: str  # "train" or "eval"
    index: int  # position in the split; with seed and split, seeds the person's drawings
    ident: str  # 6-digit id (train)
    gender: int  # 0 male, 1 female
    age: int  # years
    look: Look
    extensions: tuple[str, ...]  # one per stem
    junk_stems: tuple[str, ...] = ()  # stems that get a `._<file>` beside them
    ds_store: bool = False
    labelled_gender: int | None = None  # a planted label error: the gender the folder and train.csv give
    swapped_masks: bool = False  # a planted label error: the incorrect_mask and normal photos swap file names

    @property
    def given_gender(self) -> int:
        return self.gender if self.labelled_gender is None else self.labelled_gender

    @property
    def folder(self) -> str:
        return f"{self.ident}_{GENDER_NAMES[self.given_gender]}_Asian_{self.age}"

    def saved_as(self, stem: str) -> str:
        """The stem whose file name a photo of `stem` is saved under (swapped by a planted mask error)."""
        return MASK_SWAP.get(stem, stem) if self.swapped_masks else stem

    def label(self, stem: str) -> int:
        return int(encode(MASK_OF_STEM[stem], self.gender, int(age_group(self.age))))

    def file_name(self, stem: str) -> str:
        if self.split == "eval":
            return eval_image_name(self.seed, self.index, stem)
        return stem + self.extensions[STEMS.index(stem)]


def synthetic_spec(people: int = 120, seed: int = 0, width: int = 384, height: int = 512,
                   eval_images: int | None = None, trap_strength: float = TRAP_STRENGTH,
                   label_noise: float = 0.0) -> dict:
    """What decides a synthetic dataset's content; written to root/synthetic.json."""
    return {"format_version": FORMAT_VERSION, "people": people, "seed": seed, "width": width, "height": height,
            "eval_images": eval_images, "trap_strength": trap_strength, "label_noise": label_noise}


def make_synthetic(root: Path, people: int = 120, seed: int = 0, width: int = 384, height: int = 512,
                   eval_images: int | None = None, trap_strength: float = TRAP_STRENGTH, label_noise: float = 0.0,
                   *, workers: int | None = None) -> dict:
    """Write a synthetic competition dataset at root and return a summary of what was written.

    workers: processes drawing persons (default: 1 for small sets, else up to 8 by CPU count);
    the bytes written do not depend on it.
    """
    started = time.perf_counter()
    _check_arguments(people, seed, width, height, eval_images)
    if not 0.0 <= trap_strength <= 1.0:
        raise ValueError(f"make_synthetic: trap_strength={trap_strength} must be between 0 (no trap) and 1.")
    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"make_synthetic: label_noise={label_noise} must be between 0 and 0.5 (a share of persons).")
    root = Path(root)
    _refuse_non_empty(root)
    train = plan_train(people, seed, trap_strength, label_noise)
    evals, eval_stems = plan_eval(people, seed, eval_images)
    for left in root.parent.glob(f"{root.name}.partial-*"):  # left by killed runs
        if writer_gone(left.name.rsplit("-", 1)[1]):
            shutil.rmtree(left, ignore_errors=True)
    partial = root.parent / f"{root.name}.partial-{os.getpid()}"
    try:
        _write_dataset(partial, train, evals, eval_stems, width, height, workers)
        spec = synthetic_spec(people, seed, width, height, eval_images, trap_strength, label_noise)
        (partial / "synthetic.json").write_text(json.dumps(spec, indent=2))
        _move_into_place(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {
        "root": str(root),
        "people": len(train),
        "eval_people": len(evals),
        "train_images": len(train) * len(STEMS),
        "eval_images": sum(len(stems) for stems in eval_stems),
        "junk_files": 1 + sum(len(p.junk_stems) + p.ds_store for p in train),  # +1: train/images/.DS_Store
        "duplicate_ids": len(train) - len({p.ident for p in train}),
        "trap_strength": trap_strength,
        "planted_label_errors": sum(p.labelled_gender is not None or p.swapped_masks for p in train),
        "seconds": round(time.perf_counter() - started, 3),
    }


def eval_image_name(seed: int, index: int, stem: str) -> str:
    """40-hex file name of an eval photo, like the competition's (sha1 of seed, person and stem)."""
    return hashlib.sha1(f"harness-synthetic/{seed}/{index}/{stem}".encode()).hexdigest() + ".jpg"


# ---------------------------------------------------------------- arguments and output folder

def _check_arguments(people, seed, width, height, eval_images) -> None:
    if not 2 <= people <= 100_000:
        raise ValueError(f"make_synthetic: people={people} must be between 2 and 100000 "
                         "(two are needed for the shared id).")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"make_synthetic: seed={seed!r} must be a non-negative integer.")
    if width < 32 or height < 32:
        raise ValueError(f"make_synthetic: size {width}x{height} is too small; use at least 32x32.")
    if eval_images is not None and eval_images < 0:
        raise ValueError(f"make_synthetic: eval_images={eval_images} must be >= 0 (or None for the default).")


def _refuse_non_empty(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"make_synthetic: {root} already exists and is not empty; "
                              "pass a new or empty directory, or delete this one first.")


def _move_into_place(partial: Path, root: Path) -> None:
    try:
        os.replace(partial, root)  # rename(2) also replaces an empty directory
    except OSError as error:
        if root.exists():
            raise FileExistsError(f"make_synthetic: {root} was filled by someone else while the dataset "
                                  "was being generated; use another directory.") from error
        raise


# ---------------------------------------------------------------- who is in the dataset

def plan_train(people: int, seed: int, trap_strength: float = TRAP_STRENGTH, label_noise: float = 0.0) -> list[Person]:
    """The train persons: labels in the competition's proportions, ids, one shared id, junk, planted label errors."""
    rng = np.random.default_rng([seed, _SPLIT_CODE["train"], 0])
    persons = [_make_person("train", i, gender, group, seed, trap_strength)
               for i, (gender, group) in enumerate(_assign_labels(people, rng))]
    idents = np.sort(rng.choice(np.arange(1, max(10_000, 3 * people)), size=people, replace=False))
    persons = [replace(p, ident=f"{ident:06d}") for p, ident in zip(persons, idents, strict=True)]
    persons = _share_one_id(persons, rng)
    persons = _ensure_extension_mix(persons)
    persons = _add_junk(persons, rng)
    persons = _plant_label_errors(persons, label_noise, np.random.default_rng([seed, _SPLIT_CODE["train"], 5]))
    folders = [p.folder for p in persons]
    assert len(set(folders)) == len(folders), "synthetic person folders must be unique"
    return sorted(persons, key=lambda p: p.folder)


def plan_eval(people: int, seed: int, eval_images: int | None) -> tuple[list[Person], list[tuple[str, ...]]]:
    """New persons for eval and, for each, the stems of the photos that go into eval."""
    count = math.ceil(0.4 * people) if eval_images is None else math.ceil(eval_images / len(STEMS))
    rng = np.random.default_rng([seed, _SPLIT_CODE["eval"], 0])
    persons = [_make_person("eval", i, gender, group, seed)
               for i, (gender, group) in enumerate(_assign_labels(count, rng))]
    slots = count * len(STEMS)
    wanted = slots if eval_images is None else eval_images
    chosen = set(rng.choice(slots, size=wanted, replace=False).tolist()) if wanted < slots else set(range(slots))
    stems = [tuple(s for k, s in enumerate(STEMS) if i * len(STEMS) + k in chosen) for i in range(count)]
    return persons, stems


def _assign_labels(count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(gender, age group) per person: exact competition proportions, both genders from 2 people and
    every age group from 3 (women spread over the groups in proportion to their sizes)."""
    groups = _largest_remainder(count, AGE_SHARES)
    if count >= 3:
        for g in range(len(groups)):  # the rare old group must exist even in tiny sets
            if groups[g] == 0:
                groups[groups.index(max(groups))] -= 1
                groups[g] = 1
    women = min(max(round(count * FEMALE_SHARE), 1), count - 1) if count >= 2 else count
    sizes = {}
    for group, (size, group_women) in enumerate(zip(groups, _largest_remainder(women, groups), strict=True)):
        sizes[(1, group)], sizes[(0, group)] = group_women, size - group_women
    if count >= MIN_PER_STRATUM * len(sizes):
        _fill_small_strata(sizes)
    labels = [label for label, size in sizes.items() for _ in range(size)]
    order = rng.permutation(len(labels))
    return [labels[i] for i in order]


def _fill_small_strata(sizes: dict[tuple[int, int], int]) -> None:
    """Give every (gender, age group) MIN_PER_STRATUM persons, taken from the largest ones: person-grouped
    folds then hold each stratum out in at least two folds even in tiny sets (the smoke studies')."""
    for label in sorted(sizes):
        while sizes[label] < MIN_PER_STRATUM:
            sizes[max(sizes, key=lambda other: (sizes[other], other))] -= 1
            sizes[label] += 1


def _largest_remainder(total: int, shares) -> list[int]:
    """Integer counts in proportion to shares that sum to total (integer arithmetic: ties are exact)."""
    if total == 0:
        return [0] * len(shares)
    scaled = [share * total for share in shares]
    counts = [s // sum(shares) for s in scaled]
    by_remainder = sorted(range(len(shares)), key=lambda i: -(scaled[i] % sum(shares)))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw_age(group: int, rng: np.random.Generator) -> int:
    if group == 0:
        return int(rng.integers(18, 30))
    if group == 1:  # a bump in the 50s: the ages teams moved across the bound (58/59)
        return int(rng.integers(50, 59) if rng.random() < 0.4 else rng.integers(30, 60))
    return int(rng.integers(60, 71))


def _share_one_id(persons: list[Person], rng: np.random.Generator) -> list[Person]:
    """Give one person the id of another of different gender and age group: the folder is the person."""
    first = int(rng.integers(len(persons)))
    a = persons[first]
    candidates = [i for i, p in enumerate(persons)
                  if p.gender != a.gender and age_group(p.age) != age_group(a.age)]
    candidates = candidates or [i for i, p in enumerate(persons) if p.gender != a.gender]
    if not candidates:
        return persons
    second = candidates[int(rng.integers(len(candidates)))]
    persons = list(persons)
    persons[second] = replace(persons[second], ident=a.ident)
    return persons


def _ensure_extension_mix(persons: list[Person]) -> list[Person]:
    """Every extension appears at least once (small sets would otherwise miss the rare ones)."""
    present = {ext for p in persons for ext in p.extensions}
    persons = list(persons)
    for slot, ext in enumerate(e for e in EXTENSIONS if e not in present):
        i = slot % len(persons)
        extensions = list(persons[i].extensions)
        extensions[STEMS.index("normal") - slot // len(persons)] = ext
        persons[i] = replace(persons[i], extensions=tuple(extensions))
    return persons


def _plant_label_errors(persons: list[Person], share: float, rng: np.random.Generator) -> list[Person]:
    """`share` of the persons get one label error of the kinds the real data has: their gender given as the
    other one (folder and train.csv), or their incorrect_mask and normal photos swapped. Drawn from a stream
    of their own, so that everything else is the same with or without them."""
    count = round(share * len(persons))
    persons = list(persons)
    for i in rng.choice(len(persons), size=count, replace=False):
        if rng.random() < 0.5:
            persons[i] = replace(persons[i], labelled_gender=1 - persons[i].gender)
        else:
            persons[i] = replace(persons[i], swapped_masks=True)
    return persons


def label_noise_rows(persons: list[Person]) -> list[dict]:
    """The planted errors: target (a person folder or an image path under train/images), task, given, true."""
    rows = []
    for p in persons:
        if p.labelled_gender is not None:
            rows.append({"target": p.folder, "task": "gender", "given": GENDER_NAMES[p.labelled_gender],
                         "true": GENDER_NAMES[p.gender]})
        if p.swapped_masks:
            for stem, shown in MASK_SWAP.items():  # the file named after `stem` shows the other mask state
                rows.append({"target": f"{p.folder}/{p.file_name(stem)}", "task": "mask",
                             "given": MASK_NAMES[MASK_OF_STEM[stem]], "true": MASK_NAMES[MASK_OF_STEM[shown]]})
    return rows


def _add_junk(persons: list[Person], rng: np.random.Generator) -> list[Person]:
    n = len(persons)
    junk = rng.choice(n, size=max(1, round(JUNK_FOLDER_SHARE * n)), replace=False)
    ds_store = rng.choice(n, size=max(1, round(DS_STORE_FOLDER_SHARE * n)), replace=False)
    persons = list(persons)
    for i in junk:
        stems = rng.choice(STEMS, size=int(rng.integers(1, 4)), replace=False)
        persons[i] = replace(persons[i], junk_stems=tuple(sorted(stems.tolist())))
    for i in ds_store:
        persons[i] = replace(persons[i], ds_store=True)
    return persons


def _make_person(split: str, index: int, gender: int, group: int, seed: int,
                 trap_strength: float = TRAP_STRENGTH) -> Person:
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 1, index])
    age = _draw_age(group, rng)
    extensions = tuple(str(e) for e in rng.choice(EXTENSIONS, size=len(STEMS), p=EXTENSION_ODDS))
    if split == "eval":
        extensions = (".jpg",) * len(STEMS)
    trap = trap_strength if split == "train" else 0.0  # eval backgrounds never follow the labels
    return Person(seed, split, index, "", gender, age, _draw_look(gender, age, trap, rng), extensions)


def _draw_look(gender: int, age: int, trap_strength: float, rng: np.random.Generator) -> Look:
    group = int(age_group(age))
    female = gender == 1
    # Gender: long hair for most women, short for most men, with overlap on both sides.
    if female:
        hair_length = rng.normal(1.0, 0.2) if rng.random() < 0.85 else rng.normal(0.3, 0.15)
    else:
        hair_length = rng.normal(0.15, 0.1) if rng.random() < 0.9 else rng.normal(0.6, 0.2)
    face_w = 85 * rng.normal(0.94 if female else 1.04, 0.04)
    face_h = 110 * rng.normal(1.0, 0.04)
    brow = rng.normal(3.0 if female else 4.5, 0.6)
    lips = _jitter((70, 70, 185) if female else (95, 100, 160), 12, rng)
    # Age: dark hair that greys with age, streaks in the middle years, wrinkles when old.
    dark = _jitter((28, 34, 42) if rng.random() < 0.8 else (40, 65, 105), 6, rng)
    grey = 0.0
    streaks = 0
    wrinkles = 0
    if group == 1:
        streaks = int(np.clip(round((age - 33) / 5 + rng.normal(0, 1)), 0, 6))
        grey = float(np.clip((age - 40) / 60 + rng.normal(0, 0.04), 0, 0.3))
        wrinkles = int(age >= 45 and rng.random() < (age - 40) / 25)
    elif group == 2:
        grey = 0.0 if rng.random() < 0.1 else float(rng.uniform(0.55, 0.95))  # a few dye their hair
        streaks = int(rng.integers(2, 6))
        wrinkles = 2
    hair = tuple(d + (205 - d) * grey for d in dark)
    tone = rng.uniform(0, 1)
    light, tanned = (185, 205, 235), (110, 145, 190)
    skin = _jitter(tuple(lo + (hi - lo) * tone for lo, hi in zip(light, tanned, strict=True)), 5, rng)
    masks = tuple(_jitter(MASK_PALETTE[i], 10, rng) for i in rng.choice(len(MASK_PALETTE), 5, replace=False))
    background = _draw_background_kind(gender, group, trap_strength, rng)
    return Look(
        skin=skin, hair=hair, streaks=streaks, hair_length=float(np.clip(hair_length, 0, 1.3)),
        face_w=float(face_w), face_h=float(face_h), fringe=float(rng.uniform(0, 1)),
        brow=float(np.clip(brow, 1.5, 7)), lips=lips, clothes=tuple(float(v) for v in rng.uniform(30, 220, 3)),
        wrinkles=wrinkles, masks=masks, chin_only=bool(rng.random() < 0.5), background=background,
        tint=_jitter(BACKGROUND_TINTS[background], 14, rng),
    )


def _draw_background_kind(gender: int, group: int, trap_strength: float, rng: np.random.Generator) -> str:
    """The trap: with probability trap_strength the kind of the person's (gender, age group), else any kind.

    Both draws are made whatever the strength, so the rest of the person does not depend on it."""
    trapped = rng.random() < trap_strength
    drawn = str(rng.choice(BACKGROUND_KINDS))
    return BACKGROUND_KINDS[group * 2 + gender] if trapped else drawn


def _jitter(colour, spread: float, rng: np.random.Generator) -> tuple[float, float, float]:
    return tuple(float(np.clip(c + rng.normal(0, spread), 0, 255)) for c in colour)


# ---------------------------------------------------------------- writing

def _write_dataset(out: Path, train, evals, eval_stems, width, height, workers) -> None:
    train_dir = out / "train" / "images"
    eval_dir = out / "eval" / "images"
    train_dir.mkdir(parents=True)
    eval_dir.mkdir(parents=True)
    (train_dir / ".DS_Store").write_bytes(_DS_STORE)
    jobs = [(p, STEMS, train_dir / p.folder) for p in train] + \
           [(p, stems, eval_dir) for p, stems in zip(evals, eval_stems, strict=True) if stems]
    _render_all([(p, stems, str(folder), width, height, str(out)) for p, stems, folder in jobs], workers)
    parts = sorted((out / "truth" / "faces").glob("*.csv"))
    pd.concat([pd.read_csv(part) for part in parts]).sort_values("image").to_csv(out / "truth" / "faces.csv",
                                                                                  index=False)
    shutil.rmtree(out / "truth" / "faces")
    pd.DataFrame({
        "id": [p.ident for p in train], "gender": [GENDER_NAMES[p.given_gender] for p in train],
        "race": "Asian", "age": [p.age for p in train], "path": [p.folder for p in train],
    }).to_csv(out / "train" / "train.csv", index=False)
    pd.DataFrame(label_noise_rows(train), columns=["target", "task", "given", "true"]).to_csv(
        out / "train" / "label_noise.csv", index=False)
    rows = sorted((p.file_name(s), p.label(s)) for p, stems in zip(evals, eval_stems, strict=True) for s in stems)
    names = [name for name, _ in rows]
    pd.DataFrame({"ImageID": names, "ans": 0}).to_csv(out / "eval" / "info.csv", index=False)
    pd.DataFrame({"ImageID": names, "ans": [label for _, label in rows]}).to_csv(out / "eval" / "gt.csv", index=False)


def _render_all(jobs: list[tuple], workers: int | None) -> None:
    images = sum(len(job[1]) for job in jobs)
    if workers is None:
        workers = 1 if images < 400 else min(os.cpu_count() or 1, 8)
    if workers <= 1:
        _render_shard(jobs)
    else:
        _render_in_subprocesses([jobs[i::workers] for i in range(workers)])


def _render_shard(jobs: list[tuple], worker: bool = False) -> None:
    parent = os.getppid()
    for job in jobs:
        if worker and os.getppid() != parent:
            return  # the generating process was killed: stop instead of drawing for no one
        _render_person(job)


# Plain `python -c` workers rather than multiprocessing: a forked child can inherit a busy
# OpenCV/torch thread pool and hang, and spawn re-runs the caller's script, which breaks any
# script without an `if __name__ == "__main__"` guard.
_WORKER = ("import pickle, sys, cv2; cv2.setNumThreads(1); "
           "from harness.data.synthetic import _render_shard; _render_shard(pickle.load(sys.stdin.buffer), worker=True)")


def _render_in_subprocesses(shards: list[list[tuple]]) -> None:
    package_parent = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    procs = []
    try:
        for _ in shards:
            log = tempfile.TemporaryFile()
            procs.append((subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                           stdout=subprocess.DEVNULL, stderr=log, env=env), log))
        for (proc, _), shard in zip(procs, shards, strict=True):
            try:
                proc.stdin.write(pickle.dumps(shard))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the worker died on start; its exit code and stderr are reported below
        _follow(procs, sum(len(shard) for shard in shards), Path(shards[0][0][5]) / "truth" / "faces")
        for proc, log in procs:
            if proc.wait() != 0:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"make_synthetic: a drawing worker exited with code {proc.returncode}:\n{tail}")
    finally:
        for proc, log in procs:  # on any failure in the parent, stop the other workers too
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def _follow(procs: list, persons: int, written: Path) -> None:
    """A progress bar of the persons drawn (each writes its faces' truth file last) while the workers run."""
    from harness.io import progress_bar

    with progress_bar(persons, "drawing synthetic persons", unit="person") as bar:
        while any(proc.poll() is None for proc, _ in procs):
            done = sum(1 for _ in written.glob("*.csv")) if written.is_dir() else 0
            bar.update(done - bar.n)
            time.sleep(0.5)


def _render_person(job: tuple) -> None:
    person, stems, folder, width, height, out = job
    seed = person.seed
    folder, out = Path(folder), Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    truth = out / "truth" / "masks" / person.split / (person.folder if person.split == "train" else "")
    truth.mkdir(parents=True, exist_ok=True)
    look = person.look
    pad = max(2, round(0.04 * width))
    bg_rng = np.random.default_rng([seed, _SPLIT_CODE[person.split], 2, person.index])
    background = _background(look.background, look.tint, bg_rng, width + pad, height + pad)
    faces = []
    for stem in stems:
        k = STEMS.index(stem)
        rng = np.random.default_rng([seed, _SPLIT_CODE[person.split], 3, person.index, k])
        image, silhouette, face = _photo(person, stem, background, pad, width, height, seed, rng)
        name = person.file_name(person.saved_as(stem))
        (folder / name).write_bytes(_encode(image, name))
        (truth / f"{Path(name).stem}.png").write_bytes(_encode(silhouette, ".png"))
        faces.append({"image": str((folder / name).relative_to(out)), **dict(zip(("x0", "y0", "x1", "y1"), face))})
        if stem in person.junk_stems:
            (folder / f"._{name}").write_bytes(_APPLE_DOUBLE + rng.bytes(int(rng.integers(8, 40))))
    if person.ds_store:
        (folder / ".DS_Store").write_bytes(_DS_STORE)
    (out / "truth" / "faces").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(faces).to_csv(out / "truth" / "faces" / f"{person.split}-{person.index:06d}.csv", index=False)


_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # header of a macOS resource fork
_DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(24)


def _encode(image: np.ndarray, name: str) -> bytes:
    if name.lower().endswith(".png"):
        ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    else:
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"make_synthetic: OpenCV could not encode {name}")
    return data.tobytes()


# ---------------------------------------------------------------- pictures

def _photo(person: Person, stem: str, background: np.ndarray, pad: int, width: int, height: int,
           seed: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One photo: the person's background (slightly shifted), the face in this photo's pose, light, noise.

    Also returns where the person is (uint8, 255 on every pixel drawn for them) and the face's box
    (x0, y0, x1, y1): the truth an estimated mask and a face detector are measured against.
    """
    ox, oy = (int(v) for v in rng.integers(0, pad + 1, 2))
    image = background[oy:oy + height, ox:ox + width].copy()
    canvas = _Canvas(image, _pose_matrix(rng, width, height))
    _draw_person(canvas, person.look)
    mask = MASK_OF_STEM[stem]
    if mask == 0:
        _draw_mask(canvas, person.look, person.look.masks[STEMS.index(stem)], top=232, peak=10)
    elif mask == 1:
        colour = person.look.masks[int(rng.integers(5))]
        _draw_mask(canvas, person.look, colour, top=302 if person.look.chin_only else 270, peak=3)
    face = canvas.bounds(_ellipse(FACE_X, FACE_Y, person.look.face_w, person.look.face_h))
    return _light_and_noise(image, rng, seed), canvas.person, face


def _pose_matrix(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Reference frame -> output pixels: small rotation, scale and shift of the face, then resize."""
    angle = rng.uniform(-8, 8)
    scale = rng.uniform(0.9, 1.1)
    pose = cv2.getRotationMatrix2D(POSE_CENTRE, angle, scale)
    pose[:, 2] += rng.uniform(-0.05, 0.05, 2) * REF_W
    return np.diag([width / REF_W, height / REF_H]) @ pose


class _Canvas:
    """Draws shapes given in reference coordinates onto the photo through the pose matrix."""

    SHIFT = 4  # sub-pixel bits for OpenCV's drawing functions

    def __init__(self, image: np.ndarray, matrix: np.ndarray):
        self.image = image
        self.person = np.zeros(image.shape[:2], np.uint8)  # every pixel drawn for the person: the true mask
        self.matrix = matrix
        self.scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))

    def _pixels(self, points) -> np.ndarray:
        points = np.asarray(points, float) @ self.matrix[:, :2].T + self.matrix[:, 2]
        return np.round(points * (1 << self.SHIFT)).astype(np.int32)

    def fill(self, points, colour) -> None:
        pixels = [self._pixels(points)]
        cv2.fillPoly(self.image, pixels, colour, cv2.LINE_AA, self.SHIFT)
        cv2.fillPoly(self.person, pixels, 255, cv2.LINE_8, self.SHIFT)

    def line(self, points, colour, thickness: float) -> None:
        width = max(1, round(thickness * self.scale))
        pixels = [self._pixels(points)]
        cv2.polylines(self.image, pixels, False, colour, width, cv2.LINE_AA, self.SHIFT)
        cv2.polylines(self.person, pixels, False, 255, width, cv2.LINE_8, self.SHIFT)

    def bounds(self, points) -> tuple[float, float, float, float]:
        """The box around reference-frame points, in output pixels (clipped to the image)."""
        height, width = self.person.shape
        xy = np.asarray(points, float) @ self.matrix[:, :2].T + self.matrix[:, 2]
        x0, y0 = np.clip(xy.min(axis=0), 0, (width, height))
        x1, y1 = np.clip(xy.max(axis=0), 0, (width, height))
        return round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2)


def _ellipse(cx, cy, ax, ay, start=0.0, stop=360.0, n=48) -> np.ndarray:
    t = np.radians(np.linspace(start, stop, n))
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def _shade(colour, factor: float) -> tuple[float, float, float]:
    return tuple(c * factor for c in colour)


def _draw_person(c: _Canvas, look: Look) -> None:
    a, b = look.face_w, look.face_h
    x, y = FACE_X, FACE_Y
    c.fill(_ellipse(x, 570, 205, 180), look.clothes)  # shoulders
    if look.hair_length > 0.35:  # hair falling behind the neck towards the shoulders
        bottom = y + 10 + 190 * look.hair_length
        c.fill(np.vstack([_ellipse(x, y - 8, a + 14, b + 14, 180, 360),
                          [[x + a + 24, bottom], [x - a - 24, bottom]]]), look.hair)
        for i in range(look.streaks):
            side = 1 if i % 2 else -1
            offset = a + 6 + 3 * (i // 2)
            c.line([[x + side * offset, y], [x + side * (offset + 6), bottom - 12]], (190, 190, 190), 2)
    else:
        c.fill(_ellipse(x, y - 8, a + 10, b + 8, 165, 375), look.hair)
    for i in range(look.streaks):  # grey strands on the crown
        c.line(_ellipse(x, y - 8, a + 2 + i, b + 2 + i, 205 + 4 * i, 335 - 3 * i, 16), (190, 190, 190), 2)
    neck = 0.42 * a
    c.fill([[x - neck, 300], [x + neck, 300], [x + neck, 440], [x - neck, 440]], _shade(look.skin, 0.9))
    if look.hair_length < 0.6:  # long hair hides the ears
        for side in (-1, 1):
            c.fill(_ellipse(x + side * a, y + 5, 12, 20), _shade(look.skin, 0.95))
    c.fill(_ellipse(x, y, a, b), look.skin)
    _draw_fringe(c, look)
    _draw_features(c, look)


def _draw_fringe(c: _Canvas, look: Look) -> float:
    """Hair over the top of the face down to a line that varies per person; returns that line's y."""
    a, b = look.face_w, look.face_h
    line_y = FACE_Y - b * (0.78 - 0.16 * look.fringe)
    alpha = math.degrees(math.asin((FACE_Y - line_y) / b))
    c.fill(_ellipse(FACE_X, FACE_Y, a, b, 180 + alpha, 360 - alpha), look.hair)
    for i in range(look.streaks):
        sx = FACE_X + (i - look.streaks / 2) * 0.25 * a
        c.line([[sx, FACE_Y - b + 6], [sx + 4, line_y - 2]], (190, 190, 190), 2)
    return line_y


def _draw_features(c: _Canvas, look: Look) -> None:
    x = FACE_X
    gap = 0.38 * look.face_w
    for side in (-1, 1):
        c.fill(_ellipse(x + side * gap, 212, 12, 6), (235, 235, 235))
        c.fill(_ellipse(x + side * gap, 212, 5, 5, n=16), (40, 30, 20))
        c.line([[x + side * (gap + 16), 196], [x + side * (gap - 14), 193]], look.hair, look.brow)
    c.fill([[x, 222], [x - 11, 262], [x + 11, 262]], _shade(look.skin, 0.85))
    for side in (-1, 1):
        c.fill(_ellipse(x + side * 6, 262, 4, 2, n=12), _shade(look.skin, 0.5))
    c.fill(_ellipse(x, 290, 20 if look.lips[2] > 175 else 23, 6), look.lips)
    if look.wrinkles:
        _draw_wrinkles(c, look)


def _draw_wrinkles(c: _Canvas, look: Look) -> None:
    a, b = look.face_w, look.face_h
    x = FACE_X
    top = FACE_Y - b * (0.78 - 0.16 * look.fringe) + 6
    lines = 1 if look.wrinkles == 1 else 3
    colour = _shade(look.skin, 0.8 if look.wrinkles == 1 else 0.65)
    for i in range(lines):
        fy = top + (186 - top) * (i + 1) / (lines + 1)
        c.line(_ellipse(x, fy + 40, 0.45 * a, 40, 240, 300, 12), colour, 1.5)
    if look.wrinkles == 2:
        gap = 0.38 * a
        for side in (-1, 1):
            c.line([[x + side * 20, 266], [x + side * 30, 302]], colour, 1.5)  # nose to mouth
            for dy in (-5, 0, 5):  # crow's feet
                c.line([[x + side * (gap + 15), 212], [x + side * (gap + 25), 212 + dy * 1.5]], colour, 1.2)


def _draw_mask(c: _Canvas, look: Look, colour, top: float, peak: float) -> None:
    """A mask from `top` down over the chin: worn (top at the nose bridge) or pulled down."""
    # the mask's outline follows a slightly enlarged face ellipse below `top`
    ax, ay = look.face_w * 1.12, look.face_h * 1.04
    alpha = math.degrees(math.asin(min(1.0, (top - FACE_Y) / ay)))
    outline = _ellipse(FACE_X, FACE_Y, ax, ay, alpha, 180 - alpha, 32)
    c.fill(np.vstack([outline, [[FACE_X, top - peak]]]), colour)
    bottom = FACE_Y + ay
    left, right = outline[-1], outline[0]
    for share in (0.35, 0.65):  # pleats
        py = top + (bottom - top) * share
        half = ax * math.sqrt(max(0.0, 1 - ((py - FACE_Y) / ay) ** 2)) * 0.8
        c.line([[FACE_X - half, py], [FACE_X + half, py]], _shade(colour, 0.75), 2)
    for end, side in ((left, -1), (right, 1)):  # ear loops
        c.line([end, [FACE_X + side * look.face_w, 220]], _shade(colour, 0.85), 2)


def _light_and_noise(image: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    gains = rng.uniform(0.75, 1.25) * rng.uniform(0.95, 1.05, 3)
    bias = rng.uniform(-20, 20)
    light = np.zeros((3, 4), np.float32)
    light[np.arange(3), np.arange(3)] = gains
    light[:, 3] = bias
    image = cv2.transform(image, light)
    height, width = image.shape[:2]
    bank = _noise_bank(seed, width, height, int(rng.integers(len(NOISE_SIGMAS))))
    oy, ox = (int(v) for v in rng.integers(0, NOISE_PAD + 1, 2))
    return cv2.add(image, bank[oy:oy + height, ox:ox + width], dtype=cv2.CV_8U)


NOISE_SIGMAS = (2.0, 3.5, 5.0, 7.0)
NOISE_PAD = 32


@lru_cache(maxsize=8)
def _noise_bank(seed: int, width: int, height: int, level: int) -> np.ndarray:
    """Sensor noise, drawn once per process and cut at a random offset for each photo (drawing fresh
    Gaussian noise for every photo costs more than the rest of the photo)."""
    rng = np.random.default_rng([seed, 9, level])
    noise = rng.standard_normal((height + NOISE_PAD, width + NOISE_PAD, 3), dtype=np.float32)
    return np.round(noise * NOISE_SIGMAS[level]).astype(np.int16)


# ---------------------------------------------------------------- backgrounds

def _background(kind: str, tint, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured background of the given kind, coloured by tint: uint8 (height, width, 3)."""
    if kind in ("brick", "grass", "gravel"):
        shade = _photo_texture(kind, rng, width, height)
    elif kind == "gradient":
        shade = _ramp(rng, width, height)
    elif kind == "stripes":
        period = rng.uniform(0.05, 0.12) * width
        shade = 0.5 + 0.5 * np.sin(2 * np.pi * _ramp(rng, width, height) * width / period)
    else:  # wall: smooth blotches
        blotches = rng.uniform(0, 1, (5, 4)).astype(np.float32)
        shade = 0.35 + 0.3 * cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    shade = shade.astype(np.float32) * 0.9 + 0.55
    return np.clip(shade[..., None] * np.float32(tint), 0, 255).astype(np.uint8)


def _ramp(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """0..1 along a random direction."""
    angle = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    return (ramp - ramp.min()) / max(1e-6, float(ramp.max() - ramp.min()))


def _photo_texture(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random crop of one of scikit-image's bundled photos, 0..1."""
    source = _texture_source(kind)
    crop_w = int(rng.integers(160, 385))
    crop_h = min(source.shape[0], round(crop_w * height / width))
    crop_w = min(crop_w, round(crop_h * width / height))
    y0 = int(rng.integers(0, source.shape[0] - crop_h + 1))
    x0 = int(rng.integers(0, source.shape[1] - crop_w + 1))
    crop = source[y0:y0 + crop_h, x0:x0 + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_AREA
                      if crop_w > width else cv2.INTER_LINEAR)


@cache
def _texture_source(kind: str) -> np.ndarray:
    """scikit-image's photo of brick / grass / gravel (files inside the package, no network), 0..1;
    smooth noise when scikit-image is missing."""
    try:
        import skimage.data

        gray = getattr(skimage.data, kind)().astype(np.float32)
    except (ImportError, OSError, ValueError):
        rng = np.random.default_rng(BACKGROUND_KINDS.index(kind))
        gray = cv2.resize(rng.uniform(0, 1, (64, 64)).astype(np.float32), (512, 512))
    return (gray - gray.min()) / max(1e-6, float(gray.max() - gray.min()))


# ---------------------------------------------------------------- reading the truth back

def read_truth(root: Path, paths: list[str], height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The true face boxes (N, 4) and person masks (N, height, width) bool of image files of a synthetic
    dataset, scaled to (height, width) as the decoded cache holds them; None when root has no truth."""
    root = Path(root).resolve()
    faces_file = root / "truth" / "faces.csv"
    if not faces_file.is_file():
        return None
    faces = pd.read_csv(faces_file).set_index("image")
    boxes = np.zeros((len(paths), 4))
    masks = np.zeros((len(paths), height, width), bool)
    for row, path in enumerate(paths):
        relative = Path(path).resolve().relative_to(root)
        silhouette = cv2.imread(str(_truth_mask_file(root, relative)), cv2.IMREAD_GRAYSCALE)
        original_h, original_w = silhouette.shape
        scale = np.array([width / original_w, height / original_h] * 2)
        boxes[row] = faces.loc[str(relative), ["x0", "y0", "x1", "y1"]].to_numpy(float) * scale
        masks[row] = cv2.resize(silhouette, (width, height), interpolation=cv2.INTER_AREA) > 127
    return boxes, masks


def _truth_mask_file(root: Path, relative: Path) -> Path:
    split = relative.parts[0]  # train/images/<folder>/<file> or eval/images/<file>
    person = relative.parts[2] if split == "train" else ""
    return root / "truth" / "masks" / split / person / f"{relative.stem}.png"
