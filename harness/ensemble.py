"""Promotion: the study's best trials -> greedy ensemble selection -> submission.

    harness ensemble STUDY.yaml   run_ensemble(cfg): runs/<study>/ensemble/{members,metrics}.json, ...
    harness predict STUDY.yaml    predict(cfg): runs/<study>/submission.csv (+ eval F1 when eval/gt.csv exists)

Candidates are the top `ensemble.top_k` COMPLETE trials by val F1 (only those with
gap/f1 <= `ensemble.max_gap` when it is set); pruned and failed trials never take part.
The only input is each candidate's stored valid log-probabilities: nothing is re-run.

Selection is greedy forward selection with replacement (Caruana et al., ICML 2004, as
AutoGluon does it): each round adds the candidate, repeats allowed, whose addition gives
the best macro F1 of the averaged probabilities; a member's weight is how often it was
added. The first round therefore picks the best single trial, and the rounds after the
best score are dropped (as AutoGluon does), so on the data it was fitted on the
ensemble never scores below the best single trial.

Selecting on valid and scoring on the same valid flatters every selection. The honest
figure splits the valid PERSONS into two halves (stratified on labels, grouped by
person), selects on one half and scores on the other, both ways round, and averages
the two held-out scores. The best single trial and the plain average of the candidates
are scored the same way, so the three numbers compare like with like. The weights used
for prediction are then fitted on all of valid.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from harness.augment import IMAGENET_MEAN, IMAGENET_STD, apply_crops, cached_crop_boxes
from harness.config import Params, StudyConfig
from harness.data.cache import build_cache
from harness.data.labels import NUM_CLASSES, class_name
from harness.data.readers import read_eval
from harness.io import atomic_save_npy, atomic_write_text, json_ready, load_checkpoint
from harness.metrics import confusion, macro_f1, per_class_f1
from harness.model import build_model, class_log_probs, eval_logits
from harness.study import StudyError, load_existing_study, trials_frame
from harness.train import EVAL_BATCH, pick_device

TTA_CHOICES = (None, "none", "hflip")

# (probabilities (M, n, C) of the candidates on some rows, labels (n,)) -> weights (M,)
Strategy = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (probabilities (M, n, C), labels (n,), weights (M,)) -> score
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


class EnsembleError(StudyError):
    """An ensemble or prediction that cannot be made as asked; the message says what to do."""


@dataclass(frozen=True)
class Candidate:
    trial: int  # the trial identity (folder, W&B run)
    val_f1: float
    gap_f1: float
    run_dir: Path


@dataclass
class ValidSet:
    probs: np.ndarray  # (M, N, C) float64: candidate m's class probabilities on valid row n
    labels: np.ndarray  # (N,)
    persons: np.ndarray  # (N,)

    @property
    def num_classes(self) -> int:
        return self.probs.shape[2]


# ------------------------------------------------------------------------ fast macro F1


def macro_f1_batch(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 of each row of `preds` (K, N) against `labels` (N,): one bincount for all K.

    Equals sklearn's f1_score(average="macro", labels=range(C), zero_division=0): per class
    2TP / (2TP + FP + FN) = 2TP / (predicted + actual), 0 for a class never seen nor predicted.
    """
    preds = np.asarray(preds)
    k = preds.shape[0]
    cells = (np.arange(k)[:, None] * num_classes + labels[None, :]) * num_classes + preds
    counts = np.bincount(cells.ravel(), minlength=k * num_classes * num_classes).reshape(k, num_classes, num_classes)
    true_positives = np.diagonal(counts, axis1=1, axis2=2)
    predicted_plus_actual = counts.sum(axis=1) + counts.sum(axis=2)
    f1 = np.divide(2.0 * true_positives, predicted_plus_actual, out=np.zeros(true_positives.shape),
                   where=predicted_plus_actual > 0)
    return f1.mean(axis=1)


def macro_f1_fast(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    return float(macro_f1_batch(np.asarray(pred)[None], np.asarray(labels), num_classes)[0])


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    weights: np.ndarray  # (M,) int: how often each candidate was added
    trajectory: list[float]  # macro F1 of the ensemble after each round
    rounds_kept: int  # rounds up to the best score (the weights count only these)


def greedy_selection(probs: np.ndarray, labels: np.ndarray, rounds: int) -> Selection:
    """Caruana's forward selection with replacement over candidates' probabilities (M, N, C).

    A running sum replaces the average (the argmax is the same), and every candidate's
    addition is scored at once: (M, N, C) sums, one argmax, one batched bincount per round.
    Ties go to the lower index, i.e. the candidate with the better val F1.
    """
    num_candidates, _, num_classes = probs.shape
    running = np.zeros(probs.shape[1:], dtype=probs.dtype)
    picks, trajectory = [], []
    for _ in range(rounds):
        scores = macro_f1_batch((running[None] + probs).argmax(axis=2), labels, num_classes)
        best = int(np.argmax(scores))
        running += probs[best]
        picks.append(best)
        trajectory.append(float(scores[best]))
    kept = int(np.argmax(trajectory)) + 1  # forced additions after the best round only lose
    return Selection(np.bincount(picks[:kept], minlength=num_candidates), trajectory, kept)


def blend(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C) weighted average of the candidates' probabilities (M, N, C)."""
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights / weights.sum(), probs, axes=1)


def blend_f1(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    return macro_f1_fast(blend(probs, weights).argmax(axis=1), labels, probs.shape[2])


def best_single_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    scores = macro_f1_batch(probs.argmax(axis=2), labels, probs.shape[2])
    weights = np.zeros(len(probs), dtype=np.int64)
    weights[int(np.argmax(scores))] = 1
    return weights


def average_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.ones(len(probs), dtype=np.int64)


def greedy_weights(rounds: int) -> Strategy:
    return lambda probs, labels: greedy_selection(probs, labels, rounds).weights


def strategies(rounds: int) -> dict[str, Strategy]:
    return {"best_single": best_single_weights, "average_top_k": average_weights, "greedy": greedy_weights(rounds)}


# ----------------------------------------------------------------------- honest scoring


def person_halves(labels: np.ndarray, persons: np.ndarray, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(fit rows, held rows), (the same swapped)]: valid persons in two halves, stratified on labels.

    Empty when valid has fewer than two persons (no honest score is possible then).
    """
    if len(np.unique(persons)) < 2:
        return []
    rows = np.zeros(len(labels))
    try:
        with warnings.catch_warnings():  # "least populated class has 1 member": expected with rare classes
            warnings.simplefilter("ignore", UserWarning)
            splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
            folds = list(splitter.split(rows, labels, groups=persons))
    except ValueError:  # every class has a single image: nothing to stratify on
        folds = []
    if len(folds) != 2 or any(len(held) == 0 for _, held in folds):
        folds = list(GroupKFold(n_splits=2).split(rows, labels, groups=persons))
    return [(np.sort(fit), np.sort(held)) for fit, held in folds]


def honest_scores(probs: np.ndarray, labels: np.ndarray, halves: list[tuple[np.ndarray, np.ndarray]],
                  methods: dict[str, Strategy], score: Scorer = blend_f1) -> dict:
    """Each method selects weights on a half's fit rows only and is scored on its held rows only.

    Returns {method: mean held-out score (NaN without halves), "halves": [per-half details]}.
    """
    details = []
    for fit, held in halves:
        detail: dict = {"fit_images": len(fit), "held_images": len(held)}
        for name, select in methods.items():
            weights = np.asarray(select(probs[:, fit], labels[fit]))
            detail[name] = float(score(probs[:, held], labels[held], weights))
            detail[f"{name}_weights"] = weights.tolist()
        details.append(detail)
    means = {name: float(np.mean([d[name] for d in details])) if details else math.nan for name in methods}
    return {**means, "halves": details}


# -------------------------------------------------------------------------- candidates


def pick_candidates(frame: pd.DataFrame, top_k: int, max_gap: float | None) -> pd.DataFrame:
    """The top_k COMPLETE trials by val F1 from `trials_frame` (one row per identity).

    With max_gap, a trial whose gap/f1 is unknown (NaN) is left out: it cannot be shown to be within it.
    """
    if frame.empty:
        return frame
    eligible = frame[(frame["state"] == "complete") & frame["val_f1"].notna()]
    if max_gap is not None:
        eligible = eligible[eligible["gap_f1"] <= max_gap]
    eligible = eligible.drop_duplicates("number")
    return eligible.sort_values(["val_f1", "number"], ascending=[False, True]).head(top_k)


def load_candidates(cfg: StudyConfig, storage: str | None = None, top_k: int | None = None) -> list[Candidate]:
    frame = trials_frame(load_existing_study(cfg, storage))
    top_k = top_k or cfg.ensemble.top_k
    chosen = pick_candidates(frame, top_k, cfg.ensemble.max_gap)
    if chosen.empty:
        raise EnsembleError(_no_candidates_message(cfg, frame))
    return [Candidate(int(row.number), float(row.val_f1), float(row.gap_f1), _run_dir(cfg, row.run_dir, row.number))
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


def _folder_holding(cfg: StudyConfig, stored: str, identity: int, needs: tuple[str, ...], missing_hint: str) -> Path:
    """The stored run_dir, or the study's trial folder when the runs folder was moved; it must hold `needs`."""
    options = [Path(stored)] if stored else []
    options.append(cfg.trial_dir(identity))
    for path in options:
        if all((path / name).is_file() for name in needs):
            return path
    raise EnsembleError(f"trial {identity}: no {' and '.join(needs)} in {' or '.join(str(p) for p in options)}; "
                        f"{missing_hint}")


def _run_dir(cfg: StudyConfig, stored: str, identity: int) -> Path:
    return _folder_holding(cfg, stored, identity, ("valid_logits.npy", "valid_index.csv"),
                         "the trial folder is missing or incomplete. "
                         "Restore it, or leave the trial out by lowering ensemble.top_k")


def load_valid(candidates: list[Candidate]) -> ValidSet:
    """The candidates' stored valid probabilities, after checking they are for the same valid rows."""
    indexes = [pd.read_csv(c.run_dir / "valid_index.csv", dtype={"image_id": str, "person": str})
               for c in candidates]
    first = candidates[0]
    different = [c.trial for c, index in zip(candidates, indexes, strict=True) if not index.equals(indexes[0])]
    if different:
        raise EnsembleError(
            f"trials {different} have a valid_index.csv different from trial {first.trial}'s ({first.run_dir}): "
            "their stored logits are for other valid images, so they cannot be averaged. This happens when the "
            "data or split changed between trials; promote only trials of one split (a new study name per split)")
    logits = [np.load(c.run_dir / "valid_logits.npy") for c in candidates]
    for c, values in zip(candidates, logits, strict=True):
        if values.ndim != 2 or values.shape != (len(indexes[0]), logits[0].shape[1]):
            raise EnsembleError(f"{c.run_dir / 'valid_logits.npy'}: shape {values.shape}, expected "
                                f"({len(indexes[0])}, {logits[0].shape[1]}): one row per valid_index.csv row and "
                                f"trial {first.trial}'s classes; the trial folder is damaged")
    probs = np.exp(np.stack(logits).astype(np.float64))  # stored values are class log-probabilities
    labels = indexes[0]["label"].to_numpy(dtype=np.int64)
    if labels.min() < 0 or labels.max() >= probs.shape[2]:
        raise EnsembleError(f"{first.run_dir / 'valid_index.csv'}: labels must lie in 0..{probs.shape[2] - 1}")
    return ValidSet(probs, labels, indexes[0]["person"].to_numpy())


# ---------------------------------------------------------------------------- ensemble


def ensemble_dir(cfg: StudyConfig) -> Path:
    return cfg.study_dir / "ensemble"


def class_names(cfg: StudyConfig, num_classes: int) -> list[str]:
    if cfg.data.format == "competition" and num_classes == NUM_CLASSES:
        return [class_name(label) for label in range(num_classes)]
    return [str(label) for label in range(num_classes)]


def run_ensemble(cfg: StudyConfig, storage: str | None = None, log_to_wandb: bool = True) -> dict:
    """Promote the study's best trials: select, score honestly, write runs/<study>/ensemble/, log to W&B."""
    top_k = cfg.ensemble.top_k if cfg.ensemble.enabled else 1
    candidates = load_candidates(cfg, storage, top_k)
    valid = load_valid(candidates)
    rounds = cfg.ensemble.rounds
    halves = person_halves(valid.labels, valid.persons, seed=cfg.seed)
    honest = honest_scores(valid.probs, valid.labels, halves, strategies(rounds))
    _describe_halves(honest["halves"], halves, valid.persons, candidates)
    selection = greedy_selection(valid.probs, valid.labels, rounds)
    probs = blend(valid.probs, selection.weights)
    pred = probs.argmax(axis=1)
    num_classes = valid.num_classes
    fitted = {"greedy_f1": macro_f1(pred, valid.labels, num_classes),
              "best_single_f1": blend_f1(valid.probs, valid.labels, best_single_weights(valid.probs, valid.labels)),
              "average_top_k_f1": blend_f1(valid.probs, valid.labels, average_weights(valid.probs, valid.labels))}
    note = _note(cfg, candidates, selection, halves)
    members = [{"trial": c.trial, "weight": int(w), "val_f1": c.val_f1, "gap_f1": _finite_or_none(c.gap_f1),
                "run_dir": str(c.run_dir)} for c, w in zip(candidates, selection.weights, strict=True) if w > 0]
    metrics = {"honest": honest, "fitted_on_all_valid": fitted, "n_valid": int(len(valid.labels)),
               "n_persons": int(len(np.unique(valid.persons))), "trajectory": selection.trajectory}
    matrix = confusion(pred, valid.labels, num_classes)
    _write_ensemble(cfg, members, candidates, selection, note, metrics, probs, pred, valid, matrix)
    summary = {"members": members, "candidates": [c.trial for c in candidates], "note": note, "metrics": metrics,
               "dir": str(ensemble_dir(cfg))}
    if log_to_wandb:
        summary["wandb_run_id"] = _log_to_wandb(cfg, members, _flat_metrics(metrics), matrix, num_classes)
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
        notes.append(f"greedy selection kept trial {candidates[int(np.argmax(selection.weights))].trial} alone: "
                     "no combination beat it on valid")
    if not halves:
        notes.append("valid holds fewer than two persons: no honest (held-out) score")
    return "; ".join(notes) or None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _write_ensemble(cfg, members, candidates, selection, note, metrics, probs, pred, valid, matrix) -> None:
    out = ensemble_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    content = {"members": members, "rounds": cfg.ensemble.rounds, "rounds_kept": selection.rounds_kept,
               "candidates": len(candidates), "candidate_trials": [c.trial for c in candidates], "note": note}
    atomic_write_text(out / "members.json", json.dumps(json_ready(content), indent=2))
    atomic_write_text(out / "metrics.json", json.dumps(json_ready(metrics), indent=2))
    atomic_save_npy(out / "valid_probs.npy", probs.astype(np.float32))
    atomic_save_npy(out / "per_class_f1.npy", per_class_f1(pred, valid.labels, valid.num_classes))
    atomic_save_npy(out / "confusion.npy", matrix)


def _flat_metrics(metrics: dict) -> dict:
    honest, fitted = metrics["honest"], metrics["fitted_on_all_valid"]
    flat = {f"honest/{name}_f1": honest[name] for name in ("best_single", "average_top_k", "greedy")}
    flat.update({f"val/{name}": value for name, value in fitted.items()})
    flat.update({"n_valid": metrics["n_valid"], "n_persons": metrics["n_persons"]})
    return flat


def _log_to_wandb(cfg, members: list[dict], flat: dict, matrix: np.ndarray | None, num_classes: int) -> str | None:
    from harness.tracking import log_ensemble

    frame = pd.DataFrame(members).drop(columns=["run_dir"])
    return log_ensemble(cfg, frame, flat, matrix, class_names(cfg, num_classes),
                        extra_config={"ensemble": cfg.ensemble.model_dump(mode="json")})


def ensemble_table(cfg: StudyConfig, summary: dict) -> str:
    metrics = summary["metrics"]
    honest, fitted = metrics["honest"], metrics["fitted_on_all_valid"]
    k = len(summary["candidates"])
    lines = [f"ensemble of study {cfg.name!r}: {k} candidate(s), {cfg.ensemble.rounds} round(s), "
             f"valid {metrics['n_valid']} images of {metrics['n_persons']} persons",
             f"  {'':22} {'honest F1':>10} {'F1 fitted on all valid':>24}"]
    for name, label in (("best_single", "best single"), ("average_top_k", f"average top-{k}"), ("greedy", "greedy")):
        lines.append(f"  {label:22} {honest[name]:>10.4f} {fitted[f'{name}_f1']:>24.4f}")
    weights = ", ".join(f"trial {m['trial']} x{m['weight']}" for m in summary["members"])
    lines.append(f"  members: {weights}")
    lines.append("  honest F1: selected on one half of the valid persons, scored on the other, both ways, averaged")
    if summary["note"]:
        lines.append(f"  note: {summary['note']}")
    lines.append(f"  wrote {summary['dir']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Member:
    trial: int
    weight: int
    run_dir: Path


def load_members(cfg: StudyConfig, trial: int | None = None, storage: str | None = None) -> list[Member]:
    """The promoted members (members.json), or the one trial asked for."""
    if trial is not None:
        return [Member(trial, 1, _trial_folder(cfg, trial, storage))]
    path = ensemble_dir(cfg) / "members.json"
    if not path.is_file():
        raise EnsembleError(f"{path} does not exist: run `harness ensemble` first to select the members, "
                            "or predict with one trial: `harness predict STUDY.yaml --trial N`")
    members = json.loads(path.read_text())["members"]
    return [Member(int(m["trial"]), int(m["weight"]), _run_dir_with_model(cfg, m["run_dir"], int(m["trial"])))
            for m in members]


def _trial_folder(cfg: StudyConfig, trial: int, storage: str | None) -> Path:
    folder = cfg.trial_dir(trial)
    if (folder / "best.pt").is_file():
        return folder
    frame = trials_frame(load_existing_study(cfg, storage))
    rows = frame[frame["number"] == trial]
    if rows.empty:
        raise EnsembleError(f"study {cfg.name!r} has no trial {trial}; its trials are {sorted(frame['number'])}")
    return _run_dir_with_model(cfg, rows.iloc[0]["run_dir"], trial)


def _run_dir_with_model(cfg: StudyConfig, stored: str, trial: int) -> Path:
    return _folder_holding(cfg, stored, trial, ("best.pt", "config.yaml"),
                         "the trial never finished an epoch or its folder was removed")


def member_params(run_dir: Path, cfg: StudyConfig) -> Params:
    """The member's own params from its config.yaml; its image size must be the study's."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    trained_size = raw.get("study", {}).get("data", {}).get("image_size")
    size = cfg.data.image_size.model_dump()
    if trained_size is not None and trained_size != size:
        raise EnsembleError(f"{run_dir / 'config.yaml'}: trained at data.image_size {trained_size}, the study file "
                            f"now says {size}; predict with the study file the trial was trained with")
    return Params.model_validate(raw["params"])


def load_member_model(run_dir: Path, params: Params, cfg: StudyConfig) -> torch.nn.Module:
    num_classes = np.load(run_dir / "valid_logits.npy", mmap_mode="r").shape[1]
    size = cfg.data.image_size
    model = build_model(params.backbone, params.head, num_classes, pretrained=False, drop_rate=params.drop_rate,
                        image_size=(size.height, size.width))
    model.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    return model.eval()


@torch.no_grad()
def member_probabilities(model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu",
                         tta: str | None = None, rows: np.ndarray | None = None,
                         batch_size: int = EVAL_BATCH) -> np.ndarray:
    """(len(rows), C) class probabilities of one model over uint8 images (N, H, W, 3), in `rows` order.

    The images get the eval transform, as valid did in training (see `eval_batch`). tta="hflip"
    averages each image's probabilities with those of its mirror image (flipped along the width).
    """
    device = torch.device(device)
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    model.eval().to(device)
    outputs = []
    for start in range(0, len(rows), batch_size):
        x = eval_batch(images[rows[start:start + batch_size]], device)
        probs = _probabilities(model, x, device)
        if tta == "hflip":
            probs = (probs + _probabilities(model, torch.flip(x, dims=[3]), device)) / 2
        outputs.append(probs.cpu())
    return torch.cat(outputs).numpy()


def eval_batch(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """build_transform(0.0, H, W, train=False) over a whole uint8 batch (B, H, W, 3) at once -> (B, 3, H, W).

    For images already at their size that transform is ImageNet normalisation alone, elementwise, so
    one vectorised pass gives the same values (a test holds them equal) at a fraction of the per-image
    cost; the uint8 batch moves to the device before it grows fourfold into floats.
    """
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    mean = torch.as_tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return batch.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std).contiguous()


def _probabilities(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return class_log_probs(eval_logits(model, x, device), model.head_kind).exp()


class EvalImages:
    """The eval images through the decoded cache, with each preprocess method's crops made once."""

    def __init__(self, cfg: StudyConfig, progress: bool = False) -> None:
        index = read_eval(cfg.data)
        if index is None:
            raise EnsembleError(f"{Path(cfg.data.root) / 'eval' / 'info.csv'} not found: prediction needs the "
                                "competition's eval set (eval/info.csv and eval/images/)")
        self.frame = index.raise_on_errors()  # info.csv order, the submission's order
        size = cfg.data.image_size
        self.size = (size.height, size.width)
        self.cache_dir = Path(cfg.data.cache_dir)
        self.cache = build_cache(list(self.frame["path"]), size.height, size.width, self.cache_dir,
                                 resize=cfg.data.resize, workers=cfg.data.cache_workers, on_bad_image="fail",
                                 progress=progress)
        self.rows = np.array([self.cache.row_of(path) for path in self.frame["path"]])
        self._cropped: dict[str, np.ndarray] = {}

    def for_preprocess(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, rows in info.csv order) as a member trained with `method` saw them."""
        if method == "none":
            return self.cache.images, self.rows
        if method not in self._cropped:  # same boxes file as training uses for this cache
            boxes = cached_crop_boxes(self.cache.images, method,
                                      self.cache_dir / f"{self.cache.key}.{method}.boxes.npy")
            self._cropped[method] = apply_crops(self.cache.images, boxes, *self.size)
        return self._cropped[method], self.rows


def predict(cfg: StudyConfig, tta: str | None = None, trial: int | None = None, storage: str | None = None,
            progress: bool = False, log_to_wandb: bool = True) -> dict:
    """Write the submission (ensemble, or one trial with `trial`); score it when eval/gt.csv exists."""
    if tta not in TTA_CHOICES:
        raise EnsembleError(f"--tta {tta!r}: choose one of {[c for c in TTA_CHOICES if c]}")
    tta = None if tta == "none" else tta
    members = load_members(cfg, trial, storage)
    images = EvalImages(cfg, progress)
    device = pick_device(cfg.train.device)
    member_probs = {}
    for member in members:
        params = member_params(member.run_dir, cfg)
        model = load_member_model(member.run_dir, params, cfg)
        source, rows = images.for_preprocess(params.preprocess)
        member_probs[member.trial] = member_probabilities(model, source, device, tta, rows)
        del model
    weights = np.array([m.weight for m in members], dtype=np.float64)
    probs = blend(np.stack([member_probs[m.trial] for m in members]).astype(np.float64), weights)
    answers = probs.argmax(axis=1)
    path = cfg.study_dir / ("submission.csv" if trial is None else f"submission-trial-{trial}.csv")
    submission = pd.DataFrame({"ImageID": images.frame["image_id"].to_numpy(), "ans": answers})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, submission.to_csv(index=False))
    print(f"wrote {path}: {len(submission)} rows, {len(members)} member(s), tta {tta or 'none'}")
    result = {"submission": str(path), "rows": len(submission), "members": {m.trial: m.weight for m in members},
              "tta": tta, "probs": probs, "member_probs": member_probs}
    labels = images.frame["label"].to_numpy()
    if (labels >= 0).any():
        result.update(_score_eval(cfg, members, member_probs, answers, labels, tta, trial, log_to_wandb))
    return result


def _score_eval(cfg, members: list[Member], member_probs: dict, answers: np.ndarray, labels: np.ndarray,
                tta: str | None, trial: int | None, log_to_wandb: bool) -> dict:
    """Eval macro F1 (eval/gt.csv) of the ensemble and of each member; where background reliance shows."""
    known = labels >= 0
    num_classes = next(iter(member_probs.values())).shape[1]
    f1 = macro_f1(answers[known], labels[known], num_classes)
    member_f1 = {m.trial: macro_f1(member_probs[m.trial].argmax(axis=1)[known], labels[known], num_classes)
                 for m in members}
    scores = {"eval_f1": f1, "member_eval_f1": member_f1, "n_eval": int(len(labels)), "n_scored": int(known.sum()),
              "tta": tta}
    out = ensemble_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    name = "eval_metrics.json" if trial is None else f"eval_metrics-trial-{trial}.json"
    content = {**scores, "member_eval_f1": {str(k): v for k, v in member_f1.items()},
               "members": [{"trial": m.trial, "weight": m.weight, "eval_f1": member_f1[m.trial]} for m in members]}
    atomic_write_text(out / name, json.dumps(json_ready(content), indent=2))
    what = "ensemble" if trial is None else f"trial {trial}"
    print(f"eval macro F1 (eval/gt.csv, {int(known.sum())} images, tta {tta or 'none'}): {what} {f1:.4f}")
    if trial is None:
        for m in members:
            print(f"  trial {m.trial:4d} (weight {m.weight}): {member_f1[m.trial]:.4f}")
        if log_to_wandb:
            _log_eval_to_wandb(cfg, members, scores, answers[known], labels[known], num_classes)
    return scores


def _log_eval_to_wandb(cfg, members: list[Member], scores: dict, answers, labels, num_classes: int) -> None:
    frame = pd.DataFrame([{"trial": m.trial, "weight": m.weight, "eval_f1": scores["member_eval_f1"][m.trial]}
                          for m in members])
    flat = {"eval/f1": scores["eval_f1"], "eval/n_images": scores["n_scored"], "eval/tta": scores["tta"] or "none",
            **{f"eval/trial_{m.trial}_f1": scores["member_eval_f1"][m.trial] for m in members}}
    from harness.tracking import log_ensemble

    log_ensemble(cfg, frame, flat, confusion(answers, labels, num_classes), class_names(cfg, num_classes))
