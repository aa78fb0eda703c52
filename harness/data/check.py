"""`harness check-data`: what the data holds and everything wrong with it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from harness.config import StudyConfig
from harness.data.cache import build_cache
from harness.data.labels import TASKS, decode
from harness.data.prepare import ensure_dataset, in_cache_order
from harness.data.readers import DataError, Problem, read_eval, read_train
from harness.data.split import split_by_person


def image_sizes(paths: list[str]) -> Counter:
    """(width, height) -> count, read from the file headers only."""
    sizes: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes[image.size] += 1
        except (OSError, ValueError):
            sizes["unreadable"] += 1
    return sizes


def class_table(frame: pd.DataFrame, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    names = frame.attrs["class_names"]
    table = pd.DataFrame({part: rows["label"].value_counts().reindex(range(len(names)), fill_value=0)
                          for part, rows in parts.items()})
    table.index = [f"{i:2d} {name}" for i, name in enumerate(names)]
    return table


def task_table(parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = {}
    for task, size in TASKS.items():
        for value in range(size):
            rows[f"{task}={value}"] = {part: int((frame[task] == value).sum()) for part, frame in parts.items()}
    return pd.DataFrame(rows).T


def check_data(cfg: StudyConfig, progress: bool = True) -> tuple[str, bool]:
    """The report text and whether the data is fit to train on (no error problems)."""
    from harness.preflight import preflight_problems

    data = cfg.data
    problems = [Problem("error", "study file", problem) for problem in preflight_problems(cfg)]
    ensure_dataset(data)
    index = read_train(data)
    frame = index.frame
    problems += index.problems
    cache = build_cache(list(frame["path"]), data.image_size.height, data.image_size.width, Path(data.cache_dir),
                        resize=data.resize, workers=data.cache_workers, on_bad_image="exclude", progress=progress)
    problems += [Problem("error", path, f"unreadable image: {reason}") for path, reason in cache.excluded]
    good = frame[frame["path"].isin(set(cache.paths))]
    good.attrs.update(frame.attrs)
    lines = [f"data: {data.root} ({data.format})",
             f"images: {len(frame)} ({len(good)} readable), persons: {frame['person'].nunique()}",
             f"image sizes seen (W x H): {dict(image_sizes(list(frame['path'])))}"]
    try:
        split = split_by_person(good, data.valid_fraction, data.split_seed)
        parts = {"train": good.iloc[split.train], "valid": good.iloc[split.valid]}
        lines.append(f"split: {len(split.persons(good, 'train'))} train / {len(split.persons(good, 'valid'))} valid "
                     f"persons, hash {split.hash}")
    except ValueError as error:
        problems.append(Problem("error", str(data.root), str(error)))
        parts = {"all": good}
    found, fg = foreground_summary(cfg, cache, problems)
    lines += found + audit_summary(cfg, in_cache_order(good, cache), cache, fg)
    lines += ["", "images per class:", class_table(frame, parts).to_string()]
    if frame.attrs["tasks"]:
        lines += ["", "images per task label:", task_table(parts).to_string()]
    lines += _eval_summary(cfg, problems)
    errors = [p for p in problems if p.severity == "error"]
    lines += ["", f"problems: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)"]
    lines += [f"  {p}" for p in sorted(problems, key=lambda p: (p.severity != "error", p.file))]
    return "\n".join(lines), not errors


def foreground_summary(cfg: StudyConfig, cache, problems: list[Problem]) -> tuple[list[str], object]:
    """What the foreground step finds on this data (harness.applicability): faces, person masks and their
    fallbacks, whether the person-based probe and remedies apply, and against the truth where the data ships
    one (synthetic): the face hit rate (IoU >= 0.4) and the person masks' IoU. A study that needs them where
    they do not apply is an error problem: `harness study` would refuse it. Returns the lines and the
    foreground (None where it is not computed or does not apply)."""
    from harness.applicability import NOT_COMPUTED, foreground_users, prepare_foreground, sample_faces

    users = foreground_users(cfg)
    fg, found = prepare_foreground(cfg, cache, refuse=False)
    if found is None:
        return ["", f"foreground: {NOT_COMPUTED} ({sample_faces(cache.images, cfg, users).describe()})"], None
    uses = f"used by {', '.join(users)}" if users else "used by nothing in the study (a probe shown beside the figures)"
    lines = ["", f"foreground ({uses}): {found.describe()}"]
    if found.users and not found.applies:
        problems.append(Problem("error", "study file", found.refusal(cfg.name)))
    if fg is None:
        return lines, None
    counts = fg.counts()
    detectors = ", ".join(f"{name} {count}" for name, count in sorted(fg.stats["detectors"].items()))
    lines.append(f"  {counts['images']} images; faces by {detectors}; no face found in {counts['no_face']} (a "
                 f"portrait's usual face box stands in); person mask from the template (GrabCut failed) in "
                 f"{counts['mask_fallback']}")
    lines += truth_lines(cfg.data.root, cache, fg)
    return lines, fg


def audit_summary(cfg: StudyConfig, frame: pd.DataFrame, cache, fg) -> list[str]:
    """The context audit (harness.context_audit) of the readable images (`frame` in `cache` order) with the
    foreground found for them (or None)."""
    from harness.context_audit import AUDIT_OFF, audit_views, describe, study_methods

    if not cfg.shortcuts.audit:
        return ["", AUDIT_OFF]
    try:
        found = audit_views(cache.images, frame, fg, study_methods(cfg), cfg.shortcuts.audit_folds,
                            cfg.shortcuts.audit_permutations, seed=cfg.seed, max_images=cfg.shortcuts.audit_images)
    except ValueError as error:
        return ["", f"context audit: not run ({str(error).splitlines()[0]})"]
    return [""] + describe(found)


def truth_lines(root, cache, fg) -> list[str]:
    """The face hit rate and mask IoU against the truth a generated dataset ships (truth/), if it has one."""
    from harness.data.synthetic import read_truth
    from harness.foreground import box_iou, mask_iou

    truth = read_truth(root, cache.paths, *cache.images.shape[1:3])
    if truth is None:
        return []
    boxes, masks = truth
    hits = (box_iou(fg.faces, boxes) >= 0.4) & fg.found
    iou = mask_iou(fg.masks, masks)
    return [f"  against the data's truth: face found {hits.mean():.3f} of images (IoU >= 0.4), "
            f"person mask IoU mean {iou.mean():.3f} (10th percentile {np.percentile(iou, 10):.3f})"]


def _eval_summary(cfg: StudyConfig, problems: list[Problem]) -> list[str]:
    try:
        index = read_eval(cfg.data)
    except DataError as error:
        problems.append(Problem("error", str(cfg.data.root), str(error)))
        return []
    if index is None:
        return []
    problems += index.problems
    known = index.frame["label"] >= 0
    competition = cfg.data.format == "competition"
    truth = "eval/gt.csv" if competition else "labelled"
    scored = f", {int(known.sum())} with ground truth ({truth})" if known.any() else ""
    lines = ["", f"{'eval' if competition else 'test (data.test)'}: {len(index.frame)} images{scored}"]
    if known.any() and not competition:
        lines.append(class_table(index.frame, {"test": index.frame[known]}).to_string())
    elif known.any():
        mask, gender, age = decode(index.frame.loc[known, "label"].to_numpy())
        lines.append(f"  eval mask/gender/age counts: {Counter(mask.tolist())} {Counter(gender.tolist())} "
                     f"{Counter(age.tolist())}")
    return lines
