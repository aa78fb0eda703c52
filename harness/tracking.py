"""Weights & Biases tracking: one run per trial, one per study, one per ensemble.

Every run lives in the study's W&B group (`cfg.name`) and writes under
`runs/<study>/wandb/`. W&B runs offline unless the study file or WANDB_MODE says
otherwise; `wandb sync runs/<study>/wandb/offline-run-*` uploads later.

    with TrialTracker(cfg, identity=3, params=params, extra_config={"split_hash": h}) as tracker:
        result = run_trial(cfg, params, trial, on_epoch=tracker.log_epoch)
        tracker.finish(result, confusion=matrix, class_names=names)

Run ids come from (study, trial identity), so a retried trial continues its own
run (`resume="allow"`; offline, each attempt is one more `offline-run-*` folder
with the same id, which `wandb sync` and `read_offline_run` put back together).

Tracking must never stop training: any W&B error (init, log, finish) becomes one
warning on the "harness.tracking" logger, and the tracker turns into a no-op
(`.active` is False). Keys that look like secrets are stripped from every config
before W&B sees it. Nor may it stall or forget: an online run whose server does not
answer starts offline with the same id, a study-wide `Outage` keeps later runs from
waiting again, and each run folder's marker says whether `make sync` still has to
upload it (`run_states`, `pending_folders`, `sync_runs`; see "Connectivity").

`read_offline_run` (from harness.compat, which owns W&B's private file format) reads back what
W&B itself wrote (the binary `run-<id>.wandb` transaction log), so tests can assert on the real
output rather than on a mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from harness.compat import has_exit_record, read_offline_run, was_synced
from harness.folders import StudyFolder, read_identity
from harness.io import json_ready
from harness.records import FIGURES, TrialResult, state_name

__all__ = ["StudyTracker", "TrialTracker", "log_ensemble", "read_offline_run", "run_id_for", "study_run_id",
           "ensemble_run_id", "strip_secrets", "study_key", "study_key_at", "promotion_key"]

log = logging.getLogger("harness.tracking")

# A config key whose name matches this is never logged, at any depth.
SECRET_KEY = re.compile(r"api[_-]?key|token|passw(?:or)?d|secret|credential|private[_-]?key", re.IGNORECASE)
REDACTED_ENV = ("WANDB_API_KEY",)  # values equal to these are dropped too, whatever their key

# Settings that keep a run quiet and cheap: no console capture, code upload or system-metric
# sampling, and several runs (study + trial) open at once in one process. Unknown ones are
# skipped so another wandb version does not turn tracking off.
QUIET_SETTINGS = {
    "console": "off",
    "save_code": False,
    "disable_code": True,
    "disable_job_creation": True,
    "x_disable_stats": True,
    "silent": True,
    "quiet": True,
    "reinit": "create_new",
}

TRIAL_JOB, STUDY_JOB, ENSEMBLE_JOB, FOLD_JOB, PROMOTION_JOB = "trial", "study", "ensemble", "fold", "promotion"
BUDGET_JOB = "budget"
FLUSH_TIMEOUT_S = 30.0  # how long `finish` waits for wandb-core to write the run's last records


# ------------------------------------------------------------------------------- run ids


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")
    return slug[:40].rstrip("-") or "study"


def study_key(cfg) -> str:
    """What a study's W&B run ids are made from: its name and the identity its storage recorded at its creation
    (runs/<study>/identity), so a study deleted and created again under the same name, or another team's study of
    that name in the same project, never resumes (and appends to) an earlier study's runs on the server. A study
    made before identities existed keeps the ids of its name alone."""
    return study_key_at(cfg.name, StudyFolder.of(cfg).path)


def study_key_at(name: str, study_folder: Path) -> str:
    """study_key of the study `name` whose runs folder is `study_folder` (runs/<study>/)."""
    identity = read_identity(Path(study_folder))
    return f"{name}@{identity}" if identity else name


def promotion_key(cfg) -> str:
    """The study's key and its current promotion's identity: `promote --restart` starts runs of its own."""
    identity = read_identity(StudyFolder.of(cfg).promotion.path)
    return f"{study_key(cfg)}/promotion@{identity}" if identity else study_key(cfg)


def _run_id(key: str, part: str) -> str:
    # The hash of the raw key keeps "My.Study" and "my-study" (and two identities of one name) apart although
    # their slugs match; the slug is the study's name alone, readable in W&B's run list.
    digest = hashlib.sha256(f"{key}\0{part}".encode()).hexdigest()[:8]
    return f"{_slug(key.split('@')[0])}-{part}-{digest}"


def run_id_for(key: str, identity: int) -> str:
    """The W&B run id of trial `identity` of the study `key` (study_key): readable, deterministic, valid W&B id
    characters."""
    if not isinstance(identity, int | np.integer) or identity < 0:
        raise ValueError(f"trial identity must be an int >= 0 (the Optuna trial number), got {identity!r}")
    return _run_id(key, f"t{int(identity):04d}")


def fold_run_id(key: str, config: int, fold: int) -> str:
    """The W&B run id of fold `fold` of promoted configuration (trial) `config` (key: promotion_key)."""
    return _run_id(key, f"t{int(config):04d}-f{int(fold)}")


def study_run_id(key: str) -> str:
    return _run_id(key, "study")


def ensemble_run_id(key: str) -> str:
    return _run_id(key, "ensemble")


def promotion_run_id(key: str) -> str:
    return _run_id(key, "promotion")


def budget_run_id(key: str) -> str:
    return _run_id(key, "budget")


# --------------------------------------------------------------------------- plain values


def _secret_values() -> set[str]:
    return {os.environ[name] for name in REDACTED_ENV if os.environ.get(name)}


def strip_secrets(config: Mapping[str, Any], _secrets: set[str] | None = None) -> dict[str, Any]:
    """A copy without keys that look like credentials (api_key, token, password, secret...)."""
    secrets = _secret_values() if _secrets is None else _secrets
    clean = {}
    for key, value in config.items():
        if SECRET_KEY.search(str(key)) or (isinstance(value, str) and value in secrets):
            continue
        clean[str(key)] = strip_secrets(value, secrets) if isinstance(value, Mapping) else value
    return clean


def _as_dict(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    return dict(params)


def _resolve_mode(configured: str) -> str:
    # The user's WANDB_MODE beats the study file. It is read here, on every run, and passed to
    # wandb.init explicitly: wandb reads the environment only once per process.
    return os.environ.get("WANDB_MODE") or configured


def _quiet_settings(tracking=None):
    """QUIET_SETTINGS plus the study's bounds on how long a start or a finish may wait for the server."""
    import wandb

    wanted = dict(QUIET_SETTINGS)
    if tracking is not None:
        # base_url explicitly: wandb reads WANDB_BASE_URL once per process, the probe reads it every time
        # finish_timeout_raises: a finish that gave up uploading says so (TimeoutError), so the run is not
        # counted as uploaded
        wanted.update(init_timeout=tracking.init_timeout_s, finish_timeout=tracking.finish_timeout_s,
                      finish_timeout_raises=True, base_url=server_url())
    known = wandb.Settings.model_fields
    return wandb.Settings(**{k: v for k, v in wanted.items() if k in known})


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _quiet_wandb_logger() -> None:
    # wandb logs every init step at INFO to Python logging; a CLI at INFO would print them per
    # trial. Its own debug.log in each run folder keeps them. A level set by the user stays.
    wandb_logger = logging.getLogger("wandb")
    if wandb_logger.level == logging.NOTSET:
        wandb_logger.setLevel(logging.WARNING)


def _table(frame):
    """A wandb.Table of a DataFrame, NaN as empty cells."""
    import wandb

    rows = [[json_ready(v) for v in row] for row in frame.itertuples(index=False)]
    return wandb.Table(columns=[str(c) for c in frame.columns], data=rows, allow_mixed_types=True)


def _confusion_chart(matrix: np.ndarray, class_names: list[str] | None, title: str):
    """W&B's own confusion-matrix chart, built straight from counts.

    wandb.plot.confusion_matrix wants one (label, prediction) pair per image; this is the
    same table and Vega spec it produces, without expanding the matrix back into pairs.
    """
    import wandb

    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {matrix.shape}")
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(len(matrix))]
    if len(names) != len(matrix):
        raise ValueError(f"{len(names)} class names for a {len(matrix)}x{len(matrix)} confusion matrix")
    data = [[names[i], names[j], int(matrix[i, j])] for i in range(len(names)) for j in range(len(names))]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=data)
    fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
    return wandb.plot_table("wandb/confusion_matrix/v1", table, fields, {"title": title})


# -------------------------------------------------------------------------------- trackers


ANSWER_GRACE_S = 0.5  # a run start waits for the answer until this long after the question, then keeps its
# records in memory (a server that answers at once, or refuses, is known before the first record)
MAX_RECOVERIES = 2  # W&B errors mid-run after which the run goes on offline; one more turns tracking off
_PARKED: list[_Tracker] = []  # runs that ended before the server's answer came: started and closed once it does


def settle_parked(block: bool = True) -> None:
    """Start and close the runs that ended before the server's answer came, in the order they ended; with
    `block`, waiting for the answer until tracking.init_timeout_s after the question (the end of a study's
    trials calls it; a later run that finds the answer in calls it without waiting)."""
    while _PARKED:
        tracker = _PARKED.pop(0)
        tracker._settle(block)
        if tracker._waiting is not None:  # still no answer: it stays first
            _PARKED.insert(0, tracker)
            return


class _Tracker:
    """One W&B run that goes on offline with the same id after a W&B error mid-run (every later record is
    kept; after MAX_RECOVERIES it becomes a no-op), and starts offline with the same id when the server does
    not answer (see "Connectivity" below)."""

    def __init__(self, cfg, run_id: str, name: str, job_type: str, config: Mapping[str, Any],
                 group: str | None = None):
        self.run_id = run_id
        self.run = None
        self.failed = False  # a W&B error happened (and was reported)
        self.uploaded = False  # an online run whose every record reached the server
        self._recoveries = 0  # W&B errors mid-run after which the run went on offline
        self._waiting: list[Callable[[], None]] | None = None  # records kept until the server's answer is in
        self.dir = Path(cfg.study_dir).resolve()
        self.tracking = cfg.tracking
        self.mode = _resolve_mode(cfg.tracking.mode)
        if self.mode == "disabled":
            return
        identity = read_identity(StudyFolder.of(cfg).path)  # W&B's filter for one study where names repeat
        config = {**config, "study_identity": identity} if identity else config
        self._init_args = dict(
            project=cfg.tracking.project, entity=cfg.tracking.entity, dir=str(self.dir), group=group or cfg.name,
            job_type=job_type, name=name, id=run_id, resume="allow", config=json_ready(strip_secrets(config)))
        # Created here so an unusable runs_dir fails loudly instead of wandb quietly falling back to a
        # temporary folder.
        with self._guard("init"):
            self.dir.mkdir(parents=True, exist_ok=True)
            _quiet_wandb_logger()
            if self.mode == "online":
                self.mode = Outage(self.dir, cfg.tracking).mode(wait_s=ANSWER_GRACE_S)
            if self.mode == "waiting":
                self._waiting = []
            else:
                self._open()

    def _defer(self, record: Callable[[], None]) -> bool:
        """While the server's answer is not in, keep `record` (a call that logs it again) and say so; the run
        starts, online or offline, at the first record after the answer (or, once it ended, when
        `settle_parked` finds the answer in)."""
        self._settle(block=False)
        if self._waiting is None:
            settle_parked(block=False)
            return False
        self._waiting.append(record)
        return True

    def _park(self) -> None:
        """This run ended before the answer came: `settle_parked` starts and closes it once it does."""
        if self not in _PARKED:
            _PARKED.append(self)

    def _settle(self, block: bool) -> None:
        """Start a waiting run once the answer is in (with `block`, once it is in or init_timeout_s has passed
        without one) and log the records it kept, in order."""
        if self._waiting is None:
            return
        mode = Outage(self.dir, self.tracking).mode(wait_s=math.inf if block else 0.0)
        if mode == "waiting":
            return
        kept, self._waiting, self.mode = self._waiting, None, mode
        with self._guard("init"):
            self._open()
        if self.run is not None:
            for record in kept:
                record()

    def _open(self) -> None:
        """Start the run in self.mode; an online start that fails becomes an offline run with the same id."""
        import wandb

        try:
            self.run = wandb.init(mode=self.mode, settings=_quiet_settings(self.tracking), **self._init_args)
        except Exception as error:  # noqa: BLE001 - the server answered the probe, then failed the start
            if self.mode != "online":
                raise
            Outage(self.dir, self.tracking).begin(f"{type(error).__name__}: {_first_line(error)}")
            _free_run_ids()  # wandb keeps the failed run's id taken until its service restarts
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, settings=_quiet_settings(self.tracking), **self._init_args)
        _LIVE.add(self)
        write_marker(self._folder(), self.run_id, self.mode, uploaded=False)
        self._configure()

    def _configure(self) -> None:
        """What a run needs once started (again): TrialTracker defines its metrics here."""

    def _folder(self) -> Path:
        return Path(self.run.settings.sync_file).parent

    @property
    def active(self) -> bool:
        return self.run is not None or self._waiting is not None

    @property
    def state(self) -> str:
        """"online" (everything reached the server), "offline" (its files wait for `make sync`), "waiting" (its
        records wait in memory for the server's answer), "" (no run)."""
        if self.mode == "disabled" or (self.failed and not self._recoveries):
            return ""
        if self._waiting is not None:
            return "waiting"
        return "online" if self.uploaded else "offline"

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self.failed = True
            going_on = what != "init" and self.run is not None and self._recoveries < MAX_RECOVERIES
            log.warning("W&B %s failed for run %s under %s (%s: %s); %s. Check tracking.* in the study file and "
                        "WANDB_MODE.", what, self.run_id, StudyFolder(self.dir).wandb, type(error).__name__,
                        _first_line(error), "the run goes on offline with the same id, in a folder of its own "
                        "(`make sync` uploads it)" if going_on else "tracking is off for this run, training goes on")
            if going_on:
                self._recover()
            else:
                self._abandon()

    def _recover(self) -> None:
        """After a W&B error mid-run: close the run as it is and go on offline with the same id, so that every
        later record is kept (in a new offline folder of the run; `make sync` joins them in order)."""
        self._recoveries += 1
        self._abandon()
        try:
            if self.mode == "online":
                _free_run_ids()  # wandb keeps a failed online run's id taken until its service restarts
            self.mode = "offline"
            self._open()
        except Exception as error:  # noqa: BLE001 - W&B cannot start even offline: give up on this run
            log.warning("W&B could not go on offline for run %s (%s: %s); tracking is off for this run",
                        self.run_id, type(error).__name__, _first_line(error))
            self._abandon()

    def _abandon(self) -> None:
        run, self.run = self.run, None
        _LIVE.discard(self)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already reported; a broken run may refuse to close
                pass

    def _close(self, exit_code: int, block: bool = False) -> None:
        """Finish the run; one whose answer is not in yet is parked (`settle_parked`) unless `block`."""
        self._settle(block)
        if self._waiting is not None:
            self._waiting.append(lambda: self._close(exit_code))
            self._park()
            return
        if self.run is None:
            return
        with self._guard("finish"):
            log_file = Path(self.run.settings.sync_file)
            try:
                self.run.finish(exit_code=exit_code)  # bounded by tracking.finish_timeout_s
                gave_up = False
            except TimeoutError:  # W&B stopped uploading at the timeout; what it did not send is on disk
                gave_up = True
            # finish() returns before wandb-core has flushed the run's log to disk; wait, so that a
            # finished tracker means complete files (for readers, and for a worker killed next).
            flushed = _wait_for_exit_record(log_file, FLUSH_TIMEOUT_S)
            if not flushed:
                log.warning("W&B had not written the end of run %s to %s after %.0f s; the file may be incomplete",
                            self.run_id, log_file, FLUSH_TIMEOUT_S)
            if self.mode == "online":
                self._confirm_upload(log_file.parent, flushed and not gave_up)
        _LIVE.discard(self)
        self.run = None

    def _confirm_upload(self, folder: Path, complete: bool) -> None:
        """An online run counts as uploaded only when W&B finished without giving up on the upload and wrote its
        exit record (`complete`), and the server still answers without a server error; else the connection
        was lost, the upload was too slow or the server could not take the records: its files keep
        everything, `make sync` sends it."""
        if complete and server_answers(self.tracking.init_timeout_s, healthy=True):
            write_marker(folder, self.run_id, "online", uploaded=True)
            self.uploaded = True
            return
        Outage(self.dir, self.tracking).begin(f"the connection was lost during run {self.run_id}; its history is "
                                              f"kept in {folder}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._close_on_exit(exc)
        return False  # never swallow the caller's exception

    def _close_on_exit(self, exc: BaseException | None) -> None:
        self._close(exit_code=0 if exc is None else 1)


class TrialTracker(_Tracker):
    """The W&B run of one trial: per-epoch metrics, then the trial's outcome."""

    def __init__(self, cfg, identity: int, params: Any, extra_config: Mapping[str, Any] | None = None,
                 fold: tuple[int, int] | None = None):
        """`fold` = (configuration, fold) makes it the run of one fold of a promoted configuration: job_type
        "fold", grouped by the configuration (the promotion's trials are a study of their own)."""
        study = StudyFolder.of(cfg)
        if fold is None:
            run_id, name, job_type, group = run_id_for(study_key(cfg), identity), f"trial-{identity:04d}", TRIAL_JOB, None
            self.folder = study.trial(identity)
        else:
            config, index = fold
            run_id, name = fold_run_id(promotion_key(cfg), config, index), f"trial-{config:04d}-fold-{index}"
            job_type, group = FOLD_JOB, f"{cfg.name}/promotion/trial-{config:04d}"
            self.folder = study.promotion.fold(config, index)
        super().__init__(cfg, run_id, name, job_type, {**_as_dict(params), **(extra_config or {})}, group=group)
        self._ledgered = self.active
        if self._ledgered:
            self._note(finished=False)  # on disk before any record: a crash while waiting is found and replayed

    def _ledger(self) -> dict:
        """The trial folder's W&B ledger for this run (tracked.json): which epochs the run holds. It lives with the
        trial's files (the store carries it to a retry on another machine), so resume logs exactly the rest."""
        ledger = self.folder.tracked()
        if ledger is None or ledger.get("run_id") != self.run_id:
            ledger = {"run_id": self.run_id, "epochs": [], "finished": False}
        return ledger

    def _note(self, epochs: tuple[int, ...] = (), finished: bool | None = None) -> None:
        from harness.store import machine_name

        ledger = self._ledger()
        ledger["epochs"] = sorted(set(ledger["epochs"]) | set(epochs))
        if finished is not None:
            ledger["finished"] = finished
        ledger.update(machine=machine_name(), pid=os.getpid())
        try:
            self.folder.write_tracked(ledger)
        except OSError as error:  # the trial goes on: at worst a resume logs an epoch twice
            log.warning("could not write %s (%s); a resume may log an epoch to W&B twice",
                        self.folder.file(self.folder.TRACKED), error)

    def _configure(self) -> None:
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")  # every chart's x axis is the epoch
        for figure in FIGURES:
            if figure.best_is_max:
                self.run.define_metric(figure.key, summary="max")

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Log one epoch's metrics row (keys like "val/f1", "gap/f1"); NaNs are left out. W&B's `epoch` counts
        epochs trained, from 1, as the console and the pruner do (metrics.csv's `epoch` is the 0-based index)."""
        if not self.active or self._defer(lambda: self.log_epoch(row)):
            return
        clean = {str(k): v for k, v in ((k, json_ready(v)) for k, v in row.items()) if v is not None}
        clean["epoch"] = int(row["epoch"]) + 1
        recoveries = self._recoveries
        with self._guard(f"log of epoch {clean.get('epoch')}"):
            self.run.log(clean)
        if self._recoveries > recoveries and self.active:  # the run went on offline: this epoch goes there too
            with self._guard(f"log of epoch {clean.get('epoch')}"):
                self.run.log(clean)
        if self.run is not None:
            self._note(epochs=(clean["epoch"],))

    def catch_up(self, rows: list[Mapping[str, Any]]) -> None:
        """Log the epochs a resumed trial already ran that its W&B run does not hold, each once.

        A process killed after an epoch's checkpoint can die before W&B received that epoch, or while the
        epochs waited in memory for the server's answer. The ledger (tracked.json, written after each epoch W&B
        took, and carried by the store) says which epochs the run holds; offline, the run's own files too.
        """
        if not self.active or not rows or self._defer(lambda: self.catch_up(rows)):
            return
        if self.run.settings.mode == "offline":  # the run's own files are the truth: what W&B wrote before a kill
            held = {h.get("epoch") for h in read_offline_run(StudyFolder(self.dir).wandb, self.run_id)["history"]}
        else:  # online: what W&B took, as the ledger recorded it (on another machine too, through the store)
            held = set(self._ledger()["epochs"])
        for row in rows:
            if int(row["epoch"]) + 1 not in held:
                self.log_epoch(row)

    def finish(self, result: TrialResult | None = None, confusion: np.ndarray | None = None,
               class_names: list[str] | None = None) -> None:
        """Write the outcome (summary, tag = state, best epoch's confusion matrix) and close the run.

        `result` None closes the run as is.
        The chart is one more history row (key "best/confusion_table", no "val/f1"; W&B fills in
        the last epoch logged).
        """
        if not self.active:
            return
        if self._defer(lambda: self.finish(result, confusion, class_names)):
            self._park()
            return
        state = result.state if result is not None else None
        with self._guard("finish summary"):
            if result is not None:
                self.run.summary.update(result.wandb_summary())
            if state:
                self.run.tags = (state,)
            if confusion is not None:
                epoch = (result.best_epoch if result is not None else -1) + 1  # counted from 1, as a person reads
                self.run.log({"best/confusion": _confusion_chart(confusion, class_names,
                                                                 f"valid confusion, best epoch {epoch}")})
        self._close(exit_code=1 if state == "failed" else 0)

    def _close(self, exit_code: int, block: bool = False) -> None:
        super()._close(exit_code, block)
        # closed, not parked, and kept (online, or offline after a recovery): nothing of it waits in memory
        if self._ledgered and self._waiting is None and (not self.failed or self._recoveries):
            self._note(finished=True)

    def _close_on_exit(self, exc: BaseException | None) -> None:
        if exc is None:
            self._close(exit_code=0)
        else:
            self.finish(TrialResult(state="failed", run_dir="", reason=f"{type(exc).__name__}: {exc}"))


class StudyTracker(_Tracker):
    """The study's own run: a table of all trials, refreshed by `update`, and the counts by state."""

    def __init__(self, cfg, extra_config: Mapping[str, Any] | None = None):
        super().__init__(cfg, study_run_id(study_key(cfg)), "study", STUDY_JOB, dict(extra_config or {}))

    def update(self, trials) -> None:
        """Log `trials` (the DataFrame of harness.study.trials_frame: trial, state, objective, val F1s, eval F1,
        gaps, params, epochs, duration)."""
        if not self.active or self._defer(lambda: self.update(trials)):
            return
        with self._guard("update of the trials table"):
            counts = _state_counts(trials)
            row = {"trials": _table(trials), **{f"trials/{state}": n for state, n in counts.items()}}
            best = _best_complete(trials)
            if best is not None:
                row["best/objective"] = best
            self.run.log(row)

    def log_shortcuts(self, record: dict | None) -> None:
        """The study's "shortcuts" record (harness.context_audit): the audit's rows as a table, the count of
        flagged view/task pairs and whether the person-based probe applies, in the summary."""
        if not self.active or not record or self._defer(lambda: self.log_shortcuts(record)):
            return
        import pandas as pd

        with self._guard("the shortcut audit"):
            row: dict[str, Any] = {}
            if record.get("audit") is not None:
                audit = pd.DataFrame(record["audit"])
                row["shortcut_audit"] = _table(audit)
                row["shortcut/flagged"] = int(audit["flagged"].sum())
            found = record.get("foreground")
            row["shortcut/probe_applies"] = bool(found and found.get("applies"))
            if found:
                row["shortcut/face_share"] = found["face_share"]
            self.run.log(row)

    def finish(self) -> None:
        """Close the study's run at the end of its trials, and the trials' runs still waiting for the answer."""
        settle_parked(block=True)
        self._close(exit_code=0, block=True)


def _state_counts(trials) -> dict[str, int]:
    states = [state_name(s) for s in trials["state"]] if "state" in trials else []
    return {state: states.count(state) for state in ("complete", "pruned", "failed")}


def _best_complete(trials) -> float | None:
    if "objective" not in trials or "state" not in trials:
        return None
    values = [json_ready(v) for s, v in zip(trials["state"], trials["objective"]) if state_name(s) == "complete"]
    values = [v for v in values if isinstance(v, int | float)]
    return max(values) if values else None


def log_ensemble(cfg, members, metrics: Mapping[str, Any], confusion: np.ndarray | None = None,
                 class_names: list[str] | None = None, extra_config: Mapping[str, Any] | None = None) -> str | None:
    """One run (job_type "ensemble") in the study's group: member table with weights, metrics in the summary.

    Returns the run id, or None when W&B failed (already reported as a warning) or is disabled.
    """
    row = {"members": members}
    if confusion is not None:
        row["ensemble/confusion"] = _confusion_chart(confusion, class_names, "valid confusion, ensemble")
    return _log_result(cfg, ensemble_run_id(study_key(cfg)), ENSEMBLE_JOB, row, metrics, extra_config)


def log_promotion(cfg, configurations, metrics: Mapping[str, Any],
                  extra_config: Mapping[str, Any] | None = None) -> str | None:
    """One run (job_type "promotion") in the study's group: the configurations' table, and in the summary the
    submission's estimate first, then the cross-validated figures it was made from. The run id, or None."""
    return _log_result(cfg, promotion_run_id(promotion_key(cfg)), PROMOTION_JOB, {"configurations": configurations}, metrics,
                       extra_config)


def log_budget(cfg, record: Mapping[str, Any]) -> str | None:
    """One run (job_type "budget") in the study's group: the plans as a table (each revision), and in the summary
    the budget, the wall time, each step's seconds and what the budget left out. The run id, or None."""
    import pandas as pd

    from harness.budget import describe

    plans = pd.DataFrame([{k: v for k, v in plan.items() if not isinstance(v, dict)} for plan in record["plans"]])
    metrics = {"budget/seconds": record["budget_s"], "budget/wall_s": record.get("wall_s"),
               **{f"budget/step/{name}_s": seconds for name, seconds in record["steps"].items()},
               "budget/trials_finished": record.get("search", {}).get("trials_finished"),
               "budget/left_out": "; ".join(record.get("left_out") or []) or "nothing",
               "budget/summary": describe(record),
               "budget/submission": record.get("submission", {}).get("source")}
    return _log_result(cfg, budget_run_id(study_key(cfg)), BUDGET_JOB, {"plans": plans}, metrics,
                       {"budget_s": record["budget_s"]})


def _log_result(cfg, run_id: str, job: str, row: Mapping[str, Any], metrics: Mapping[str, Any],
                extra_config: Mapping[str, Any] | None) -> str | None:
    """A run of one logged row (DataFrames become tables) and `metrics` in its summary."""
    tracker = _Tracker(cfg, run_id, job, job, dict(extra_config or {}))
    tracker._settle(block=True)
    if not tracker.active:
        return None
    with tracker._guard(f"{job} logging"):
        tracker.run.log({key: _table(value) if hasattr(value, "columns") else value for key, value in row.items()})
        tracker.run.summary.update(json_ready(dict(metrics)))
        tracker.run.tags = (job,)
    tracker._close(exit_code=0)
    return None if tracker.failed else tracker.run_id


# ---------------------------------------------------------------------------- connectivity
#
# An unreachable server must cost a study nothing and lose nothing. Whether the server answers is asked in
# the background (`Probe`, bounded by tracking.init_timeout_s), started when a study opens, so the answer is
# normally in before the first run starts; a run starts online only once the server has answered, and
# offline with its own id when none came within tracking.init_timeout_s (a slow answer is an answer). A run
# whose answer is not in within ANSWER_GRACE_S does not wait for it: its records are kept in memory and the
# run starts at the first record after the answer, or when it closes (which waits for the answer until
# init_timeout_s after the probe began: training goes on meanwhile). No answer makes `Outage` remember
# it study-wide (runs/<study>/wandb/outage.json, seen by every worker and rerun) until
# tracking.retry_online_s has passed and the next start asks again. Each W&B run folder gets a marker
# (`MARKER`): how the run was logged and whether everything reached the server; `make sync` uploads the
# folders that did not and marks them synced.

MARKER = "harness-run.json"
DEFAULT_BASE_URL = "https://api.wandb.ai"
SYNC_PROBE_S = 10.0  # how long `make sync` waits for the server's first answer
PROBE_FRESH_S = 60.0  # how long an answer stands for later starts
_LIVE: weakref.WeakSet = weakref.WeakSet()  # this process's open trackers
_SAID: set[tuple[str, str]] = set()  # (study folder, message kind): what this process has said once


def server_url() -> str:
    return (os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def server_answers(timeout_s: float, healthy: bool = False) -> bool:
    """Whether the W&B server answers an HTTP request within timeout_s: any status is an answer (the server
    is there), or with `healthy` any status but a server error (5xx: it is there but cannot take records)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server_url()}/graphql", data=b'{"query": "{ serverInfo { features } }"}',
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as error:
        return not (healthy and error.code >= 500)
    except (OSError, ValueError):  # refused, reset, timed out, no route, a malformed URL
        return False
    return True


class Outage:
    """The study-wide memory of a W&B outage (runs/<study>/wandb/outage.json)."""

    def __init__(self, study_dir: Path, tracking) -> None:
        self.path = StudyFolder(study_dir).outage
        self.key = str(study_dir)
        self.tracking = tracking

    def mode(self, wait_s: float) -> str:
        """"online" once the server has answered; "offline" while an outage holds or when it did not answer
        within tracking.init_timeout_s; "waiting" while the answer is not in `wait_s` after the question (the
        probe goes on, and records an outage if it times out)."""
        state = self._read()
        if state and time.time() < state.get("retry_at", 0):
            _no_wandb_analytics()
            return "offline"
        answer = Probe.answer(self, wait_s)
        if answer is None:
            return "waiting"
        if answer:
            if state:
                self.end(state)
            return "online"
        _no_wandb_analytics()
        return "offline"

    def settle(self, answered: bool, seen: dict | None) -> None:
        """A probe's verdict: an outage begins when the server did not answer; an answer ends the outage the
        probe saw when it started (`seen`), not one another worker recorded since."""
        if not answered:
            self.begin(f"no answer within {self.tracking.init_timeout_s:g} s")
        elif seen:
            self.end(seen)

    def begin(self, reason: str) -> None:
        from harness.io import atomic_write_text

        now = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            since = (self._read() or {}).get("since", now)
            state = {"since": since, "retry_at": now + self.tracking.retry_online_s, "url": server_url(),
                     "reason": reason, "by": f"{socket.gethostname()}:{os.getpid()}:{now!r}"}
            atomic_write_text(self.path, json.dumps(state))
        if (self.key, "outage") not in _SAID:
            _SAID.add((self.key, "outage"))
            _SAID.discard((self.key, "back"))
            log.warning("W&B at %s is unreachable (%s): this study's runs log offline under %s, with their own run "
                        "ids; `make sync` uploads them. Online is tried again after %.0f s.", server_url(), reason,
                        self.path.parent, self.tracking.retry_online_s)

        _no_wandb_analytics()

    def end(self, seen: dict) -> None:
        """End the outage recorded as `seen` (what this process read before the server answered it); a record
        written since (another worker's fresh outage) stays. Read, compare and remove under the file's lock."""
        if not self.path.parent.is_dir():
            return
        with self._locked():
            if self._read() != seen:
                return
            self.path.unlink(missing_ok=True)
        if (self.key, "back") not in _SAID:
            _SAID.add((self.key, "back"))
            _SAID.discard((self.key, "outage"))
            log.warning("W&B at %s answers again: new runs log online (`make sync` uploads the offline ones)",
                        server_url())

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The study's outage record is changed by one process at a time (workers and machines share it)."""
        import fcntl

        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _no_wandb_analytics() -> None:
    """Turn wandb's own usage analytics off in this process once its server is known not to answer: they go to
    that server, and at exit wandb waits for their last report (a 10 s request) however offline every run is.
    That wait was the 10-12 s a 6-trial smoke study with the server black-holed paid after its report (py-spy:
    the main thread in MeterProvider.shutdown, joining a POST to the server). The runs' records are not
    affected; a wandb without these analytics has nothing to turn off."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()
    except (ImportError, AttributeError):
        pass


class Probe:
    """Whether the W&B server answers, asked in a background thread: started early (`Probe.start`, when a
    study opens), read by every run start without waiting for the network."""

    _lock = threading.Lock()
    _current: dict | None = None  # {"url", "started", "answer": None | bool, "finished"}

    @classmethod
    def start(cls, outage: Outage) -> dict:
        """The probe in flight or freshly answered for this server, else a new one."""
        now = time.time()
        with cls._lock:
            probe = cls._current
            fresh = probe and probe["url"] == server_url() and (
                probe["answer"] is None or now - probe["finished"] < PROBE_FRESH_S)
            if fresh:
                return probe
            probe = cls._current = {"url": server_url(), "started": now, "answer": None, "finished": 0.0}
        seen = outage._read()  # the outage this probe can end: the one recorded before it asked

        def ask() -> None:
            answered = server_answers(outage.tracking.init_timeout_s)
            probe.update(answer=answered, finished=time.time())
            outage.settle(answered, seen)

        threading.Thread(target=ask, name="wandb-probe", daemon=True).start()
        return probe

    @classmethod
    def answer(cls, outage: Outage, wait_s: float) -> bool | None:
        """The server's answer, waited for until `wait_s` after the question was asked: True (it answered,
        however slowly, within tracking.init_timeout_s), False (no answer by then: offline), None (not in yet)."""
        probe = cls.start(outage)
        timed_out = probe["started"] + outage.tracking.init_timeout_s + 0.5
        deadline = min(timed_out, probe["started"] + wait_s)
        while probe["answer"] is None and time.time() < deadline:
            time.sleep(0.01)
        if probe["answer"] is None and time.time() >= timed_out:
            return False  # the probe's thread records the outage as it gives up
        return probe["answer"]


def start_probe(cfg) -> None:
    """Ask the W&B server in the background now, so that the study's first run finds the answer in."""
    if _resolve_mode(cfg.tracking.mode) == "online":
        Probe.start(Outage(Path(cfg.study_dir).resolve(), cfg.tracking))



def _free_run_ids() -> None:
    """After a failed online start wandb keeps its run id taken until its service restarts. Restarting it
    (wandb.teardown) ends this process's other runs too: they go on offline with their own ids; what they
    logged before stays in their folders, for `make sync`."""
    import wandb

    others = [tracker for tracker in list(_LIVE) if tracker.run is not None]
    for tracker in others:
        tracker.run = None
    wandb.teardown()
    for tracker in others:
        tracker.mode = "offline"
        with tracker._guard("restart offline"):
            tracker._open()


def write_marker(folder: Path, run_id: str, mode: str, uploaded: bool, synced: bool = False) -> None:
    from harness.io import atomic_write_text

    atomic_write_text(Path(folder) / MARKER, json.dumps({"run_id": run_id, "mode": mode, "uploaded": uploaded,
                                                         "synced": synced}))


FOLDER_TIME = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-")


def started_at(folder: Path) -> tuple[str, float]:
    """When a W&B run folder's first record was written: the start time W&B puts in its name
    (`[offline-]run-YYYYMMDD_HHMMSS-<id>`), then its transaction log's modification time within one second."""
    match = FOLDER_TIME.match(folder.name)
    logs = sorted(folder.glob("run-*.wandb"))
    return (match.group(1) if match else ""), (logs[0].stat().st_mtime if logs else 0.0)


def run_folders(study_dir: Path) -> list[tuple[Path, str, dict]]:
    """Every W&B run folder of a study, oldest first by the time of its first record, whatever its prefix
    (`offline-run-*` and `run-*` interleave by time): (folder, run id, its marker; a folder without one is
    judged by its name: offline-run-* waits for an upload unless `wandb sync` marked it, run-* went online)."""
    found = []
    for folder in sorted(StudyFolder(study_dir).wandb.glob("*run-*"), key=started_at):
        logs = sorted(folder.glob("run-*.wandb")) if folder.is_dir() else []
        if not logs:
            continue
        run_id = logs[0].name.removeprefix("run-").removesuffix(".wandb")
        try:
            marker = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError):
            offline = folder.name.startswith("offline-")
            marker = {"mode": "offline" if offline else "online", "uploaded": not offline,
                      "synced": offline and was_synced(folder, run_id)}
        found.append((folder, run_id, marker))
    return found


def pending_folders(study_dir: Path) -> list[Path]:
    """The run folders whose records have not all reached the server (oldest first)."""
    return [folder for folder, _, marker in run_folders(study_dir) if not marker["uploaded"] and not marker["synced"]]


def run_states(study_dir: Path) -> dict[str, str]:
    """run id -> "online" (everything reached the server), "offline" (a folder waits for `make sync`) or
    "synced" (`make sync` uploaded what did not go online)."""
    states: dict[str, list[str]] = {}
    for _, run_id, marker in run_folders(study_dir):
        state = "synced" if marker["synced"] else "online" if marker["uploaded"] else "offline"
        states.setdefault(run_id, []).append(state)
    return {run_id: next(s for s in ("offline", "synced", "online") if s in found) for run_id, found in states.items()}


def sync_runs(cfg) -> tuple[list[Path], list[Path]]:
    """Upload the study's pending run folders with `python -m wandb sync` (the interpreter running the
    harness: no `wandb` executable on PATH needed); (synced, failed). Folders of one run id go in one call,
    oldest first, so a resumed run's attempts arrive in order; wandb sync's exit code says nothing, its
    per-folder marker does."""
    import subprocess
    import sys

    folders = pending_folders(cfg.study_dir)
    if not folders:
        return [], []
    if not server_answers(SYNC_PROBE_S):  # wandb sync would retry for minutes
        log.warning("W&B at %s does not answer; nothing was uploaded. Run `make sync` again once it does.",
                    server_url())
        return [], folders
    command = [sys.executable, "-m", "wandb", "sync", "--include-online", "--no-skip-synced",
               "--project", cfg.tracking.project, *(["--entity", cfg.tracking.entity] if cfg.tracking.entity else []),
               *map(str, folders)]
    started = time.time()
    subprocess.call(command)
    synced, failed = [], []
    for folder, run_id, marker in run_folders(cfg.study_dir):
        if folder not in folders:
            continue
        if was_synced(folder, run_id, since=started):
            write_marker(folder, run_id, marker.get("mode", "offline"), uploaded=False, synced=True)
            synced.append(folder)
        else:
            failed.append(folder)
    return synced, failed


def describe_states(trials, cfg) -> str:
    """One line on where the trials' W&B runs stand (`trials` has `trial` and `wandb`, as study.scored_frame)."""
    states = trials["wandb"].value_counts().to_dict() if "wandb" in trials else {}
    if not any(states.get(s) for s in ("online", "offline", "synced")):
        return f"W&B: no runs (tracking.mode {cfg.tracking.mode})"
    offline = [str(t) for t in trials.loc[trials["wandb"] == "offline", "trial"]]
    line = (f"W&B: {states.get('online', 0)} trial run(s) online, {states.get('offline', 0)} offline, "
            f"{states.get('synced', 0)} synced")
    if offline:
        line += f"; offline ones ({', '.join(offline)}) wait under {StudyFolder.of(cfg).wandb} for `make sync`"
    return line


def _wait_for_exit_record(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and has_exit_record(path)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
