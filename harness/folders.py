"""The layout of runs/<study>/: the only module that names its files and folders.

Every path under a study's folder comes from `StudyFolder` (the study's own files, and the folders
below it), and every file of a trial's or an ensemble's folder from `TrialFolder` / `EnsembleFolder`;
nothing else spells a name inside them. Writes are atomic (temp file + os.replace).

    runs/<study>/                       StudyFolder
        study.db            the Optuna study (SQLite; absent on a server storage)
        trials.csv          the trials table (`harness status`)
        report.html         the HTML report
        remedies.json       the remedies table; remedies/<name>/seed-<k>/ their runs
        submission.csv      the submission (submission-trial-<n>.csv: one trial's)
        test_predictions.csv  predictions on a labelled data.test (-trial-<n> likewise)
        predictions.csv     `harness predict --images`
        model.pt2           `harness export`
        single/<time>/      `harness train` runs outside a study
        unpruned/<n>/       `make bench`: a pruned trial trained on to the last epoch
        wandb/              W&B's run folders, and outage.json (the study-wide outage record)
        trials/<n>/         TrialFolder
        ensemble/           EnsembleFolder
        promotion/          PromotionFolder

    runs/<study>/trials/<n>/            TrialFolder
        config.yaml         resolved study config and this trial's params
        metrics.csv         one row per epoch
        last.pt             written after every epoch (the resume point)
        best.pt             the model at the best val/f1
        valid_logits.npy    class log-probabilities on valid at the best epoch
        bgswap_logits.npy   the same on the background-swapped valid images
        valid_index.csv     the valid rows those logits refer to (image_id, person, label)
        per_class_f1.npy    per-class F1 on valid at the best epoch
        confusion.npy       confusion matrix on valid at the best epoch
        result.json         state (complete / pruned / failed), reason, best figures
        traceback.txt       where a failed trial failed
        tracked.json        the epochs its W&B run holds and whether its tracker finished (resume logs the rest)

    runs/<study>/ensemble/              EnsembleFolder
        members.json, metrics.json, valid_probs.npy, per_class_f1.npy, confusion.npy,
        eval_metrics.json (eval/gt.csv scores of the submission; eval_metrics-trial-<n>.json for one trial)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from harness.io import (
    atomic_save_npy,
    atomic_torch_save,
    atomic_write_text,
    json_ready,
    load_checkpoint,
    remove_dead_temporaries,
)

if TYPE_CHECKING:
    from harness.config import StudyConfig


def _load_array(path: Path) -> np.ndarray | None:
    return np.load(path, allow_pickle=False) if path.is_file() else None


def _write_json(path: Path, content: Any) -> None:
    atomic_write_text(path, json.dumps(json_ready(content), indent=2))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


IDENTITY = "identity"  # the identity the storage recorded for the study (runs/<study>/) or promotion (promotion/)


def read_identity(folder: Path) -> str | None:
    """The identity a study's or promotion's folder records, None where it records none."""
    try:
        return (Path(folder) / IDENTITY).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass(frozen=True)
class Folder:
    """A folder under runs/<study>/ (a str or Path); its subclasses name its files."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def file(self, name: str) -> Path:
        return self.path / name

    def adopt_identity(self, identity: str | None, keep: tuple[str, ...] = ()) -> Path | None:
        """Record `identity` (the storage's study or promotion this folder holds the files of). Files another
        recorded identity left here (a study deleted and created again under the same name) are moved, not deleted, to
        runs/<study>/earlier/<identity>-<time>/ (`keep`: names that stay, e.g. the SQLite storage itself);
        returns where they went, None when nothing moved. Without an identity (created before identities
        existed) nothing changes."""
        if identity is None:
            return None
        recorded = read_identity(self.path)
        if recorded == identity:
            return None
        # a folder that records no identity is this study's (its first open: a probe may have written in it
        # already) or an earlier harness version's, whose files carry no identity to tell them apart
        leftovers = [p for p in self.path.iterdir() if p.name not in (*keep, IDENTITY, EARLIER)] \
            if recorded is not None and self.path.is_dir() else []
        aside = None
        if leftovers:
            study, kind = (self.path.parent, "promotion") if isinstance(self, PromotionFolder) else (self.path, "study")
            aside = study / EARLIER / f"{kind}-{recorded or 'unknown'}-{datetime.now():%Y%m%d-%H%M%S}"
            aside.mkdir(parents=True)
            for path in leftovers:
                path.rename(aside / path.name)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.file(IDENTITY), identity)
        return aside


EARLIER = "earlier"  # runs/<study>/earlier/: what an earlier study or promotion of the same name left


@dataclass(frozen=True)
class TrialFolder(Folder):
    """One trial's folder: its files' names and their readers and writers."""

    CONFIG = "config.yaml"
    METRICS = "metrics.csv"
    LAST = "last.pt"
    BEST = "best.pt"
    VALID_LOGITS = "valid_logits.npy"
    BGSWAP_LOGITS = "bgswap_logits.npy"
    VALID_INDEX = "valid_index.csv"
    PER_CLASS_F1 = "per_class_f1.npy"
    CONFUSION = "confusion.npy"
    RESULT = "result.json"
    TRACEBACK = "traceback.txt"
    TRACKED = "tracked.json"  # the epochs the trial's W&B run holds, and whether its tracker finished

    FILES = frozenset((CONFIG, METRICS, LAST, BEST, VALID_LOGITS, BGSWAP_LOGITS, VALID_INDEX, PER_CLASS_F1, CONFUSION,
                       RESULT, TRACEBACK, TRACKED))  # every file a trial's folder holds (the store mirrors no other)

    # what a reader needs to find in a folder
    VIEW_FILES = {"valid": VALID_LOGITS, "bgswap": BGSWAP_LOGITS}  # log-probabilities of each evaluated view
    MODEL_FILES = (BEST, CONFIG)  # a model to predict with

    @classmethod
    def files_for(cls, views: tuple[str, ...]) -> tuple[str, ...]:
        """The files a reader of these views' log-probabilities needs (the valid index and each view's file)."""
        return tuple(dict.fromkeys((cls.VALID_LOGITS, *(cls.VIEW_FILES[view] for view in views), cls.VALID_INDEX)))

    def has(self, names: tuple[str, ...]) -> bool:
        return all((self.path / name).is_file() for name in names)

    def prepare(self) -> None:
        """Create the folder and delete the half-written temporaries of a killed attempt."""
        self.path.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(self.path)

    def clear(self) -> None:
        """Delete what an earlier training left (a checkpoint made for another configuration): start afresh."""
        for name in self.FILES - {self.CONFIG}:  # the config is this run's, written before
            self.file(name).unlink(missing_ok=True)

    # ------------------------------------------------------------------- config, result
    def write_config(self, study: dict, params: dict) -> None:
        atomic_write_text(self.file(self.CONFIG), yaml.safe_dump({"study": study, "params": params}, sort_keys=False))

    def read_config(self) -> dict:
        return yaml.safe_load(self.file(self.CONFIG).read_text())

    def write_result(self, result: dict) -> None:
        atomic_write_text(self.file(self.RESULT), json.dumps(result, indent=2, default=str))

    def read_result(self) -> dict | None:
        path = self.file(self.RESULT)
        return _read_json(path) if path.is_file() else None

    def tracked(self) -> dict | None:
        """The W&B ledger (harness.tracking.TrialTracker): run id, epochs held (counted from 1), finished."""
        path = self.file(self.TRACKED)
        try:
            return _read_json(path) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None  # writes are atomic: an unreadable ledger was damaged by other hands; read as none

    def write_tracked(self, ledger: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.file(self.TRACKED), ledger)

    def write_traceback(self, text: str) -> None:
        self.file(self.TRACEBACK).write_text(text)

    # ------------------------------------------------------------------------- metrics
    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.csv with every epoch's row (atomically: never half a file)."""
        atomic_write_text(self.file(self.METRICS), pd.DataFrame(rows).to_csv(index=False))

    def metrics(self) -> pd.DataFrame | None:
        """metrics.csv as a frame, or None when there is none (or it has no rows)."""
        path = self.file(self.METRICS)
        if not path.is_file():
            return None
        frame = pd.read_csv(path)
        return frame if not frame.empty else None

    def metrics_before(self, epoch: int) -> list[dict]:
        """Rows of the epochs before `epoch`; a row written after the last checkpoint is dropped (it is redone)."""
        frame = self.metrics()
        return [] if frame is None else frame[frame["epoch"] < epoch].to_dict("records")

    # --------------------------------------------------------------------- checkpoints
    def has_last(self) -> bool:
        return self.file(self.LAST).is_file()

    def save_last(self, state: dict) -> None:
        atomic_torch_save(state, self.file(self.LAST))

    def load_last(self) -> dict:
        return load_checkpoint(self.file(self.LAST))

    def load_best_model(self) -> dict:
        """The best epoch's model state dict."""
        return load_checkpoint(self.file(self.BEST))["model"]

    def save_best(self, model_state: dict, view_log_probs: dict[str, np.ndarray], valid_index: pd.DataFrame) -> None:
        """The best epoch's model, its log-probabilities on each valid view and the valid rows they are for."""
        atomic_torch_save({"model": model_state}, self.file(self.BEST))
        for view, log_probs in view_log_probs.items():
            atomic_save_npy(self.file(self.VIEW_FILES[view]), log_probs.astype(np.float32))
        atomic_write_text(self.file(self.VALID_INDEX), valid_index.to_csv(index=False))

    def save_best_scores(self, per_class_f1: np.ndarray, confusion: np.ndarray) -> None:
        """The best epoch's per-class F1 and confusion matrix on valid."""
        atomic_save_npy(self.file(self.PER_CLASS_F1), per_class_f1)
        atomic_save_npy(self.file(self.CONFUSION), confusion)

    # ----------------------------------------------------------------- the best epoch
    def valid_index(self) -> pd.DataFrame:
        return pd.read_csv(self.file(self.VALID_INDEX), dtype={"image_id": str, "person": str})

    def view_log_probs(self, view: str = "valid", mmap: bool = False) -> np.ndarray:
        """The best epoch's class log-probabilities on a valid view ("valid", "bgswap"), (N, C)."""
        return np.load(self.file(self.VIEW_FILES[view]), mmap_mode="r" if mmap else None)

    def num_classes(self) -> int:
        return int(self.view_log_probs(mmap=True).shape[1])

    def per_class_f1(self) -> np.ndarray | None:
        return _load_array(self.file(self.PER_CLASS_F1))

    def confusion(self) -> np.ndarray | None:
        return _load_array(self.file(self.CONFUSION))


def objective_files(cfg: StudyConfig) -> tuple[str, ...]:
    """The files of a trial folder the study's objective reads (valid, and the swapped view where it counts)."""
    from harness.metrics import OBJECTIVES

    return TrialFolder.files_for(OBJECTIVES.get(cfg.search.objective).views)


@dataclass(frozen=True)
class EnsembleFolder(Folder):
    """runs/<study>/ensemble/: what `harness ensemble` chose and how it scored, and the eval scores."""

    MEMBERS = "members.json"
    METRICS = "metrics.json"
    VALID_PROBS = "valid_probs.npy"
    PER_CLASS_F1 = "per_class_f1.npy"
    CONFUSION = "confusion.npy"

    @classmethod
    def of(cls, cfg: StudyConfig) -> EnsembleFolder:
        return StudyFolder.of(cfg).ensemble

    def eval_metrics_file(self, trial: int | None = None) -> Path:
        return self.path / ("eval_metrics.json" if trial is None else f"eval_metrics-trial-{trial}.json")

    def write(self, members: dict, metrics: dict, valid_probs: np.ndarray, per_class_f1: np.ndarray,
              confusion: np.ndarray) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.file(self.MEMBERS), members)
        _write_json(self.file(self.METRICS), metrics)
        atomic_save_npy(self.file(self.VALID_PROBS), valid_probs.astype(np.float32))
        atomic_save_npy(self.file(self.PER_CLASS_F1), per_class_f1)
        atomic_save_npy(self.file(self.CONFUSION), confusion)

    def write_eval_metrics(self, content: dict, trial: int | None = None) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.eval_metrics_file(trial)
        _write_json(path, content)
        return path

    def held_out_scores(self) -> dict | None:
        """What the last prediction of the held-out set scored (eval_metrics.json), or None."""
        path = self.eval_metrics_file()
        try:
            return _read_json(path) if path.is_file() else None
        except (json.JSONDecodeError, OSError):
            return None

    def has_members(self) -> bool:
        return self.file(self.MEMBERS).is_file()

    def members(self) -> dict:
        return _read_json(self.file(self.MEMBERS))

    def read(self) -> tuple[dict[str, Any], list[str]]:
        """{"members", "metrics", "per_class_f1", "confusion", "eval_metrics"} (None where absent) and the
        problems met reading them: a broken file is a problem to report, not a crash."""
        found: dict[str, Any] = {}
        problems = []
        readers = {"members": (self.file(self.MEMBERS), _read_json), "metrics": (self.file(self.METRICS), _read_json),
                   "eval_metrics": (self.eval_metrics_file(), _read_json),
                   "per_class_f1": (self.file(self.PER_CLASS_F1), _load_array),
                   "confusion": (self.file(self.CONFUSION), _load_array)}
        for key, (path, read) in readers.items():
            found[key] = None
            if not path.is_file():
                continue
            try:
                found[key] = read(path)
            except (json.JSONDecodeError, ValueError, OSError) as error:
                problems.append(f"{path} could not be read ({error}); rerun `harness ensemble`")
        return found, problems


@dataclass(frozen=True)
class PromotionFolder(EnsembleFolder):
    """runs/<study>/promotion/: the promoted configurations' fold models (trial-<n>/fold-<k>/, each a
    TrialFolder), the promotion's summary, the label audit and the eval scores of its submission."""

    SUMMARY = "summary.json"
    LABEL_ISSUES = "label_issues.csv"
    CORRECTIONS = "corrections.csv"

    @classmethod
    def of(cls, cfg: StudyConfig) -> PromotionFolder:
        return StudyFolder.of(cfg).promotion

    def fold(self, config: int, fold: int) -> TrialFolder:
        return TrialFolder(self.path / f"trial-{config}" / f"fold-{fold}")

    def write_summary(self, summary: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.file(self.SUMMARY), summary)

    def summary(self) -> dict | None:
        """The summary, or None when the promotion has not finished. A summary that exists and cannot be read is
        an OSError saying how to recover, never None: predict would silently submit the single-split ensemble."""
        path = self.file(self.SUMMARY)
        if not path.is_file():
            return None
        try:
            return _read_json(path)
        except (OSError, json.JSONDecodeError) as error:
            raise OSError(f"{path} cannot be read ({type(error).__name__}: {error}): the promotion's result is in no "
                          "other file. Run `harness promote` again (its trained folds are kept: it writes the summary "
                          "without training them again), or predict with `--from ensemble`") from None


@dataclass(frozen=True)
class StudyFolder(Folder):
    """runs/<study>/: the one owner of every path under a study's folder."""

    DATABASE = "study.db"
    TRIALS_TABLE = "trials.csv"
    REPORT = "report.html"
    REMEDIES = "remedies.json"
    PREDICTIONS = "predictions.csv"
    EXPORT = "model.pt2"
    OUTAGE = "outage.json"
    BUDGET = "budget.json"

    @classmethod
    def of(cls, cfg: StudyConfig) -> StudyFolder:
        return cls(cfg.study_dir)

    @property
    def database(self) -> Path:
        return self.file(self.DATABASE)

    @property
    def trials_table(self) -> Path:
        return self.file(self.TRIALS_TABLE)

    @property
    def report(self) -> Path:
        return self.file(self.REPORT)

    @property
    def budget(self) -> Path:
        """What a budgeted `make study` planned, what each step took and what it left out (harness.budget)."""
        return self.file(self.BUDGET)

    @property
    def remedies_table(self) -> Path:
        return self.file(self.REMEDIES)

    def remedy_run(self, name: str, seed: int) -> Path:
        return self.path / "remedies" / name / f"seed-{seed}"

    def submission(self, trial: int | None = None, competition: bool = True) -> Path:
        """The competition's submission, or the predictions on a labelled data.test; of one trial's models
        when `trial` is given."""
        suffix = "" if trial is None else f"-trial-{trial}"
        return self.file(f"{'submission' if competition else 'test_predictions'}{suffix}.csv")

    @property
    def predictions(self) -> Path:
        return self.file(self.PREDICTIONS)

    @property
    def export(self) -> Path:
        return self.file(self.EXPORT)

    def single_run(self) -> Path:
        """A new folder for one `harness train` run outside the study (named by the time it started)."""
        return self.path / "single" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")

    @property
    def wandb(self) -> Path:
        """W&B's folder: it names its run folders itself (wandb.init(dir=<study folder>) writes here)."""
        return self.path / "wandb"

    @property
    def outage(self) -> Path:
        return self.wandb / self.OUTAGE

    @property
    def trials(self) -> Path:
        """The folder of every trial's folder."""
        return self.path / "trials"

    def trial(self, identity: int) -> TrialFolder:
        return TrialFolder(self.trials / str(identity))

    def unpruned_copy(self, identity: int) -> TrialFolder:
        """A pruned trial's copy trained on to the last epoch (`make bench`'s pruning precision)."""
        return TrialFolder(self.path / "unpruned" / str(identity))

    @property
    def ensemble(self) -> EnsembleFolder:
        return EnsembleFolder(self.path / "ensemble")

    @property
    def promotion(self) -> PromotionFolder:
        return PromotionFolder(self.path / "promotion")
