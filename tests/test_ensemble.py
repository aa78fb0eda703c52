"""Promotion: greedy selection, the fast F1, honest scoring, candidates from a real study, prediction."""

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState, create_trial
from sklearn.metrics import f1_score

from harness.augment import build_transform, normalize_batch
from harness.config import StudyConfig, load_study
from harness.folders import TrialFolder
from harness.metrics import macro_f1_batch
from harness.predict import EvalImages, PredictError, load_member_model, member_params, member_probabilities, predict_submission
from harness.promotion.ensemble import EnsembleError, run_ensemble
from harness.promotion.selection import blend_score, greedy_selection, honest_scores, person_halves
from harness.study import run_study, trials_frame
from harness.tracking import ensemble_run_id, read_offline_run, study_key

REPO = Path(__file__).resolve().parents[1]
C = 18


# ------------------------------------------------------------------------------ helpers


def one_hot_probs(classes: np.ndarray, confidence: float, num_classes: int = C) -> np.ndarray:
    """(N, C): `confidence` on each row's class, the rest spread evenly."""
    probs = np.full((len(classes), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(classes)), classes] = confidence
    return probs


def noisy_log_probs(labels: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Log-probabilities whose argmax is the label on about `accuracy` of the rows, a wrong class elsewhere."""
    rng = np.random.default_rng(seed)
    wrong = (labels + rng.integers(1, C, len(labels))) % C
    predicted = np.where(rng.random(len(labels)) < accuracy, labels, wrong)
    return np.log(one_hot_probs(predicted, 0.6)).astype(np.float32)


def valid_index(persons: int = 8, per_person: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"image_id": f"img{p * per_person + i}", "person": f"p{p}", "label": int(rng.integers(0, C))}
            for p in range(persons) for i in range(per_person)]
    return pd.DataFrame(rows)


def write_trial_folder(folder: Path, index: pd.DataFrame, logits: np.ndarray, swapped: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "valid_logits.npy", logits)
    np.save(folder / "bgswap_logits.npy", swapped)
    index.to_csv(folder / "valid_index.csv", index=False)


def made_study(tmp_path: Path, trials: list[dict], **ensemble) -> StudyConfig:
    """A real SQLite Optuna study whose trials point at hand-written trial folders.

    Each trial: {"state": TrialState, "value": float | None, "accuracy": float, "gap": float, "index": frame}.
    """
    cfg = StudyConfig.model_validate({"name": "made", "runs_dir": str(tmp_path / "runs"),
                                      "tracking": {"mode": "disabled"}, "ensemble": {"rounds": 10, **ensemble}})
    cfg.study_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=cfg.name, storage=f"sqlite:///{cfg.study_dir / 'study.db'}",
                                direction="maximize")
    for number, spec in enumerate(trials):
        index = spec.get("index", valid_index())
        folder = cfg.study_dir / "trials" / str(number)
        labels = index["label"].to_numpy()
        write_trial_folder(folder, index, noisy_log_probs(labels, spec["accuracy"], seed=number),
                           noisy_log_probs(labels, spec.get("bgswap_accuracy", spec["accuracy"]), seed=100 + number))
        attrs = {"identity": number, "run_dir": str(folder), "gap_f1": spec.get("gap", 0.1)}
        state = spec["state"]
        study.add_trial(create_trial(state=state, value=spec.get("value"), user_attrs=attrs,
                                     intermediate_values={0: spec["value"]} if spec.get("value") else None))
    return cfg


COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL


# ------------------------------------------------------------------------ fast macro F1


@pytest.mark.parametrize("case", ["random", "few_classes_present", "all_wrong", "perfect", "one_class_predicted"])
def test_fast_macro_f1_equals_sklearn(case):
    rng = np.random.default_rng(7)
    n = 300
    labels = rng.integers(0, C, n)
    preds = rng.integers(0, C, (6, n))
    if case == "few_classes_present":
        labels, preds = rng.integers(0, 4, n), rng.integers(2, 7, (6, n))  # classes absent from either side
    elif case == "all_wrong":
        preds = (labels[None] + rng.integers(1, C, (6, n))) % C
    elif case == "perfect":
        preds = np.tile(labels, (6, 1))
    elif case == "one_class_predicted":
        preds = np.full((6, n), 3)
    expected = [f1_score(labels, p, average="macro", labels=range(C), zero_division=0) for p in preds]
    np.testing.assert_allclose(macro_f1_batch(preds, labels, C), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ greedy


def complementary_candidates(n: int = 120):
    """A knows the first half, B the second (each is confidently wrong on the other half); D is always wrong.

    Averaged, A and B are right everywhere; every single candidate is wrong on half the rows or more.
    """
    labels = np.arange(n) % C
    first = np.arange(n) < n // 2
    wrong = (labels + 1) % C

    def knows(rows):
        expert, guess = one_hot_probs(labels, 0.9), one_hot_probs(wrong, 0.5)
        guess[np.arange(n), labels] = 0.35  # the right class second
        guess /= guess.sum(axis=1, keepdims=True)
        return np.where(rows[:, None], expert, guess)

    bad = one_hot_probs((labels + 2) % C, 0.6)
    return np.stack([knows(first), knows(~first), bad]), labels


def test_greedy_finds_the_complementary_pair_and_drops_the_bad_candidate():
    probs, labels = complementary_candidates()
    singles = macro_f1_batch(probs.argmax(axis=2), labels, C)
    assert singles.max() < 0.6

    selection = greedy_selection({"valid": probs}, labels, rounds=10)

    assert selection.weights[0] > 0 and selection.weights[1] > 0 and selection.weights[2] == 0
    assert blend_score({"valid": probs}, labels, selection.weights) == 1.0
    assert selection.trajectory[0] == pytest.approx(singles.max())  # round one picks the best single
    assert selection.weights.sum() == selection.rounds_kept == 2  # rounds after the best score are dropped


def test_greedy_with_one_good_candidate_gives_it_all_the_weight():
    probs, labels = complementary_candidates()
    perfect = one_hot_probs(labels, 0.7)[None]
    selection = greedy_selection({"valid": np.concatenate([probs, perfect])}, labels, rounds=5)
    assert selection.weights.tolist() == [0, 0, 0, 1]


# ------------------------------------------------------------------------- honest score


def test_honest_score_never_selects_and_scores_on_the_same_sample():
    index = valid_index(persons=12, per_person=7)
    labels, persons = index["label"].to_numpy(), index["person"].to_numpy()
    n = len(labels)
    probs = np.zeros((1, n, C))
    probs[0, :, 0] = np.arange(n)  # each row carries its own id, so the callbacks can tell which rows they got
    selected, scored = [], []

    def recording_strategy(fit_views, fit_labels):
        selected.append(set(fit_views["valid"][0, :, 0].astype(int)))
        return np.ones(1)

    def recording_score(held_views, held_labels, weights):
        scored.append(set(held_views["valid"][0, :, 0].astype(int)))
        return 0.5

    halves = person_halves(labels, persons)
    result = honest_scores({"valid": probs}, labels, halves, {"rec": recording_strategy}, score=recording_score)

    assert len(selected) == len(scored) == 2 and result["rec"] == 0.5
    everything = set(range(n))
    for fit, held in zip(selected, scored, strict=True):
        assert not fit & held and fit | held == everything
        assert not set(persons[list(fit)]) & set(persons[list(held)])  # grouped by person
    assert not scored[0] & scored[1] and scored[0] | scored[1] == everything  # each row scored exactly once


def test_honest_halves_are_stratified_and_deterministic():
    index = valid_index(persons=20, per_person=7, seed=3)
    labels, persons = index["label"].to_numpy(), index["person"].to_numpy()
    first, again = person_halves(labels, persons, seed=0), person_halves(labels, persons, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert abs(len(first[0][0]) - len(first[0][1])) <= 7 * 2
    assert person_halves(labels[:7], persons[:7]) == []  # one person: no honest score possible
    unique_labels = np.arange(14)  # every class once: nothing to stratify on, still split by person
    tiny = person_halves(unique_labels, persons[:14])
    assert [(len(fit), len(held)) for fit, held in tiny] == [(7, 7), (7, 7)]
    assert not set(persons[tiny[0][0]]) & set(persons[tiny[0][1]])


# --------------------------------------------------------------------------- candidates


def test_pruned_and_failed_trials_are_never_selected(tmp_path, capsys):
    cfg = made_study(tmp_path, [
        {"state": COMPLETE, "value": 0.40, "accuracy": 0.4},
        {"state": PRUNED, "value": 0.99, "accuracy": 1.0},  # the best logits and the best value, but pruned
        {"state": FAIL, "accuracy": 1.0},
        {"state": COMPLETE, "value": 0.55, "accuracy": 0.55},
        {"state": COMPLETE, "value": 0.50, "accuracy": 0.5, "gap": 0.9},  # left out by max_gap
    ], top_k=5, max_gap=0.5)

    summary = run_ensemble(cfg)

    assert summary["candidates"] == [3, 0]  # complete, within max_gap, by val F1
    assert {m["trial"] for m in summary["members"]} <= {0, 3}
    members = json.loads((cfg.study_dir / "ensemble" / "members.json").read_text())
    assert members["candidates"] == 2 and members["rounds"] == 10
    assert all(isinstance(m["weight"], int) and m["weight"] > 0 for m in members["members"])
    assert "honest" in capsys.readouterr().out


def test_a_single_complete_trial_is_an_ensemble_of_one_with_a_note(tmp_path, capsys):
    cfg = made_study(tmp_path, [{"state": PRUNED, "value": 0.9, "accuracy": 0.9},
                                {"state": COMPLETE, "value": 0.5, "accuracy": 0.5}])
    summary = run_ensemble(cfg)
    members = json.loads((cfg.study_dir / "ensemble" / "members.json").read_text())
    assert [(m["trial"], m["weight"]) for m in members["members"]] == [(1, 1)]
    assert "only one complete trial" in members["note"] and summary["note"] == members["note"]
    assert "only one complete trial" in capsys.readouterr().out
    metrics = json.loads((cfg.study_dir / "ensemble" / "metrics.json").read_text())
    honest = metrics["honest"]
    assert honest["best_single"] == honest["average_top_k"] == honest["greedy"]  # one member: all the same


def test_ensemble_charts_name_the_classes_the_study_stored(tmp_path):
    """Image-folder or CSV data: the W&B confusion chart of the ensemble uses the study's stored class names."""
    names = [f"kind-{i}" for i in range(C)]
    cfg = made_study(tmp_path, [{"state": COMPLETE, "value": 0.5, "accuracy": 0.6},
                                {"state": COMPLETE, "value": 0.4, "accuracy": 0.5}])
    cfg = cfg.replace({"tracking.mode": "offline"})
    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{cfg.study_dir / 'study.db'}")
    study.set_user_attr("data_summary", {"class_names": names})
    run_ensemble(cfg)
    run = read_offline_run(cfg.study_dir / "wandb", ensemble_run_id(study_key(cfg)))
    table = run["tables"]["ensemble/confusion_table"]
    assert {row[table["columns"].index("Actual")] for row in table["data"]} == set(names)


@pytest.mark.parametrize("method", ["best_single", "average_top_k", "greedy"])
def test_ensemble_method_chooses_the_members_weights(tmp_path, method):
    cfg = made_study(tmp_path, [{"state": COMPLETE, "value": 0.6, "accuracy": 0.7},
                                {"state": COMPLETE, "value": 0.5, "accuracy": 0.6},
                                {"state": COMPLETE, "value": 0.4, "accuracy": 0.5}], method=method)
    summary = run_ensemble(cfg)
    weights = {m["trial"]: m["weight"] for m in summary["members"]}
    if method == "best_single":
        assert weights == {0: 1}
    elif method == "average_top_k":
        assert weights == {0: 1, 1: 1, 2: 1}
    else:
        assert 0 in weights and sum(weights.values()) >= 1
    assert json.loads((cfg.study_dir / "ensemble" / "members.json").read_text())["method"] == method


def test_the_ensemble_optimises_the_studys_objective(tmp_path):
    """Trial 0 is best on valid but reads the background (poor on swapped backgrounds); trial 1 is robust."""
    cfg = made_study(tmp_path, [{"state": COMPLETE, "value": 0.55, "accuracy": 0.9, "bgswap_accuracy": 0.2},
                                {"state": COMPLETE, "value": 0.6, "accuracy": 0.7, "bgswap_accuracy": 0.7}],
                     method="best_single")
    robust = run_ensemble(cfg.replace({"search.objective": "robust/f1"}))
    assert [m["trial"] for m in robust["members"]] == [1] and robust["metrics"]["objective"] == "robust/f1"
    plain = run_ensemble(cfg.replace({"search.objective": "val/f1"}))
    assert [m["trial"] for m in plain["members"]] == [0]


def test_different_valid_rows_are_a_clear_error_naming_the_trials(tmp_path):
    other = valid_index(seed=1)
    cfg = made_study(tmp_path, [{"state": COMPLETE, "value": 0.5, "accuracy": 0.5},
                                {"state": COMPLETE, "value": 0.4, "accuracy": 0.4, "index": other}])
    with pytest.raises(EnsembleError, match=r"trials \[1\] have a valid_index.csv different from trial 0's"):
        run_ensemble(cfg)


def test_no_complete_trial_and_no_ensemble_yet_are_clear_errors(tmp_path):
    cfg = made_study(tmp_path, [{"state": PRUNED, "value": 0.9, "accuracy": 0.9}])
    with pytest.raises(EnsembleError, match="no complete trial to promote"):
        run_ensemble(cfg)
    with pytest.raises(PredictError, match="run `harness ensemble` first"):  # predicting has its own error type
        predict_submission(cfg)
    with pytest.raises(PredictError, match="--tta 'vflip'"):
        predict_submission(cfg, tta="vflip")


# ------------------------------------------------------------------- end to end, real study


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    """One smoke study (3 tiny trials) for all end-to-end tests; the same overrides as conftest's smoke_study."""
    runs = tmp_path_factory.mktemp("ensemble-study")
    cfg = load_study(REPO / "studies" / "default.yaml", smoke=True, overrides={
        "runs_dir": str(runs / "runs"), "data.root": str(shared_data / "default" / "data"),
        "data.cache_dir": str(shared_data / "cache"), "search.pruner.name": "none"})
    study = run_study(cfg, progress=False)
    return cfg, trials_frame(study)


@pytest.fixture(scope="module")
def ensembled(trained):
    cfg, frame = trained
    return cfg, frame, run_ensemble(cfg)


def test_ensemble_of_a_real_study_writes_its_files(ensembled):
    cfg, frame, summary = ensembled
    out = cfg.study_dir / "ensemble"
    members = json.loads((out / "members.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    complete = set(frame.loc[frame["state"] == "complete", "trial"])
    assert {m["trial"] for m in members["members"]} <= complete and members["members"]
    assert 1 <= sum(m["weight"] for m in members["members"]) <= cfg.ensemble.rounds
    assert set(members["members"][0]) == {"trial", "weight", "objective", "val_f1", "gap_f1", "run_dir"}
    assert {"best_single", "average_top_k", "greedy"} <= set(metrics["honest"]) and len(metrics["honest"]["halves"]) == 2
    n = metrics["n_valid"]
    probs = np.load(out / "valid_probs.npy")
    assert probs.shape == (n, C) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert np.load(out / "confusion.npy").sum() == n and np.load(out / "per_class_f1.npy").shape == (C,)
    assert metrics["objective"] == cfg.search.objective == "robust/f1"
    assert metrics["fitted_on_all_valid"]["greedy"] >= metrics["fitted_on_all_valid"]["best_single"]
    best = frame.loc[frame["state"] == "complete", "objective"].max()
    assert metrics["fitted_on_all_valid"]["best_single"] == pytest.approx(best)  # stored logits = Optuna's value

    run = read_offline_run(cfg.study_dir / "wandb", ensemble_run_id(study_key(cfg)))
    assert run["job_type"] == "ensemble"
    assert run["summary"]["honest/greedy"] == pytest.approx(metrics["honest"]["greedy"])


def test_predict_writes_a_submission_in_info_order_and_scores_eval(ensembled, capsys):
    cfg, _, summary = ensembled
    result = predict_submission(cfg)

    submission = pd.read_csv(cfg.study_dir / "submission.csv", dtype={"ImageID": str})
    info = pd.read_csv(Path(cfg.data.root) / "eval" / "info.csv", dtype={"ImageID": str})
    assert list(submission.columns) == ["ImageID", "ans"]
    assert submission["ImageID"].tolist() == info["ImageID"].tolist()
    assert submission["ans"].between(0, C - 1).all()
    assert 0.0 <= result["eval_f1"] <= 1.0
    assert set(result["member_eval_f1"]) == {str(m["trial"]) for m in summary["members"]}
    assert "eval macro F1" in capsys.readouterr().out
    saved = json.loads((cfg.study_dir / "ensemble" / "eval_metrics.json").read_text())
    assert saved["eval_f1"] == pytest.approx(result["eval_f1"])
    run = read_offline_run(cfg.study_dir / "wandb", ensemble_run_id(study_key(cfg)))
    assert run["summary"]["eval/f1"] == pytest.approx(result["eval_f1"])
    assert "honest/greedy" in run["summary"]  # the eval figures joined the same run


def test_predict_one_trial_gives_that_trials_probabilities(ensembled):
    cfg, _, summary = ensembled
    trial = summary["members"][0]["trial"]
    ensemble = predict_submission(cfg, log_to_wandb=False)
    single = predict_submission(cfg, trial=trial)

    submission = pd.read_csv(cfg.study_dir / f"submission-trial-{trial}.csv")
    assert len(submission) == single["rows"] and submission["ans"].between(0, C - 1).all()
    np.testing.assert_allclose(single["probs"], ensemble["member_probs"][str(trial)], atol=1e-6)
    assert single["member_eval_f1"] == {str(trial): single["eval_f1"]}


def test_hflip_tta_averages_the_image_and_its_mirror(ensembled):
    cfg, _, summary = ensembled
    folder = TrialFolder(summary["members"][0]["run_dir"])
    model = load_member_model(folder, member_params(folder, cfg), cfg)
    images = np.asarray(EvalImages(cfg).cache.images[:20])

    plain = member_probabilities(model, images)
    mirrored = member_probabilities(model, np.ascontiguousarray(images[:, :, ::-1]))
    with_tta = member_probabilities(model, images, tta="hflip")

    np.testing.assert_allclose(with_tta, (plain + mirrored) / 2, atol=1e-5)
    assert not np.allclose(plain, mirrored, atol=1e-4)  # the mirror really is another view


def test_normalize_batch_is_the_eval_transform():
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 30, 3), dtype=np.uint8)
    transform = build_transform(0.0, 40, 30, train=False)
    expected = torch.stack([transform(image) for image in images])
    assert torch.equal(normalize_batch(images), expected)


def test_eval_images_are_preprocessed_as_members_were_trained(trained):
    cfg, _ = trained
    images = EvalImages(cfg)
    assert images.for_preprocess("none")[0] is images.cache.images
    alone, rows = images.for_preprocess("remove_background")
    assert alone.shape == images.cache.images.shape and len(rows) == len(images.frame)
    # the eval images' faces and person masks were found once and kept beside their decoded cache
    assert list(Path(cfg.data.cache_dir).glob(f"{images.cache.key}.fg*.masks.npy"))
    assert images.for_preprocess("remove_background")[0] is alone  # made once per method
