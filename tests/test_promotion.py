"""Cross-validated promotion: every configuration on every person-grouped fold, resumable, predicted with every
fold model; the label audit and the corrections it writes; person-bootstrap intervals against sklearn."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from sklearn.metrics import f1_score

from conftest import REPO, harness_env, people, wait_for, write_competition
from harness.config import load_study
from harness.data.labels import GENDER_NAMES, MASK_NAMES, decode
from harness.data.prepare import prepare_data
from harness.data.readers import read_competition_train
from harness.data.split import person_folds
from harness.folders import PromotionFolder, StudyFolder
from harness.predict import predict_submission
from harness.promotion.audit import AuditError, audit_labels, labels_after, read_issues, write_corrections
from harness.promotion.folds import (
    Plan,
    PromotionError,
    companion_name,
    describe_estimate,
    open_promotion,
    promote,
    restart,
)
from harness.report import AUDIT_ROWS, external_references, write_report
from harness.runtime import default_storage
from harness.study import run_study, status, trials_frame
from harness.tracking import fold_run_id, promotion_key, promotion_run_id, read_offline_run
from harness.uncertainty import (
    expected_f1,
    f1_interval,
    f1_on_held_out,
    f1_on_new_set,
    person_weights,
    undiluted,
    weighted_f1,
)


def smoke_config(root, name: str, **overrides):
    return load_study(REPO / "studies" / "default.yaml", smoke=True, overrides={
        "name": name, "runs_dir": str(root / "runs"), "data.root": str(root / "data"),
        "data.cache_dir": str(root / "cache"), "search.pruner.name": "none", **overrides})


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    """The default study's smoke variant searched (3 trials, no pruner), the best trial's folder deleted
    (promotion needs only its params, kept in storage), then promoted: 2 configurations x 2 folds."""
    root = tmp_path_factory.mktemp("promotion")
    cfg = smoke_config(root, "promoted")
    study = run_study(cfg, progress=False)
    best = int(trials_frame(study).iloc[0]["trial"])
    shutil.rmtree(StudyFolder.of(cfg).trial(best).path)
    summary = promote(cfg)
    return cfg, summary, best


def companion(cfg) -> optuna.Study:
    return optuna.load_study(study_name=companion_name(cfg), storage=default_storage(cfg))


def fold_files(cfg) -> dict[str, int]:
    """Every file under the promotion's fold folders -> its modification time in ns (retraining rewrites them)."""
    folder = PromotionFolder.of(cfg).path
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.glob("trial-*/fold-*/*") if p.is_file()}


def test_each_configuration_trains_on_each_fold_of_all_persons(promoted):
    cfg, summary, best = promoted
    trials = companion(cfg).get_trials()
    pairs = sorted((t.user_attrs["config"], t.user_attrs["fold"]) for t in trials)
    configs = [c["trial"] for c in summary["configs"]]
    assert len(configs) == cfg.promotion.top_k and configs[0] == best  # the best one, although its folder is gone
    assert pairs == sorted((c, f) for c in configs for f in range(cfg.promotion.folds))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    persons = set(prepare_data(cfg, progress=False).frame["person"])
    for config in configs:
        held_out = [set(PromotionFolder.of(cfg).fold(config, f).valid_index()["person"])
                    for f in range(cfg.promotion.folds)]
        assert set().union(*held_out) == persons and not set.intersection(*held_out)
        run = read_offline_run(cfg.study_dir / "wandb", fold_run_id(promotion_key(cfg), config, 0))
        assert run["job_type"] == "fold" and run["group"] == f"{cfg.name}/promotion/trial-{config:04d}"
        epochs = sorted({int(h["epoch"]) for h in run["history"] if "val/f1" in h})
        assert epochs == list(range(1, cfg.train.epochs + 1))  # full epochs, no pruning


def test_summary_holds_honest_cv_f1_members_and_single_split_figures(promoted):
    cfg, summary, _ = promoted
    stored = PromotionFolder.of(cfg).summary()
    assert stored["folds"] == cfg.promotion.folds and stored["cv_f1"] == pytest.approx(summary["cv_f1"])
    assert stored["members"] and all(set(m) == {"trial", "weight"} and m["weight"] > 0 for m in stored["members"])
    low, high = stored["cv_f1_ci95"]
    assert 0 <= low <= high <= 1
    data = prepare_data(cfg, progress=False)
    labels = dict(zip(data.frame["image_id"], data.frame["label"]))
    for member in stored["configs"]:
        truth, predicted = [], []
        for fold in range(cfg.promotion.folds):  # each configuration's CV F1 is sklearn's on its held-out logits
            folder = PromotionFolder.of(cfg).fold(member["trial"], fold)
            truth += [labels[i] for i in folder.valid_index()["image_id"]]
            predicted += list(folder.view_log_probs("valid").argmax(axis=1))
        expected = f1_score(truth, predicted, average="macro", labels=range(18), zero_division=0)
        assert member["cv_f1"] == pytest.approx(expected)
        assert member["cv_f1_ci95"][0] <= member["cv_f1"] <= member["cv_f1_ci95"][1]
        assert {"objective", "val_f1", "state", "epochs"} <= set(member["single_split"])


def test_estimate_of_the_submission_is_taken_at_the_held_out_sets_size_and_logged_first(promoted):
    cfg, summary, _ = promoted
    estimate = summary["estimate"]
    eval_images = len(pd.read_csv(cfg.data.root / "eval" / "info.csv"))
    per_person = summary["n_images"] / summary["n_persons"]
    assert estimate["images"] == eval_images and estimate["persons"] == max(1, round(eval_images / per_person))
    assert estimate["ci95"][0] <= estimate["f1"] <= estimate["ci95"][1]
    issues = read_issues(PromotionFolder.of(cfg))
    data = prepare_data(cfg, progress=False)
    changed = int((labels_after(data.frame, issues, True) != data.frame["label"].to_numpy()).sum())
    assert summary["corrected_labels"] == changed
    assert list(PromotionFolder.of(cfg).summary())[:6] == ["folds", "method", "objective", "members", "estimate", "cv_f1"]
    run = read_offline_run(cfg.study_dir / "wandb", promotion_run_id(promotion_key(cfg)))
    assert run["job_type"] == "promotion"
    assert run["summary"]["estimate/f1"] == pytest.approx(estimate["f1"])
    assert run["summary"]["estimate/f1_as_averaged"] == pytest.approx(estimate["dilution"]["f1_as_averaged"])
    assert run["summary"]["cv_f1"] == pytest.approx(summary["cv_f1"])
    assert run["summary"]["cv_f1/corrected_labels"] == pytest.approx(summary["cv_f1_corrected_labels"])
    line = describe_estimate(summary)  # what `make status` and the summary print
    assert f"{estimate['f1']:.4f}" in line and f"{eval_images} held-out images" in line
    assert f"as averaged {estimate['dilution']['f1_as_averaged']:.4f}" in line


def test_the_estimate_reads_the_submitted_bags_own_probabilities_on_the_held_out_images(promoted):
    cfg, summary, _ = promoted
    estimate = summary["estimate"]
    assert estimate["basis"] == "held-out images"
    result = predict_submission(cfg, log_to_wandb=False)  # every fold model of every member
    weight = {member["trial"]: member["weight"] for member in summary["members"]}
    names = list(result["member_probs"])
    each = np.stack([result["member_probs"][name] for name in names])
    weights = np.array([weight[int(name.split("/")[0])] for name in names])
    assert estimate["f1"] == pytest.approx(expected_f1(undiluted(each, weights)[0])[0], abs=1e-6)
    dilution = estimate["dilution"]
    assert dilution["f1_as_averaged"] == pytest.approx(expected_f1(result["probs"])[0], abs=1e-6)
    assert dilution["members_confidence"] == pytest.approx(np.average(each.max(axis=2).mean(axis=1), weights=weights))
    assert estimate["new_set"]["f1"] != estimate["f1"]  # the new-set figure is kept beside it


def test_an_average_of_models_that_disagree_is_given_back_their_confidence_and_reads_closer_to_the_truth():
    """Five models, each right on an image with the probability it gives its answer (calibrated), independently
    of one another: their average is right more often than any of them and less sure than each, so its expected
    confusion matrix reads below even its members' scores. Given back the members' confidence it reads what they
    score: closer to the truth, and still below it (independent models are where bagging gains most)."""
    rng = np.random.default_rng(11)
    images, classes, models = 3000, 4, 5
    truth = rng.integers(0, classes, images)
    sure = rng.uniform(0.45, 0.95, (models, images))  # how often model m is right on image i, and what it says
    right = rng.random((models, images)) < sure
    answer = np.where(right, truth, (truth + rng.integers(1, classes, (models, images))) % classes)
    members = np.repeat(((1 - sure) / (classes - 1))[:, :, None], classes, axis=2)
    np.put_along_axis(members, answer[:, :, None], sure[:, :, None], axis=2)
    weights = np.array([1, 1, 2, 1, 1])
    average = np.tensordot(weights / weights.sum(), members, axes=1)
    restored, what = undiluted(members, weights)
    assert (restored.argmax(axis=1) == average.argmax(axis=1)).all() and what["temperature"] < 1
    assert restored.max(axis=1).mean() == pytest.approx(what["members_confidence"], abs=1e-4)
    assert what["average_confidence"] < what["members_confidence"]
    true_f1 = f1_score(truth, average.argmax(axis=1), average="macro")
    members_f1 = np.average([f1_score(truth, each, average="macro") for each in answer], weights=weights)
    assert expected_f1(average)[0] < members_f1 - 0.1 < true_f1 - 0.2  # the plain average reads low
    assert expected_f1(restored)[0] == pytest.approx(members_f1, abs=0.02)
    alone, what = undiluted(members[:1], weights[:1])  # one model: nothing is diluted, nothing changes
    assert what["temperature"] == 1 and np.allclose(alone, members[0])



def test_undiluted_never_raises_on_near_certain_members_with_an_exact_tie():
    """Digits-like data: every fold model near-certain, two of them on different classes for one image: the average
    ties exactly there and no temperature reaches the members' confidence; the sharpest one is used and said."""
    members = np.full((2, 50, 10), 1e-7)
    members[:, np.arange(50), np.arange(50) % 10] = 1 - 9e-7
    members[1, 0] = 1e-7
    members[1, 0, 1] = 1 - 9e-7  # image 0: member 0 says class 0, member 1 says class 1, each all but certain
    average, what = undiluted(members, np.array([1, 1]))
    assert not what["target_reached"] and what["temperature"] == pytest.approx(1e-3)
    assert np.isfinite(average).all() and np.allclose(average.sum(axis=1), 1)
    assert (average[1:].argmax(axis=1) == np.arange(1, 50) % 10).all() and average[0, :2] == pytest.approx([0.5, 0.5])

def test_a_new_sets_score_falls_in_the_estimates_interval_stratified_or_not():
    """A classifier right on 80% of images, six classes two of them rare, persons of seven images: the estimate
    from 120 labelled persons, at a held-out size of 40, against fresh held-out sets of 40 persons (200 drawn as a
    stratified split draws them, each class its share of persons; 300 at random)."""
    rng = np.random.default_rng(7)
    shares = [0.3, 0.3, 0.2, 0.12, 0.05, 0.03]
    persons = 120 + 300 * 40
    person_class = rng.choice(6, size=persons, p=shares)
    labels = np.repeat(person_class, 7)
    owner = np.repeat(np.arange(persons), 7)
    right = rng.random(len(labels)) < 0.8
    pred = np.where(right, labels, (labels + rng.integers(1, 6, len(labels))) % 6)
    seen = owner < 120
    fresh_random = [weighted_f1(pred, labels, (owner // 40 == k + 3).astype(float)[None], 6)[0, 0]
                    for k in range(300)]
    pools = [rng.permutation(np.flatnonzero(person_class[120:] == c) + 120) for c in range(6)]
    per_set = [12, 12, 8, 5, 2, 1]  # 40 persons in the population's proportions
    fresh_stratified = [weighted_f1(pred, labels, np.isin(owner, np.concatenate(
        [pool[k * n:(k + 1) * n] for pool, n in zip(pools, per_set, strict=True)])).astype(float)[None], 6)[0, 0]
        for k in range(200)]  # 200: the rarer classes' pools hold enough persons for as many sets
    for stratified, fresh in ((True, fresh_stratified), (False, fresh_random)):
        mean, (low, high) = f1_on_new_set(pred[seen], labels[seen], owner[seen], 6, size=40, seed=0,
                                          stratified=stratified)
        assert np.mean([(low <= f1 <= high) for f1 in fresh]) >= 0.9
        assert abs(mean - np.mean(fresh)) < 0.03
    assert np.mean(fresh_stratified) - np.mean(fresh_random) > 0.02  # a random set misses rare classes
    large, _ = f1_on_new_set(pred[seen], labels[seen], owner[seen], 6, size=120, seed=0)
    assert f1_on_new_set(pred[seen], labels[seen], owner[seen], 6, size=40, stratified=False)[0] < large


def test_the_held_out_estimate_follows_each_set_and_its_interval_covers_its_score():
    """A model whose probabilities are right (each person's class drawn from them), six classes two of them rare,
    persons of seven images: the estimate read from 200 unlabelled sets of 40 persons against each set's own
    macro F1, its interval from the 120 labelled persons."""
    rng = np.random.default_rng(3)
    persons = 120 + 200 * 40
    logits = rng.normal(0, 1, (persons, 6))
    logits[np.arange(persons), rng.choice(6, size=persons, p=[0.3, 0.3, 0.2, 0.12, 0.05, 0.03])] += \
        rng.uniform(0.5, 4.0, persons)  # how sure the model is of each person
    belief = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    person_class = np.array([rng.choice(6, p=row) for row in belief])
    probs, labels, owner = np.repeat(belief, 7, axis=0), np.repeat(person_class, 7), np.repeat(np.arange(persons), 7)
    seen = owner < 120
    estimates, truths, inside = [], [], []
    for k in range(200):
        rows = owner // 40 == k + 3
        truth = weighted_f1(probs[rows].argmax(axis=1), labels[rows], np.ones((1, rows.sum())), 6)[0, 0]
        estimate, (low, high) = f1_on_held_out(probs[rows], probs[seen], labels[seen], owner[seen], 40, seed=0)
        estimates.append(estimate), truths.append(truth), inside.append(low <= truth <= high)
    assert np.mean(inside) >= 0.85  # 0.90 measured: the interval stands on 120 labelled persons
    assert abs(np.mean(estimates) - np.mean(truths)) < 0.02
    assert np.corrcoef(estimates, truths)[0, 1] > 0.25  # it reads the set, not the population (0.48 measured)


def test_submission_votes_over_every_fold_model_of_every_member(promoted):
    cfg, summary, _ = promoted
    result = predict_submission(cfg, log_to_wandb=False)
    expected = {f"{m['trial']}/fold-{f}" for m in summary["members"] for f in range(summary["folds"])}
    assert set(result["members"]) == expected
    submission = pd.read_csv(result["submission"])
    assert len(submission) == result["rows"] and submission["ans"].between(0, 17).all()
    assert (PromotionFolder.of(cfg).path / "eval_metrics.json").is_file()


def test_report_shows_the_promotion_the_audit_thumbnails_and_intervals(promoted):
    cfg, summary, deleted = promoted
    page = write_report(cfg).read_text()
    section = page[page.index('<section id="promotion">'):]
    section = section[:section.index("</section>")]
    assert f"{summary['cv_f1']:.4f}" in section
    issues = read_issues(PromotionFolder.of(cfg))
    assert section.count('src="data:image/jpeg;base64,') == min(len(issues), AUDIT_ROWS) > 0
    assert not external_references(page)
    frame = status(cfg)
    assert frame.loc[frame["trial"] == deleted, "objective_low"].isna().all()  # its predictions are gone
    trials = frame[frame["trial"] != deleted]
    assert trials[["objective_low", "objective_high"]].notna().all().all()
    assert ((trials["objective_low"] <= trials["objective"]) & (trials["objective"] <= trials["objective_high"])).all()
    assert trials.loc[trials["objective"].idxmax(), "tied_with_best"]
    assert 'data-figure="intervals"' in page


def test_rerun_trains_nothing_finished_and_retrains_a_deleted_fold(promoted):
    cfg, _, _ = promoted
    before, attempts = fold_files(cfg), len(companion(cfg).get_trials())
    promote(cfg)
    assert fold_files(cfg) == before and len(companion(cfg).get_trials()) == attempts

    config = int(PromotionFolder.of(cfg).summary()["configs"][-1]["trial"])
    shutil.rmtree(PromotionFolder.of(cfg).fold(config, 1).path)
    promote(cfg)
    after = fold_files(cfg)
    retrained = {name for name in after if before.get(name) != after[name]}
    assert retrained and {name.split("/")[0:2] == [f"trial-{config}", "fold-1"] for name in retrained} == {True}
    assert len(companion(cfg).get_trials()) == attempts + 1


@pytest.mark.parametrize("change, said", [({"promotion.folds": 3}, "folds 2 then, 3 now"),
                                          ({"promotion.top_k": 3}, "top_k 2 then, 3 now"),
                                          ({"promotion.min_epochs": 2}, "min_epochs 1 then, 2 now"),
                                          ({"promotion.epochs": "best"}, "epochs full then, best now")])
def test_resume_with_other_settings_is_refused_and_loses_nothing(promoted, change, said):
    cfg, _, _ = promoted
    before, attempts = fold_files(cfg), len(companion(cfg).get_trials())
    changed = load_study(REPO / "studies" / "default.yaml", smoke=True, overrides={
        **{key: str(value) for key, value in flat(cfg).items()}, **change})
    with pytest.raises(PromotionError, match=said) as error:
        promote(changed)
    assert "--restart" in str(error.value)
    assert fold_files(cfg) == before and len(companion(cfg).get_trials()) == attempts


def test_more_folds_than_the_smallest_stratum_has_persons_still_hold_every_person_out_once(promoted, tmp_path, caplog):
    cfg, _, _ = promoted
    more = load_study(REPO / "studies" / "default.yaml", smoke=True, overrides={
        **flat(cfg), "promotion.folds": 3, "runs_dir": str(tmp_path / "other-runs")})
    shutil.copytree(cfg.study_dir, more.study_dir, ignore=shutil.ignore_patterns("promotion", "wandb"))
    optuna.delete_study(study_name=companion_name(more), storage=default_storage(more))  # a study not promoted
    with caplog.at_level(logging.WARNING, logger="harness.data.split"):
        started, data, folds = open_promotion(more, None, progress=False)  # the plan only: nothing trained
    held_out = [set(data.frame["person"].iloc[f.valid]) for f in folds]
    assert len(folds) == 3 and sum(map(len, held_out)) == data.frame["person"].nunique() == len(set().union(*held_out))
    assert "3 folds, but these strata have fewer persons" in caplog.text and "promotion.folds: 2" in caplog.text
    assert len(Plan.of(started).pairs()) == 3 * len(Plan.of(started).configs)


@pytest.mark.slow
def test_promotion_killed_mid_fold_resumes_without_retraining_a_finished_fold(promoted):
    cfg, _, _ = promoted
    args = [sys.executable, "-m", "harness.cli", "promote", str(REPO / "studies" / "default.yaml"), "--smoke",
            *[f"--set={key}={value}" for key, value in flat(cfg).items()], "--set=search.heartbeat_s=1"]
    restart(cfg, None)  # discard the finished promotion: this one is killed on its way
    victim = subprocess.Popen(args, env=harness_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = PromotionFolder.of(cfg).fold(int(promoted[1]["configs"][0]["trial"]), 0)
    assert wait_for(first.path / "result.json", victim), victim.communicate()[0][-3000:]
    assert wait_for(PromotionFolder.of(cfg).fold(int(promoted[1]["configs"][0]["trial"]), 1).path / "last.pt", victim)
    os.killpg(victim.pid, signal.SIGKILL)  # inside the second fold, after its first epoch
    victim.wait()
    finished = (first.path / "result.json").stat().st_mtime_ns
    rerun = subprocess.run(args, env=harness_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (first.path / "result.json").stat().st_mtime_ns == finished
    trials = companion(cfg).get_trials()
    complete = sorted((t.user_attrs["config"], t.user_attrs["fold"]) for t in trials if t.state == TrialState.COMPLETE)
    assert len(complete) == len(set(complete)) == cfg.promotion.top_k * cfg.promotion.folds
    assert [t.state for t in trials].count(TrialState.FAIL) == 1  # the killed fold, retried once
    assert PromotionFolder.of(cfg).summary() is not None and "cv F1" in rerun.stdout


def flat(cfg) -> dict:
    return {"name": cfg.name, "runs_dir": str(cfg.runs_dir), "data.root": str(cfg.data.root),
            "data.cache_dir": str(cfg.data.cache_dir), "search.pruner.name": "none"}


# ----------------------------------------------------------------------------- label audit


def test_audit_finds_planted_errors_and_names_them_as_corrections_take_them(tmp_path):
    """Probabilities that are confident in the true labels: the flipped ones come first, in the given units."""
    frame = read_competition_train(write_competition(tmp_path / "data", people(12))).frame
    true = frame["label"].to_numpy()
    given = frame.copy()
    male, female = given["gender"] == 0, given["gender"] == 1
    flipped_person = given["person"].iloc[0]
    given.loc[given["person"] == flipped_person, "gender"] = 1 - given.loc[given["person"] == flipped_person, "gender"]
    flipped_image = given.index[(given["person"] == given["person"].iloc[7]) & (given["mask"] == 0)][0]
    given.loc[flipped_image, "mask"] = 2
    given["label"] = given["mask"] * 6 + given["gender"] * 3 + given["age"]
    assert male.any() and female.any()
    probs = np.full((len(frame), 18), 0.02 / 17)
    probs[np.arange(len(frame)), true] = 0.98
    folder = PromotionFolder(tmp_path / "promotion")
    folder.path.mkdir()
    result = audit_labels(probs, given, True, folder)
    issues = read_issues(folder)
    assert result["rows"] == len(issues) >= 2
    top = issues.head(2)
    assert set(top["task"]) == {"gender", "mask"}
    gender = top[top["task"] == "gender"].iloc[0]
    assert gender["target"] == flipped_person and gender["suggested"] == GENDER_NAMES[int(decode(true[0])[1])]
    mask = top[top["task"] == "mask"].iloc[0]
    assert mask["target"].startswith(f"{given['person'].iloc[7]}/") and mask["given"] == MASK_NAMES[2]
    assert list(issues.columns[:5]) == ["target", "task", "given", "suggested", "score"]
    assert issues["score"].astype(float).is_monotonic_increasing
    np.testing.assert_array_equal(labels_after(given, top, True), true)  # the two suggestions undo the two errors


def test_corrections_come_from_accepted_rows_and_keep_earlier_ones(tmp_path):
    cfg = smoke_config(tmp_path, "corrections")
    folder = PromotionFolder.of(cfg)
    folder.path.mkdir(parents=True)
    with pytest.raises(AuditError, match="run `harness promote` first"):
        write_corrections(cfg)
    rows = [("000001_male_Asian_22", "gender", "male", "female", 0.01, "yes"),
            ("000002_female_Asian_45/mask1.jpg", "mask", "wear", "incorrect", 0.02, ""),
            ("000003_female_Asian_63", "age", "old", "middle", 0.03, "x")]
    issues = pd.DataFrame(rows, columns=["target", "task", "given", "suggested", "score", "accept"])
    issues.to_csv(folder.file(folder.LABEL_ISSUES), index=False)
    path, count = write_corrections(cfg)
    written = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert count == 2 and written["target"].tolist() == ["000001_male_Asian_22", "000003_female_Asian_63"]
    assert written.iloc[0]["gender"] == "female" and written.iloc[1]["age"] == str(cfg.data.age_bounds[1] - 1)
    issues["accept"] = ""
    issues.to_csv(folder.file(folder.LABEL_ISSUES), index=False)
    with pytest.raises(AuditError, match="no row is accepted"):
        write_corrections(cfg)
    again = load_study(REPO / "studies" / "default.yaml", smoke=True, overrides={
        **flat(cfg), "data.corrections": str(path)})
    path, count = write_corrections(again, out=tmp_path / "round2.csv", top=1)
    assert count == 3 and pd.read_csv(path)["target"].tolist()[-1] == "000001_male_Asian_22"


# ----------------------------------------------------------------------------- intervals


def test_weighted_f1_is_sklearns_macro_f1_under_any_person_weighting():
    rng = np.random.default_rng(0)
    labels, persons = rng.integers(0, 5, 140), np.repeat(np.arange(20), 7)
    preds = np.where(rng.random((3, 140)) < 0.6, labels, rng.integers(0, 5, (3, 140)))
    weights = person_weights(persons, resamples=4, seed=1)
    got = weighted_f1(preds, labels, weights, 5)
    for k in range(3):
        for b in range(4):
            expected = f1_score(labels, preds[k], average="macro", labels=range(5), sample_weight=weights[b],
                                zero_division=0)
            assert got[k, b] == pytest.approx(expected)
    assert (weights.reshape(4, 20, 7).std(axis=2) == 0).all()  # a person's images are drawn together
    low, high = f1_interval(preds[0], labels, persons, 5)
    assert low < f1_score(labels, preds[0], average="macro") < high


def test_person_folds_hold_every_person_out_once_and_name_a_stratum_smaller_than_the_folds(tmp_path, caplog):
    frame = read_competition_train(write_competition(tmp_path / "data", people(30))).frame
    folds = person_folds(frame, 5, seed=0)
    held_out = [set(frame["person"].iloc[f.valid]) for f in folds]
    assert len(set().union(*held_out)) == 30 and sum(map(len, held_out)) == 30
    for fold in folds:  # every stratum is held out in every fold
        assert frame.iloc[fold.valid].groupby(["gender", "age"]).ngroups == 6
    with caplog.at_level(logging.WARNING, logger="harness.data.split"):
        folds = person_folds(frame, 6, seed=0)  # five persons per stratum: one fold misses each stratum
    held_out = [set(frame["person"].iloc[f.valid]) for f in folds]
    assert len(folds) == 6 and len(set().union(*held_out)) == 30 and sum(map(len, held_out)) == 30
    assert all(set(frame["person"].iloc[f.train]).isdisjoint(h) for f, h in zip(folds, held_out))
    assert "6 folds, but these strata have fewer persons" in caplog.text and "promotion.folds: 5" in caplog.text
    lonely = frame[~frame["person"].isin(frame.loc[(frame["gender"] == 1) & (frame["age"] == 2), "person"].unique()[1:])]
    with pytest.raises(ValueError, match=r"female old has a single person .* add persons to it"):
        person_folds(lonely, 2)
