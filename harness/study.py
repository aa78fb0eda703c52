"""The search: sampler, pruner, search space, the objective, the study's trials table.

`run_study(cfg)` creates the study named in the file or loads it, then runs trials until `target` of
them have finished (complete + pruned), on the runtime of `harness.runtime` (storage, heartbeats, the
resumable trial loop, worker processes). Rerunning the same command is the resume path; beside the
runtime's guarantees, the split hash and the search-space hash (space, defaults, training recipe) are
stored with the study, and resuming with different ones stops with a message instead of mixing two
experiments.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

import harness
from harness.config import Params, StudyConfig
from harness.data.prepare import PreparedData, prepare_data
from harness.folders import StudyFolder, TrialFolder
from harness.io import process_alive, remove_dead_temporaries
from harness.preflight import check_study, study_backbones
from harness.records import TrialResult, state_name, table_columns
from harness.runtime import (
    IDENTITY_ATTR,
    RecordAsFailed,
    StudyError,
    adopt_study_identity,
    count_states,
    default_storage,
    load_existing_study,
    open_storage,
    redact,
    requeue_interrupted,
    run_trials,
    run_workers,
    trial_identity,
)
from harness.store import machine_name
from harness.train import run_trial

log = logging.getLogger("harness.study")


# ------------------------------------------------------------------------- sampler, pruner, space


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    spec = cfg.search.sampler
    if spec.name == "qmc":  # one shared sequence: the study counts the draws, so every process must agree on it
        return optuna.samplers.QMCSampler(seed=spec.seed)
    return TrialSeededSampler(spec.seed, lambda seed: _plain_sampler(spec.name, seed, spec.n_startup_trials))


def _plain_sampler(name: str, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # constant liar: a running trial counts as a bad one, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup_trials)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler seeded afresh for every trial from (study seed, trial number).

    A process's draws then depend on which trial it samples, not on how many it sampled
    before: workers sharing a study and a process resuming after a kill never repeat each
    other's draws, and a study run again from scratch draws the same params. The samplers
    wrapped here keep no other state between trials (they read the history from the study).
    """

    def __init__(self, seed: int, build: Callable[[int], optuna.samplers.BaseSampler]):
        self._seed, self._build = seed, build
        self._inner = build(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seed = np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
        self._inner = self._build(int(seed))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """The study's pruner; with `search.pruner.evidence`, wrapped so that it stops a trial only on evidence
    (harness.pruners.EvidencePruner)."""
    from harness.pruners import SparingKnown

    pruner = _rung_pruner(cfg)
    return SparingKnown(pruner) if cfg.search.pruner.spare_known else pruner


def _rung_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    from harness.pruners import EvidencePruner

    spec, epochs = cfg.search.pruner, cfg.train.epochs
    resource = max(1, spec.n_warmup_steps)

    def on_evidence(pruner: optuna.pruners.BasePruner, keep: float) -> optuna.pruners.BasePruner:
        return EvidencePruner(pruner, keep) if spec.evidence else pruner

    if spec.name == "median":
        return on_evidence(optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials,
                                                       n_warmup_steps=spec.n_warmup_steps), 0.5)
    rung_share = 1 / spec.reduction_factor  # the share of a rung's trials that goes on
    if spec.name == "successive_halving":  # asynchronous: a trial is compared with every trial at its rung
        return on_evidence(optuna.pruners.SuccessiveHalvingPruner(min_resource=resource,
                                                                  reduction_factor=spec.reduction_factor), rung_share)
    if spec.name == "hyperband":
        return on_evidence(optuna.pruners.HyperbandPruner(min_resource=resource, max_resource=epochs,
                                                          reduction_factor=spec.reduction_factor), rung_share)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------- search space


def suggest_params(trial: optuna.Trial, cfg: StudyConfig) -> Params:
    """Sample the study's space; a conditional param is sampled only when its parents allow it."""
    values = cfg.params.model_dump()
    for name, spec in cfg.search.space.items():
        if not spec.active(values):
            continue  # inactive: keeps its default and is not a param of this trial
        if spec.type == "categorical":
            values[name] = trial.suggest_categorical(name, spec.choices)
        elif spec.type == "int":
            values[name] = trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
        else:
            values[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)
    return Params.model_validate(values)


def default_trial_params(cfg: StudyConfig, recipe: dict | None = None) -> dict:
    """The study file's defaults (with a recipe's params over them) restricted to the active searched params:
    trial 0, or an enqueued recipe."""
    values = cfg.params.replace(**(recipe or {})).model_dump()
    active = {}
    for name, spec in cfg.search.space.items():
        if spec.active(values):
            active[name] = values[name]
    return active


# ---------------------------------------------------------------------------- study


def open_study(cfg: StudyConfig, storage_url: str | None, split_hash: str,
               data_summary: dict | None = None) -> optuna.Study:
    """Create the study or load it; refuse a resume whose split or search space changed."""
    cfg.study_dir.mkdir(parents=True, exist_ok=True)
    for folder in (cfg.study_dir, StudyFolder.of(cfg).ensemble.path):  # left by a process killed mid-write
        remove_dead_temporaries(folder)
    url = storage_url or default_storage(cfg)
    storage = open_storage(url, cfg.search.heartbeat_s)
    study = optuna.create_study(study_name=cfg.name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(cfg), pruner=make_pruner(cfg))
    stored = study.user_attrs
    expected = {"split_hash": split_hash, "space_hash": cfg.search_space_hash()}
    if "split_hash" not in stored:
        if not any(t.user_attrs.get("reference") for t in study.trials):
            study.enqueue_trial(default_trial_params(cfg), user_attrs={"reference": True})
        for index, recipe in enumerate(cfg.search.enqueue):  # known recipes right after it
            if not any(t.user_attrs.get("recipe") == index for t in study.trials):
                study.enqueue_trial(default_trial_params(cfg, recipe), user_attrs={"recipe": index})
        stored_attrs = {"space_hash": expected["space_hash"], "harness_version": harness.__version__}
        if IDENTITY_ATTR not in stored:  # this study, not the name: a study created again gets another
            stored_attrs[IDENTITY_ATTR] = uuid.uuid4().hex[:12]
        if data_summary is not None:  # persons, images, class counts: the report shows them
            stored_attrs["data_summary"] = data_summary
        stored_attrs["split_hash"] = split_hash  # last: the mark of a study set up completely
        for key, value in stored_attrs.items():
            study.set_user_attr(key, value)
        adopt_study_identity(cfg, study)
        log.info("created study %r in %s", cfg.name, redact(url))
        return study
    checks = (("split_hash", "data split"),
              ("space_hash", "search space, defaults or training settings (train:, data.image_size)"))
    for key, what in checks:
        if stored[key] != expected[key]:
            raise StudyError(
                f"study {cfg.name!r} in {redact(url)} was created with a different {what} "
                f"({key} {stored[key]} there, {expected[key]} now). Resuming would mix two experiments. "
                f"Give the study a new `name:` in the study file, or delete {cfg.study_dir} to start over.")
    adopt_study_identity(cfg, study)
    log.info("resuming study %r: %s", cfg.name, count_states(study))
    return study


def device_label(cfg: StudyConfig) -> str:
    """Where this process trains: "cpu", or "cuda" with the GPUs it was given (CUDA_VISIBLE_DEVICES)."""
    import torch

    from harness.train import pick_device

    if pick_device(cfg.train.device).type != "cuda":
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cuda (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else f"cuda ({torch.cuda.device_count()} GPU(s))"


class Objective:
    """One Optuna trial: sample params, run the trial with W&B tracking, store the outcome."""

    def __init__(self, cfg: StudyConfig, data: PreparedData, deadline: Callable[[], float] | None = None) -> None:
        self.cfg, self.data, self.deadline = cfg, data, deadline  # deadline: a budget's end of the search
        self.tracked = ""  # how the last trial's W&B run went, for its console line

    def __call__(self, trial: optuna.Trial) -> float:
        from harness.tracking import run_id_for, study_key

        cfg = self.cfg
        identity = trial_identity(trial)
        run_dir = StudyFolder.of(cfg).trial(identity).path
        # first, before sampling: a retry (stale or interrupted) copies these and keeps the identity
        trial.set_user_attr("identity", identity)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("wandb_run_id", run_id_for(study_key(cfg), identity))
        trial.set_user_attr("machine", machine_name())  # who ran it (a retry on another machine says so)
        trial.set_user_attr("device", device_label(cfg))
        params = suggest_params(trial, cfg)
        extra = {"fixed": cfg.model_dump(mode="json", exclude={"params", "search", "smoke"}),
                 "split_hash": self.data.split.hash, "harness_version": harness.__version__, "trial": identity}
        started = time.perf_counter()
        try:
            result = self._run(trial, identity, params, run_dir, extra, started)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # Optuna records FAIL; the next run re-enqueues it
            raise
        try:
            store_result(trial, result)
        except optuna.exceptions.UpdateFinishedTrialError:  # went stale here and was retried elsewhere
            print(f"trial {identity:4d} was taken over by another attempt (this one's heartbeat went stale); this "
                  f"attempt ended: {result.summary()}", flush=True)
            raise RecordAsFailed("taken over by another attempt") from None
        print(f"trial {identity:4d} {result.summary()}{self.tracked}", flush=True)
        if result.state == "pruned":
            raise optuna.TrialPruned(f"pruned after {result.epochs_run} epoch(s)")
        if result.state != "complete":
            raise RecordAsFailed(result.reason or result.state)
        return result.objective

    def _run(self, trial, identity: int, params: Params, run_dir: Path, extra: dict, started: float) -> TrialResult:
        from harness.tracking import TrialTracker

        cfg = self.cfg
        with TrialTracker(cfg, identity, params.model_dump(), extra) as tracker:
            progress = EpochPrinter(f"trial {identity:4d}", cfg.train.epochs, started)
            result = run_trial(cfg, params, trial, data=self.data, run_dir=run_dir, on_resume=tracker.catch_up,
                               on_epoch=lambda row: (tracker.log_epoch(row), progress(row)), deadline=self.deadline)
            tracker.finish(result, *self._confusion(run_dir))
        self.tracked = {"online": ", W&B online", "offline": ", W&B offline (`make sync` uploads)",
                        "waiting": ", W&B waiting for the server's answer"}.get(tracker.state, "")
        return result

    def _confusion(self, run_dir: Path) -> tuple[np.ndarray | None, list[str]]:
        return TrialFolder(run_dir).confusion(), list(self.data.frame.attrs["class_names"])


class EpochPrinter:
    """One line per epoch a person can follow: trial, epoch, F1, gap, ETA."""

    def __init__(self, label: str, epochs: int, started: float) -> None:
        self.label, self.epochs, self.started = label, epochs, started
        self.done = 0

    def __call__(self, row: dict) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        remaining = self.epochs - row["epoch"] - 1
        eta = elapsed / self.done * remaining
        print(f"{self.label} epoch {row['epoch'] + 1}/{self.epochs} objective {row['objective']:.4f} "
              f"val/f1 {row['val/f1']:.4f} val/f1_bgswap {row['val/f1_bgswap']:.4f} gap/f1 {row['gap/f1']:+.4f} "
              f"{row['images_per_s']:.0f} img/s ETA {eta:.0f}s", flush=True)


def store_result(trial: optuna.Trial, result: TrialResult) -> None:
    """The figures of the best epoch and the outcome, as trial user attributes (the value is the objective)."""
    for name, value in result.user_attrs().items():
        trial.set_user_attr(name, value)


def run_study(cfg: StudyConfig, trials: int | None = None, timeout: float | None = None,
              storage: str | None = None, progress: bool = True, track_study: bool = True,
              warm_start: tuple[str, list[dict]] | None = None, budget=None) -> optuna.Study:
    """Run (or resume) the study until `trials` (default: the study file's) trials have finished.

    `track_study=False` leaves the study's own W&B run to someone else (the parent of `run_search_workers`):
    one run id must have one writer. `budget` (harness.budget.Budget) is planned once the data is prepared, ends
    the search when its plan says, and is revised after every trial.
    """
    target = trials or cfg.search.trials
    if not cfg.search.space and target > 1:
        log.warning("search.space is empty: only trial 0 (the study file's defaults) can run; the target is 1")
        target = 1
    study, data = open_search(cfg, storage, progress, warm_start)
    requeue_interrupted(study)
    if track_study:  # one process per machine does it: the study's own, or the parent of run_search_workers
        replay_untracked(cfg, data)
    study_run = StudyRun(cfg, data) if track_study else None
    deadline = may_start = None
    if budget is not None:
        budget.start_search(data, study, study_backbones(cfg))
        deadline, may_start = budget.search_until, lambda: budget.may_start_trial(study)

    def changed(study: optuna.Study) -> None:
        if study_run:
            study_run.changed(study)
        if budget is not None:
            budget.revise(study)

    try:
        run_trials(study, Objective(cfg, data, deadline), target, cfg, timeout, on_change=changed, may_start=may_start)
    finally:
        if study_run:
            study_run.close(study)
        else:
            from harness.tracking import settle_parked

            settle_parked()
    return study


def replay_untracked(cfg: StudyConfig, data: PreparedData) -> list[int]:
    """The trials that ended while their W&B records waited for the server's answer, in a process that died before
    the answer came: their ledger (tracked.json) says unfinished, and their records are on disk (metrics.csv,
    result.json). Log what each run lacks and finish it; returns their identities. Only ledgers this machine
    wrote, by a process no longer alive (another machine's, or a live one's, may still settle them itself)."""
    from harness.tracking import TrialTracker

    if cfg.tracking.mode == "disabled" or not StudyFolder.of(cfg).trials.is_dir():
        return []
    replayed = []
    for path in sorted(StudyFolder.of(cfg).trials.iterdir()):
        folder = TrialFolder(path)
        ledger, result = folder.tracked(), folder.read_result()
        if not path.name.isdigit() or ledger is None or ledger.get("finished") or result is None:
            continue
        if ledger.get("machine") != machine_name() or (ledger.get("pid") and process_alive(int(ledger["pid"]))):
            continue
        with TrialTracker(cfg, int(path.name), folder.read_config()["params"], {"replayed": True}) as tracker:
            tracker.catch_up(folder.metrics_before(result.get("epochs_run", 0) + 1))
            tracker.finish(TrialResult(**result), folder.confusion(), list(data.frame.attrs["class_names"]))
        replayed.append(int(path.name))
    if replayed:
        log.warning("trial(s) %s ended while their W&B records waited for the server's answer and the process died; "
                    "their records were logged again from their folders", replayed)
    return replayed

    return True


def run_search_workers(cfg: StudyConfig, workers: int, trials: int | None = None, timeout: float | None = None,
                       storage: str | None = None, progress: bool = True,
                       warm_start: tuple[str, list[dict]] | None = None) -> optuna.Study:
    """The search in `workers` processes on one machine (harness.runtime.run_workers): the parent runs the
    preflight, prepares the data and opens the study once, and keeps the study's W&B run."""

    def prepare(cfg: StudyConfig, storage: str | None, progress: bool):
        study, data = open_search(cfg, storage, progress, warm_start)
        replay_untracked(cfg, data)
        return study, lambda: StudyRun(cfg, data)

    return run_workers(cfg, workers, run=run_study, prepare=prepare, trials=trials, timeout=timeout, storage=storage,
                       progress=progress)


def open_search(cfg: StudyConfig, storage: str | None, progress: bool,
                warm_start: tuple[str, list[dict]] | None = None) -> tuple[optuna.Study, PreparedData]:
    """Before any compute the preflight, then the data (index, cache, foreground) and the study, created or resumed;
    `warm_start` (another study's name and its best configurations, harness.warm_start) enqueued once."""
    from harness.tracking import start_probe
    from harness.warm_start import enqueue_warm_start

    check_study(cfg)  # every backbone the study can draw must be usable here
    start_probe(cfg)  # whether W&B answers, found out while the data is prepared
    data = prepare_data(cfg, progress=progress)  # refuses a person-based objective or remedy that does not apply
    study = open_study(cfg, storage, data.split.hash, data.summary())
    if warm_start is not None and enqueue_warm_start(study, *warm_start):
        log.info("warm start: %d configuration(s) of study %r enqueued", len(warm_start[1]), warm_start[0])
    data.shortcuts = shortcuts_of(cfg, study, data)
    return study, data


def shortcuts_of(cfg: StudyConfig, study: optuna.Study, data: PreparedData) -> dict:
    """The study's "shortcuts" attribute (harness.context_audit): measured once, when the study is new."""
    from harness.context_audit import record_flags, record_lines, shortcut_record

    record = study.user_attrs.get("shortcuts")
    if record is None:
        record = shortcut_record(cfg, data)
        study.set_user_attr("shortcuts", record)
    say = log.warning if record_flags(record) else log.info
    for line in record_lines(record):
        say("%s", line)
    return record


class StudyRun:
    """The study's own W&B run: its settings and shortcut record, and the trials table, refreshed whenever a
    trial changes state (without intervals: they take a pass over every trial's logits) and whole at the end."""

    def __init__(self, cfg: StudyConfig, data: PreparedData) -> None:
        from harness.tracking import StudyTracker

        self.cfg = cfg
        self.tracker = StudyTracker(cfg, {"split_hash": data.split.hash, "space_hash": cfg.search_space_hash(),
                                          "harness_version": harness.__version__, "target_trials": cfg.search.trials})
        self.tracker.log_shortcuts(data.shortcuts)

    def changed(self, study: optuna.Study) -> None:
        self.tracker.update(scored_frame(self.cfg, study, intervals=False))

    def close(self, study: optuna.Study) -> None:
        self.tracker.update(scored_frame(self.cfg, study))
        self.tracker.finish()


# ---------------------------------------------------------------------------- status


def trial_objective(trial: optuna.trial.FrozenTrial) -> float:
    """A trial's one objective: its best epoch's (the figure its files, interval and console line hold).

    Optuna's own value is the same for a complete trial, but for a pruned one it is the last reported
    epoch's; the best epoch's is kept as the user attribute "objective" (`store_result`)."""
    stored = trial.user_attrs.get("objective")
    if stored is not None and math.isfinite(stored):
        return float(stored)
    return trial.value if trial.values else float("nan")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial (its identity: folder and W&B run; column "trial"), the latest Optuna trial of it
    ("optuna_trial": a retried trial is a new Optuna trial), sorted by the objective (Optuna's value).

    Beside the objective: val F1 and background-swapped val F1 at the best epoch, and eval F1 (the truth,
    eval/gt.csv) where `score_trials_on_eval` has measured it."""
    rows = []
    nan = float("nan")
    truth = study.user_attrs.get("eval_f1", {})
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        identity = attrs.get("identity", t.number)
        rows.append({"trial": identity, "optuna_trial": t.number, "state": state_name(t.state),
                     **table_columns(attrs), "objective": trial_objective(t), "eval_f1": truth.get(str(identity), nan),
                     "duration_s": t.duration.total_seconds() if t.duration else float("nan"),
                     **{f"param_{k}": v for k, v in t.params.items()},
                     "weights": attrs.get("weights", ""),
                     "wandb_run_id": attrs.get("wandb_run_id", ""), "run_dir": attrs.get("run_dir", ""),
                     "machine": attrs.get("machine", ""),
                     "reason": attrs.get("reason", "")})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.sort_values("optuna_trial").drop_duplicates("trial", keep="last")
    return frame.sort_values(["objective", "trial"], ascending=[False, True], na_position="last").reset_index(drop=True)


def status(cfg: StudyConfig, storage: str | None = None) -> pd.DataFrame:
    """The trials table, also written to runs/<study>/trials.csv."""
    from harness.io import atomic_write_text

    frame = scored_frame(cfg, load_existing_study(cfg, storage))
    atomic_write_text(StudyFolder.of(cfg).trials_table, frame.to_csv(index=False))
    return frame


def scored_frame(cfg: StudyConfig, study: optuna.Study, intervals: bool = True) -> pd.DataFrame:
    """trials_frame with each trial's person-bootstrap interval, whether it is tied with the best (unless
    `intervals` is False: the study's W&B table while trials run skips them, they take a pass over every
    trial's logits), and where its W&B run stands (`wandb`: online, offline = waiting for `make sync`,
    synced; empty without a run)."""
    from harness.tracking import run_states
    from harness.uncertainty import with_intervals

    frame = with_intervals(cfg, trials_frame(study)) if intervals else trials_frame(study)
    if "wandb_run_id" in frame:
        states = run_states(cfg.study_dir)
        frame["wandb"] = [states.get(run_id, "") for run_id in frame["wandb_run_id"]]
    if cfg.store.url is not None and not frame.empty:
        from harness.store import stored_state

        frame["stored"] = [stored_state(cfg, StudyFolder.of(cfg).trial(int(identity)).path) for identity in frame["trial"]]
    return frame
