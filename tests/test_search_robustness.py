"""A study whose answer depends less on luck: pruning on evidence, known recipes first, warm starts, and a
report that says how sure the study is of its winner."""

import math
import re

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import REPO
from harness.config import ConfigError, load_study
from harness.folders import StudyFolder
from harness.pruners import HIGH_ATTR, EvidencePruner
from harness.study import open_study, run_study, trials_frame
from harness.uncertainty import winner_certainty
from harness.warm_start import ATTR, WarmStartError, best_params, check_same_space, enqueue_warm_start


def test_the_evidence_pruner_stops_only_what_is_surely_worse(tmp_path):
    halving = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize",
                                pruner=EvidencePruner(halving, keep_share=0.5))
    decisions = []
    for value, high in ((0.8, 0.9), (0.5, 0.85), (0.4, 0.6), (0.3, None)):
        trial = study.ask()
        if high is not None:
            trial.set_user_attr(HIGH_ATTR.format(step=1), high)
        trial.report(value, 1)
        decisions.append(trial.should_prune())
    # the first leads its rung; the second is below the rung's top half but its interval reaches it; the third's
    # does not; the fourth has no interval, so successive halving alone decides
    assert decisions == [False, False, True, True]


def test_the_evidence_pruner_never_prunes_what_the_wrapped_pruner_keeps(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize",
                                pruner=EvidencePruner(optuna.pruners.NopPruner(), keep_share=0.5))
    for value in (0.9, 0.1):
        trial = study.ask()
        trial.set_user_attr(HIGH_ATTR.format(step=1), value)
        trial.report(value, 1)
        assert not trial.should_prune()


def test_known_recipes_are_enqueued_after_trial_zero_once(smoke_study):
    cfg = smoke_study(**{"search.enqueue": [{"backbone": "efficientnet_lite0", "preprocess": "face_crop",
                                             "bgswap_p": 0.5, "lr": 0.005}]})
    study = open_study(cfg, None, split_hash="aaaa")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs for t in waiting] == [{"reference": True}, {"recipe": 0}]
    recipe = waiting[1].system_attrs["fixed_params"]  # what the trial will run with
    assert (recipe["preprocess"], recipe["bgswap_p"], recipe["lr"]) == ("face_crop", 0.5, 0.005)
    assert recipe["loss"] == cfg.params.loss  # the rest are the defaults
    again = open_study(cfg, None, split_hash="aaaa")
    assert len(again.get_trials(states=(TrialState.WAITING,))) == 2


@pytest.mark.parametrize("recipe, message", [
    ({"backbone": "efficientnet_lite0", "colour": 1}, "search.enqueue.0: unknown parameter(s) ['colour']"),
    ({"lr": 5.0}, "search.enqueue.0.lr: 5.0 lies outside search.space.lr"),
    ({"preprocess": "grayscale"}, "search.enqueue.0.preprocess: 'grayscale' lies outside search.space.preprocess"),
])
def test_a_recipe_outside_the_space_is_refused_when_the_file_loads(smoke_study, recipe, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        smoke_study(**{"search.enqueue": [recipe]})


def seeded_study(cfg, values: list[float]):
    """A study of `cfg` with complete trials drawn from its space at the given objective values."""
    cfg.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(cfg, None, split_hash="aaaa")
    for _ in study.get_trials(states=(TrialState.WAITING,)):  # trial 0 of the defaults: not part of this history
        study.tell(study.ask(), state=TrialState.FAIL)
    for value in values:
        trial = study.ask()
        trial.suggest_categorical("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
        trial.suggest_float("lr", 3e-4, 1e-2, log=True)
        study.tell(trial, value)
    return study


def test_a_warm_start_trains_the_other_studys_best_first_and_refuses_another_space(smoke_study):
    other = smoke_study(name="earlier")
    earlier = seeded_study(other, [0.2, 0.9, 0.5])
    best = sorted((t for t in earlier.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    cfg = smoke_study(name="later")
    check_same_space(cfg, other)
    params = best_params(other.name, earlier, top=2)
    assert params == [best[0].params, best[1].params]
    study = open_study(cfg, None, split_hash="bbbb")
    assert enqueue_warm_start(study, other.name, params) == 2
    assert enqueue_warm_start(study, other.name, params) == 0  # once per study, also on resume
    seeded = [t for t in study.get_trials(states=(TrialState.WAITING,)) if "warm_start" in t.user_attrs]
    assert [t.system_attrs["fixed_params"] for t in seeded] == params and ATTR in study.user_attrs
    narrower = smoke_study(name="narrower", **{"search.space.lr": {"type": "float", "low": 1e-3, "high": 1e-2}})
    with pytest.raises(WarmStartError, match=r"search space differs .* in \['lr'\]"):
        check_same_space(narrower, other)


def test_the_cli_refuses_a_warm_start_from_another_space_before_any_data(smoke_study, tmp_path):
    import subprocess
    import sys

    import yaml

    from conftest import REPO, harness_env

    files = {}
    for name, low in (("mine", 3e-4), ("theirs", 1e-3)):
        cfg = smoke_study(name=name, **{"search.space.lr": {"type": "float", "low": low, "high": 1e-2, "log": True},
                                        "data.root": str(tmp_path / "never-written"), "smoke": None})
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "harness.cli", "study", str(files["mine"]), "--warm-start",
                             str(files["theirs"])], capture_output=True, text=True, env=harness_env(), cwd=REPO,
                            timeout=300)
    assert result.returncode == 2 and "search space differs from study 'mine'" in result.stderr
    assert "['lr']" in result.stderr and not (tmp_path / "never-written").exists()


def test_a_study_with_the_evidence_pruner_keeps_each_epochs_interval(smoke_study):
    cfg = smoke_study(**{"search.pruner.evidence": True, "search.trials": 2})
    study = run_study(cfg, progress=False)
    frame = trials_frame(study)
    assert len(frame) == 2
    for trial in study.trials:
        steps = sorted(trial.intermediate_values)
        highs = [trial.user_attrs[HIGH_ATTR.format(step=step)] for step in steps]
        assert all(high >= trial.intermediate_values[step] - 1e-9 for high, step in zip(highs, steps, strict=True))
        metrics = pd.read_csv(f"{trial.user_attrs['run_dir']}/metrics.csv")
        assert (metrics["objective_low"] <= metrics["objective"] + 1e-9).all()


def test_the_winner_certainty_names_the_runner_up_and_the_ties():
    frame = pd.DataFrame({"trial": [3, 1, 0, 2], "state": ["complete", "complete", "pruned", "failed"],
                          "objective": [0.8, 0.75, 0.5, math.nan], "objective_low": [0.7, 0.6, 0.4, math.nan],
                          "objective_high": [0.9, 0.85, 0.55, math.nan],
                          "tied_with_best": [True, True, False, pd.NA]})
    text = winner_certainty(frame)
    assert text.startswith("Winner: trial 3 at 0.8000 [0.7000, 0.9000]; runner-up: trial 1 at 0.7500")
    assert "1 trial(s) cannot be told apart from the winner" in text
    assert "0 of the 3 finished trials came after the winner" in text
    frame.loc[1, "tied_with_best"] = False
    assert "No other trial is within the winner's noise" in winner_certainty(frame)
    assert winner_certainty(frame.iloc[:1]) is None


def test_pruning_precision_continues_the_pruned_trials_from_their_last_checkpoint(smoke_study):
    from test_study import study_with_reference_trials

    from harness.bench.spread import pruning_precision

    cfg = smoke_study(**{"train.epochs": 3, "search.trials": 4,  # 2 references + 2 trials
                         "search.pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 2}})
    study_with_reference_trials(cfg, 2.0)  # every real trial is worse: pruned at epoch 2, whatever its F1
    frame = trials_frame(run_study(cfg, progress=False))
    pruned = sorted(frame.loc[frame["state"] == "pruned", "trial"].astype(int))
    assert len(pruned) == 2
    row = pruning_precision(cfg)
    assert row["pruned"] == pruned and row["reference"] == len(pruned)
    assert set(row["final_objective"]) == {str(n) for n in frame["trial"]}
    assert len(row["wrongly_pruned"]) == 1  # the top 3 of 4: both references and the better continued trial
    for trial in pruned:  # each continued in a copy of its folder up to train.epochs, the original untouched
        continued = pd.read_csv(cfg.study_dir / "unpruned" / str(trial) / "metrics.csv")
        original = pd.read_csv(StudyFolder.of(cfg).trial(trial).path / "metrics.csv")
        assert len(continued) == cfg.train.epochs and len(original) < cfg.train.epochs
        assert continued["objective"].iloc[:len(original)].tolist() == original["objective"].tolist()
    assert row["ratio"] == 1 - len(row["wrongly_pruned"]) / max(1, len(pruned))


def test_enqueued_trials_are_never_pruned_when_the_study_spares_them():
    """search.pruner.spare_known: trial 0, the recipes and a warm start run to the end; others are pruned."""
    from harness.study import make_pruner

    cfg = load_study(REPO / "studies" / "default.yaml", overrides={"search.pruner.evidence": False})
    assert cfg.search.pruner.spare_known  # the default study spares them
    for spare, expected in ((True, [False, True]), (False, [True, True])):
        pruner = make_pruner(cfg.replace({"search.pruner.spare_known": spare}))
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for value in (0.9, 0.8, 0.85):  # strong trials at the first rung (asking records their rung)
            trial = study.ask()
            trial.report(value, 1)
            trial.should_prune()
            study.tell(trial, value)
        study.enqueue_trial({}, user_attrs={"recipe": 0})
        answers = []
        for _ in range(2):  # the enqueued recipe, then a proposed trial, both weak after epoch 1
            trial = study.ask()
            trial.report(0.1, 1)
            answers.append(trial.should_prune())
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        assert answers == expected, spare


def test_a_sampled_trial_continued_after_an_interruption_stays_prunable():
    """requeue_interrupted (and a stale trial's retry) enqueue a sampled trial with its params fixed: it is still
    the sampler's trial, and the pruner may stop it; the requeued reference is still spared."""
    from harness.runtime import requeue_interrupted
    from harness.study import make_pruner

    cfg = load_study(REPO / "studies" / "default.yaml", overrides={"search.pruner.evidence": False})
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg))
    for value in (0.9, 0.8, 0.85):
        trial = study.ask()
        trial.report(value, 1)
        trial.should_prune()
        study.tell(trial, value)
    for attrs in ({"identity": 3, "reference": True}, {"identity": 4}):  # Ctrl-C during the reference, a sampled one
        study.enqueue_trial({}, user_attrs=attrs)
        interrupted = study.ask()
        interrupted.set_user_attr("interrupted", True)
        study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    requeue_interrupted(study)
    answers = {}
    for _ in range(2):
        trial = study.ask()
        trial.report(0.1, 1)
        answers[trial.user_attrs["identity"]] = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert answers == {3: False, 4: True}
