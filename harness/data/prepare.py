"""From a study's data section to everything a trial reads: index, split, decoded cache."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import DataConfig, StudyConfig
from harness.data.cache import DecodedCache, build_cache
from harness.data.labels import NUM_CLASSES, class_name
from harness.data.readers import DataIndex, read_train
from harness.data.split import Split, split_by_person
from harness.foreground import Foreground

log = logging.getLogger(__name__)
SPEC_DEFAULTS = {"label_noise": 0.0}  # synthetic.json keys added later, at the value data made before had


@dataclass
class PreparedData:
    frame: pd.DataFrame  # the train index, rows in cache order
    split: Split
    cache: DecodedCache
    # each cached image's face box, person mask and background plate; None where the study uses none of them
    # and the data is not portraits, or where they do not apply (harness.applicability)
    foreground: Foreground | None
    applicability: object = None  # harness.applicability.Applicability: what the foreground step found; None: not run
    shortcuts: dict | None = None  # the study's "shortcuts" record (harness.context_audit), once the study is open

    @property
    def num_classes(self) -> int:
        return int(self.frame.attrs["num_classes"])

    @property
    def tasks(self) -> bool:
        return bool(self.frame.attrs["tasks"])

    def rows(self, part: str) -> np.ndarray:
        """Cache rows of the train or valid images."""
        return np.asarray(getattr(self.split, part))

    def labels(self, part: str) -> np.ndarray:
        return self.frame["label"].to_numpy()[getattr(self.split, part)]

    def summary(self) -> dict:
        return data_summary(self.frame, self.split, len(self.cache.excluded))

    def with_split(self, split: Split) -> PreparedData:
        """The same images under another train/valid split (a fold of the promotion)."""
        return replace(self, split=split)


def ensure_dataset(data: DataConfig) -> None:
    """Write the synthetic or sample dataset a study asks for when its root does not exist yet; refuse a root
    that holds synthetic data generated with other settings than the study file's."""
    root = Path(data.root)
    if root.exists():
        if data.synthetic is not None:
            check_synthetic(data)
        return
    if data.sample is not None:
        from harness.data.samples import write_sample

        log.info("writing sample dataset %r at %s", data.sample, root)
        write_sample(data.sample, root)
        return
    if data.synthetic is None:
        return
    from harness.data.synthetic import make_synthetic

    spec = data.synthetic
    log.info("generating synthetic data (%d people, trap strength %s) at %s", spec.people, spec.trap_strength, root)
    make_synthetic(root, people=spec.people, seed=spec.seed, width=spec.width, height=spec.height,
                   eval_images=spec.eval_images, trap_strength=spec.trap_strength, label_noise=spec.label_noise)


def check_synthetic(data: DataConfig) -> None:
    """A synthetic root must hold what data.synthetic asks for (its synthetic.json), not older or other data."""
    from harness.data.readers import DataError
    from harness.data.synthetic import synthetic_spec

    spec = data.synthetic
    wanted = synthetic_spec(spec.people, spec.seed, spec.width, spec.height, spec.eval_images, spec.trap_strength,
                            spec.label_noise)
    written = Path(data.root) / "synthetic.json"
    found = json.loads(written.read_text()) if written.is_file() else None
    if found is not None:  # a setting added later, written before it existed: its default was made
        found = {**SPEC_DEFAULTS, **found}
    if found != wanted:
        differ = sorted(k for k in wanted if (found or {}).get(k) != wanted[k])
        raise DataError(f"{data.root} holds synthetic data made with other settings than data.synthetic asks for "
                        f"(differing: {', '.join(differ)}; found {written if found else 'no synthetic.json'}); "
                        f"delete {data.root} to generate it again, or point data.root elsewhere")


def read_checked(data: DataConfig) -> DataIndex:
    ensure_dataset(data)
    index = read_train(data)
    index.raise_on_errors()
    return index


def prepare_data(cfg: StudyConfig, progress: bool = True, refuse_foreground: bool = True) -> PreparedData:
    """Index, split and cache the train data, and find faces and persons where the study uses them and they
    apply (raises harness.applicability.NotApplicable where they are needed and do not, unless
    `refuse_foreground` is False: then the foreground is None there). With
    `on_bad_image: fail`, build_cache raises on a bad image."""
    from harness.applicability import prepare_foreground

    data = cfg.data
    frame = read_checked(data).frame
    cache = build_cache(list(frame["path"]), data.image_size.height, data.image_size.width, Path(data.cache_dir),
                        resize=data.resize, workers=data.cache_workers, on_bad_image=data.on_bad_image,
                        progress=progress)
    if cache.excluded:
        for path, reason in cache.excluded:
            log.warning("excluded unreadable image %s: %s", path, reason)
        keep = frame["path"].isin(set(cache.paths))
        frame = frame[keep].reset_index(drop=True).copy()
    frame = in_cache_order(frame, cache)
    split = split_by_person(frame, data.valid_fraction, data.split_seed)
    return PreparedData(frame, split, cache, *prepare_foreground(cfg, cache, refuse_foreground))


def in_cache_order(frame: pd.DataFrame, cache: DecodedCache) -> pd.DataFrame:
    """Reorder rows so that row i of the index is row i of the cache."""
    attrs = dict(frame.attrs)
    order = np.argsort([cache.row_of(p) for p in frame["path"]], kind="stable")
    frame = frame.iloc[order].reset_index(drop=True)
    frame.attrs.update(attrs)
    return frame


def class_names(summary: dict | None, size: int) -> list[str]:
    """Names of `size` classes: the ones a data summary stored (see `data_summary`), else the competition's
    names for its 18 classes, else the class numbers."""
    names = (summary or {}).get("class_names")
    if names and len(names) == size:
        return [str(n) for n in names]
    return [class_name(i) for i in range(size)] if size == NUM_CLASSES else [str(i) for i in range(size)]


def data_summary(frame: pd.DataFrame, split, excluded_images: int = 0) -> dict:
    """Persons, images and class counts of train and valid: the shape stored as the study attr "data_summary"."""
    labels = frame["label"].to_numpy()
    num_classes = int(frame.attrs.get("num_classes", NUM_CLASSES))
    names = list(frame.attrs.get("class_names") or [class_name(i) for i in range(num_classes)])

    def counts(rows: np.ndarray) -> list[int]:
        part = labels[rows]
        return np.bincount(part[part >= 0], minlength=num_classes).astype(int).tolist()

    return {"persons": {part: len(split.persons(frame, part)) for part in ("train", "valid")},
            "images": {"train": len(split.train), "valid": len(split.valid)},
            "class_counts": {"train": counts(split.train), "valid": counts(split.valid)},
            "class_names": names, "split_hash": split.hash, "excluded_images": int(excluded_images)}
