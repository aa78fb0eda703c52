"""The context audit: can the labels be predicted from context alone? A shortcut check that needs no person.

A model that reads where a photo was taken instead of what it shows scores well wherever the two agree
(a train split, a valid split cut from it) and poorly where they do not (the leaderboard). Whether they
agree in the data is measurable before any training: describe only what lies OUTSIDE the object, and
see whether a small classifier predicts the labels from that.

    context      where a foreground applies (harness.applicability): every pixel outside the person mask
                 grown by GROW pixels; elsewhere the four corner patches (CORNER of each side), where a
                 centred subject rarely reaches
    features     per image quadrant, the mean and spread of each colour channel and the mean gradient
                 over the context pixels; over all of them a 4x4x4 colour histogram and an 8-bin gradient
                 orientation histogram (what the context looks like, not where the object is)
    classifier   standardised features, shrinkage LDA with equal class priors (closed form: fast enough
                 to run at every study start), person-grouped stratified K-fold (no person on both sides)
    score        out-of-fold macro F1 per task (the competition's mask, gender, age; else the label), its
                 person-bootstrap 95% interval, and chance: the same cross-validation with the labels
                 shuffled `shortcuts.audit_permutations` times
    flagged      the interval's low end above every shuffled score, F1 at least MIN_LIFT above chance, and
                 the context reading at least MIN_SHARE of what the same features read from the whole image
                 (F1 above chance, context over whole): where the object itself reaches into the context
                 region, as a digit's strokes reach the corners of its scan, the whole image reads far more

`audit_views` runs it on the images as loaded and as each remedy the study uses leaves them (a crop, the
background removed): the same context region, moved as the remedy moved the pixels (a crop). Where the
remedy leaves less than MIN_CONTEXT of it (background removal blanks exactly that region) the view is not
audited: the audit cannot see what an imperfect mask leaves inside the mask; check-data's mask IoU against
a dataset's truth is the measure there.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

AUDIT_VERSION = 1  # part of a stored audit's key: raise it when the audit's method changes
CORNER = 1 / 16  # each corner patch spans this share of the width and of the height: where a framed subject ends
GROW = 2  # pixels the person mask grows by before its outside counts as context
MIN_LIFT = 0.1  # F1 above chance that counts as a shortcut (smaller lifts flag nothing)
# share of what the same features read from the whole image that the context alone reads: where the object
# itself reaches the context region (a digit's strokes in the corners) the share stays low
MIN_SHARE = 0.5
COLOUR_LEVELS = 4
ORIENTATIONS = 8
MIN_CONTEXT = 0.01  # a view with less of its pixels left in the context region is not audited
BLANKED = "the remedy leaves nothing of the context region"
AUDIT_OFF = "context audit: off (shortcuts.audit: false)"
CHUNK = 256  # images per feature batch (bounds memory)


@dataclass(frozen=True)
class TaskAudit:
    view: str  # "as loaded", or the remedy (preprocessor) the images went through
    region: str  # "outside the person" or "corners"
    task: str
    classes: int
    f1: float
    low: float
    high: float
    chance: float  # mean F1 with shuffled labels
    chance_high: float  # the highest F1 with shuffled labels
    whole_f1: float  # the same test on features of the whole image
    flagged: bool
    sampled: str = ""  # "<n> of <N> images" where the audit read a sample of whole persons (audit_images)

    @property
    def share(self) -> float:
        """How much of what the whole image tells these features the context alone tells (0: nothing)."""
        return (self.f1 - self.chance) / max(self.whole_f1 - self.chance, 1e-9)

    def line(self) -> str:
        if self.region == BLANKED:
            return f"{self.view:18s} {self.task:7s} not audited: {BLANKED}"
        verdict = "SHORTCUT: the context predicts it" if self.flagged else "no shortcut found"
        return (f"{self.view:18s} {self.task:7s} F1 from {self.region} {self.f1:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"vs chance {self.chance:.3f} (shuffled up to {self.chance_high:.3f}), whole image {self.whole_f1:.3f}: "
                f"{verdict}")


# ------------------------------------------------------------------------------ regions


def corner_region(height: int, width: int) -> np.ndarray:
    """(H, W) bool: the four corner patches."""
    region = np.zeros((height, width), bool)
    ch, cw = max(1, round(CORNER * height)), max(1, round(CORNER * width))
    for rows in (slice(0, ch), slice(height - ch, height)):
        for cols in (slice(0, cw), slice(width - cw, width)):
            region[rows, cols] = True
    return region


def outside_person(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: outside each person mask grown by GROW pixels (max filter over a square)."""
    import cv2

    kernel = np.ones((2 * GROW + 1, 2 * GROW + 1), np.uint8)
    return np.stack([cv2.dilate(np.asarray(mask, np.uint8), kernel) == 0 for mask in masks])


# ----------------------------------------------------------------------------- features


def context_features(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(N, F) float features of uint8 images (N, H, W, 3) over `region`, (H, W) or (N, H, W) bool."""
    count, height, width = images.shape[:3]
    region = np.broadcast_to(region, (count, height, width))
    return np.concatenate([_features(np.asarray(images[start:start + CHUNK], np.float32) / 255.0,
                                     np.asarray(region[start:start + CHUNK]))
                           for start in range(0, count, CHUNK)])


def _features(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    count, height, width = images.shape[:3]
    gray = images.mean(axis=3)
    gx, gy = np.zeros_like(gray), np.zeros_like(gray)
    gx[:, :, 1:-1], gy[:, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2], gray[:, 2:] - gray[:, :-2]
    magnitude = np.hypot(gx, gy)
    quadrants = np.zeros((height, width), np.int64)
    quadrants[height // 2:] += 2
    quadrants[:, width // 2:] += 1
    parts = []
    for quadrant in range(4):
        weight = (region & (quadrants == quadrant)).astype(np.float32)
        pixels = np.maximum(weight.sum(axis=(1, 2)), 1.0)
        mean = np.einsum("nhwc,nhw->nc", images, weight) / pixels[:, None]
        square = np.einsum("nhwc,nhw->nc", images ** 2, weight) / pixels[:, None]
        parts += [mean, np.sqrt(np.maximum(square - mean ** 2, 0)),
                  ((magnitude * weight).sum(axis=(1, 2)) / pixels)[:, None]]
    parts.append(_histogram(_colour_bins(images), region, COLOUR_LEVELS ** 3))
    angle = ((np.arctan2(gy, gx) + np.pi) / (2 * np.pi) * ORIENTATIONS).astype(np.int64) % ORIENTATIONS
    parts.append(_histogram(angle, region, ORIENTATIONS, magnitude))
    return np.concatenate(parts, axis=1)


def _colour_bins(images: np.ndarray) -> np.ndarray:
    levels = np.minimum((images * COLOUR_LEVELS).astype(np.int64), COLOUR_LEVELS - 1)
    return (levels[..., 0] * COLOUR_LEVELS + levels[..., 1]) * COLOUR_LEVELS + levels[..., 2]


def _histogram(bins: np.ndarray, region: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, size) normalised histogram of per-pixel bins over each image's region."""
    count = len(bins)
    index = (np.arange(count)[:, None, None] * size + bins)[region]
    values = None if weights is None else weights[region]
    hist = np.bincount(index, weights=values, minlength=count * size).reshape(count, size)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1e-9)


# ------------------------------------------------------------------------------ the test


def out_of_fold(features: np.ndarray, labels: np.ndarray, persons: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of shrinkage LDA (equal priors), person-grouped stratified K-fold."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = np.unique(labels)
    predicted = np.full(len(labels), classes[0])
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(features, labels, persons):
        if len(np.unique(labels[train])) < 2:
            continue
        model = make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(
            solver="lsqr", shrinkage="auto", priors=np.full(len(np.unique(labels[train])),
                                                            1 / len(np.unique(labels[train])))))
        predicted[held] = model.fit(features[train], labels[train]).predict(features[held])
    return predicted


def audit_task(features: np.ndarray, whole: np.ndarray, labels: np.ndarray, persons: np.ndarray, folds: int,
               permutations: int, view: str, region: str, task: str, seed: int = 0) -> TaskAudit:
    """The test of one task on one view: `features` of the context, `whole` of the whole image."""
    from harness.metrics import macro_f1
    from harness.uncertainty import f1_interval

    classes = int(labels.max()) + 1
    folds = max(2, min(folds, len(np.unique(persons))))
    predicted = out_of_fold(features, labels, persons, folds, seed)
    f1 = macro_f1(predicted, labels, classes)
    low, high = f1_interval(predicted, labels, persons, classes, seed=seed)
    rng = np.random.default_rng(seed)
    shuffled = []
    for _ in range(permutations):
        permuted = rng.permutation(labels)
        shuffled.append(macro_f1(out_of_fold(features, permuted, persons, folds, seed), permuted, classes))
    chance, chance_high = float(np.mean(shuffled)), float(np.max(shuffled))
    whole_f1 = macro_f1(out_of_fold(whole, labels, persons, folds, seed), labels, classes)
    found = TaskAudit(view, region, task, classes, round(f1, 4), round(low, 4), round(high, 4), round(chance, 4),
                      round(chance_high, 4), round(whole_f1, 4), False)
    flagged = low > chance_high and f1 - chance >= MIN_LIFT and found.share >= MIN_SHARE
    return replace(found, flagged=bool(flagged))


def task_labels(frame) -> dict[str, np.ndarray]:
    """The labels each task is audited on: the competition's mask, gender and age where the data has them
    (the trap follows gender and age, not the 18 classes as a whole), else the label."""
    from harness.data.labels import TASKS, decode

    labels = frame["label"].to_numpy()
    if not frame.attrs.get("tasks"):
        return {"label": labels}
    return dict(zip(TASKS, decode(labels), strict=True))


def sample_rows(persons: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Rows of whole persons, drawn in a seeded order until `limit` images are reached (sorted)."""
    order = np.random.default_rng(seed).permutation(np.unique(persons))
    counts = pd.Series(persons).value_counts().reindex(order).to_numpy()
    chosen = order[:int(np.searchsorted(np.cumsum(counts), limit)) + 1]
    return np.flatnonzero(np.isin(persons, chosen))


def audit_views(images: np.ndarray, frame, fg, methods: list[str], folds: int = 5,
                permutations: int = 20, seed: int = 0, max_images: int | None = None) -> list[TaskAudit]:
    """The audit of `images` (the decoded cache, rows as `frame`) as loaded and as each preprocessor in
    `methods` leaves them; `fg` the foreground (harness.foreground) or None. Beyond `max_images`, a seeded
    sample of whole persons (the rows say so)."""
    from harness.augment import PREPROCESSORS, preprocess
    from harness.io import progress_bar

    sampled = ""
    if max_images is not None and len(frame) > max_images:
        rows = sample_rows(frame["person"].to_numpy(), max_images, seed)
        sampled = f"{len(rows)} of {len(frame)} images"
        images, attrs = np.asarray(images[rows]), dict(frame.attrs)
        frame = frame.iloc[rows].reset_index(drop=True)
        frame.attrs.update(attrs)  # whether the labels hold the competition's tasks
        fg = fg.take(rows) if fg is not None else None
    persons = frame["person"].to_numpy()
    tasks = task_labels(frame)
    height, width = images.shape[1:3]
    if fg is not None:
        region, region_name = outside_person(fg.masks), "outside the person"
    else:
        region, region_name = np.broadcast_to(corner_region(height, width), images.shape[:3]), "corners"
    views = [("as loaded", region_name, None, region)]
    for method in methods:
        if method == "none" or (PREPROCESSORS.get(method).uses_foreground and fg is None):
            continue
        # without a person the context is the corners of what the model sees; with one, the outside of the person
        # moved as the remedy moved the pixels
        remedied = region if fg is None else remedied_region(region, method, fg)
        if remedied.mean() < MIN_CONTEXT:  # the background removed: nothing left to read it from
            views.append((method, BLANKED, None, None))
            continue
        views.append((method, region_name, method, remedied))
    found = []
    with progress_bar(len(views) * len(tasks), "context audit", unit="fit") as bar:
        for view, region_name, method, region in views:
            if region is None:
                nan = float("nan")
                found += [TaskAudit(view, region_name, task, int(labels.max()) + 1, nan, nan, nan, nan, nan, nan,
                                    False) for task, labels in tasks.items()]
                bar.update(len(tasks))
                continue
            # one remedied copy of the images at a time: at the competition's size each is gigabytes
            pixels = images if method is None else preprocess(np.asarray(images), method, fg)
            features = context_features(pixels, region)
            whole = context_features(pixels, np.ones((height, width), bool))
            del pixels
            for task, labels in tasks.items():
                found.append(audit_task(features, whole, labels, persons, folds, permutations, view, region_name,
                                        task, seed))
                bar.update()
    return [replace(item, sampled=sampled) for item in found]


def remedied_region(region: np.ndarray, method: str, fg) -> np.ndarray:
    """Where `region` lies once preprocessor `method` has moved the pixels (a crop) or blanked them (the
    background removed: what is left of the region is what the person mask kept of it)."""
    from harness.augment import preprocess

    as_image = np.repeat(np.where(region, 255, 0).astype(np.uint8)[..., None], 3, axis=3)
    return preprocess(np.ascontiguousarray(as_image), method, fg)[..., 0] > 127


def study_methods(cfg) -> list[str]:
    """The preprocessors a study can train with: its default and its searched choices."""
    space = cfg.search.space.get("preprocess")
    choices = space.choices if space is not None and space.type == "categorical" else []
    return list(dict.fromkeys([cfg.params.preprocess, *choices]))


def audit_study_data(cfg, data) -> list[TaskAudit]:
    """The audit of a study's prepared data (harness.data.prepare.PreparedData): its train and valid images.
    Kept beside the decoded cache under a key of everything it reads, so that every later study of the same
    data (and the bench's applicability group) reads it instead of fitting it again (seconds at smoke size,
    minutes at full); check-data audits the cache it builds itself."""
    import json

    from harness.io import atomic_write_text

    methods = study_methods(cfg)
    path = Path(cfg.data.cache_dir) / "context_audit" / f"{audit_key(cfg, data, methods)}.json"
    try:
        return [TaskAudit(**row) for row in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):  # not measured yet (or a half-written file of a killed writer)
        pass
    found = audit_views(data.cache.images, data.frame, data.foreground, methods, cfg.shortcuts.audit_folds,
                        cfg.shortcuts.audit_permutations, seed=cfg.seed, max_images=cfg.shortcuts.audit_images)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(as_records(found)))
    return found


def audit_key(cfg, data, methods: list[str]) -> str:
    """sha256 over what the audit reads: the cache's images (its own key), the labels and persons in cache
    order, the person masks (a function of the cache's key and the foreground method's version, as
    harness.foreground stores them: the version stands for them, no pass over the masks), the views and
    the audit's settings."""
    masks = data.foreground.stats.get("version") if data.foreground is not None else None
    digest = hashlib.sha256(repr((AUDIT_VERSION, data.cache.key, masks, methods, cfg.shortcuts.audit_folds,
                                  cfg.shortcuts.audit_permutations, cfg.seed, bool(data.frame.attrs.get("tasks")),
                                  cfg.shortcuts.audit_images)
                                 ).encode())
    for column in ("label", "person"):
        digest.update(pd.util.hash_pandas_object(data.frame[column], index=False).to_numpy().tobytes())
    return digest.hexdigest()


def as_records(found: list[TaskAudit]) -> list[dict]:
    return [asdict(item) for item in found]


def describe(found: list[TaskAudit]) -> list[str]:
    flagged = [item for item in found if item.flagged]
    audited = sum(item.region != BLANKED for item in found)
    head = (f"context audit: the labels CAN be predicted from context alone ({len(flagged)} of {audited} "
            "view/task pairs): a model may learn where photos were taken instead of what they show"
            if flagged else f"context audit: no label is predictable from context alone ({audited} view/task "
                            "pairs checked)")
    sampled = next((item.sampled for item in found if item.sampled), "")
    if sampled:
        head += f" (on {sampled}: whole persons, a seeded sample; shortcuts.audit_images)"
    return [head] + [f"  {item.line()}" for item in found]


def shortcut_record(cfg, data) -> dict:
    """What a study keeps of where its shortcut measures apply (the study attribute "shortcuts"): the
    foreground's applicability and the context audit's rows."""
    applicability = data.applicability.as_dict() if data.applicability is not None else None
    audit = as_records(audit_study_data(cfg, data)) if cfg.shortcuts.audit else None
    return {"foreground": applicability, "audit": audit}


def record_lines(record: dict) -> list[str]:
    """The console / report lines of a study's "shortcuts" record."""
    from harness.applicability import NOT_COMPUTED, Applicability

    found = record.get("foreground")
    lines = ["foreground: " + (Applicability(**{k: v for k, v in found.items() if k != "applies"}).describe()
                               if found else NOT_COMPUTED)]
    audit = record.get("audit")
    return lines + (describe([TaskAudit(**row) for row in audit]) if audit is not None else [AUDIT_OFF])


def record_flags(record: dict) -> bool:
    """Whether a "shortcuts" record flags any view/task pair."""
    return any(row["flagged"] for row in record.get("audit") or [])
