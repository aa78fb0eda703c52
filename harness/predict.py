"""`harness predict STUDY.yaml`: the promoted members on the eval images -> runs/<study>/submission.csv.

    predict_submission(cfg)            the ensemble's members (runs/<study>/ensemble/members.json)
    predict_submission(cfg, trial=N)   one trial alone

Each member's best checkpoint runs over the eval images through the decoded cache, preprocessed
as that member was trained (its own crop), with optional test-time augmentation (hflip); the
members' probabilities are averaged with their ensemble weights. The submission keeps
eval/info.csv's order. When eval/gt.csv exists (the synthetic data ships one) the submission and
each member are scored against it: eval_metrics.json beside the ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.augment import PREPROCESSORS, normalize_batch, preprocess
from harness.config import Params, StudyConfig
from harness.data.cache import build_cache
from harness.data.prepare import class_names
from harness.data.readers import read_eval
from harness.ensemble import EnsembleError, trial_folder_with
from harness.folders import EnsembleFolder, PromotionFolder, TrialFolder
from harness.foreground import foreground
from harness.io import atomic_write_text
from harness.metrics import confusion, macro_f1
from harness.model import build_model, eval_logits
from harness.selection import blend
from harness.study import load_existing_study, trials_frame
from harness.train import EVAL_BATCH, pick_device

TTA_CHOICES = (None, "none", "hflip")
NO_MODEL_HINT = "the trial never finished an epoch or its folder was removed"


SOURCES = ("auto", "promotion", "ensemble")


@dataclass(frozen=True)
class Member:
    trial: int  # the configuration (trial identity)
    weight: int  # its weight in the ensemble; every fold model of a promoted configuration carries it
    folder: TrialFolder
    fold: int | None = None  # a promoted configuration's fold model; None: the trial's own model

    @property
    def name(self) -> str:
        return str(self.trial) if self.fold is None else f"{self.trial}/fold-{self.fold}"


def load_members(cfg: StudyConfig, trial: int | None = None, storage: str | None = None,
                 source: str = "auto") -> tuple[list[Member], EnsembleFolder]:
    """The members to predict with, and the folder their eval scores go to: every fold model of the
    promotion's members (source "promotion", or "auto" once `harness promote` has run), else the ensemble's
    members (members.json), or the one trial asked for."""
    if source not in SOURCES:
        raise EnsembleError(f"--from {source!r}: choose one of {list(SOURCES)}")
    if trial is not None:
        return [Member(trial, 1, _one_trial(cfg, trial, storage))], EnsembleFolder.of(cfg)
    promoted = PromotionFolder.of(cfg)
    summary = promoted.summary() if source != "ensemble" else None
    if summary is not None:
        members = [Member(int(m["trial"]), int(m["weight"]), promoted.fold(int(m["trial"]), fold), fold)
                   for m in summary["members"] for fold in range(summary["folds"])]
        missing = [m.name for m in members if not m.folder.has(TrialFolder.MODEL_FILES)]
        if missing:
            raise EnsembleError(f"the promotion's fold models {missing} are missing under {promoted.path}; run "
                                "`harness promote` again")
        return members, promoted
    if source == "promotion":
        raise EnsembleError(f"{promoted.path} holds no promotion: run `harness promote` first")
    ensemble = EnsembleFolder.of(cfg)
    if not ensemble.has_members():
        raise EnsembleError(f"{ensemble.file(EnsembleFolder.MEMBERS)} does not exist: run `harness ensemble` first "
                            "to select the members, or predict with one trial: `harness predict STUDY.yaml --trial N`")
    return [Member(int(m["trial"]), int(m["weight"]),
                   trial_folder_with(cfg, m["run_dir"], int(m["trial"]), TrialFolder.MODEL_FILES, NO_MODEL_HINT))
            for m in ensemble.members()["members"]], ensemble


def _one_trial(cfg: StudyConfig, trial: int, storage: str | None) -> TrialFolder:
    folder = TrialFolder(cfg.trial_dir(trial))
    if folder.has(TrialFolder.MODEL_FILES):
        return folder
    frame = trials_frame(load_existing_study(cfg, storage))
    rows = frame[frame["trial"] == trial]
    if rows.empty:
        raise EnsembleError(f"study {cfg.name!r} has no trial {trial}; its trials are {sorted(frame['trial'])}")
    return trial_folder_with(cfg, rows.iloc[0]["run_dir"], trial, TrialFolder.MODEL_FILES, NO_MODEL_HINT)


def member_params(folder: TrialFolder, cfg: StudyConfig) -> Params:
    """The member's own params from its config; its image size must be the study's."""
    raw = folder.read_config()
    trained_size = raw.get("study", {}).get("data", {}).get("image_size")
    size = cfg.data.image_size.model_dump()
    if trained_size is not None and trained_size != size:
        raise EnsembleError(f"{folder.file(TrialFolder.CONFIG)}: trained at data.image_size {trained_size}, the study "
                            f"file now says {size}; predict with the study file the trial was trained with")
    return Params.model_validate(raw["params"])


def load_member_model(folder: TrialFolder, params: Params, cfg: StudyConfig) -> torch.nn.Module:
    size = cfg.data.image_size
    model = build_model(params.backbone, params.head, folder.num_classes(), pretrained=False,
                        drop_rate=params.drop_rate, image_size=(size.height, size.width))
    model.load_state_dict(folder.load_best_model())
    return model.eval()


@torch.no_grad()
def member_probabilities(model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu",
                         tta: str | None = None, rows: np.ndarray | None = None,
                         batch_size: int = EVAL_BATCH) -> np.ndarray:
    """(len(rows), C) class probabilities of one model over uint8 images (N, H, W, 3), in `rows` order.

    The images get the eval transform, as valid did in training (see `normalize_batch`). tta="hflip"
    averages each image's probabilities with those of its mirror image (flipped along the width).
    """
    device = torch.device(device)
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    model.eval().to(device)
    outputs = []
    for start in range(0, len(rows), batch_size):
        x = normalize_batch(images[rows[start:start + batch_size]], device)
        probs = _probabilities(model, x, device)
        if tta == "hflip":
            probs = (probs + _probabilities(model, torch.flip(x, dims=[3]), device)) / 2
        outputs.append(probs.cpu())
    return torch.cat(outputs).numpy()


def _probabilities(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model.class_log_probs(eval_logits(model, x, device)).exp()


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
        self._preprocessed: dict[str, np.ndarray] = {}

    def for_preprocess(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, rows in info.csv order) as a member trained with `method` saw them; the faces and person
        masks of the eval images are found once (beside their decoded cache) when the method needs them."""
        if method not in self._preprocessed:
            fg = foreground(self.cache, self.cache_dir) if PREPROCESSORS.get(method).uses_foreground else None
            self._preprocessed[method] = preprocess(self.cache.images, method, fg)
        return self._preprocessed[method], self.rows


def predict_submission(cfg: StudyConfig, tta: str | None = None, trial: int | None = None,
                       storage: str | None = None, progress: bool = False, log_to_wandb: bool = True,
                       source: str = "auto") -> dict:
    """Write the submission (the promotion's or the ensemble's members, or one trial with `trial`; see
    `load_members`); score it when eval/gt.csv exists."""
    if tta not in TTA_CHOICES:
        raise EnsembleError(f"--tta {tta!r}: choose one of {[c for c in TTA_CHOICES if c]}")
    tta = None if tta == "none" else tta
    members, scores_folder = load_members(cfg, trial, storage, source)
    images = EvalImages(cfg, progress)
    device = pick_device(cfg.train.device)
    member_probs = {}
    for member in members:
        params = member_params(member.folder, cfg)
        model = load_member_model(member.folder, params, cfg)
        images_of_member, rows = images.for_preprocess(params.preprocess)
        member_probs[member.name] = member_probabilities(model, images_of_member, device, tta, rows)
        del model
    weights = np.array([m.weight for m in members], dtype=np.float64)
    probs = blend(np.stack([member_probs[m.name] for m in members]).astype(np.float64), weights)
    answers = probs.argmax(axis=1)
    path = cfg.study_dir / ("submission.csv" if trial is None else f"submission-trial-{trial}.csv")
    submission = pd.DataFrame({"ImageID": images.frame["image_id"].to_numpy(), "ans": answers})
    atomic_write_text(path, submission.to_csv(index=False))
    print(f"wrote {path}: {len(submission)} rows, {len(members)} member model(s), tta {tta or 'none'}")
    result = {"submission": str(path), "rows": len(submission), "members": {m.name: m.weight for m in members},
              "tta": tta, "probs": probs, "member_probs": member_probs}
    labels = images.frame["label"].to_numpy()
    if (labels >= 0).any():
        result.update(_score_eval(cfg, storage, members, member_probs, answers, labels, tta, trial, log_to_wandb,
                                  scores_folder))
    return result


def _score_eval(cfg, storage, members: list[Member], member_probs: dict, answers: np.ndarray, labels: np.ndarray,
                tta: str | None, trial: int | None, log_to_wandb: bool, folder: EnsembleFolder) -> dict:
    """Eval macro F1 (eval/gt.csv) of the ensemble and of each member; where background reliance shows."""
    known = labels >= 0
    num_classes = next(iter(member_probs.values())).shape[1]
    f1 = macro_f1(answers[known], labels[known], num_classes)
    member_f1 = {m.name: macro_f1(member_probs[m.name].argmax(axis=1)[known], labels[known], num_classes)
                 for m in members}
    scores = {"eval_f1": f1, "member_eval_f1": member_f1, "n_eval": int(len(labels)), "n_scored": int(known.sum()),
              "tta": tta}
    content = {**scores, "member_eval_f1": {str(k): v for k, v in member_f1.items()},
               "members": [{"trial": m.trial, "fold": m.fold, "weight": m.weight, "eval_f1": member_f1[m.name]}
                           for m in members]}
    folder.write_eval_metrics(content, trial)
    what = "ensemble" if trial is None else f"trial {trial}"
    print(f"eval macro F1 (eval/gt.csv, {int(known.sum())} images, tta {tta or 'none'}): {what} {f1:.4f}")
    if trial is None:
        for m in members:
            print(f"  {m.name:>12} (weight {m.weight}): {member_f1[m.name]:.4f}")
        if log_to_wandb:
            names = class_names(load_existing_study(cfg, storage).user_attrs.get("data_summary"), num_classes)
            _log_eval_to_wandb(cfg, members, scores, confusion(answers[known], labels[known], num_classes), names)
    return scores


def _log_eval_to_wandb(cfg, members: list[Member], scores: dict, matrix: np.ndarray, names: list[str]) -> None:
    from harness.tracking import log_ensemble

    frame = pd.DataFrame([{"member": m.name, "weight": m.weight, "eval_f1": scores["member_eval_f1"][m.name]}
                          for m in members])
    flat = {"eval/f1": scores["eval_f1"], "eval/n_images": scores["n_scored"], "eval/tta": scores["tta"] or "none",
            **{f"eval/member_{m.name}_f1": scores["member_eval_f1"][m.name] for m in members}}
    log_ensemble(cfg, frame, flat, matrix, names)


def score_trials_on_eval(cfg: StudyConfig, storage: str | None = None, progress: bool = False) -> dict[str, float]:
    """Eval macro F1 (eval/gt.csv) of each finished trial's best epoch: the truth beside each trial's objective.

    Stored with the study (user attribute "eval_f1": {trial: F1}, read by trials_frame) and only ever shown:
    nothing is ranked, pruned or promoted by it. Trials scored before are not scored again. Empty without
    an eval set with ground truth.
    """
    from harness.folders import find_trial_folder

    try:
        images = EvalImages(cfg, progress)
    except EnsembleError:
        return {}
    labels = images.frame["label"].to_numpy()
    known = labels >= 0
    if not known.any():
        return {}
    study = load_existing_study(cfg, storage)
    scored = {str(k): float(v) for k, v in study.user_attrs.get("eval_f1", {}).items()}
    frame = trials_frame(study)
    device = pick_device(cfg.train.device)
    for row in frame[frame["state"].isin(["complete", "pruned"])].itertuples():
        folder, _ = find_trial_folder(cfg, row.run_dir, int(row.trial), TrialFolder.MODEL_FILES)
        if str(row.trial) in scored or folder is None:
            continue
        params = member_params(folder, cfg)
        images_of_member, rows = images.for_preprocess(params.preprocess)
        probs = member_probabilities(load_member_model(folder, params, cfg), images_of_member, device, rows=rows)
        scored[str(row.trial)] = macro_f1(probs.argmax(axis=1)[known], labels[known], probs.shape[1])
    study.set_user_attr("eval_f1", scored)
    return scored
