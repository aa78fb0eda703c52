"""A budget for the whole pipeline: durations, the promotion sized from measured costs, a trial stopped at the
search's end, a budget too small refused, and a budgeted `make study` ending with a promoted submission whose
plan and cuts are in budget.json, `harness status`, the report and W&B."""

from __future__ import annotations

import json
import re
import time

import pytest

from harness.budget import Candidate, CostBook, EpochCost, Sizes, promotable, read_record, size_promotion
from harness.config import ConfigError, format_duration, parse_duration, parse_study
from harness.folders import PromotionFolder, StudyFolder
from harness.pipeline import make_study
from harness.runtime import StudyError, load_existing_study
from harness.tracking import budget_run_id, read_offline_run, study_key
from harness.train import run_trial

# -------------------------------------------------------------------------------- durations


@pytest.mark.parametrize("text, seconds", [("20m", 1200), ("1h30m", 5400), ("90s", 90), ("90", 90), (600, 600),
                                           ("1.5h", 5400), ("2m30s", 150)])
def test_a_duration_reads_as_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "twenty minutes", "20x", "0", "-5m"])
def test_a_duration_that_is_none_is_refused_saying_how_to_write_one(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_search_budget_in_a_study_file_is_a_duration_and_a_bad_one_names_its_key():
    assert parse_study("name: s\nsearch: {budget: 20m}").search.budget == 1200
    assert parse_study("name: s").search.budget is None
    with pytest.raises(ConfigError, match=r"search\.budget: .*not a duration"):
        parse_study("name: s\nsearch: {budget: soon}")
    assert format_duration(1200) == "20m00s" and format_duration(4000) == "1h06m40s" and format_duration(42) == "42s"


# -------------------------------------------------------------------------- sizing the promotion


def costs_of(smoke_study, train_s: float = 0.01, eval_s: float = 0.001) -> CostBook:
    """A cost book whose measured costs are given: 100 labelled images, 20 held out, no overhead."""
    book = CostBook(smoke_study(), Sizes(train=80, valid=20, labelled=100, eval_views=2, held_out=20))
    for backbone in ("efficientnet_lite0", "efficientnet_lite2"):
        book.measured[backbone] = EpochCost(train_s, eval_s, "given")
    return book


CANDIDATES = [Candidate(2, "efficientnet_lite2", 4), Candidate(5, "efficientnet_lite0", 6),
              Candidate(7, "efficientnet_lite0", 3, tied=False)]


def test_a_promotion_that_fits_keeps_the_study_files_size_and_leaves_out_only_what_the_study_can_tell_apart(smoke_study):
    size = size_promotion(costs_of(smoke_study), CANDIDATES, folds=3, full_epochs=6, seconds=1e6)
    assert (size.configs, size.folds, size.epochs) == ((2, 5), 3, "full")
    assert size.left_out == ("trial 7 (the study can tell it from the winner)",)
    assert size.settings == {"promotion.top_k": 2, "promotion.folds": 3, "promotion.epochs": "full"}


def test_the_budget_cuts_epochs_to_each_ones_best_then_configurations_then_folds(smoke_study):
    costs = costs_of(smoke_study)

    def cost(configs, folds, epochs):
        from harness.budget import promotion_cost
        return promotion_cost(costs, [c for c in CANDIDATES if c.trial in configs], folds, epochs, 6)

    # fold run: (100 * 2/3 train images * 0.01 + 100/3 * 2 eval images * 0.001) per epoch; held out predicted twice
    assert cost((2,), 3, "full") == pytest.approx(3 * 6 * (100 * 2 / 3 * 0.01 + 100 / 3 * 2 * 0.001) + 2 * 3 * 20 * 0.001)
    for configs, folds, epochs in [((2, 5), 3, "best"), ((2,), 3, "full"), ((2,), 3, "best")]:
        size = size_promotion(costs, CANDIDATES, folds=3, full_epochs=6, seconds=cost(configs, folds, epochs) + 1e-9)
        assert (size.configs, size.folds, size.epochs) == (configs, folds, epochs)
        assert size.seconds <= cost(configs, folds, epochs) + 1e-9
    best_epochs = size_promotion(costs, CANDIDATES, 3, 6, cost((2, 5), 3, "best") + 1e-9)
    assert "epochs trial 2 6 -> 4" in best_epochs.left_out
    # never fewer than MIN_FOLDS (3) folds: below the smallest 3-fold promotion there is none
    assert size_promotion(costs, CANDIDATES, 3, 6, cost((2,), 3, "best") * 0.99) is None
    fewer = size_promotion(costs, CANDIDATES, 5, 6, cost((2,), 3, "best") + 1e-9)  # a study file's 5 folds cut to 3
    assert (fewer.configs, fewer.folds, fewer.epochs) == ((2,), 3, "best")
    assert {"trial 5 (no time)", "folds 5 -> 3"} <= set(fewer.left_out)


def test_a_trial_the_budget_stopped_is_an_ensemble_candidate_and_one_the_pruner_stopped_is_not():
    import pandas as pd

    from harness.promotion.ensemble import top_trials

    frame = pd.DataFrame({"trial": [0, 1, 2], "state": ["complete", "pruned", "pruned"], "objective": [0.5, 0.7, 0.9],
                          "epochs": [6, 4, 4], "reason": ["", "budget: epoch 5 would end after the search's end", ""]})
    assert list(top_trials(frame, 5)["trial"]) == [1, 0]
    assert list(top_trials(frame, 5, pruned_after=3)["trial"]) == [2, 1, 0]


def test_only_the_winner_and_the_trials_tied_with_it_in_a_row_are_promotable():
    ranked = [Candidate(1, "a", 3), Candidate(2, "a", 3, tied=False), Candidate(3, "a", 3)]
    assert [c.trial for c in promotable(ranked)] == [1]
    assert [c.trial for c in promotable([Candidate(4, "a", 3, tied=False)])] == [4]  # the winner always


# ---------------------------------------------------------------------------- the search's end


def test_a_trial_whose_next_epoch_would_end_past_the_search_stops_there_as_pruned(smoke_study):
    cfg = smoke_study(**{"train.epochs": 2, "shortcuts.audit": False})
    result = run_trial(cfg, deadline=lambda: 0.0)  # the end already passed: one epoch, then stop
    assert result.state == "pruned" and result.epochs_run == 1
    assert result.reason.startswith("budget: epoch 2 would end after the search's end")
    unlimited = run_trial(cfg, deadline=lambda: float("inf"))
    assert unlimited.state == "complete" and unlimited.epochs_run == 2


def test_a_budget_that_holds_no_trial_is_refused_naming_what_it_would_need(smoke_study):
    cfg = smoke_study(**{"tracking.mode": "disabled", "shortcuts.audit": False})
    with pytest.raises(StudyError, match=r"budget 1s: .* no trial fits .* at least ~") as error:
        make_study(cfg, budget=1, progress=False, report=False)
    assert "--budget" in str(error.value)
    assert not any(t.state.is_finished() for t in load_existing_study(cfg).trials)
    assert read_record(cfg)["search"]["stopped"] == "the budget holds no trial"


# ------------------------------------------------------------------------ a budgeted make study


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, shared_data):
    """The default study's smoke variant as `make study BUDGET=10m` runs it (W&B offline, no context audit): a
    budget every step fits."""
    from conftest import REPO
    from harness.config import load_study

    root = tmp_path_factory.mktemp("budget")
    cfg = load_study(REPO / "studies" / "default.yaml", smoke=True, overrides={
        "name": "budgeted", "runs_dir": str(root / "runs"), "data.root": str(shared_data / "default" / "data"),
        "data.cache_dir": str(shared_data / "cache"), "search.pruner.name": "none", "shortcuts.audit": False})
    return cfg, make_study(cfg, budget=600, progress=False)


def test_a_budgeted_study_ends_with_a_promoted_submission_and_its_record(budgeted):
    cfg, outcome = budgeted
    record = json.loads(StudyFolder.of(cfg).budget.read_text())
    assert record["budget_s"] == 600 and record["wall_s"] is not None
    assert list(record["steps"]) == ["prep", "timing", "search", "eval scores and ensemble", "promotion",
                                     "submission", "report"]
    assert record["search"]["trials_finished"] == cfg.search.trials and record["search"]["stopped_by_budget"] == []
    first = record["plans"][0]
    assert set(first["costs"]) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert first["costs"]["efficientnet_lite0"]["source"].startswith("timed steps")
    assert len(record["plans"]) == 1 + cfg.search.trials  # revised after every trial
    last = record["plans"][-1]["costs"]
    assert re.match(r"\d+ epoch\(s\) of trial\(s\) \[0", last["efficientnet_lite0"]["source"])  # trial 0's backbone
    for cost in last.values():  # every other one measured too, or timed plus what the measured epochs added
        assert re.match(r"\d+ epoch\(s\) of trial|timed steps \+ [\d.-]+ ms per image measured", cost["source"])
    promotion = record["promotion"]
    assert (promotion["folds"], promotion["epochs"]) == (cfg.promotion.folds, "full")  # all of it fits
    summary = PromotionFolder.of(cfg).summary()
    assert [c["trial"] for c in summary["configs"]] == promotion["configs"]
    assert record["submission"]["source"] == "promotion" and outcome.submission["members"]
    assert set(outcome.submission["members"]) == {f"{c}/fold-{f}" for c in promotion["configs"]
                                                  for f in range(cfg.promotion.folds)}
    assert record["submission"]["eval_f1"] == outcome.submission["eval_f1"]


def test_status_the_report_and_wandb_say_what_the_budget_planned_and_left_out(budgeted, capsys):
    from harness.cli import main

    cfg, outcome = budgeted
    study_file = cfg.study_dir / "study.yaml"
    study_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["status", str(study_file)]) == 0
    began = time.strftime("%Y-%m-%d %H:%M", time.localtime(outcome.budget["started"]))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"budget 10m00s (the run of {began}):"))
    assert "submission from the promotion" in line and ("left out:" in line or "nothing left out" in line)
    page = outcome.report.read_text()
    assert '<section id="budget">' in page and "Left out by the budget" in page
    run = read_offline_run(cfg.study_dir / "wandb", budget_run_id(study_key(cfg)))
    assert run["job_type"] == "budget" and run["summary"]["budget/seconds"] == 600
    assert run["summary"]["budget/submission"] == "promotion"
    assert run["summary"]["budget/left_out"] == ("; ".join(outcome.budget["left_out"]) or "nothing")


def test_best_epochs_train_each_configurations_fold_runs_to_its_own_best_epoch(budgeted):
    from harness.promotion.folds import Plan, companion_name, promote, restart
    from harness.runtime import default_storage
    from harness.study import trials_frame

    cfg, _ = budgeted
    best = cfg.replace({"promotion.epochs": "best", "promotion.top_k": 1})
    restart(best, None)
    promote(best)
    import optuna

    plan = Plan.of(optuna.load_study(study_name=companion_name(cfg), storage=default_storage(cfg)))
    frame = trials_frame(load_existing_study(cfg)).set_index("trial")
    for config in plan.configs:
        assert plan.epochs[config] == max(int(frame.loc[config, "best_epoch"]), 1)
        for fold in range(plan.folds):
            assert len(PromotionFolder.of(cfg).fold(config, fold).metrics()) == plan.epochs[config]


def test_with_no_time_left_no_promotion_is_planned_and_the_record_says_the_ensemble_is_submitted(smoke_study):
    from harness.budget import Budget

    cfg = smoke_study()
    planner = Budget(cfg, 600, started=time.time() - 3600)  # the budget ran out an hour ago
    planner.costs = costs_of(smoke_study)
    assert planner.plan_promotion(CANDIDATES) is None
    record = read_record(cfg)
    assert record["promotion"]["skipped"].startswith("the smallest promotion (1 configuration x 2 folds) does not fit")
    assert record["left_out"] == ["promotion: none (no time); the single-split ensemble is submitted"]
    assert record["promotion"]["candidates"][0] == {"trial": 2, "backbone": "efficientnet_lite2", "best_epochs": 4,
                                                    "tied": True}
