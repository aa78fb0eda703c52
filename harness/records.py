"""A trial's record: its figures and its state, each with one name from metrics.csv to W&B.

A figure is named once, by its key in an epoch's metrics row (metrics.csv, W&B's history): "val/f1". Its
best epoch's value keeps that name in `TrialResult.best`, and every other place spells it by one rule:
the Optuna user attribute, the trials table (trials.csv, `harness status`, the report) and the HTML
report's columns use `Figure.column` ("val_f1"), the trial's W&B summary `Figure.summary_key`
("best/val_f1"). Adding a figure to every one of them is one entry in FIGURES (and the code that
computes it into the epoch's row).

A trial's state has one set of names, Optuna's states lower-cased with FAIL as "failed": a trial's
result.json, its user attribute, the trials table, its W&B tag and the report say the same word.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.io import json_ready

__all__ = ["FIGURES", "Figure", "TrialResult", "shown_figures", "state_name", "table_columns"]


@dataclass(frozen=True)
class Figure:
    """A per-epoch figure kept at the trial's best epoch."""

    key: str  # the epoch row's key (metrics.csv, W&B history)
    meaning: str
    best_is_max: bool = False  # W&B also keeps the run's maximum of it as the run's summary
    signed: bool = False  # a difference: shown with its sign

    @property
    def column(self) -> str:
        """Its name as an Optuna user attribute and a column of the trials table."""
        return self.key.replace("/", "_")

    @property
    def summary_key(self) -> str:
        """Its name in the trial's W&B summary (the best epoch's value)."""
        return f"best/{self.column}"


OBJECTIVE = Figure("objective", "the study's objective (search.objective)", best_is_max=True)
VAL_F1 = Figure("val/f1", "macro F1 on valid", best_is_max=True)
VAL_F1_BGSWAP = Figure("val/f1_bgswap", "macro F1 on valid with the backgrounds swapped", best_is_max=True)
GAP_F1 = Figure("gap/f1", "train-probe F1 - val F1 (overfitting)", signed=True)
GAP_BGSWAP = Figure("gap/bgswap", "val F1 - background-swapped val F1 (reliance on the background)", signed=True)
FIGURES = (OBJECTIVE, VAL_F1, VAL_F1_BGSWAP, GAP_F1, GAP_BGSWAP)

def state_name(state: Any) -> str:
    """The one name of a state, from an Optuna TrialState or any spelling of it ("FAIL", "fail", "failed"):
    Optuna's state names lower-cased, FAIL as "failed"."""
    name = str(getattr(state, "name", state)).lower()
    return "failed" if name == "fail" else name


# The outcome's fields a reviewer filters on (Optuna user attributes, optuna-dashboard shows them) beside the
# figures; best_epoch and epochs_run count from 0 / are counts, as in metrics.csv
# the reason of a trial a budget stopped before its last epoch (harness.budget): stopped for time, not for its score
BUDGET_STOP = "budget: "
OUTCOME_FIELDS = ("best_epoch", "epochs_run", "images_per_s", "seconds", "state", "reason", "weights", "foreground")


@dataclass
class TrialResult:
    """What one trial ended with: its state, its best epoch's figures (`best`, by figure key) and its outcome."""

    state: str  # "complete", "pruned", "failed" (`state_name`), or "interrupted": stopped on request, never stored
    run_dir: str
    best: dict[str, float] = field(default_factory=dict)  # figure key -> value at the best epoch
    best_epoch: int = -1  # counted from 0, as metrics.csv's epoch column
    epochs_run: int = 0
    images_per_s: float = float("nan")
    seconds: float = 0.0
    reason: str | None = None
    params: dict = field(default_factory=dict)
    weights: str | None = None  # where the backbone's weights came from: a file, or "random init"
    foreground: dict = field(default_factory=dict)  # the trial's images without a face found / with a template mask

    @property
    def objective(self) -> float:
        """The best epoch's objective: the trial's value."""
        return self.best.get(OBJECTIVE.key, math.nan)

    def fill(self, rows: list[dict], best_epoch: int) -> None:
        """The figures of the best epoch's row, the epochs run and the mean throughput, from the epochs' rows."""
        self.epochs_run = len(rows)
        self.best_epoch = best_epoch
        chosen = next((row for row in rows if row["epoch"] == best_epoch), None)
        if chosen is not None:
            self.best = {figure.key: float(chosen[figure.key]) for figure in FIGURES if figure.key in chosen}
        if rows:
            self.images_per_s = sum(float(r["images_per_s"]) for r in rows) / len(rows)

    def user_attrs(self) -> dict[str, Any]:
        """The Optuna user attributes of this outcome (non-finite figures left out)."""
        values = {**{figure.column: self.best.get(figure.key) for figure in FIGURES},
                  **{name: getattr(self, name) for name in OUTCOME_FIELDS}}
        return {name: value for name, value in values.items()
                if not (isinstance(value, float) and not math.isfinite(value)) and value is not None}

    def wandb_summary(self) -> dict[str, Any]:
        """The trial's W&B summary: its state and outcome, and its best epoch's figures (epoch counted from 1)."""
        summary = {"state": self.state, "reason": self.reason, "epochs_run": self.epochs_run, "seconds": self.seconds}
        if self.best_epoch >= 0:
            summary.update({figure.summary_key: self.best.get(figure.key) for figure in FIGURES})
            summary["best/epoch"] = self.best_epoch + 1
        return {k: v for k, v in ((k, json_ready(v)) for k, v in summary.items()) if v is not None}

    def as_json(self) -> dict[str, Any]:
        """result.json's content."""
        return asdict(self)

    def summary(self) -> str:
        """The console line (epochs counted from 1, as in the progress lines)."""
        figures = ", ".join(f"{figure.key} {self.best.get(figure.key, math.nan):{'+' if figure.signed else ''}.4f}"
                            for figure in FIGURES if figure is not OBJECTIVE)
        text = (f"{self.state}: objective {self.objective:.4f} at epoch {self.best_epoch + 1}, {figures}, "
                f"{self.epochs_run} epoch(s), {self.images_per_s:.0f} img/s")
        return text + (f" ({self.reason})" if self.reason else "")


def table_columns(attrs: dict[str, Any]) -> dict[str, Any]:
    """A trial's figures and outcome as columns of the trials table, from its Optuna user attributes."""
    return {**{figure.column: attrs.get(figure.column, math.nan) for figure in FIGURES},
            "best_epoch": attrs.get("best_epoch", -1) + 1,  # counted from 1 (0: none)
            "epochs": attrs.get("epochs_run", 0)}


def shown_figures(frame) -> list[str]:
    """The trials table's figure columns in the order a person reads them: the objective with its interval
    and tie with the best (where computed), each figure, the eval F1 (where the truth is known)."""
    columns = [OBJECTIVE.column, "objective_low", "objective_high", "tied_with_best",
               *(figure.column for figure in FIGURES if figure is not OBJECTIVE), "eval_f1"]
    return [column for column in columns if column in frame]
