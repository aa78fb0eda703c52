"""Optuna's runtime under every study the harness runs (the search, the promotion's folds): storage,
heartbeats, the resumable trial loop and worker processes. It knows nothing of what a trial trains.

- a finished trial is never re-run; the target is met exactly;
- a trial left RUNNING by a dead process stops sending heartbeats, is declared stale after
  `3 * search.heartbeat_s` seconds, and Optuna re-enqueues it with the same params; the retry keeps the
  original trial's identity (`trial_identity`), so it continues the same folder, `last.pt` and W&B run;
- a live process's trial keeps its heartbeat, so a second process never steals it;
- a trial stopped by Ctrl-C is enqueued once more (`requeue_interrupted`); a failed one is a result, and
  the loop stops only after `search.max_failed` of them.
"""

from __future__ import annotations

import datetime
import logging
import math
import multiprocessing
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from harness.compat import has_heartbeat, immediate_sqlite_transactions, record_heartbeat
from harness.config import ConfigError, StudyConfig
from harness.folders import StudyFolder
from harness.records import state_name

log = logging.getLogger("harness.runtime")
# heartbeats and the stale-trial retry are "experimental" in Optuna's terms; they are the resume mechanism here
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class _NoTracebackForFailedTrials(logging.Filter):
    """A failed trial is a result: Optuna's log line keeps its reason but drops the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RecordAsFailed):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_NoTracebackForFailedTrials())

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

IDLE_POLL_S = 1.0  # how often a process with nothing to run looks at the study again


class StudyError(RuntimeError):
    """A study that cannot be opened or resumed as asked; the message says what to do."""


class RecordAsFailed(Exception):
    """Raised from the objective so Optuna records the trial as FAIL with its reason."""


# ------------------------------------------------------------------ storage


def default_storage(cfg: StudyConfig) -> str:
    return f"sqlite:///{StudyFolder.of(cfg).database.resolve()}"


def open_storage(url: str, heartbeat_s: int) -> RDBStorage:
    """An RDB storage with heartbeats (stale trials are retried) and, for SQLite, a busy timeout and
    transactions that take the write lock when they begin."""
    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        # several processes on one file: wait for the lock instead of failing with "database is locked";
        # no transactions of pysqlite's own (immediate_sqlite_transactions begins them)
        engine_kwargs = {"connect_args": {"timeout": 120, "isolation_level": None}}
    try:
        storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                             grace_period=3 * heartbeat_s,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=5))
    except Exception as error:  # noqa: BLE001 - sqlalchemy raises many kinds; all mean "cannot use it"
        raise StudyError(f"storage {redact(url)} cannot be opened: {type(error).__name__}: {error}. "
                         "Check the URL (e.g. postgresql://user@host:5432/db or sqlite:///path.db) "
                         "and that the server is reachable.") from None
    if sqlite:  # an enqueued trial is popped by one process only (PostgreSQL's row locks do this there)
        immediate_sqlite_transactions(storage)
    return storage


def redact(url: str) -> str:
    """The URL without its password (in the credentials or as a query parameter), for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    credentials, at, host = rest.rpartition("@")  # the last "@": a raw one may hide in the password
    if at and ":" in credentials:
        rest = f"{credentials.split(':')[0]}:***@{host}"
    return f"{scheme}://" + re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)


def load_existing_study(cfg: StudyConfig, storage: str | None = None) -> optuna.Study:
    url = storage or default_storage(cfg)
    database = StudyFolder.of(cfg).database
    if storage is None and not database.is_file():
        raise ConfigError(f"no study {cfg.name!r} yet ({database} does not exist); "
                          "run `harness study` first")
    try:
        study = optuna.load_study(study_name=cfg.name, storage=open_storage(url, cfg.search.heartbeat_s))
    except KeyError:
        raise ConfigError(f"storage {redact(url)} holds no study named {cfg.name!r}") from None
    adopt_study_identity(cfg, study)
    return study


IDENTITY_ATTR = "identity"  # a study's (and a promotion's) user attribute, set once at its creation


def adopt_study_identity(cfg: StudyConfig, study: optuna.Study) -> None:
    """Make runs/<study>/ the storage's study's: its identity recorded there (the store's keys and checkpoints
    carry it); files a study of the same name created earlier left are moved to runs/<study>/earlier/."""
    folder = StudyFolder.of(cfg)
    database = folder.database.name  # the SQLite storage lives here: it is the study, never moved
    moved = folder.adopt_identity(study.user_attrs.get(IDENTITY_ATTR),
                                  keep=tuple(database + suffix for suffix in ("", "-journal", "-wal", "-shm")))
    if moved is not None:
        log.warning("%s held the files of an earlier study named %r (another identity than the storage's); moved "
                    "to %s so that none of them enters this study's results", folder.path, cfg.name, moved)


# ------------------------------------------------------------------- trials


def count_states(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {state_name(state): states.count(state) for state in TrialState if states.count(state)}


def trial_identity(trial: optuna.trial.BaseTrial) -> int:
    """The trial number that owns the folder and W&B run: the original one for a retried trial.

    The objective stores it as the user attribute "identity" first thing, and Optuna's retry
    callback copies user attributes onto the retry, so a retry finds its original number there.
    """
    if "identity" in trial.user_attrs:
        return int(trial.user_attrs["identity"])
    frozen = trial if isinstance(trial, optuna.trial.FrozenTrial) else trial.study.get_trials(deepcopy=False)[trial.number]
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return int(original if original is not None else trial.number)


def run_trials(study: optuna.Study, objective: Callable, target: int, cfg: StudyConfig, timeout: float | None,
               on_change: Callable[[optuna.Study], None] | None = None,
               may_start: Callable[[], bool] | None = None) -> None:
    """The resumable trial loop of every study the harness runs (the search, the promotion's folds): trials until
    `target` have finished, a dead process's trial retried once its heartbeat is stale, other processes' trials
    left to them, and a stop after `search.max_failed` failures. `on_change` is called after each trial;
    `may_start()` False (a budget's search is over) starts no more trials."""
    deadline = time.monotonic() + timeout if timeout else math.inf
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while time.monotonic() < deadline:
        heartbeat_trials_that_never_beat(study, 3 * cfg.search.heartbeat_s)
        fail_stale_trials(study)  # a dead process's RUNNING trial becomes FAIL + a WAITING retry
        states = [t.state for t in study.get_trials(deepcopy=False)]
        finished, running = sum(s in FINISHED for s in states), states.count(TrialState.RUNNING)
        failed = _failed_on_their_own(study)
        if finished >= target:
            break
        if failed >= cfg.search.max_failed:
            raise StudyError(f"{failed} trials failed (search.max_failed = {cfg.search.max_failed}); "
                             f"see their reasons with `harness status`; the study stops here")
        if may_start is not None and not may_start():
            break
        if finished + running >= target:
            # the rest is in other processes' hands, or waits for a dead one's trial to go stale
            time.sleep(IDLE_POLL_S)
            continue
        callbacks = [lambda s, t: on_change(s)] if on_change else []
        try:
            study.optimize(objective, n_trials=1, catch=(RecordAsFailed,), gc_after_trial=False, callbacks=callbacks)
        except ValueError as error:
            if not str(error).startswith("Cannot tell a "):
                raise
            # this process's trial went stale (no heartbeat while it was frozen, swapped out, cut off) and another
            # attempt took it over: its outcome is the other attempt's to record; the study goes on
            log.warning("a trial of this process was declared stale and retried by another attempt, which records "
                        "its outcome; this process's attempt stopped (%s)", error)


def heartbeat_trials_that_never_beat(study: optuna.Study, grace_s: float) -> None:
    """Give one heartbeat to RUNNING trials that never sent any and are older than the grace period.

    Optuna never declares a trial stale that has no heartbeat at all; a process killed between
    `ask` and its first beat would leave it RUNNING forever. One beat lets it go stale normally.
    """
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.datetime_start is None or (now - t.datetime_start).total_seconds() < grace_s:
            continue
        if not has_heartbeat(study, t):
            record_heartbeat(study, t)


def _failed_on_their_own(study: optuna.Study) -> int:
    """Failed trials, not counting stale or interrupted ones (those are retried, not failures)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return sum(t.state == TrialState.FAIL and t.number not in retried and not t.user_attrs.get("interrupted")
               for t in trials)


def requeue_interrupted(study: optuna.Study) -> None:
    """A trial stopped by Ctrl-C is recorded as FAIL; enqueue it once more with its params and identity."""
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in requeued:
            attrs = {k: v for k, v in t.user_attrs.items() if k != "interrupted"}
            study.enqueue_trial(t.params, user_attrs={**attrs, "retry_of": t.number})
            log.info("trial %s was interrupted; it will continue from its last checkpoint", attrs.get("identity"))


# ------------------------------------------------------------------ workers


def run_workers(cfg: StudyConfig, workers: int, run: Callable, prepare: Callable, trials: int | None = None,
                timeout: float | None = None, storage: str | None = None, progress: bool = True) -> optuna.Study:
    """K worker processes on one machine, each running `run(cfg, trials=, timeout=, storage=, progress=False,
    track_study=False)` on the same storage.

    The parent first runs `prepare(cfg, storage, progress) -> (study, make_watcher or None)` (the search's
    preflight, data and study; the promotion's companion study), so workers neither race to build the cache
    nor enqueue trials twice. Each worker takes its own trials; heartbeats let a surviving worker retry the
    trial of one that died. A watcher (made after the workers start: W&B's service must not reach them) is
    told `changed(study)` whenever a trial changes state and `close(study)` at the end.
    """
    study, make_watcher = prepare(cfg, storage, progress)
    context = multiprocessing.get_context("spawn")  # no inherited thread pools or open DB connections
    threads = max(1, (os.cpu_count() or 1) // workers)
    gpus = worker_gpus(workers)
    processes = [context.Process(target=_worker, args=(run, cfg, trials, timeout, storage, threads, gpus[i]),
                                 name=f"worker-{i}") for i in range(workers)]
    for process in processes:
        process.start()
    watcher = make_watcher() if make_watcher else None
    seen = None
    try:
        while any(p.is_alive() for p in processes):
            time.sleep(IDLE_POLL_S)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            if states != seen and watcher:
                seen = states
                watcher.changed(study)
    finally:
        for process in processes:
            process.join()
        if watcher:
            watcher.close(study)
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise StudyError(f"worker(s) {', '.join(failed)} stopped with an error; see the output above. "
                         "Running the same command resumes the study.")
    return study


def worker_gpus(workers: int) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES: one GPU each, round robin, on a machine with several (of those this
    process may see); None (inherit) with fewer than two."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return [devices[i % len(devices)] for i in range(workers)]


def _worker(run: Callable, cfg: StudyConfig, trials: int | None, timeout: float | None, storage: str | None,
            threads: int, gpu: str | None = None) -> None:
    if gpu is not None:  # before this process touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(processName)s: %(message)s",
                        datefmt="%H:%M:%S")
    run(cfg, trials=trials, timeout=timeout, storage=storage, progress=False, track_study=False)
