"""`make study`'s sequence, in one place: the CLI, the bench and the tests call it.

    prepare + search   study.run_study (one process) or study.run_search_workers (--workers K); the data, the
                       preflight and the study's storage are prepared inside, before any trial
    score on eval      predict.score_trials_on_eval: where the held-out set's labels are known, each trial's
                       eval F1 beside its objective (shown only)
    status             study.status: the trials table, runs/<study>/trials.csv
    ensemble           ensemble.run_ensemble, unless ensemble.enabled is false
    report             report.write_report (runs/<study>/report.html), unless report=False
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd

from harness.config import StudyConfig


@dataclass
class StudyOutcome:
    study: optuna.Study
    frame: pd.DataFrame  # the trials table after the search (status)
    eval_f1: dict[str, float] = field(default_factory=dict)  # trial -> eval F1 where the truth is known
    ensemble: dict | None = None  # run_ensemble's summary; None when disabled
    report: Path | None = None


def make_study(cfg: StudyConfig, *, trials: int | None = None, timeout: float | None = None,
               storage: str | None = None, workers: int = 1, warm_start: tuple[str, list[dict]] | None = None,
               progress: bool = True, log_to_wandb: bool = True, report: bool = True,
               after_search: Callable[[pd.DataFrame, dict[str, float]], None] | None = None) -> StudyOutcome:
    """Run `make study` on `cfg`: search, eval scores where truth exists, status, ensemble, report.
    `after_search(frame, eval_f1)` sees the trials table before the ensemble (the CLI prints it)."""
    from harness.predict import score_trials_on_eval
    from harness.promotion.ensemble import run_ensemble
    from harness.study import run_search_workers, run_study, status

    if workers > 1:
        study = run_search_workers(cfg, workers, trials=trials, timeout=timeout, storage=storage, progress=progress,
                            warm_start=warm_start)
    else:
        study = run_study(cfg, trials=trials, timeout=timeout, storage=storage, progress=progress,
                          warm_start=warm_start)
    eval_f1 = score_trials_on_eval(cfg, storage)
    frame = status(cfg, storage)
    if after_search is not None:
        after_search(frame, eval_f1)
    outcome = StudyOutcome(study, frame, eval_f1)
    if cfg.ensemble.enabled:
        outcome.ensemble = run_ensemble(cfg, storage=storage, log_to_wandb=log_to_wandb)
    if report:
        from harness.report import write_report

        outcome.report = write_report(cfg, storage)
    return outcome
