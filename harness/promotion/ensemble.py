"""Promotion: the study's best trials -> an ensemble chosen on their stored valid logits.

    harness ensemble STUDY.yaml   run_ensemble(cfg): runs/<study>/ensemble/ (harness.folders.EnsembleFolder)

`harness predict` (harness.predict) then runs the members on the eval images.

Candidates are the top `ensemble.top_k` COMPLETE trials by the study's objective
(`search.objective`; only those with gap/f1 <= `ensemble.max_gap` when it is set); pruned and
failed trials never take part. The only input is each candidate's stored log-probabilities on
the valid views the objective reads (valid, background-swapped valid): nothing is re-run.

How candidates are combined is an ensemble method (`METHODS`, chosen by `ensemble.method`):
best_single, average_top_k, or greedy forward selection with replacement (Caruana et al.,
ICML 2004, as AutoGluon does it): each round adds the candidate, repeats allowed, whose
addition gives the best objective of the averaged probabilities; a member's weight is how
often it was added. The first round therefore picks the best single trial, and the rounds
after the best score are dropped (as AutoGluon does), so on the data it was fitted on the
ensemble never scores below the best single trial.

Selecting on valid and scoring on the same valid flatters every selection. The honest
figure splits the valid PERSONS into two halves (stratified on labels, grouped by
person), selects on one half and scores on the other, both ways round, and averages
the two held-out scores. Every method is scored the same way, so the numbers compare like
with like. The weights used for prediction are then fitted on all of valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.config import StudyConfig
from harness.data.prepare import class_names
from harness.folders import EnsembleFolder, TrialFolder, objective_files
from harness.metrics import OBJECTIVES, confusion, per_class_f1
from harness.promotion.selection import METHODS, Selection, Views, blend, blend_score, honest_scores, person_halves, strategies
from harness.records import BUDGET_STOP
from harness.runtime import StudyError, load_existing_study
from harness.store import find_trial_folder
from harness.study import trials_frame


class EnsembleError(StudyError):
    """An ensemble that cannot be made as asked; the message says what to do."""


@dataclass(frozen=True)
class Candidate:
    trial: int  # the trial identity (folder, W&B run)
    objective: float
    val_f1: float
    gap_f1: float
    folder: TrialFolder


@dataclass
class Stacked:
    """Candidates' class probabilities stacked on the same labelled images: the single split's valid images
    (`load_valid`) or every labelled image held out of its fold (`promotion.out_of_fold`)."""

    views: Views  # view -> (M, N, C) float64: candidate m's class probabilities on row n
    labels: np.ndarray  # (N,)
    persons: np.ndarray  # (N,)
    frame: pd.DataFrame | None = None  # the images' index rows, where the caller needs more than labels

    @property
    def probs(self) -> np.ndarray:
        """(M, N, C) on the images as they are."""
        return self.views["valid"]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[2]


# -------------------------------------------------------------------------- candidates


def top_trials(frame: pd.DataFrame, top_k: int, max_gap: float | None = None,
               pruned_after: int | None = None) -> pd.DataFrame:
    """The top_k trials by objective from `trials_frame` (one row per trial): the complete ones and those a budget
    stopped (for time, not for their score), and with `pruned_after` the pruned ones that trained at least that
    many epochs (the promotion's late rungs).

    With max_gap, a trial whose gap/f1 is unknown (NaN) is left out: it cannot be shown to be within it.
    """
    if frame.empty:
        return frame
    eligible = frame["state"] == "complete"
    if "reason" in frame:
        eligible |= (frame["state"] == "pruned") & frame["reason"].fillna("").astype(str).str.startswith(BUDGET_STOP)
    if pruned_after is not None:
        eligible |= (frame["state"] == "pruned") & (frame["epochs"] >= pruned_after)
    eligible = frame[eligible & frame["objective"].notna()]
    if max_gap is not None:
        eligible = eligible[eligible["gap_f1"] <= max_gap]
    eligible = eligible.drop_duplicates("trial")
    return eligible.sort_values(["objective", "trial"], ascending=[False, True]).head(top_k)


def load_candidates(cfg: StudyConfig, frame: pd.DataFrame, top_k: int | None = None) -> list[Candidate]:
    """The candidates among the study's trials (`frame` from trials_frame), each with its valid logits."""
    top_k = top_k or cfg.ensemble.top_k
    chosen = top_trials(frame, top_k, cfg.ensemble.max_gap)
    if chosen.empty:
        raise EnsembleError(_no_candidates_message(cfg, frame))
    return [Candidate(int(row.trial), float(row.objective), float(row.val_f1), float(row.gap_f1),
                      trial_folder_with(cfg, row.run_dir, int(row.trial), objective_files(cfg),
                                        "the trial folder is missing or incomplete. "
                                        "Restore it, or leave the trial out by lowering ensemble.top_k"))
            for row in chosen.itertuples()]


def _no_candidates_message(cfg: StudyConfig, frame: pd.DataFrame) -> str:
    counts = frame["state"].value_counts().to_dict() if not frame.empty else {}
    if counts.get("complete", 0) == 0:
        return (f"study {cfg.name!r} has no complete trial to promote (trials by state: {counts or 'none'}); "
                "run `harness study` until at least one trial completes")
    gaps = frame.loc[frame["state"] == "complete", "gap_f1"]
    return (f"no complete trial of study {cfg.name!r} has gap/f1 <= ensemble.max_gap = {cfg.ensemble.max_gap} "
            f"(smallest gap/f1 among complete trials: {gaps.min():.4f}); raise ensemble.max_gap in the study file "
            "or remove it")


def trial_folder_with(cfg: StudyConfig, stored: str | None, identity: int, needs: tuple[str, ...],
                      missing_hint: str, error: type[StudyError] | None = None) -> TrialFolder:
    """The trial's folder holding `needs` (see find_trial_folder), or `error` (EnsembleError unless given: the
    caller's own type) saying what is missing."""
    folder, looked = find_trial_folder(cfg, stored, identity, needs)
    if folder is None:
        raise (error or EnsembleError)(f"trial {identity}: no {' and '.join(needs)} in {' or '.join(str(p) for p in looked)}; "
                            f"{missing_hint}")
    return folder


def load_valid(candidates: list[Candidate], views: tuple[str, ...] = ("valid",)) -> Stacked:
    """The candidates' stored probabilities on `views`, after checking they are for the same valid rows."""
    indexes = [c.folder.valid_index() for c in candidates]
    first = candidates[0]
    different = [c.trial for c, index in zip(candidates, indexes, strict=True) if not index.equals(indexes[0])]
    if different:
        raise EnsembleError(
            f"trials {different} have a {TrialFolder.VALID_INDEX} different from trial {first.trial}'s "
            f"({first.folder.path}): their stored logits are for other valid images, so they cannot be averaged. "
            "This happens when the data or split changed between trials; promote only trials of one split "
            "(a new study name per split)")
    loaded = {}
    for view in ("valid", *views):
        logits = [c.folder.view_log_probs(view) for c in candidates]
        for c, values in zip(candidates, logits, strict=True):
            if values.ndim != 2 or values.shape != (len(indexes[0]), logits[0].shape[1]):
                raise EnsembleError(f"{c.folder.file(TrialFolder.VIEW_FILES[view])}: shape {values.shape}, expected "
                                    f"({len(indexes[0])}, {logits[0].shape[1]}): one row per "
                                    f"{TrialFolder.VALID_INDEX} row and trial {first.trial}'s classes; "
                                    "the trial folder is damaged")
        loaded[view] = np.exp(np.stack(logits).astype(np.float64))  # stored values are class log-probabilities
    labels = indexes[0]["label"].to_numpy(dtype=np.int64)
    classes = loaded["valid"].shape[2]
    if labels.min() < 0 or labels.max() >= classes:
        raise EnsembleError(f"{first.folder.file(TrialFolder.VALID_INDEX)}: labels must lie in 0..{classes - 1}")
    return Stacked({view: loaded[view] for view in views}, labels, indexes[0]["person"].to_numpy())


# ---------------------------------------------------------------------------- ensemble


def run_ensemble(cfg: StudyConfig, storage: str | None = None, log_to_wandb: bool = True) -> dict:
    """Promote the study's best trials: select, score honestly, write runs/<study>/ensemble/, log to W&B."""
    study = load_existing_study(cfg, storage)
    top_k = cfg.ensemble.top_k if cfg.ensemble.enabled else 1
    candidates = load_candidates(cfg, trials_frame(study), top_k)
    objective = OBJECTIVES.get(cfg.search.objective)
    valid = load_valid(candidates, objective.views)
    rounds = cfg.ensemble.rounds
    halves = person_halves(valid.labels, valid.persons, seed=cfg.seed)
    honest = honest_scores(valid.views, valid.labels, halves, strategies(rounds, objective),
                           score=lambda views, labels, weights: blend_score(views, labels, weights, objective))
    _describe_halves(honest["halves"], halves, valid.persons, candidates)
    fitted_selections = {name: method.select(valid.views, valid.labels, rounds, objective)
                         for name, method in METHODS.items()}
    selection = fitted_selections[cfg.ensemble.method]
    probs = blend(valid.probs, selection.weights)
    pred = probs.argmax(axis=1)
    num_classes = valid.num_classes
    fitted = {f"{name}": blend_score(valid.views, valid.labels, chosen.weights, objective)
              for name, chosen in fitted_selections.items()}
    note = _note(cfg, candidates, selection, halves)
    members = [{"trial": c.trial, "weight": int(w), "objective": c.objective, "val_f1": c.val_f1,
                "gap_f1": _finite_or_none(c.gap_f1), "run_dir": str(c.folder.path)}
               for c, w in zip(candidates, selection.weights, strict=True) if w > 0]
    metrics = {"method": cfg.ensemble.method, "objective": cfg.search.objective, "honest": honest,
               "fitted_on_all_valid": fitted, "n_valid": int(len(valid.labels)),
               "n_persons": int(len(np.unique(valid.persons))), "trajectory": selection.trajectory}
    matrix = confusion(pred, valid.labels, num_classes)
    folder = EnsembleFolder.of(cfg)
    folder.write({"members": members, "method": cfg.ensemble.method, "rounds": rounds,
                  "rounds_kept": selection.rounds_kept, "candidates": len(candidates),
                  "candidate_trials": [c.trial for c in candidates], "note": note},
                 metrics, probs, per_class_f1(pred, valid.labels, num_classes), matrix)
    summary = {"members": members, "candidates": [c.trial for c in candidates], "note": note, "metrics": metrics,
               "dir": str(folder.path)}
    if log_to_wandb:
        names = class_names(study.user_attrs.get("data_summary"), num_classes)
        summary["wandb_run_id"] = _log_to_wandb(cfg, members, _flat_metrics(metrics), matrix, names)
    print(ensemble_table(cfg, summary))
    return summary


def _describe_halves(details: list[dict], halves, persons: np.ndarray, candidates: list[Candidate]) -> None:
    """Per-half details readable without the candidate order: persons counted, weights by trial."""
    for detail, (fit, held) in zip(details, halves, strict=True):
        detail["fit_persons"] = int(len(np.unique(persons[fit])))
        detail["held_persons"] = int(len(np.unique(persons[held])))
        for name in list(detail):
            if name.endswith("_weights"):
                detail[name] = {str(c.trial): int(w) for c, w in zip(candidates, detail[name], strict=True) if w}


def _note(cfg: StudyConfig, candidates: list[Candidate], selection: Selection, halves) -> str | None:
    notes = []
    if not cfg.ensemble.enabled:
        notes.append(f"ensemble.enabled is false: trial {candidates[0].trial} alone is promoted")
    elif len(candidates) == 1:
        notes.append(f"only one complete trial is eligible (trial {candidates[0].trial}): "
                     "the ensemble is that trial alone")
    elif np.count_nonzero(selection.weights) == 1:
        notes.append(f"{cfg.ensemble.method} selection kept trial "
                     f"{candidates[int(np.argmax(selection.weights))].trial} alone: no combination beat it on valid")
    if not halves:
        notes.append("valid holds fewer than two persons: no honest (held-out) score")
    return "; ".join(notes) or None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _flat_metrics(metrics: dict) -> dict:
    honest, fitted = metrics["honest"], metrics["fitted_on_all_valid"]
    flat = {f"honest/{name}": honest[name] for name in METHODS.names()}
    flat.update({f"fitted/{name}": value for name, value in fitted.items()})
    flat.update({key: metrics[key] for key in ("n_valid", "n_persons", "method", "objective")})
    return flat


def _log_to_wandb(cfg, members: list[dict], flat: dict, matrix: np.ndarray | None, names: list[str]) -> str | None:
    from harness.tracking import log_ensemble

    frame = pd.DataFrame(members).drop(columns=["run_dir"])
    return log_ensemble(cfg, frame, flat, matrix, names, extra_config={"ensemble": cfg.ensemble.model_dump(mode="json")})


def ensemble_table(cfg: StudyConfig, summary: dict) -> str:
    metrics = summary["metrics"]
    honest, fitted = metrics["honest"], metrics["fitted_on_all_valid"]
    k = len(summary["candidates"])
    lines = [f"ensemble of study {cfg.name!r}: {k} candidate(s), {cfg.ensemble.rounds} round(s), "
             f"valid {metrics['n_valid']} images of {metrics['n_persons']} persons, objective {metrics['objective']}",
             f"  {'':22} {'honest':>10} {'fitted on all valid':>21}"]
    for name, method in METHODS.items():
        chosen = " (chosen: ensemble.method)" if name == metrics["method"] else ""
        lines.append(f"  {method.label.format(k=k):22} {honest[name]:>10.4f} {fitted[name]:>21.4f}{chosen}")
    weights = ", ".join(f"trial {m['trial']} x{m['weight']}" for m in summary["members"])
    lines.append(f"  members: {weights}")
    lines.append("  honest: selected on one half of the valid persons, scored on the other, both ways, averaged")
    if summary["note"]:
        lines.append(f"  note: {summary['note']}")
    lines.append(f"  wrote {summary['dir']}")
    return "\n".join(lines)
