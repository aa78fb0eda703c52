"""`harness promote STUDY.yaml`: the best configurations retrained on K person-grouped folds, as winning teams
built their ensembles.

A single valid split of a few dozen persons ranks trials mostly by noise, and successive halving leaves one or
two complete trials. Promotion takes the top `promotion.top_k` configurations by the study's objective, pruned
trials that reached a late rung (`promotion.min_epochs`) included, and trains each on `promotion.folds`
person-grouped, stratified folds of ALL labelled persons (train and valid), full epochs, no pruning. Every
(configuration, fold) run is a trial of a companion Optuna study (`<study>-promotion`, in the same storage),
so resuming after a kill, heartbeats, `--workers`, PostgreSQL and W&B (job_type "fold", grouped by
configuration) are the search's own machinery; run the same command again and nothing finished is retrained.

Each fold keeps its last epoch's model and its log-probabilities on its held-out persons: together, an
out-of-fold prediction for every labelled image from a model that never trained on that person. On them:

    the ensemble   ensemble.method maximising search.objective over the configurations, scored honestly:
                   each person's prediction comes from weights chosen on the other half of the persons
    cv_f1          macro F1 of those predictions, with a person-bootstrap 95% interval; each member's too
                   (one fold model per image), and on the labels after the audit's corrections
    the audit      harness.promotion.audit: label issues per task with cleanlab (label_issues.csv)
    the estimate   what the submission should score on its held-out set (submission_estimate): read from the
                   submitted fold models' own probabilities on the held-out images (the expected confusion
                   matrix of their average, given back the fold models' own confidence), its interval from
                   how far that reading misses on out-of-fold sets of as many persons; beside it the same
                   predictions on draws of as many persons as the held-out set has (a new set like the
                   labelled one), on the given and the corrected labels; shown first
                   (make promote, make status, report, W&B)

runs/<study>/promotion/ holds summary.json, the folds' folders (trial-<n>/fold-<k>/, each a TrialFolder) and
the audit; `harness predict` then uses every fold model of every member.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd

from harness.config import Params, StudyConfig
from harness.data.prepare import PreparedData, prepare_data
from harness.data.readers import DataError
from harness.data.split import person_folds, split_hash
from harness.folders import EnsembleFolder, PromotionFolder, objective_files
from harness.io import json_ready
from harness.metrics import OBJECTIVES, macro_f1
from harness.promotion.ensemble import Stacked, top_trials
from harness.promotion.selection import METHODS, blend, held_out_weights, person_halves, strategies
from harness.runtime import (
    IDENTITY_ATTR,
    RecordAsFailed,
    StudyError,
    default_storage,
    load_existing_study,
    open_storage,
    redact,
    run_trials,
    run_workers,
    trial_identity,
)
from harness.store import forget_tree
from harness.study import store_result, trials_frame
from harness.uncertainty import expected_f1, f1_interval, f1_on_held_out, f1_on_new_set, undiluted

log = logging.getLogger("harness.promotion")
SETTINGS = ("folds", "top_k", "min_epochs", "epochs", "fold_hash")  # a resume must find these as they were
EARLIER = {"epochs": "full"}  # what a promotion started before a setting existed ran with


class PromotionError(StudyError):
    """A promotion that cannot start or resume as asked; the message says what to do."""


def companion_name(cfg: StudyConfig) -> str:
    return f"{cfg.name}-promotion"


def min_epochs(cfg: StudyConfig) -> int:
    """Epochs a pruned trial must have trained to be promotable (a late rung): the study file's, else half."""
    return cfg.promotion_min_epochs


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What a promotion trains, fixed when it starts: configurations (source trials, best first), their
    params and figures on the single split, the folds, and the epochs of each configuration's fold runs."""

    configs: list[int]
    params: dict[int, dict]
    single_split: dict[int, dict]
    folds: int
    epochs: dict[int, int]

    def pairs(self) -> list[tuple[int, int]]:
        """Every (configuration, fold) the promotion trains, in plan order."""
        return [(config, fold) for config in self.configs for fold in range(self.folds)]

    @classmethod
    def of(cls, companion: optuna.Study) -> Plan:
        stored = companion.user_attrs["plan"]
        configs = [int(c) for c in stored["configs"]]
        epochs = {int(k): int(v) for k, v in stored.get("epochs", {}).items()}  # none stored: the recipe's own
        return cls(configs, {int(k): v for k, v in stored["params"].items()},
                   {int(k): v for k, v in stored["single_split"].items()}, int(stored["folds"]), epochs)

    def fold_config(self, cfg: StudyConfig, config: int) -> StudyConfig:
        """The study's settings for a fold run of `config`: its epochs where the plan cut them."""
        epochs = self.epochs.get(config, cfg.train.epochs)
        return cfg if epochs == cfg.train.epochs else cfg.replace({"train.epochs": epochs})


def choose_configs(cfg: StudyConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """The top_k trials by objective among the complete ones and the pruned ones that trained min_epochs."""
    return top_trials(frame, cfg.promotion.top_k, pruned_after=min_epochs(cfg))


def open_promotion(cfg: StudyConfig, storage: str | None, progress: bool = True
                   ) -> tuple[optuna.Study, PreparedData, list]:
    """The companion study, created with its plan (every configuration x fold enqueued) or resumed; refused
    when a resume would change the folds, top_k or the persons of the folds."""
    url = storage or default_storage(cfg)
    main = load_existing_study(cfg, storage)
    settings = {"folds": cfg.promotion.folds, "top_k": cfg.promotion.top_k, "min_epochs": min_epochs(cfg),
                "epochs": cfg.promotion.epochs}
    _refuse_changed_settings(cfg, _stored_settings(cfg, url), settings)  # before the data: the cheap check first
    data = prepare_data(cfg, progress=progress)
    try:
        folds = person_folds(data.frame, cfg.promotion.folds, seed=cfg.seed)
    except ValueError as error:
        raise PromotionError(f"promotion.folds: {error}") from None
    companion = optuna.create_study(study_name=companion_name(cfg), storage=open_storage(url, cfg.search.heartbeat_s),
                                    direction="maximize", load_if_exists=True, pruner=optuna.pruners.NopPruner())
    settings["fold_hash"] = split_hash([s.hash for s in folds], [])
    if "plan" not in companion.user_attrs:
        _create_plan(cfg, main, companion, settings)
        log.info("promotion of study %r started in %s", cfg.name, redact(url))
    else:
        _check_resume(cfg, companion, settings, main)
    moved = PromotionFolder.of(cfg).adopt_identity(companion.user_attrs.get(IDENTITY_ATTR))
    if moved is not None:
        log.warning("%s held the fold models of an earlier promotion; moved to %s so that none of them enters this "
                    "one", PromotionFolder.of(cfg).path, moved)
    return companion, data, folds


def _create_plan(cfg: StudyConfig, main: optuna.Study, companion: optuna.Study, settings: dict) -> None:
    frame = trials_frame(main)
    chosen = choose_configs(cfg, frame)
    if chosen.empty:
        raise PromotionError(f"study {cfg.name!r} has no trial to promote: none is complete or was pruned after "
                             f"{min_epochs(cfg)} epochs (promotion.min_epochs); run `harness study` first")
    finished = {t.user_attrs.get("identity", t.number): t for t in main.get_trials(deepcopy=False)}
    params = {int(c): cfg.params.replace(**finished[c].params).model_dump(mode="json") for c in chosen["trial"]}
    single = {int(row.trial): {"state": row.state, "objective": row.objective, "val_f1": row.val_f1,
                               "val_f1_bgswap": row.val_f1_bgswap, "epochs": int(row.epochs)}
              for row in chosen.itertuples()}
    plan = {"configs": [int(c) for c in chosen["trial"]], "params": params, "single_split": single,
            "folds": cfg.promotion.folds, "epochs": fold_epochs(cfg, chosen)}
    position = 0
    for config in plan["configs"]:
        for fold in range(cfg.promotion.folds):
            companion.enqueue_trial({}, user_attrs={"identity": position, "config": config, "fold": fold})
            position += 1
    settings = {**settings, IDENTITY_ATTR: companion.user_attrs.get(IDENTITY_ATTR) or uuid.uuid4().hex[:12]}
    for key, value in settings.items():
        companion.set_user_attr(key, value)
    companion.set_user_attr("plan", json_ready(plan))  # last: the mark of a promotion set up completely


def fold_epochs(cfg: StudyConfig, chosen: pd.DataFrame) -> dict[int, int]:
    """Epochs of each configuration's fold runs: train.epochs, or with promotion.epochs "best" the epochs up to its
    best epoch on the single split (at least min_epochs: the late rung a pruned trial is promoted after)."""
    if cfg.promotion.epochs == "full":
        return {int(row.trial): cfg.train.epochs for row in chosen.itertuples()}
    return {int(row.trial): min(cfg.train.epochs, max(int(row.best_epoch), min_epochs(cfg)))
            for row in chosen.itertuples()}


def _stored_settings(cfg: StudyConfig, url: str) -> dict | None:
    """The settings a promotion of this study started with, or None when none has started."""
    try:
        stored = optuna.load_study(study_name=companion_name(cfg), storage=open_storage(url, cfg.search.heartbeat_s))
    except KeyError:
        return None
    return stored.user_attrs if "plan" in stored.user_attrs else None


def started_settings(cfg: StudyConfig, storage: str | None) -> dict | None:
    """The promotion settings a started promotion of this study runs with, as overrides (a budget resumes it with
    them rather than size it again); None when none has started."""
    stored = _stored_settings(cfg, storage or default_storage(cfg))
    if stored is None:
        return None
    return {"promotion.folds": stored["folds"], "promotion.top_k": stored["top_k"],
            "promotion.min_epochs": stored["min_epochs"], "promotion.epochs": stored.get("epochs", EARLIER["epochs"])}


def _check_resume(cfg: StudyConfig, companion: optuna.Study, settings: dict, main: optuna.Study) -> None:
    _refuse_changed_settings(cfg, companion.user_attrs, settings)
    planned = Plan.of(companion).configs
    now = [int(c) for c in choose_configs(cfg, trials_frame(main))["trial"]]
    if now != planned:
        log.warning("the study's best trials are now %s; the promotion resumes with the ones chosen when it "
                    "started, %s (`--restart` chooses again)", now, planned)


def _refuse_changed_settings(cfg: StudyConfig, stored: dict | None, settings: dict) -> None:
    if stored is None:
        return
    then = {key: stored.get(key, EARLIER.get(key)) for key in SETTINGS}
    changed = [f"{key} {then[key]} then, {settings[key]} now" for key in SETTINGS
               if key in settings and then[key] != settings[key]]
    if changed:
        raise PromotionError(
            f"the promotion of study {cfg.name!r} was started with other settings ({'; '.join(changed)}); resuming "
            f"would mix folds. Set promotion: back as it was to resume it, or run `harness promote "
            f"<study file> --restart` to discard it ({PromotionFolder.of(cfg).path} and the study {companion_name(cfg)!r}).")


def trained_pairs(cfg: StudyConfig, companion: optuna.Study) -> set[tuple[int, int]]:
    """The (configuration, fold) pairs with a complete trial whose fold folder still holds its predictions."""
    complete = {(int(t.user_attrs["config"]), int(t.user_attrs["fold"])) for t in companion.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE and "config" in t.user_attrs}
    return {pair for pair in complete if PromotionFolder.of(cfg).fold(*pair).has(objective_files(cfg))}


def _lost_pairs(cfg: StudyConfig, companion: optuna.Study) -> int:
    """Complete fold trials whose folder was deleted since: each needs one more trial to train it again."""
    complete = [t for t in companion.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE and "config" in t.user_attrs]
    return sum(not PromotionFolder.of(cfg).fold(int(t.user_attrs["config"]), int(t.user_attrs["fold"]))
               .has(objective_files(cfg)) for t in complete)


def restart(cfg: StudyConfig, storage: str | None) -> None:
    """Discard a promotion: its companion study and its folder (the study itself is untouched)."""
    url = storage or default_storage(cfg)
    storage_ = open_storage(url, cfg.search.heartbeat_s)
    try:
        identity = optuna.load_study(study_name=companion_name(cfg), storage=storage_).user_attrs.get(IDENTITY_ATTR)
        optuna.delete_study(study_name=companion_name(cfg), storage=storage_)
    except KeyError:
        identity = None
    forget_tree(cfg, PromotionFolder.of(cfg).path, identity)  # its fold models in the store, on every machine
    shutil.rmtree(PromotionFolder.of(cfg).path, ignore_errors=True)


# ------------------------------------------------------------------------------ the folds


class FoldObjective:
    """One (configuration, fold) trial of the companion study: train on the other folds, keep the last epoch."""

    def __init__(self, cfg: StudyConfig, data: PreparedData, folds: list, plan: Plan) -> None:
        self.cfg, self.data, self.folds, self.plan = cfg, data, folds, plan

    def __call__(self, trial: optuna.Trial) -> float:
        from harness.study import EpochPrinter
        from harness.tracking import TrialTracker
        from harness.train import run_trial

        if "config" not in trial.user_attrs:  # not from the plan's queue: a failed or lost fold's retry
            for key, value in zip(("config", "fold"), self._next_needed(trial)):
                trial.set_user_attr(key, value)
        identity = trial_identity(trial)
        config, fold = int(trial.user_attrs["config"]), int(trial.user_attrs["fold"])
        params = Params.model_validate(self.plan.params[config])
        cfg = self.plan.fold_config(self.cfg, config)
        folder = PromotionFolder.of(self.cfg).fold(config, fold)
        trial.set_user_attr("run_dir", str(folder.path))
        extra = {"config": config, "fold": fold, "folds": self.plan.folds, "fold_split_hash": self.folds[fold].hash}
        started = time.perf_counter()
        with TrialTracker(cfg, identity, params, extra, fold=(config, fold)) as tracker:
            progress = EpochPrinter(f"trial {config} fold {fold}", cfg.train.epochs, started)
            result = run_trial(cfg, params, data=self.data.with_split(self.folds[fold]), run_dir=folder.path,
                               on_resume=tracker.catch_up, keep="last",
                               on_epoch=lambda row: (tracker.log_epoch(row), progress(row)))
            tracker.finish(result, folder.confusion(), list(self.data.frame.attrs["class_names"]))
        store_result(trial, result)
        print(f"trial {config} fold {fold}: {result.summary()}", flush=True)
        if result.state != "complete":
            raise RecordAsFailed(result.reason or result.state)
        return result.objective

    def _next_needed(self, trial: optuna.Trial) -> tuple[int, int]:
        """A pair that is neither trained nor in another process's hands; two processes retrying at once
        start apart (by trial number) when more than one pair is needed."""
        busy = {(t.user_attrs.get("config"), t.user_attrs.get("fold")) for t in trial.study.get_trials(deepcopy=False)
                if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
                and t.number != trial.number}
        trained = trained_pairs(self.cfg, trial.study)
        needed = [pair for pair in self.plan.pairs() if pair not in trained and pair not in busy]
        if not needed:
            raise RecordAsFailed("every fold of the promotion is trained or being trained")
        return needed[trial.number % len(needed)]


def train_folds(cfg: StudyConfig, trials: int | None = None, timeout: float | None = None,
                storage: str | None = None, progress: bool = True, track_study: bool = True) -> optuna.Study:
    """Train every (configuration, fold) of the promotion that is not finished (also a `--workers` worker)."""
    companion, data, folds = open_promotion(cfg, storage, progress)
    plan = Plan.of(companion)
    target = len(plan.pairs()) + _lost_pairs(cfg, companion)  # a fold whose folder was deleted trains again
    from harness.tracking import settle_parked

    try:
        run_trials(companion, FoldObjective(cfg, data, folds, plan), target, cfg, timeout)
    finally:
        settle_parked()  # the fold runs that ended before W&B's answer came
    return companion


def _prepare_folds(cfg: StudyConfig, storage: str | None, progress: bool):
    companion, _, _ = open_promotion(cfg, storage, progress)
    return companion, None


def promote(cfg: StudyConfig, storage: str | None = None, workers: int = 1, timeout: float | None = None) -> dict:
    """Train the folds (in `workers` processes), then the out-of-fold ensemble, its honest score and the audit."""
    started = time.perf_counter()
    if workers > 1:
        run_workers(cfg, workers, timeout=timeout, storage=storage, run=train_folds, prepare=_prepare_folds)
    else:
        train_folds(cfg, timeout=timeout, storage=storage)
    summary = summarize(cfg, storage)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    PromotionFolder.of(cfg).write_summary(summary)
    print(summary_table(summary))
    log_summary(cfg, summary)
    return summary


def log_summary(cfg: StudyConfig, summary: dict) -> str | None:
    """The promotion's W&B run: the estimate of the submission first, the figures it was made from beside it."""
    from harness.tracking import log_promotion

    estimate, fixed = summary["estimate"], summary["estimate"]["corrected_labels"]
    metrics = {"estimate/f1": estimate["f1"], "estimate/low": estimate["ci95"][0], "estimate/high": estimate["ci95"][1],
               "estimate/persons": estimate["persons"], "estimate/basis": estimate.get("basis", "new set"),
               "estimate/new_set_f1": estimate.get("new_set", estimate)["f1"], "estimate/corrected_labels_f1": fixed["f1"],
               **({"estimate/f1_as_averaged": estimate["dilution"]["f1_as_averaged"],
                   "estimate/temperature": estimate["dilution"]["temperature"]} if "dilution" in estimate else {}),
               "cv_f1": summary["cv_f1"], "cv_f1/low": summary["cv_f1_ci95"][0], "cv_f1/high": summary["cv_f1_ci95"][1],
               "cv_f1/corrected_labels": summary["cv_f1_corrected_labels"],
               "corrected_labels": summary["corrected_labels"], "label_issues": summary["label_issues"]["rows"],
               "folds": summary["folds"], "n_persons": summary["n_persons"]}
    configurations = pd.DataFrame([{"trial": c["trial"], "weight": c["weight"], "one_fold_model_cv_f1": c["cv_f1"],
                                    "low": c["cv_f1_ci95"][0], "high": c["cv_f1_ci95"][1],
                                    "single_split_objective": c["single_split"]["objective"]}
                                   for c in summary["configs"]])
    return log_promotion(cfg, configurations, metrics, extra_config={"promotion": cfg.promotion.model_dump(mode="json")})


# ------------------------------------------------------------------------ out of fold


def out_of_fold(cfg: StudyConfig, plan: Plan, data: PreparedData, views: tuple[str, ...]) -> Stacked:
    """Every labelled image's held-out probabilities from each configuration (the fold that held it out),
    with the labelled images' index (path, person, image_id, labels) as the frame."""
    rows_of_image = {image: row for row, image in enumerate(data.frame["image_id"])}
    count = len(data.frame)
    arrays = {view: None for view in views}
    for m, config in enumerate(plan.configs):
        for fold in range(plan.folds):
            folder = PromotionFolder.of(cfg).fold(config, fold)
            if not folder.has(objective_files(cfg)):
                raise PromotionError(f"{folder.path}: fold {fold} of trial {config} has no held-out predictions; "
                                     "run `harness promote` again to train it")
            rows = np.array([rows_of_image[image] for image in folder.valid_index()["image_id"]])
            for view in views:
                values = np.exp(folder.view_log_probs(view).astype(np.float64))
                if arrays[view] is None:
                    arrays[view] = np.full((len(plan.configs), count, values.shape[1]), np.nan)
                arrays[view][m, rows] = values
    missing = np.isnan(arrays[views[0]]).any(axis=(0, 2))
    if missing.any():
        raise PromotionError(f"{int(missing.sum())} labelled images have no held-out prediction; the folds do not "
                             "cover the data (did the data change since the promotion started?)")
    return Stacked(arrays, data.frame["label"].to_numpy(), data.frame["person"].to_numpy(), data.frame)


def summarize(cfg: StudyConfig, storage: str | None = None) -> dict:
    """The out-of-fold ensemble, its honest cross-validated score, each member's, and the label audit."""
    from harness.promotion.audit import audit_labels, labels_after, read_issues

    url = storage or default_storage(cfg)
    companion = optuna.load_study(study_name=companion_name(cfg), storage=open_storage(url, cfg.search.heartbeat_s))
    plan = Plan.of(companion)
    missing = [pair for pair in plan.pairs() if pair not in trained_pairs(cfg, companion)]
    if missing:
        raise PromotionError(f"{len(missing)} fold run(s) are not trained (configuration, fold: "
                             f"{', '.join(f'{c}, {f}' for c, f in missing)}); run `harness promote` again")
    objective = OBJECTIVES.get(cfg.search.objective)
    data = prepare_data(cfg, progress=False)
    oof = out_of_fold(cfg, plan, data, tuple(dict.fromkeys(("valid", *objective.views))))
    method, rounds = METHODS.get(cfg.ensemble.method), cfg.ensemble.rounds
    num_classes = oof.num_classes
    honest = np.empty(len(oof.labels), dtype=np.int64)
    halves = person_halves(oof.labels, oof.persons, seed=cfg.seed)
    select = strategies(rounds, objective)[cfg.ensemble.method]
    for _, held, weights in held_out_weights(oof.views, oof.labels, halves, select):
        honest[held] = blend(oof.probs[:, held], weights).argmax(axis=1)  # weights chosen without these persons
    chosen = method.select(oof.views, oof.labels, rounds, objective)
    probs = blend(oof.probs, chosen.weights)
    members = []
    for m, config in enumerate(plan.configs):
        own = oof.probs[m].argmax(axis=1)
        members.append({"trial": config, "weight": int(chosen.weights[m]),
                        "cv_f1": macro_f1(own, oof.labels, num_classes),
                        "cv_f1_ci95": list(f1_interval(own, oof.labels, oof.persons, num_classes, seed=cfg.seed)),
                        "single_split": plan.single_split[config]})
    audit = audit_labels(probs, oof.frame, data.tasks, PromotionFolder.of(cfg))
    corrected = labels_after(oof.frame, read_issues(PromotionFolder.of(cfg)), data.tasks)
    ensemble = EnsembleFolder.of(cfg).read()[0].get("metrics") or {}
    summary = {
        "folds": plan.folds, "method": cfg.ensemble.method, "objective": cfg.search.objective,
        "members": [{"trial": m["trial"], "weight": m["weight"]} for m in members if m["weight"] > 0],
        "estimate": submission_estimate(cfg, honest, probs, oof, corrected, plan, chosen.weights),
        "cv_f1": macro_f1(honest, oof.labels, num_classes),
        "cv_f1_ci95": list(f1_interval(honest, oof.labels, oof.persons, num_classes, seed=cfg.seed)),
        "cv_f1_corrected_labels": macro_f1(honest, corrected, num_classes),
        "corrected_labels": int((corrected != oof.labels).sum()),
        "cv_f1_fitted": macro_f1(probs.argmax(axis=1), oof.labels, num_classes),
        "configs": members, "n_images": int(len(oof.labels)), "n_persons": int(len(np.unique(oof.persons))),
        "single_split": {"ensemble_honest": (ensemble.get("honest") or {}).get(cfg.ensemble.method),
                         "n_valid": ensemble.get("n_valid")},
        "label_issues": audit}
    return summary


def held_out_persons(cfg: StudyConfig, labelled: pd.DataFrame) -> tuple[int, int] | None:
    """(images, persons) of the held-out set the submission is scored on, or None where there is none. Its
    persons are unknown (the competition's eval has none), so they are its images at the labelled data's
    images per person."""
    from harness.data.readers import read_eval

    index = read_eval(cfg.data)
    if index is None or index.frame.empty:
        return None
    images = len(index.frame)
    per_person = len(labelled) / labelled["person"].nunique()
    return images, max(1, round(images / per_person))


def held_out_probabilities(cfg: StudyConfig, plan: Plan, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """What the submission will predict from: every fold model's class probabilities on the held-out images
    (F, N, C) and each one's weight, its configuration's (`harness predict` blends them so, without test-time
    augmentation); None where its images cannot be read (the estimate then stands on a new set). Called where
    a held-out set exists (held_out_persons)."""
    from harness.predict import EvalImages, PredictError, ensemble_probabilities, fold_members

    members = fold_members(PromotionFolder.of(cfg), {c: int(w) for c, w in zip(plan.configs, weights, strict=True)
                                                     if w > 0}, plan.folds)
    try:
        each = ensemble_probabilities(cfg, members, EvalImages(cfg), tta=None)[1]
    except (PredictError, DataError) as error:
        log.warning("the estimate of the submission stands on a new set, not on the held-out images: %s", error)
        return None
    return np.stack([each[m.name] for m in members]), np.array([m.weight for m in members], dtype=np.float64)


def submission_estimate(cfg: StudyConfig, honest: np.ndarray, probs: np.ndarray, oof: Stacked,
                        corrected: np.ndarray, plan: Plan, weights: np.ndarray) -> dict:
    """The macro F1 to expect of the submission, with a 95% interval for it.

    With held-out images (held_out_probabilities: the submission's own probabilities on them) the figure is read from
    those probabilities, so it is of the bag that is submitted (every fold model) on the very images it is
    scored on, and its interval comes from how far the same reading missed on out-of-fold sets of as many
    persons (uncertainty.f1_on_held_out). Both are read with the average given back its members' confidence
    (uncertainty.undiluted: averaging models that disagree lowers it while raising accuracy; `dilution` keeps
    the confidences, the temperature and the plain average's reading). Beside it, and in its place without
    held-out images: the honest out-of-fold ensemble's predictions scored on draws of as many persons as the held-out set has
    (uncertainty.f1_on_new_set), on the given labels and on the labels after the audit's corrections."""
    started = time.perf_counter()
    num_classes = probs.shape[1]
    size = held_out_persons(cfg, oof.frame)
    persons = size[1] if size else len(np.unique(oof.persons))
    f1, ci95 = f1_on_new_set(honest, oof.labels, oof.persons, num_classes, persons, seed=cfg.seed)
    f1_corrected, ci95_corrected = f1_on_new_set(honest, corrected, oof.persons, num_classes, persons, seed=cfg.seed)
    new_set = {"f1": f1, "ci95": list(ci95)}
    estimate = {"f1": f1, "ci95": list(ci95), "basis": "new set", "persons": persons,
                "images": size[0] if size else None, "new_set": new_set,
                "corrected_labels": {"f1": f1_corrected, "ci95": list(ci95_corrected)}}
    held_out = held_out_probabilities(cfg, plan, weights) if size else None
    if held_out is not None:  # the bag's and the out-of-fold blend's probabilities, each with its members' confidence
        bag, dilution = undiluted(*held_out)
        f1, ci95 = f1_on_held_out(bag, undiluted(oof.probs, weights)[0], oof.labels, oof.persons, persons,
                                  seed=cfg.seed)
        dilution["f1_as_averaged"] = float(expected_f1(blend(*held_out))[0])
        estimate.update(f1=f1, ci95=list(ci95), basis="held-out images", images=len(bag), dilution=dilution)
    return {**estimate, "seconds": round(time.perf_counter() - started, 3)}


def _as_averaged(estimate: dict) -> str:
    dilution = estimate.get("dilution")
    return f"; as averaged {dilution['f1_as_averaged']:.4f}" if dilution else ""


def summary_table(summary: dict) -> str:
    low, high = summary["cv_f1_ci95"]
    lines = [f"promotion: {len(summary['configs'])} configuration(s) x {summary['folds']} folds over "
             f"{summary['n_persons']} persons ({summary['n_images']} images), ensemble {summary['method']} on "
             f"{summary['objective']}",
             f"  {describe_estimate(summary)}",
             f"  cv F1 {summary['cv_f1']:.4f} [{low:.4f}, {high:.4f}] over all {summary['n_persons']} persons (95%, "
             f"person bootstrap; weights chosen on the other half of the persons); with the audit's "
             f"corrections ({summary['corrected_labels']} image label(s) changed): "
             f"{summary['cv_f1_corrected_labels']:.4f}"]
    for member in summary["configs"]:
        m_low, m_high = member["cv_f1_ci95"]
        single = member["single_split"]
        lines.append(f"  trial {member['trial']:4d} weight {member['weight']:2d}: one fold model: cv F1 {member['cv_f1']:.4f} "
                     f"[{m_low:.4f}, {m_high:.4f}]; single split: objective {single['objective']:.4f}, "
                     f"val F1 {single['val_f1']:.4f} ({single['state']}, {single['epochs']} epochs)")
    issues = summary["label_issues"]
    lines.append(f"  label audit: {issues['rows']} suspicious label(s) in {issues['file']} "
                 f"({issues.get('method', 'cleanlab find_label_issues')})")
    return "\n".join(lines)


def describe_estimate(summary: dict) -> str:
    """The submission's expected score in one line (make promote, make status); '' for an older summary."""
    estimate = summary.get("estimate")
    if not estimate:
        return ""
    low, high = estimate["ci95"]
    fixed = estimate["corrected_labels"]
    corrected = (f"{fixed['f1']:.4f} [{fixed['ci95'][0]:.4f}, {fixed['ci95'][1]:.4f}] if the audit's "
                 f"{summary['corrected_labels']} changed image label(s) are right")
    if estimate.get("basis") == "held-out images":
        new_set = estimate["new_set"]
        return (f"the submission should score macro F1 {estimate['f1']:.4f} [{low:.4f}, {high:.4f}] (95%) on its "
                f"{estimate['images']} held-out images (read from its own probabilities on them, every fold model, at "
                f"the fold models' own confidence{_as_averaged(estimate)}); "
                f"on a new set of {estimate['persons']} persons like the labelled ones (each label its share): "
                f"{new_set['f1']:.4f} [{new_set['ci95'][0]:.4f}, {new_set['ci95'][1]:.4f}], {corrected}")
    where = (f"a held-out set of {estimate['images']} images (~{estimate['persons']} persons, each label its share)"
             if estimate["images"] else f"a new set of {estimate['persons']} persons (each label its share)")
    return (f"the submission should score macro F1 {estimate['f1']:.4f} on {where}, 95% of such sets within "
            f"[{low:.4f}, {high:.4f}]; {corrected}")
