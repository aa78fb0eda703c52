"""Readers: turn a data root into one index DataFrame, and list what is wrong with it.

Every reader returns a `DataIndex`: the DataFrame (one row per image) plus the
problems found while reading. Columns:

    path       absolute path of the image file
    person     the person (competition: the folder, not the id) or the group
    image_id   stable id (competition train: "<folder>/<stem>", eval: ImageID)
    mask, gender, age, age_years   task labels (-1 where unknown)
    label      class (competition: mask*6 + gender*3 + age; -1 where unknown)

`df.attrs` holds `num_classes`, `tasks` (True when mask/gender/age exist) and
`class_names`. Problems with severity "error" would corrupt training;
`DataIndex.raise_on_errors()` turns them into one DataError that lists them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import DataConfig
from harness.data.labels import GENDER_NAMES, GENDER_OF_WORD, MASK_OF_STEM, NUM_CLASSES, age_group, class_name, encode
from harness.data.split import split_by_person

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
TRAIN_CSV_COLUMNS = ["id", "gender", "race", "age", "path"]
FOLDER_PATTERN = re.compile(r"^(?P<id>[^_]+)_(?P<gender>[^_]+)_(?P<race>[^_]+)_(?P<age>[^_]+)$")
COLUMNS = ["path", "person", "image_id", "mask", "gender", "age", "age_years", "label"]


class DataError(ValueError):
    """Data that cannot be trained on; the message names the files and what is wrong."""


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" (corrupts training) or "warning" (skipped or repaired)
    file: str
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.file}: {self.message}"


@dataclass
class DataIndex:
    frame: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def raise_on_errors(self) -> pd.DataFrame:
        if self.errors:
            listed = "\n".join(f"  {p}" for p in self.errors)
            raise DataError(f"{len(self.errors)} data problem(s) would corrupt training:\n{listed}\n"
                            "Fix the files or list corrections (data.corrections), then run `harness check-data`.")
        return self.frame


def is_junk(path: Path) -> bool:
    """macOS resource forks (._x.jpg), .DS_Store and other hidden files."""
    return path.name.startswith(".")


def inside_root(root: Path, relative: str, source: Path) -> Path:
    """Resolve a path read from a data file; refuse anything that escapes the data root."""
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(f"{source}: path {relative!r} escapes the data root {root}; "
                        "paths in data files must stay inside it (no '..' or absolute paths)")
    return resolved


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected columns {required}, found {list(frame.columns)}")
    return frame


def _finish(rows: list[dict], num_classes: int, tasks: bool, names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in ["mask", "gender", "age", "age_years", "label"]:
        frame[column] = frame[column].astype("int64")
    frame.attrs.update(num_classes=num_classes, tasks=tasks, class_names=names)
    return frame


# ------------------------------------------------------------------ competition train


def _parse_folder(name: str, folder: Path, problems: list[Problem]) -> tuple[str, int, int] | None:
    """(id, gender, age_years) from `<id>_<gender>_<race>_<age>`, or None with a problem recorded."""
    match = FOLDER_PATTERN.match(name)
    if not match:
        problems.append(Problem("error", str(folder), "folder name is not <id>_<gender>_<race>_<age>"))
        return None
    gender = GENDER_OF_WORD.get(match["gender"].lower())
    if gender is None:
        problems.append(Problem("error", str(folder), f"unknown gender {match['gender']!r}; expected male or female"))
        return None
    if not match["age"].isdigit():
        problems.append(Problem("error", str(folder), f"age {match['age']!r} is not a whole number of years"))
        return None
    return match["id"], gender, int(match["age"])


def _person_images(folder: Path, problems: list[Problem]) -> dict[str, Path]:
    """stem -> image file for one person folder; junk skipped, unknown names and missing masks reported."""
    images: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if is_junk(file):
            problems.append(Problem("warning", str(file), "junk file skipped"))
        elif file.suffix.lower() not in IMAGE_SUFFIXES or file.stem not in MASK_OF_STEM:
            problems.append(Problem("warning", str(file), f"not one of the 7 expected images ({sorted(MASK_OF_STEM)}); skipped"))
        elif file.stem in images:
            problems.append(Problem("error", str(file), f"second file for {file.stem!r} beside {images[file.stem].name}"))
        elif file.stat().st_size == 0:
            problems.append(Problem("error", str(file), "zero-byte image"))
        else:
            images[file.stem] = file
    missing = sorted(set(MASK_OF_STEM) - set(images))
    if missing:
        problems.append(Problem("error", str(folder), f"person has {len(images)} of 7 images; missing {missing}"))
    return images


def _check_train_csv(root: Path, folders: dict[str, tuple[str, int, int]], unparsed: set[str],
                     problems: list[Problem]) -> None:
    """Cross-check train.csv against the parsed folders (folders that failed to parse are reported already)."""
    csv_path = root / "train" / "train.csv"
    table = _read_csv(csv_path, TRAIN_CSV_COLUMNS)
    listed = set(table["path"])
    for folder in sorted(set(folders) - listed):
        problems.append(Problem("warning", str(csv_path), f"folder {folder!r} exists but has no row"))
    for row in table.itertuples(index=False):
        if row.path in unparsed:
            continue
        if row.path not in folders:
            problems.append(Problem("error", str(csv_path), f"row for {row.path!r}: no such folder under train/images"))
            continue
        ident, gender, age = folders[row.path]
        if (row.id, row.gender.lower(), row.age) != (ident, GENDER_NAMES[gender], str(age)):
            problems.append(Problem("error", str(csv_path), f"row for {row.path!r} says id={row.id}, gender={row.gender}, "
                                    f"age={row.age}; the folder name says otherwise"))
    ids = table.drop_duplicates("path").groupby("id")["path"].nunique()
    for ident in ids[ids > 1].index:
        problems.append(Problem("warning", str(csv_path),
                                f"id {ident} names {ids[ident]} folders; each folder is its own person"))


def read_competition_train(root: Path, age_bounds=(30, 60), corrections: Path | None = None) -> DataIndex:
    root = Path(root)
    images_dir = root / "train" / "images"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found; the competition layout is train/images/<id>_<gender>_<race>_<age>/")
    problems: list[Problem] = []
    folders: dict[str, tuple[str, int, int]] = {}
    unparsed: set[str] = set()
    rows: list[dict] = []
    for folder in sorted(p for p in images_dir.iterdir() if p.is_dir() and not is_junk(p)):
        parsed = _parse_folder(folder.name, folder, problems)
        if parsed is None:
            unparsed.add(folder.name)
            continue
        folders[folder.name] = parsed
        _, gender, age_years = parsed
        for stem, file in _person_images(folder, problems).items():
            rows.append(dict(path=str(file.resolve()), person=folder.name, image_id=f"{folder.name}/{stem}",
                             mask=MASK_OF_STEM[stem], gender=gender, age_years=age_years))
    _check_train_csv(root, folders, unparsed, problems)
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise DataError(f"{images_dir}: no images found")
    if corrections is not None:
        frame = apply_corrections(frame, root, Path(corrections), problems)
    frame["age"] = age_group(frame["age_years"], tuple(age_bounds))
    frame["label"] = encode(frame["mask"], frame["gender"], frame["age"])
    return DataIndex(_finish(frame.to_dict("records"), NUM_CLASSES, True, _competition_names()), problems)


def _competition_names() -> list[str]:
    return [class_name(label) for label in range(NUM_CLASSES)]


def apply_corrections(frame: pd.DataFrame, root: Path, path: Path, problems: list[Problem]) -> pd.DataFrame:
    """Apply a label-correction CSV: rows `target,gender,age,mask` (empty = keep).

    `target` is a person folder (changes gender/age of all its images) or an image
    path relative to train/images (changes that image, e.g. its mask state).
    """
    table = _read_csv(path, ["target", "gender", "age", "mask"])
    frame = frame.copy()
    for line, row in enumerate(table.itertuples(index=False), start=2):
        where = f"{path}:{line}"
        if row.target in set(frame["person"]):
            selected = frame["person"] == row.target
        else:
            target = inside_root(root / "train" / "images", row.target, path)
            selected = frame["path"] == str(target)
        if not selected.any():
            problems.append(Problem("error", where, f"correction target {row.target!r} matches no person folder or image"))
            continue
        try:
            if row.gender:
                frame.loc[selected, "gender"] = GENDER_OF_WORD[row.gender.lower()]
            if row.age:
                frame.loc[selected, "age_years"] = int(row.age)
            if row.mask:
                frame.loc[selected, "mask"] = _mask_value(row.mask)
        except (KeyError, ValueError):
            problems.append(Problem("error", where, f"bad correction values gender={row.gender!r} age={row.age!r} "
                                    f"mask={row.mask!r}; use male/female, whole years, mask 0-2 or a stem like 'normal'"))
    return frame


def _mask_value(text: str) -> int:
    if text in MASK_OF_STEM:
        return MASK_OF_STEM[text]
    value = int(text)
    if value not in (0, 1, 2):
        raise ValueError(text)
    return value


# ------------------------------------------------------------------- competition eval


def read_competition_eval(root: Path) -> DataIndex:
    """eval/info.csv in its order; labels from eval/gt.csv when present (local scoring)."""
    root = Path(root)
    info_path = root / "eval" / "info.csv"
    info = _read_csv(info_path, ["ImageID", "ans"])
    problems: list[Problem] = []
    duplicated = info["ImageID"][info["ImageID"].duplicated()]
    for image_id in duplicated:
        problems.append(Problem("error", str(info_path), f"ImageID {image_id!r} appears more than once"))
    truth = _read_ground_truth(root / "eval" / "gt.csv", problems)
    rows = []
    for image_id in info["ImageID"]:
        file = inside_root(root / "eval" / "images", image_id, info_path)
        if not file.is_file():
            problems.append(Problem("error", str(file), "listed in eval/info.csv but missing"))
        elif file.stat().st_size == 0:
            problems.append(Problem("error", str(file), "zero-byte image"))
        label = truth.get(image_id, -1)
        mask, gender, age = ((label // 6) % 3, (label // 3) % 2, label % 3) if label >= 0 else (-1, -1, -1)
        rows.append(dict(path=str(file), person=image_id, image_id=image_id, mask=mask, gender=gender,
                         age=age, age_years=-1, label=label))
    return DataIndex(_finish(rows, NUM_CLASSES, True, _competition_names()), problems)


def _read_ground_truth(path: Path, problems: list[Problem]) -> dict[str, int]:
    if not path.is_file():
        return {}
    table = _read_csv(path, ["ImageID", "ans"])
    truth = {}
    for image_id, answer in zip(table["ImageID"], table["ans"]):
        if not answer.isdigit() or not 0 <= int(answer) < NUM_CLASSES:
            problems.append(Problem("error", str(path), f"ImageID {image_id!r}: ans {answer!r} is not a class 0-17"))
        else:
            truth[image_id] = int(answer)
    return truth


# ---------------------------------------------------------------- other layouts


def read_image_folder(root: Path) -> DataIndex:
    """One sub-folder per class (sorted names are classes 0..C-1); each image is its own group."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_junk(p)) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root}: no class folders found; the image-folder layout is <root>/<class>/<image>")
    problems: list[Problem] = []
    rows = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if is_junk(file):
                problems.append(Problem("warning", str(file), "junk file skipped"))
            elif file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                relative = str(file.relative_to(root))
                rows.append(_plain_row(file, group=relative, image_id=relative, label=label, problems=problems))
    return DataIndex(_finish(rows, len(classes), False, classes), problems)


def read_csv_index(root: Path, csv_name: Path) -> DataIndex:
    """A CSV with columns path,label[,group]; labels are class names or ints, paths relative to root."""
    root = Path(root)
    csv_path = root / csv_name
    table = _read_csv(csv_path, ["path", "label"])
    names = sorted(set(table["label"]), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    label_of = {name: i for i, name in enumerate(names)}
    problems: list[Problem] = []
    rows = []
    for line, row in enumerate(table.to_dict("records"), start=2):
        file = inside_root(root, row["path"], csv_path)
        if not file.is_file():
            problems.append(Problem("error", f"{csv_path}:{line}", f"image {row['path']!r} not found"))
            continue
        rows.append(_plain_row(file, group=row.get("group") or row["path"], image_id=row["path"],
                               label=label_of[row["label"]], problems=problems))
    return DataIndex(_finish(rows, len(names), False, names), problems)


def _plain_row(file: Path, group: str, image_id: str, label: int, problems: list[Problem]) -> dict:
    """One image of an image-folder or CSV dataset; `image_id` names the image (a group may hold several)."""
    if file.stat().st_size == 0:
        problems.append(Problem("error", str(file), "zero-byte image"))
    return dict(path=str(file.resolve()), person=group, image_id=image_id, mask=-1, gender=-1, age=-1,
                age_years=-1, label=label)


# ------------------------------------------------------------------ a held-out test set


def read_test_folder(root: Path, class_names: list[str]) -> DataIndex:
    """A test folder: <root>/<class>/<image> labelled by its class folder, images directly in root unlabelled."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: test folder not found (data.test.root); point it at a folder of test images")
    problems: list[Problem] = []
    rows, unknown = [], set()
    for file in sorted(root.rglob("*")):
        if not file.is_file():
            continue
        relative = file.relative_to(root)
        if any(is_junk(Path(part)) for part in relative.parts):
            problems.append(Problem("warning", str(file), "junk file skipped"))
        elif file.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(Problem("warning", str(file), f"not an image file ({sorted(IMAGE_SUFFIXES)}); skipped"))
        elif len(relative.parts) == 1:
            rows.append(_plain_row(file, group=str(relative), image_id=str(relative), label=-1, problems=problems))
        elif relative.parts[0] not in class_names:
            unknown.add(relative.parts[0])
        else:
            rows.append(_plain_row(file, group=str(relative), image_id=str(relative),
                                   label=class_names.index(relative.parts[0]), problems=problems))
    _refuse_unknown(root, unknown, class_names)
    if not rows:
        raise DataError(f"{root}: no test images found ({sorted(IMAGE_SUFFIXES)} files, in class folders or "
                        "directly in the folder)")
    return DataIndex(_finish(rows, len(class_names), False, list(class_names)), problems)


def read_test_csv(root: Path, csv_name: Path, class_names: list[str]) -> DataIndex:
    """A test CSV under root: columns path[,label]; an empty or missing label is unknown (not scored)."""
    root = Path(root)
    csv_path = root / csv_name
    table = _read_csv(csv_path, ["path"])
    problems: list[Problem] = []
    rows, unknown = [], set()
    for line, row in enumerate(table.to_dict("records"), start=2):
        label = row.get("label", "")
        if label and label not in class_names:
            unknown.add(label)
            continue
        file = inside_root(root, row["path"], csv_path)
        if not file.is_file():
            problems.append(Problem("error", f"{csv_path}:{line}", f"image {row['path']!r} not found"))
            continue
        rows.append(_plain_row(file, group=row["path"], image_id=row["path"],
                               label=class_names.index(label) if label else -1, problems=problems))
    _refuse_unknown(csv_path, unknown, class_names)
    if not rows and not problems:
        raise DataError(f"{csv_path}: lists no test images")
    return DataIndex(_finish(rows, len(class_names), False, list(class_names)), problems)


def _refuse_unknown(source: Path, unknown: set[str], class_names: list[str]) -> None:
    if unknown:
        raise DataError(f"{source}: test class(es) {sorted(unknown)} are not among the training classes "
                        f"{list(class_names)}; a test set is scored against the classes the models learned, so "
                        "rename or remove them")


def held_out_rows(frame: pd.DataFrame, test) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out test rows) of the labelled index under data.test.fraction: whole groups,
    stratified as the valid split is."""
    split = split_by_person(frame, test.fraction, test.seed)
    return split.train, split.valid


def _rows(frame: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    attrs = dict(frame.attrs)
    part = frame.iloc[rows].reset_index(drop=True)
    part.attrs.update(attrs)
    return part


# ------------------------------------------------------------------------ entry


def _read_labelled(data: DataConfig) -> DataIndex:
    if data.format == "competition":
        return read_competition_train(data.root, data.age_bounds, _under_root(data, data.corrections))
    if data.format == "imagefolder":
        return read_image_folder(data.root)
    return read_csv_index(data.root, data.csv)


def read_train(data: DataConfig) -> DataIndex:
    """The training index for a study's data section (the labelled data less a held-out test fraction)."""
    index = _read_labelled(data)
    if data.test is not None and data.test.fraction is not None:
        kept, _ = held_out_rows(index.frame, data.test)
        index = DataIndex(_rows(index.frame, kept), index.problems)
    return index


def read_eval(data: DataConfig) -> DataIndex | None:
    """The held-out set predictions are written for and scored on: the competition's eval/ (info.csv order,
    labels from eval/gt.csv where it exists), or data.test for other layouts; None where there is none."""
    if data.format == "competition":
        if not (Path(data.root) / "eval" / "info.csv").is_file():
            return None
        return read_competition_eval(data.root)
    test = data.test
    if test is None:
        return None
    if test.fraction is not None:
        index = _read_labelled(data)
        _, held_out = held_out_rows(index.frame, test)
        return DataIndex(_rows(index.frame, held_out))  # its problems are the training index's, reported there
    names = list(read_train(data).frame.attrs["class_names"])
    if test.csv is not None:
        return read_test_csv(test.root, test.csv, names)
    return read_test_folder(test.root, names)


def truth_source(data: DataConfig) -> str:
    """Where the held-out set's labels come from, in words."""
    return "eval/gt.csv" if data.format == "competition" else "the test set's labels (data.test)"


def _under_root(data: DataConfig, path: Path | None) -> Path | None:
    if path is None or path.is_absolute():
        return path
    return Path(data.root) / path
