"""Label audit: the given labels the out-of-fold predictions doubt most, per task, with cleanlab.

Out-of-fold probabilities (harness.promotion.folds: every image predicted by models that never trained on its
person) are what cleanlab needs. For the competition each task is audited at its own level:

    mask     per image (a photo's mask state; the real data swaps incorrect_mask and normal files)
    gender   per person (the person's images' probabilities averaged: a folder's gender is one label)
    age      per person (an age group; corrections take years: the nearest age inside the suggested group)

Other data has one task, "label", per image. cleanlab's `find_label_issues` flags the issues and its
self-confidence label-quality score ranks them (lowest first: most suspicious). runs/<study>/promotion/
label_issues.csv has `target` (a person folder or an image path under train/images, as data.corrections
takes it), `task`, `given`, `suggested`, `score`, `image` (a file to look at), `method` (how it was flagged)
and an empty `accept` column;
`harness corrections STUDY.yaml` turns the accepted rows into a data.corrections file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import StudyConfig
from harness.data.labels import AGE_NAMES, GENDER_NAMES, MASK_NAMES, TASKS, encode
from harness.folders import PromotionFolder
from harness.io import atomic_write_text
from harness.runtime import StudyError

log = logging.getLogger("harness.audit")
COLUMNS = ["target", "task", "given", "suggested", "score", "image", "method", "accept"]
TASK_NAMES = {"mask": MASK_NAMES, "gender": GENDER_NAMES, "age": AGE_NAMES}
PERSON_TASKS = ("gender", "age")


class AuditError(StudyError):
    """The label audit cannot be turned into corrections as asked; the message says what to do."""


def task_probs(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Each task's marginal probabilities (N, size) from 18-class probabilities (N, 18)."""
    joint = np.asarray(probs).reshape(len(probs), *TASKS.values())  # (N, mask, gender, age): label m*6+g*3+a
    return {"mask": joint.sum(axis=(2, 3)), "gender": joint.sum(axis=(1, 3)), "age": joint.sum(axis=(1, 2))}


CLEANLAB = "cleanlab find_label_issues"


def _issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(indices flagged, most suspicious first; every item's self-confidence score; how they were flagged).

    cleanlab estimates the noise rates per given class, and refuses classes no item is given; the audit
    runs it on the classes present (their probabilities renormalised), which is the same question asked of
    the labels that exist. Should it still refuse, the items are ranked by the score alone, and the
    method says so (summary, report, the `method` column of label_issues.csv)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(labels)
    compact = np.searchsorted(present, labels)
    probs = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
    scores = get_label_quality_scores(compact, probs, method="self_confidence")
    try:
        flagged = find_label_issues(compact, probs, return_indices_ranked_by="self_confidence")
        method = CLEANLAB
    except ValueError as error:
        method = f"self-confidence below 0.5 (cleanlab could not estimate the noise rates: {error})"
        log.warning("label audit: %s", method)
        flagged = np.argsort(scores)[scores[np.argsort(scores)] < 0.5]
    return np.asarray(flagged, dtype=np.int64), scores, method


def _rows(task: str, targets, images, labels, probs, names) -> list[dict]:
    flagged, scores, method = _issues(np.asarray(labels), np.asarray(probs))
    return [{"target": targets[i], "task": task, "given": names[labels[i]], "suggested": names[int(np.argmax(probs[i]))],
             "score": float(scores[i]), "image": images[i], "method": method, "accept": ""} for i in flagged]


def audit_labels(probs: np.ndarray, frame: pd.DataFrame, tasks: bool, folder: PromotionFolder) -> dict:
    """Write the promotion's label_issues.csv from out-of-fold class probabilities (N, C) of `frame`'s images."""
    paths = frame["path"].astype(str).tolist()
    rows = []
    if tasks:
        per_task = task_probs(probs)
        images = [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]  # relative to train/images
        rows += _rows("mask", images, paths, frame["mask"].to_numpy(), per_task["mask"], MASK_NAMES)
        persons = frame.groupby("person", sort=True)
        shown = persons["path"].last()  # the person's last photo (the unmasked "normal" one) to look at
        for task in PERSON_TASKS:
            mean = pd.DataFrame(per_task[task]).groupby(frame["person"].to_numpy(), sort=True).mean().to_numpy()
            given = persons[task].first().to_numpy()
            rows += _rows(task, list(persons.groups), shown.tolist(), given, mean, TASK_NAMES[task])
    else:
        names = list(frame.attrs.get("class_names") or range(probs.shape[1]))
        rows += _rows("label", paths, paths, frame["label"].to_numpy(), probs, [str(n) for n in names])
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("score", kind="stable")
    path = folder.file(folder.LABEL_ISSUES)
    atomic_write_text(path, table.to_csv(index=False))
    methods = sorted(set(table["method"])) or [CLEANLAB]
    return {"file": str(path), "rows": len(table), "by_task": table["task"].value_counts().to_dict(),
            "method": "; ".join(methods)}


def labels_after(frame: pd.DataFrame, issues: pd.DataFrame, tasks: bool) -> np.ndarray:
    """`frame`'s class labels with every audit row's suggestion applied: the labels the audit believes in.
    Scoring out-of-fold predictions against them says how much of a low score is the labels' doing."""
    if not tasks:
        classes = [str(n) for n in (frame.attrs.get("class_names") or range(int(frame["label"].max()) + 1))]
        labels = pd.Series(frame["label"].to_numpy().copy(), index=frame["path"].astype(str))
        for issue in issues.itertuples():
            labels[issue.target] = classes.index(issue.suggested)
        return labels.to_numpy()
    columns = {task: frame[task].to_numpy().copy() for task in TASK_NAMES}
    image_key = np.array([f"{Path(p).parent.name}/{Path(p).name}" for p in frame["path"].astype(str)])
    persons = frame["person"].astype(str).to_numpy()
    for issue in issues.itertuples():
        rows = persons == str(issue.target) if issue.task in PERSON_TASKS else image_key == issue.target
        columns[issue.task][rows] = TASK_NAMES[issue.task].index(issue.suggested)
    return encode(columns["mask"], columns["gender"], columns["age"])


def read_issues(folder: PromotionFolder) -> pd.DataFrame | None:
    path = folder.file(folder.LABEL_ISSUES)
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype=str, keep_default_na=False)


ACCEPTED = {"y", "yes", "x", "1", "true", "accept"}


def write_corrections(cfg: StudyConfig, out: Path | None = None, top: int | None = None) -> tuple[Path, int]:
    """The accepted rows of the study's label audit (its `accept` column, or the `top` most suspicious) as a
    data.corrections file: (its absolute path, rows). Rows already in the study's data.corrections are kept
    first, so corrections accumulate over rounds."""
    folder = PromotionFolder.of(cfg)
    issues = read_issues(folder)
    where = folder.file(folder.LABEL_ISSUES)
    if issues is None:
        raise AuditError(f"{where} does not exist: run `harness promote` first; it writes the label audit")
    accepted = issues.head(top) if top is not None else issues[issues["accept"].str.strip().str.lower().isin(ACCEPTED)]
    if accepted.empty:
        raise AuditError(f"{where}: no row is accepted; write yes in the accept column of the rows to correct, or "
                         "pass --top N to accept the N most suspicious")
    try:
        new = corrections_from(accepted, tuple(cfg.data.age_bounds))
    except ValueError as error:
        raise AuditError(f"{where}: {error}") from None
    earlier = _earlier_corrections(cfg)
    table = pd.concat([earlier, new], ignore_index=True) if earlier is not None else new
    path = Path(out or folder.file(folder.CORRECTIONS)).resolve()
    atomic_write_text(path, table.to_csv(index=False))
    return path, len(table)


def _earlier_corrections(cfg: StudyConfig) -> pd.DataFrame | None:
    if cfg.data.corrections is None:
        return None
    path = cfg.data.corrections if cfg.data.corrections.is_absolute() else Path(cfg.data.root) / cfg.data.corrections
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else None


def corrections_from(issues: pd.DataFrame, age_bounds: tuple[int, int]) -> pd.DataFrame:
    """Accepted audit rows as data.corrections rows (target,gender,age,mask; empty = keep). An age group
    becomes the age inside it nearest the other groups: the suspicious ages are the ones near a bound."""
    low, high = age_bounds
    years = {"young": low - 1, "middle": low, "old": high}
    rows = []
    for issue in issues.itertuples():
        row = {"target": issue.target, "gender": "", "age": "", "mask": ""}
        if issue.task == "gender":
            row["gender"] = issue.suggested
        elif issue.task == "age":
            row["age"] = str(years[issue.suggested] if issue.suggested != "middle" or issue.given == "young"
                             else high - 1)
        elif issue.task == "mask":
            row["mask"] = str(MASK_NAMES.index(issue.suggested))
        else:
            raise ValueError(f"task {issue.task!r}: corrections take gender, age and mask; fix other labels by hand")
        rows.append(row)
    return pd.DataFrame(rows, columns=["target", "gender", "age", "mask"])
