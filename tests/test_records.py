"""Every figure true, one number per fact: a pruned trial's objective, the label audit's method, the trials
table without warnings."""

from __future__ import annotations

import warnings

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import REPO
from harness.config import load_study
from harness.folders import PromotionFolder
from harness.promotion.audit import CLEANLAB, audit_labels, read_issues
from harness.promotion.folds import choose_configs
from harness.records import TrialResult
from harness.study import scored_frame, store_result, trials_frame


def finished_trial(study: optuna.Study, reports: list[float], best: float, state: TrialState, epochs: int) -> None:
    trial = study.ask()
    trial.set_user_attr("identity", trial.number)
    for step, value in enumerate(reports, start=1):
        trial.report(value, step)
    store_result(trial, TrialResult(state=state.name.lower(), run_dir="", params={}, best={"objective": best},
                                    epochs_run=epochs, best_epoch=int(np.argmax(reports))))
    study.tell(trial, best if state == TrialState.COMPLETE else None, state=state)


def test_a_pruned_trial_is_ranked_by_its_best_epoch_everywhere(tmp_path):
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'study.db'}")
    finished_trial(study, [0.20, 0.25, 0.22], best=0.25, state=TrialState.COMPLETE, epochs=3)
    finished_trial(study, [0.31, 0.08], best=0.31, state=TrialState.PRUNED, epochs=2)
    assert study.trials[1].value == pytest.approx(0.08)  # Optuna keeps the last reported epoch's
    frame = trials_frame(study)
    assert frame["trial"].tolist() == [1, 0]  # the best epoch's 0.31 ranks first
    assert frame.set_index("trial").loc[1, "objective"] == pytest.approx(0.31)
    cfg = load_study(REPO / "studies" / "default.yaml", overrides={"promotion.top_k": 1, "promotion.min_epochs": 2})
    assert choose_configs(cfg, frame)["trial"].tolist() == [1]


def test_the_trials_table_of_a_study_without_wandb_runs_raises_no_warning(tmp_path):
    cfg = load_study(REPO / "studies" / "default.yaml", overrides={"runs_dir": str(tmp_path)})
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'study.db'}")
    finished_trial(study, [0.2], best=0.2, state=TrialState.COMPLETE, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = scored_frame(cfg, study, intervals=False)
    assert frame["wandb"].tolist() == [""]


def audit_frame(n: int = 60, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 2, 4], size=n)  # classes 1 and 3 are given to no image
    probs = rng.dirichlet(np.ones(5), size=n)
    probs[np.arange(n), labels] += 2.0
    probs[:5] = np.eye(5)[(labels[:5] + 2) % 6] * 0.9 + 0.02  # five confident votes for another given class
    frame = pd.DataFrame({"path": [f"/data/{i}.png" for i in range(n)], "label": labels})
    frame.attrs["class_names"] = [f"c{i}" for i in range(5)]
    return frame, probs / probs.sum(axis=1, keepdims=True)


def test_the_label_audit_runs_cleanlab_on_the_classes_present_and_says_how_it_flagged(tmp_path):
    frame, probs = audit_frame()
    folder = PromotionFolder(tmp_path)
    summary = audit_labels(probs, frame, tasks=False, folder=folder)
    issues = read_issues(folder)
    assert summary["method"] == CLEANLAB and set(issues["method"]) == {CLEANLAB}
    assert {f"/data/{i}.png" for i in range(5)} <= set(issues["target"])


def test_a_label_audit_cleanlab_refuses_says_so_in_the_summary_and_the_file(tmp_path, monkeypatch):
    import cleanlab.filter

    def refuse(*args, **kwargs):
        raise ValueError("not enough examples to estimate the noise")

    monkeypatch.setattr(cleanlab.filter, "find_label_issues", refuse)
    frame, probs = audit_frame()
    folder = PromotionFolder(tmp_path)
    summary = audit_labels(probs, frame, tasks=False, folder=folder)
    assert "cleanlab could not estimate the noise rates: not enough examples" in summary["method"]
    assert read_issues(folder)["method"].str.contains("self-confidence below 0.5").all()


def test_each_figure_and_state_has_one_name_from_the_epoch_row_to_the_trials_table_and_wandb(tmp_path):
    """A trial's best-epoch figures go from the epoch rows to Optuna's attributes, the trials table and the W&B
    summary under the names FIGURES gives them; a failed trial is "failed" in result.json and the table alike."""
    from harness.records import FIGURES

    rows = [{"epoch": e, "objective": 0.1 * e, "val/f1": 0.2 * e, "val/f1_bgswap": 0.15 * e, "gap/f1": 0.01 * e,
             "gap/bgswap": 0.05 * e, "images_per_s": 10.0} for e in range(3)]
    result = TrialResult(state="complete", run_dir="")
    result.fill(rows, best_epoch=1)
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'study.db'}")
    for identity, outcome in enumerate([result, TrialResult(state="failed", run_dir="", reason="RuntimeError: x")]):
        trial = study.ask()
        trial.set_user_attr("identity", identity)
        store_result(trial, outcome)
        study.tell(trial, outcome.objective if outcome.state == "complete" else None,
                   state=TrialState.COMPLETE if outcome.state == "complete" else TrialState.FAIL)
    table = trials_frame(study).set_index("trial")
    summary = result.wandb_summary()
    for figure in FIGURES:
        assert table.loc[0, figure.column] == pytest.approx(rows[1][figure.key]), figure
        assert summary[figure.summary_key] == pytest.approx(rows[1][figure.key]), figure
    assert (result.epochs_run, summary["best/epoch"], table.loc[0, "best_epoch"]) == (3, 2, 2)
    assert (table.loc[1, "state"], table.loc[1, "reason"]) == ("failed", "RuntimeError: x")  # Optuna's FAIL
