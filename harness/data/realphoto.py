"""A shortcut trap built from real photographs, with its held-out truth: the check that the shortcut
measures hold on data we did not draw.

Subjects: scikit-image's LFW subset, 100 real face crops and 100 real non-face crops (25x25 grey levels;
label "face" / "non_face"). Each crop is one group (a "person") photographed GROUP_IMAGES times: scaled,
shifted, mirrored and lit a little differently, pasted through a soft ellipse onto a crop of a real
photograph (scikit-image's brick, grass, gravel and coffee photos). In train a group's background kind
follows its label with probability `trap_strength` (faces on brick or grass, non-faces on gravel or
coffee); in eval it is drawn at random, as the competition's leaderboard photos were. 0 switches the trap
off: the same subjects, poses and crops on other backgrounds.

    <root>/train.csv, eval.csv   path,label,group (paths relative to root; the study reads train.csv)
    <root>/images/<split>/...    the photos (PNG)
    <root>/truth.csv             per photo: the pasted subject's box, whether it is a face, its mask file
    <root>/truth/<split>/...     the subject's true mask (PNG, 255 = subject)

Nothing is downloaded and nothing is committed: the photos ship inside scikit-image.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

BACKGROUNDS = ("brick", "grass", "gravel", "coffee")
TRAPPED = {"face": ("brick", "grass"), "non_face": ("gravel", "coffee")}
GROUP_IMAGES = 4
EVAL_SHARE = 0.3  # of each class's subjects, held out as the eval set
SUBJECT_SHARE = 0.25  # the subject's side as a share of the photo's side: small enough that the background weighs


def _subjects() -> tuple[np.ndarray, list[str]]:
    from skimage.data import lfw_subset

    images = lfw_subset()  # the first 100 are faces, the last 100 are not
    return images, ["face"] * 100 + ["non_face"] * 100


def _photo(kind: str) -> np.ndarray:
    """scikit-image's photo of that kind as uint8 RGB."""
    import skimage.data

    image = getattr(skimage.data, kind)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    source = _photo(kind)
    side = int(rng.integers(size, min(source.shape[:2]) + 1))
    y0, x0 = int(rng.integers(0, source.shape[0] - side + 1)), int(rng.integers(0, source.shape[1] - side + 1))
    crop = source[y0:y0 + side, x0:x0 + side]
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)


def _paste(background: np.ndarray, subject: np.ndarray, share: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The subject (grey, 0..1) scaled, shifted, maybe mirrored and relit, through a soft ellipse."""
    size = background.shape[0]
    side = int(round(size * share * rng.uniform(0.85, 1.15)))
    patch = cv2.resize(subject.astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    patch = np.clip(patch * rng.uniform(0.85, 1.15), 0, 1)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.08, 0.08) * size
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    ellipse = np.zeros((side, side), np.float32)
    cv2.ellipse(ellipse, (side // 2, side // 2), (int(side * 0.46), int(side * 0.5)), 0, 0, 360, 1.0, -1)
    soft = cv2.GaussianBlur(ellipse, (0, 0), max(0.5, side / 30))
    image = background.astype(np.float32).copy()
    region = image[y0:y0 + side, x0:x0 + side]
    region[:] = region * (1 - soft[..., None]) + (patch[..., None] * 255) * soft[..., None]
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y0 + side, x0:x0 + side] = (ellipse > 0) * 255
    return np.clip(image, 0, 255).astype(np.uint8), mask, (x0, y0, x0 + side, y0 + side)


def make_realphoto(root: Path, trap_strength: float = 0.9, seed: int = 0, size: int = 96,
                   subject_share: float = SUBJECT_SHARE) -> int:
    """Write the dataset at root (written beside it, then renamed into place); returns the photo count.
    `subject_share`: the subject's side as a share of the photo's (smaller: the background weighs more)."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; delete it or choose another root")
    subjects, labels = _subjects()
    rng = np.random.default_rng(seed)
    order = {label: rng.permutation([i for i, name in enumerate(labels) if name == label]) for label in TRAPPED}
    held = {int(i) for label, rows in order.items() for i in rows[:round(EVAL_SHARE * len(rows))]}
    partial = root.parent / f"{root.name}.partial-{os.getpid()}"
    rows, truth = {"train": [], "eval": []}, []
    try:
        for index, (subject, label) in enumerate(zip(subjects, labels, strict=True)):
            split = "eval" if index in held else "train"
            # separate streams: the same kind draw, poses and crops whatever the trap strength
            draw, pose = np.random.default_rng([seed, index, 0]), np.random.default_rng([seed, index, 1])
            random_kind, trapped_kind, trapped = (BACKGROUNDS[draw.integers(len(BACKGROUNDS))],
                                                  TRAPPED[label][draw.integers(2)], draw.random() < trap_strength)
            kind = trapped_kind if split == "train" and trapped else random_kind
            crops = np.random.default_rng([seed, index, 2])
            for k in range(GROUP_IMAGES):
                name = f"{split}/{index:03d}-{k}.png"
                image, mask, box = _paste(_background(kind, size, crops), subject, subject_share, pose)
                for folder, pixels in (("images", image[..., ::-1]), ("truth", mask)):
                    (partial / folder / split).mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(partial / folder / name), pixels)
                rows[split].append({"path": f"images/{name}", "label": label, "group": f"subject-{index:03d}"})
                truth.append({"path": f"images/{name}", "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
                              "face": label == "face", "mask": f"truth/{name}", "background": kind})
        for split, table in rows.items():
            pd.DataFrame(table).to_csv(partial / f"{split}.csv", index=False)
        pd.DataFrame(truth).to_csv(partial / "truth.csv", index=False)
        os.replace(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return sum(len(table) for table in rows.values())


def read_realphoto_truth(root: Path, paths: list[str], height: int, width: int) -> pd.DataFrame:
    """Per decoded image (absolute `paths`): the true subject box scaled to (height, width), whether it is a
    face, and its true mask at that size."""
    root = Path(root).resolve()
    table = pd.read_csv(root / "truth.csv").set_index("path")
    found = []
    for path in paths:
        row = table.loc[str(Path(path).resolve().relative_to(root))]
        mask = cv2.imread(str(root / row["mask"]), cv2.IMREAD_GRAYSCALE)
        scale = np.array([width / mask.shape[1], height / mask.shape[0]] * 2)
        found.append({"box": row[["x0", "y0", "x1", "y1"]].to_numpy(float) * scale, "face": bool(row["face"]),
                      "mask": cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA) > 127})
    return pd.DataFrame(found)
