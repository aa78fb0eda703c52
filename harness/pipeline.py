"""`make study`'s sequence, in one place: the CLI, the bench and the tests call it.

    prepare + search   study.run_study (one process) or study.run_search_workers (--workers K); the data, the
                       preflight and the study's storage are prepared inside, before any trial
    score on eval      predict.score_trials_on_eval: where the held-out set's labels are known, each trial's
                       eval F1 beside its objective (shown only)
    status             study.status: the trials table, runs/<study>/trials.csv
    ensemble           ensemble.run_ensemble, unless ensemble.enabled is false
    with a budget      (`--budget`, search.budget: harness.budget) the search ends when the plan says, then the
                       promotion sized to the time left (promotion.folds.promote) and the submission
                       (predict.predict_submission) with its fold models
    report             report.write_report (runs/<study>/report.html), unless report=False
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import pandas as pd

from harness.config import ConfigError, StudyConfig


@dataclass
class StudyOutcome:
    study: optuna.Study
    frame: pd.DataFrame  # the trials table after the search (status)
    eval_f1: dict[str, float] = field(default_factory=dict)  # trial -> eval F1 where the truth is known
    ensemble: dict | None = None  # run_ensemble's summary; None when disabled
    report: Path | None = None
    promotion: dict | None = None  # with a budget: the promotion's summary, None when it did not run
    submission: dict | None = None  # with a budget: predict_submission's result
    budget: dict | None = None  # with a budget: its record (runs/<study>/budget.json)


def make_study(cfg: StudyConfig, *, trials: int | None = None, timeout: float | None = None,
               storage: str | None = None, workers: int = 1, warm_start: tuple[str, list[dict]] | None = None,
               progress: bool = True, log_to_wandb: bool = True, report: bool = True,
               after_search: Callable[[pd.DataFrame, dict[str, float]], None] | None = None,
               budget: float | None = None, started: float | None = None) -> StudyOutcome:
    """Run `make study` on `cfg`: search, eval scores where truth exists, status, ensemble, report; with a budget
    (`budget` seconds, else search.budget, counted from `started`, default now) also the promotion and the
    submission, all planned inside it.
    `after_search(frame, eval_f1)` sees the trials table before the ensemble (the CLI prints it)."""
    from harness.budget import Budget
    from harness.predict import score_trials_on_eval
    from harness.study import run_search_workers, run_study, status

    seconds = budget or cfg.search.budget
    planner = Budget(cfg, seconds, started) if seconds else None
    if planner is not None and workers > 1:
        raise ConfigError("a budget (--budget, search.budget) plans one process's search: drop --workers, or run "
                          "the workers without a budget and `harness promote` after them")
    if workers > 1:
        study = run_search_workers(cfg, workers, trials=trials, timeout=timeout, storage=storage, progress=progress,
                            warm_start=warm_start)
    else:
        study = run_study(cfg, trials=trials, timeout=timeout, storage=storage, progress=progress,
                          warm_start=warm_start, budget=planner)
    if planner is not None:
        planner.search_done(study)
    eval_f1 = score_trials_on_eval(cfg, storage)
    frame = status(cfg, storage)
    if after_search is not None:
        after_search(frame, eval_f1)
    outcome = StudyOutcome(study, frame, eval_f1)
    if cfg.ensemble.enabled:
        outcome.ensemble = ensemble_within(cfg, planner, storage, log_to_wandb)
    if planner is not None:
        planner.step_done("eval scores and ensemble")
        promote_within(cfg, planner, outcome, storage, log_to_wandb)
    if report:
        from harness.report import write_report

        outcome.report = write_report(cfg, storage)
    if planner is not None:
        finish_budget(cfg, planner, outcome, log_to_wandb)
    return outcome


def ensemble_within(cfg: StudyConfig, planner, storage: str | None, log_to_wandb: bool) -> dict | None:
    """The single-split ensemble; with a budget, a study whose trials were all stopped early has none (said so)."""
    from harness.promotion.ensemble import EnsembleError, run_ensemble

    try:
        return run_ensemble(cfg, storage=storage, log_to_wandb=log_to_wandb)
    except EnsembleError as error:
        if planner is None:
            raise
        planner.record.left_out.append(f"ensemble: none ({error})")
        return None


def promote_within(cfg: StudyConfig, planner, outcome: StudyOutcome, storage: str | None, log_to_wandb: bool) -> None:
    """The promotion sized to what the budget left (or resumed as it started), then the submission: from the fold
    models, else from the single-split ensemble, else from the best trial alone."""
    from harness.predict import predict_submission
    from harness.promotion.folds import PromotionError, promote, started_settings

    started = started_settings(cfg, storage)
    if started is not None:  # a promotion of this study began in an earlier run: it resumes as it was
        sized = cfg.replace(started)
        planner.record.promotion = {"resumed": started}
    else:
        size = planner.plan_promotion(promotion_candidates(cfg, outcome.frame))
        sized = cfg.replace(size.settings) if size is not None else None
    if sized is not None:
        try:
            outcome.promotion = promote(sized, storage=storage, timeout=max(1.0, planner.left()))
        except PromotionError as error:
            planner.record.left_out.append(f"promotion: not finished within the budget ({error})")
        planner.step_done("promotion")
    sized = sized or cfg
    if outcome.promotion is not None:
        outcome.submission = predict_submission(sized, storage=storage, log_to_wandb=log_to_wandb, source="promotion")
    elif outcome.ensemble is not None:
        outcome.submission = predict_submission(sized, storage=storage, log_to_wandb=log_to_wandb, source="ensemble")
    else:
        best = int(outcome.frame.iloc[0]["trial"])
        outcome.submission = predict_submission(sized, trial=best, storage=storage, log_to_wandb=log_to_wandb)
    source = "promotion" if outcome.promotion else "ensemble" if outcome.ensemble else "best trial alone"
    planner.record.submission = {"source": source, "path": outcome.submission["submission"],
                                 **({"eval_f1": outcome.submission["eval_f1"]} if "eval_f1" in outcome.submission else {})}
    planner.step_done("submission")


def promotion_candidates(cfg: StudyConfig, frame: pd.DataFrame) -> list:
    """The configurations `harness promote` would choose (best first), each with its backbone, its own best epoch
    as the promotion counts it (promotion.epochs "best") and whether the study can tell it from the winner."""
    from harness.budget import Candidate
    from harness.promotion.folds import choose_configs, fold_epochs

    chosen = choose_configs(cfg, frame)
    best = fold_epochs(cfg.replace({"promotion.epochs": "best"}), chosen)
    return [Candidate(int(row.trial), str(getattr(row, "param_backbone", None) or cfg.params.backbone),
                      best[int(row.trial)], bool(row.tied_with_best) if "tied_with_best" in frame else True)
            for row in chosen.itertuples()]


def finish_budget(cfg: StudyConfig, planner, outcome: StudyOutcome, log_to_wandb: bool) -> None:
    """The record's last step and wall time, its W&B run, and the line that says what the budget left out."""
    from harness.budget import describe
    from harness.tracking import log_budget

    planner.finish("report")
    outcome.budget = asdict(planner.record)
    if log_to_wandb:
        log_budget(cfg, outcome.budget)
    print(describe(outcome.budget), flush=True)
