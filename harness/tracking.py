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
before W&B sees it.

`read_offline_run` (from harness.compat, which owns W&B's private file format) reads back what
W&B itself wrote (the binary `run-<id>.wandb` transaction log), so tests can assert on the real
output rather than on a mirror.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from harness.compat import has_exit_record, read_offline_run
from harness.io import json_ready

__all__ = ["StudyTracker", "TrialTracker", "log_ensemble", "read_offline_run", "run_id_for", "study_run_id",
           "ensemble_run_id", "strip_secrets"]

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

TRIAL_JOB, STUDY_JOB, ENSEMBLE_JOB, FOLD_JOB = "trial", "study", "ensemble", "fold"
FLUSH_TIMEOUT_S = 30.0  # how long `finish` waits for wandb-core to write the run's last records


# ------------------------------------------------------------------------------- run ids


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")
    return slug[:40].rstrip("-") or "study"


def _run_id(study_name: str, part: str) -> str:
    # The hash of the raw name keeps "My.Study" and "my-study" apart although their slugs match.
    digest = hashlib.sha256(f"{study_name}\0{part}".encode()).hexdigest()[:8]
    return f"{_slug(study_name)}-{part}-{digest}"


def run_id_for(study_name: str, identity: int) -> str:
    """The W&B run id of trial `identity` of a study: readable, deterministic, valid W&B id characters."""
    if not isinstance(identity, int | np.integer) or identity < 0:
        raise ValueError(f"trial identity must be an int >= 0 (the Optuna trial number), got {identity!r}")
    return _run_id(study_name, f"t{int(identity):04d}")


def fold_run_id(study_name: str, config: int, fold: int) -> str:
    """The W&B run id of fold `fold` of promoted configuration (trial) `config`."""
    return _run_id(study_name, f"t{int(config):04d}-f{int(fold)}")


def study_run_id(study_name: str) -> str:
    return _run_id(study_name, "study")


def ensemble_run_id(study_name: str) -> str:
    return _run_id(study_name, "ensemble")


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


def _quiet_settings():
    import wandb

    known = wandb.Settings.model_fields
    return wandb.Settings(**{k: v for k, v in QUIET_SETTINGS.items() if k in known})


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


class _Tracker:
    """One W&B run that degrades to a no-op on the first W&B error."""

    def __init__(self, cfg, run_id: str, name: str, job_type: str, config: Mapping[str, Any],
                 group: str | None = None):
        self.run_id = run_id
        self.run = None
        self.failed = False  # a W&B error happened (and was reported)
        self.dir = Path(cfg.study_dir).resolve()
        mode = _resolve_mode(cfg.tracking.mode)
        if mode == "disabled":
            return
        with self._guard("init"):
            import wandb

            _quiet_wandb_logger()

            # Created here so an unusable runs_dir fails loudly instead of wandb quietly
            # falling back to a temporary folder.
            self.dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.tracking.project, entity=cfg.tracking.entity, mode=mode, dir=str(self.dir),
                group=group or cfg.name, job_type=job_type, name=name, id=run_id, resume="allow",
                config=json_ready(strip_secrets(config)), settings=_quiet_settings())

    @property
    def active(self) -> bool:
        return self.run is not None

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self.failed = True
            first_line = (str(error).strip().splitlines() or [""])[0]
            log.warning("W&B %s failed for run %s under %s (%s: %s); tracking is off for this run, training goes on. "
                        "Check tracking.* in the study file and WANDB_MODE.", what, self.run_id, self.dir / "wandb",
                        type(error).__name__, first_line)
            self._abandon()

    def _abandon(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already reported; a broken run may refuse to close
                pass

    def _close(self, exit_code: int) -> None:
        if self.run is None:
            return
        with self._guard("finish"):
            log_file = Path(self.run.settings.sync_file)
            self.run.finish(exit_code=exit_code)
            # finish() returns before wandb-core has flushed the run's log to disk; wait, so that a
            # finished tracker means complete files (for readers, and for a worker killed next).
            if not _wait_for_exit_record(log_file, FLUSH_TIMEOUT_S):
                log.warning("W&B had not written the end of run %s to %s after %.0f s; the file may be incomplete",
                            self.run_id, log_file, FLUSH_TIMEOUT_S)
        self.run = None

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
        if fold is None:
            run_id, name, job_type, group = run_id_for(cfg.name, identity), f"trial-{identity:04d}", TRIAL_JOB, None
        else:
            config, index = fold
            run_id, name = fold_run_id(cfg.name, config, index), f"trial-{config:04d}-fold-{index}"
            job_type, group = FOLD_JOB, f"{cfg.name}/promotion/trial-{config:04d}"
        super().__init__(cfg, run_id, name, job_type, {**_as_dict(params), **(extra_config or {})}, group=group)
        if self.active:
            with self._guard("define_metric"):
                self.run.define_metric("epoch")
                self.run.define_metric("*", step_metric="epoch")  # every chart's x axis is the epoch
                for key in ("objective", "val/f1", "val/f1_bgswap"):
                    self.run.define_metric(key, summary="max")

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Log one epoch's metrics row as is (keys like "val/f1", "gap/f1", "epoch"); NaNs are left out."""
        if not self.active:
            return
        clean = {str(k): v for k, v in ((k, json_ready(v)) for k, v in row.items()) if v is not None}
        with self._guard(f"log of epoch {clean.get('epoch')}"):
            self.run.log(clean)

    def catch_up(self, rows: list[Mapping[str, Any]]) -> None:
        """Log the epochs a resumed trial already ran that W&B never received.

        A process killed right after an epoch's checkpoint can die before W&B wrote that
        epoch. Offline, the run's own files say which epochs it holds, so exactly the
        missing ones are logged; online, only the last checkpointed epoch is at risk.
        """
        if not self.active or not rows:
            return
        if self.run.settings.mode == "offline":
            held = {h.get("epoch") for h in read_offline_run(self.dir / "wandb", self.run_id)["history"]}
            missing = [row for row in rows if row["epoch"] not in held]
        else:
            missing = list(rows[-1:])
        for row in missing:
            self.log_epoch(row)

    def finish(self, result: Any = None, confusion: np.ndarray | None = None,
               class_names: list[str] | None = None) -> None:
        """Write the outcome (summary, tag = state, best epoch's confusion matrix) and close the run.

        `result` is a TrialResult or anything with its attributes; None closes the run as is.
        The chart is one more history row (key "best/confusion_table", no "val/f1"; W&B fills in
        the last epoch logged).
        """
        if not self.active:
            return
        state = getattr(result, "state", None)
        with self._guard("finish summary"):
            if result is not None:
                self.run.summary.update(_outcome_summary(result))
            if state:
                self.run.tags = (state,)
            if confusion is not None:
                epoch = getattr(result, "best_epoch", None)
                self.run.log({"best/confusion": _confusion_chart(confusion, class_names,
                                                                 f"valid confusion, best epoch {epoch}")})
        self._close(exit_code=1 if state == "failed" else 0)

    def _close_on_exit(self, exc: BaseException | None) -> None:
        if exc is None:
            self._close(exit_code=0)
        else:
            self.finish(SimpleNamespace(state="failed", reason=f"{type(exc).__name__}: {exc}"))


def _outcome_summary(result: Any) -> dict[str, Any]:
    best_epoch = getattr(result, "best_epoch", -1)
    summary = {"state": getattr(result, "state", None), "reason": getattr(result, "reason", None),
               "epochs_run": getattr(result, "epochs_run", None), "seconds": getattr(result, "seconds", None)}
    if best_epoch is not None and best_epoch >= 0:
        summary.update({"best/objective": getattr(result, "best_objective", None),
                        "best/val_f1": getattr(result, "best_f1", None),
                        "best/val_f1_bgswap": getattr(result, "best_f1_bgswap", None),
                        "best/gap_f1": getattr(result, "gap_f1", None),
                        "best/gap_bgswap": getattr(result, "gap_bgswap", None), "best/epoch": best_epoch})
    return {k: v for k, v in ((k, json_ready(v)) for k, v in summary.items()) if v is not None}


class StudyTracker(_Tracker):
    """The study's own run: a table of all trials, refreshed by `update`, and the counts by state."""

    def __init__(self, cfg, extra_config: Mapping[str, Any] | None = None):
        super().__init__(cfg, study_run_id(cfg.name), "study", STUDY_JOB, dict(extra_config or {}))

    def update(self, trials) -> None:
        """Log `trials` (the DataFrame of harness.study.trials_frame: trial, state, objective, val F1s, eval F1,
        gaps, params, epochs, duration)."""
        if not self.active:
            return
        with self._guard("update of the trials table"):
            counts = _state_counts(trials)
            row = {"trials": _table(trials), **{f"trials/{state}": n for state, n in counts.items()}}
            best = _best_complete(trials)
            if best is not None:
                row["best/objective"] = best
            self.run.log(row)

    def finish(self) -> None:
        self._close(exit_code=0)


def _state_name(state: Any) -> str:
    name = str(getattr(state, "name", state)).lower()  # optuna TrialState or its name
    return {"fail": "failed"}.get(name, name)


def _state_counts(trials) -> dict[str, int]:
    states = [_state_name(s) for s in trials["state"]] if "state" in trials else []
    return {state: states.count(state) for state in ("complete", "pruned", "failed")}


def _best_complete(trials) -> float | None:
    if "objective" not in trials or "state" not in trials:
        return None
    values = [json_ready(v) for s, v in zip(trials["state"], trials["objective"]) if _state_name(s) == "complete"]
    values = [v for v in values if isinstance(v, int | float)]
    return max(values) if values else None


def log_ensemble(cfg, members, metrics: Mapping[str, Any], confusion: np.ndarray | None = None,
                 class_names: list[str] | None = None, extra_config: Mapping[str, Any] | None = None) -> str | None:
    """One run (job_type "ensemble") in the study's group: member table with weights, metrics in the summary.

    Returns the run id, or None when W&B failed (already reported as a warning) or is disabled.
    """
    tracker = _Tracker(cfg, ensemble_run_id(cfg.name), "ensemble", ENSEMBLE_JOB, dict(extra_config or {}))
    if not tracker.active:
        return None
    with tracker._guard("ensemble logging"):
        row = {"members": _table(members)}
        if confusion is not None:
            row["ensemble/confusion"] = _confusion_chart(confusion, class_names, "valid confusion, ensemble")
        tracker.run.log(row)
        tracker.run.summary.update(json_ready(dict(metrics)))
        tracker.run.tags = ("ensemble",)
    tracker._close(exit_code=0)
    return None if tracker.failed else tracker.run_id


def _wait_for_exit_record(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and has_exit_record(path)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
