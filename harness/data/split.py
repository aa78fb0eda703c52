"""Person-grouped, stratified train/valid split and its hash.

No person is ever in both train and valid (splitting by image leaks: 90% valid
vs 20% test in the real competition). Persons are stratified on their
attributes (gender x age group for the competition, the majority class
otherwise) so the rare >=60 group always appears in valid.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from harness.data.labels import AGE_NAMES, GENDER_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # row positions into the index
    valid: np.ndarray
    hash: str  # over the sorted person lists: stored with a study, checked on resume

    def persons(self, frame: pd.DataFrame, part: str) -> list[str]:
        return sorted(set(frame["person"].iloc[getattr(self, part)]))


def person_strata(frame: pd.DataFrame) -> pd.Series:
    """One stratum per image, constant within a person."""
    if frame.attrs.get("tasks"):
        return frame["gender"] * 3 + frame["age"]
    majority = frame.groupby("person")["label"].agg(lambda labels: labels.mode().iloc[0])
    return frame["person"].map(majority)


def split_hash(train_persons: list[str], valid_persons: list[str]) -> str:
    blob = "\n".join(sorted(train_persons)) + "\n--valid--\n" + "\n".join(sorted(valid_persons))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_by_person(frame: pd.DataFrame, valid_fraction: float = 0.2, seed: int = 0) -> Split:
    """Stratified grouped split: one fold of StratifiedGroupKFold with round(1/fraction) folds."""
    persons = frame["person"].to_numpy()
    n_persons = len(set(persons))
    n_splits = max(2, round(1 / valid_fraction))
    if n_persons < n_splits:
        raise ValueError(f"{n_persons} persons cannot be split with valid_fraction={valid_fraction}; "
                         f"need at least {n_splits} persons")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, valid = next(splitter.split(np.zeros(len(frame)), person_strata(frame), groups=persons))
    train, valid = np.sort(train), np.sort(valid)
    return Split(train, valid, split_hash(sorted(set(persons[train])), sorted(set(persons[valid]))))


def stratum_name(frame: pd.DataFrame, stratum: int) -> str:
    if frame.attrs.get("tasks"):
        return f"{GENDER_NAMES[stratum // 3]} {AGE_NAMES[stratum % 3]}"
    names = frame.attrs.get("class_names")
    return f"class {names[stratum] if names else stratum}"


def person_folds(frame: pd.DataFrame, folds: int, seed: int = 0) -> list[Split]:
    """K person-grouped folds over every row, stratified as `split_by_person` is: fold k's `valid` is its
    held-out persons, its `train` everyone else. Every person is held out exactly once.

    A stratum with fewer persons than folds (a rare class of a user's data, two old men of a small set) is
    spread over as many folds as it has persons: the other folds hold none of it out, so their own held-out
    scores miss that class, while the out-of-fold predictions, which the promotion scores and audits, still
    cover every person. That is logged, not refused: fewer folds would train every model on fewer persons.
    A stratum of one person is refused: the fold holding it out would train without its class."""
    persons = frame["person"].to_numpy()
    strata = person_strata(frame)
    per_stratum = pd.Series(strata.to_numpy()).groupby(persons).first().value_counts()
    smallest, fewest = per_stratum.idxmin(), int(per_stratum.min())
    if fewest < 2:
        raise ValueError(f"{stratum_name(frame, int(smallest))} has a single person (strata: gender x age group, or "
                         "class): no K-fold split can both train on and hold out a stratum of one person; add "
                         "persons to it")
    if fewest < folds:
        short = ", ".join(f"{stratum_name(frame, int(s))} ({n})" for s, n in per_stratum[per_stratum < folds].items())
        log.warning("%d folds, but these strata have fewer persons: %s; the folds without one of them score "
                    "their held-out persons without that class (every person is still held out once). "
                    "promotion.folds: %d holds each of them out in every fold, training on fewer persons",
                    folds, short, fewest)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    result = []
    with warnings.catch_warnings():  # sklearn's "least populated class" warning: said above, in our terms
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for train, valid in splitter.split(np.zeros(len(frame)), strata, groups=persons):
            train, valid = np.sort(train), np.sort(valid)
            result.append(Split(train, valid, split_hash(sorted(set(persons[train])), sorted(set(persons[valid])))))
    return result
