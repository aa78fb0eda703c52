"""`harness predict STUDY.yaml`: the promoted members on the held-out set, or on any folder of images.

    predict_submission(cfg)            the promotion's fold models, else the ensemble's members, on the held-out
                                       set: the competition's eval/ -> runs/<study>/submission.csv (info.csv
                                       order), or data.test -> runs/<study>/test_predictions.csv
    predict_submission(cfg, trial=N)   one trial alone
    predict_images(cfg, DIR)           every image under DIR -> a CSV of file, predicted class, probabilities

Each member's best checkpoint runs over the images through the decoded cache, preprocessed as that
member was trained (its own crop), with optional test-time augmentation (hflip); the members'
probabilities are averaged with their ensemble weights. Where the held-out set's labels are known
(eval/gt.csv, which the synthetic data ships; a labelled test set) the prediction and each member are
scored against them: eval_metrics.json beside the ensemble (macro and per-class F1, confusion). Shown
only: nothing is chosen by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from harness.augment import PREPROCESSORS, normalize_batch, preprocess
from harness.config import Params, StudyConfig
from harness.data.cache import build_cache
from harness.data.prepare import class_names
from harness.data.readers import IMAGE_SUFFIXES, DataError, is_junk, read_eval, truth_source
from harness.folders import EnsembleFolder, PromotionFolder, StudyFolder, TrialFolder
from harness.foreground import foreground
from harness.io import atomic_write_text
from harness.metrics import confusion, macro_f1, per_class_f1
from harness.model import build_model, eval_logits
from harness.promotion.ensemble import trial_folder_with
from harness.promotion.selection import blend
from harness.runtime import StudyError, load_existing_study
from harness.store import fetch_folder
from harness.study import trials_frame
from harness.train import EVAL_BATCH, pick_device

TTA_CHOICES = (None, "none", "hflip")
NO_MODEL_HINT = "the trial never finished an epoch or its folder was removed"


SOURCES = ("auto", "promotion", "ensemble")


class PredictError(StudyError):
    """A prediction or export that cannot be made as asked (no members, a missing model, an option the
    members cannot honour); the message says what to do."""


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
        raise PredictError(f"--from {source!r}: choose one of {list(SOURCES)}")
    if trial is not None:
        return [Member(trial, 1, _one_trial(cfg, trial, storage))], EnsembleFolder.of(cfg)
    promoted = PromotionFolder.of(cfg)
    summary = promoted.summary() if source != "ensemble" else None
    if summary is not None:
        members = fold_members(promoted, {int(m["trial"]): int(m["weight"]) for m in summary["members"]},
                               summary["folds"])
        missing = [m.name for m in members if not m.folder.has(TrialFolder.MODEL_FILES)
                   and fetch_folder(cfg, m.folder.path, TrialFolder.MODEL_FILES) is None]
        if missing:
            raise PredictError(f"the promotion's fold models {missing} are missing under {promoted.path}; run "
                                "`harness promote` again")
        return members, promoted
    if source == "promotion":
        raise PredictError(f"{promoted.path} holds no promotion: run `harness promote` first")
    ensemble = EnsembleFolder.of(cfg)
    if not ensemble.has_members():
        raise PredictError(f"{ensemble.file(EnsembleFolder.MEMBERS)} does not exist: run `harness ensemble` first "
                            "to select the members, or predict with one trial: `harness predict STUDY.yaml --trial N`")
    return [Member(int(m["trial"]), int(m["weight"]),
                   trial_folder_with(cfg, m["run_dir"], int(m["trial"]), TrialFolder.MODEL_FILES, NO_MODEL_HINT,
                                     error=PredictError))
            for m in ensemble.members()["members"]], ensemble


def fold_members(promoted: PromotionFolder, weights: dict[int, int], folds: int) -> list[Member]:
    """Every fold model of the promoted configurations (configuration -> weight), each with its configuration's
    weight."""
    return [Member(config, weight, promoted.fold(config, fold), fold)
            for config, weight in weights.items() for fold in range(folds)]


def _one_trial(cfg: StudyConfig, trial: int, storage: str | None) -> TrialFolder:
    folder = StudyFolder.of(cfg).trial(trial)
    if folder.has(TrialFolder.MODEL_FILES):
        return folder
    frame = trials_frame(load_existing_study(cfg, storage))
    rows = frame[frame["trial"] == trial]
    if rows.empty:
        raise PredictError(f"study {cfg.name!r} has no trial {trial}; its trials are {sorted(frame['trial'])}")
    return trial_folder_with(cfg, rows.iloc[0]["run_dir"], trial, TrialFolder.MODEL_FILES, NO_MODEL_HINT,
                             error=PredictError)


def member_params(folder: TrialFolder, cfg: StudyConfig) -> Params:
    """The member's own params from its config; its image size must be the study's."""
    raw = folder.read_config()
    trained_size = raw.get("study", {}).get("data", {}).get("image_size")
    size = cfg.data.image_size.model_dump()
    if trained_size is not None and trained_size != size:
        raise PredictError(f"{folder.file(TrialFolder.CONFIG)}: trained at data.image_size {trained_size}, the study "
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
                         batch_size: int = EVAL_BATCH, on_batch=None) -> np.ndarray:
    """(len(rows), C) class probabilities of one model over uint8 images (N, H, W, 3), in `rows` order.

    The images get the eval transform, as valid did in training (see `normalize_batch`). tta="hflip"
    averages each image's probabilities with those of its mirror image (flipped along the width).
    `on_batch(n)` is told each batch's size (a progress bar).
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
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(outputs).numpy()


def _probabilities(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model.class_log_probs(eval_logits(model, x, device)).exp()


class ImageSet:
    """Images to predict, through the decoded cache, with each preprocess method's crops made once.

    `frame` is a reader's index (its `path` column; its order is the output's order). With on_bad_image
    "exclude" an unreadable file is left out (`excluded`) and `frame` keeps the readable rows."""

    def __init__(self, cfg: StudyConfig, frame: pd.DataFrame, progress: bool = False,
                 on_bad_image: str = "fail") -> None:
        size = cfg.data.image_size
        self.cache_dir = Path(cfg.data.cache_dir)
        self.cache = build_cache(list(frame["path"]), size.height, size.width, self.cache_dir,
                                 resize=cfg.data.resize, workers=cfg.data.cache_workers, on_bad_image=on_bad_image,
                                 progress=progress)
        self.excluded = list(self.cache.excluded)
        if self.excluded:
            attrs = dict(frame.attrs)
            frame = frame[frame["path"].isin(set(self.cache.paths))].reset_index(drop=True)
            frame.attrs.update(attrs)
        self.frame = frame
        self.rows = np.array([self.cache.row_of(path) for path in self.frame["path"]])
        self._preprocessed: dict[str, np.ndarray] = {}

    def for_preprocess(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, rows in the frame's order) as a member trained with `method` saw them; the faces and person
        masks of the images are found once (beside their decoded cache) when the method needs them."""
        if method not in self._preprocessed:
            fg = foreground(self.cache, self.cache_dir) if PREPROCESSORS.get(method).uses_foreground else None
            self._preprocessed[method] = preprocess(self.cache.images, method, fg)
        return self._preprocessed[method], self.rows

    @property
    def class_names(self) -> list[str]:
        return list(self.frame.attrs["class_names"])


class EvalImages(ImageSet):
    """The held-out set: the competition's eval images (info.csv order), or data.test for other layouts."""

    def __init__(self, cfg: StudyConfig, progress: bool = False) -> None:
        index = read_eval(cfg.data)
        if index is None:
            raise PredictError(NO_HELD_OUT.format(root=Path(cfg.data.root)))
        self.competition = cfg.data.format == "competition"
        super().__init__(cfg, index.raise_on_errors(), progress)


NO_HELD_OUT = ("no held-out set to predict: the competition layout needs {root}/eval/info.csv and eval/images/; "
               "image-folder and CSV data name one in the study file (data.test: fraction or root). Any folder "
               "of images: `harness predict STUDY.yaml --images DIR`")


def ensemble_probabilities(cfg: StudyConfig, members: list[Member], images: ImageSet, tta: str | None,
                           progress: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The members' weighted average of class probabilities over `images` (frame order), and each member's."""
    device = pick_device(cfg.train.device)
    member_probs = {}
    with tqdm(total=len(members) * len(images.rows), desc=f"predicting ({len(members)} model(s))", unit="img",
              disable=not progress) as bar:
        for member in members:
            params = member_params(member.folder, cfg)
            model = load_member_model(member.folder, params, cfg)
            images_of_member, rows = images.for_preprocess(params.preprocess)
            member_probs[member.name] = member_probabilities(model, images_of_member, device, tta, rows,
                                                             on_batch=bar.update)
            del model
    weights = np.array([m.weight for m in members], dtype=np.float64)
    probs = blend(np.stack([member_probs[m.name] for m in members]).astype(np.float64), weights)
    return probs, member_probs


def checked_tta(tta: str | None) -> str | None:
    if tta not in TTA_CHOICES:
        raise PredictError(f"--tta {tta!r}: choose one of {[c for c in TTA_CHOICES if c]}")
    return None if tta == "none" else tta


def predict_submission(cfg: StudyConfig, tta: str | None = None, trial: int | None = None,
                       storage: str | None = None, progress: bool = False, log_to_wandb: bool = True,
                       source: str = "auto") -> dict:
    """Predict the held-out set with the promotion's or the ensemble's members, or one trial with `trial` (see
    `load_members`): the competition's submission.csv, or test_predictions.csv for a data.test set; scored
    where its labels are known (eval/gt.csv, the test set's labels)."""
    tta = checked_tta(tta)
    members, scores_folder = load_members(cfg, trial, storage, source)
    images = EvalImages(cfg, progress)
    probs, member_probs = ensemble_probabilities(cfg, members, images, tta, progress)
    answers = probs.argmax(axis=1)
    path = StudyFolder.of(cfg).submission(trial, competition=images.competition)
    if images.competition:
        table = pd.DataFrame({"ImageID": images.frame["image_id"].to_numpy(), "ans": answers})
    else:
        table = predictions_table(images.frame["image_id"], probs, images.class_names, images.frame["label"])
    atomic_write_text(path, table.to_csv(index=False))
    print(f"wrote {path}: {len(table)} rows, {len(members)} member model(s), tta {tta or 'none'}")
    result = {"submission": str(path), "rows": len(table), "members": {m.name: m.weight for m in members},
              "tta": tta, "probs": probs, "member_probs": member_probs}
    labels = images.frame["label"].to_numpy()
    if (labels >= 0).any():
        result.update(_score_eval(cfg, storage, members, member_probs, answers, labels, tta, trial, log_to_wandb,
                                  scores_folder, images.class_names))
    return result


def predictions_table(files: pd.Series, probs: np.ndarray, names: list[str],
                      labels: pd.Series | None = None) -> pd.DataFrame:
    """One row per image: file, predicted class name, (its known label,) one probability column per class."""
    table = pd.DataFrame({"file": files.to_numpy(), "predicted": np.asarray(names, dtype=object)[probs.argmax(axis=1)]})
    if labels is not None:
        table["label"] = [names[i] if i >= 0 else "" for i in labels.to_numpy()]
    for index, name in enumerate(names):
        table[f"p_{name}"] = probs[:, index]
    return table


def list_images(directory: Path) -> tuple[pd.DataFrame, list[str]]:
    """Every image file under `directory` (recursively, sorted) as an index frame, and the files skipped
    (hidden ones silently, others as 'path: why')."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--images {directory}: not a folder; give a folder of images (searched recursively)")
    found, skipped = [], []
    for file in sorted(directory.rglob("*")):
        if not file.is_file() or any(is_junk(Path(part)) for part in file.relative_to(directory).parts):
            continue
        if file.suffix.lower() in IMAGE_SUFFIXES:
            found.append({"path": str(file.resolve()), "image_id": str(file.relative_to(directory))})
        else:
            skipped.append(f"{file}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not found:
        raise DataError(f"--images {directory}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))}, "
                        f"searched recursively; {len(skipped)} other file(s))")
    return pd.DataFrame(found), skipped


def predict_images(cfg: StudyConfig, directory: Path, out: Path | None = None, tta: str | None = None,
                   trial: int | None = None, storage: str | None = None, source: str = "auto",
                   progress: bool = True) -> dict:
    """Predict every image under `directory` with the promoted members (see `load_members`): a CSV of file,
    predicted class name and per-class probabilities (default runs/<study>/predictions.csv). Unreadable and
    non-image files are listed and skipped; the rest are predicted."""
    tta = checked_tta(tta)
    members, _ = load_members(cfg, trial, storage, source)
    frame, skipped = list_images(directory)
    frame.attrs["class_names"] = member_class_names(cfg, members[0].folder, storage)
    images = ImageSet(cfg, frame, progress, on_bad_image="exclude")
    skipped += [f"{path}: {reason}" for path, reason in images.excluded]
    if skipped:
        shown = "\n".join(f"  {line}" for line in skipped[:SHOWN_SKIPPED])
        more = f"\n  ... and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
        print(f"skipped {len(skipped)} file(s):\n{shown}{more}")
    if images.frame.empty:
        raise DataError(f"--images {directory}: none of its {len(skipped)} image file(s) could be read")
    probs, _ = ensemble_probabilities(cfg, members, images, tta, progress)
    path = Path(out) if out is not None else StudyFolder.of(cfg).predictions
    path.parent.mkdir(parents=True, exist_ok=True)
    table = predictions_table(images.frame["image_id"], probs, images.class_names)
    atomic_write_text(path, table.to_csv(index=False))
    print(f"wrote {path}: {len(table)} image(s), {len(members)} member model(s), tta {tta or 'none'}")
    return {"predictions": str(path), "rows": len(table), "skipped": skipped, "probs": probs}


SHOWN_SKIPPED = 5


def member_class_names(cfg: StudyConfig, folder: TrialFolder, storage: str | None = None) -> list[str]:
    """The class names the members learned: the study's data summary (stored when it started)."""
    summary = load_existing_study(cfg, storage).user_attrs.get("data_summary")
    return class_names(summary, folder.num_classes())


def _score_eval(cfg, storage, members: list[Member], member_probs: dict, answers: np.ndarray, labels: np.ndarray,
                tta: str | None, trial: int | None, log_to_wandb: bool, folder: EnsembleFolder,
                names: list[str]) -> dict:
    """Macro and per-class F1 on the held-out set (eval/gt.csv, the test set's labels) of the ensemble and of
    each member, and its confusion; where background reliance shows."""
    known = labels >= 0
    num_classes = next(iter(member_probs.values())).shape[1]
    f1 = macro_f1(answers[known], labels[known], num_classes)
    matrix = confusion(answers[known], labels[known], num_classes)
    member_f1 = {m.name: macro_f1(member_probs[m.name].argmax(axis=1)[known], labels[known], num_classes)
                 for m in members}
    scores = {"eval_f1": f1, "member_eval_f1": member_f1, "n_eval": int(len(labels)), "n_scored": int(known.sum()),
              "tta": tta}
    content = {**scores, "member_eval_f1": {str(k): v for k, v in member_f1.items()}, "class_names": names,
               "per_class_f1": per_class_f1(answers[known], labels[known], num_classes).tolist(),
               "confusion": matrix.tolist(),
               "members": [{"trial": m.trial, "fold": m.fold, "weight": m.weight, "eval_f1": member_f1[m.name]}
                           for m in members]}
    folder.write_eval_metrics(content, trial)
    what = "ensemble" if trial is None else f"trial {trial}"
    print(f"eval macro F1 ({truth_source(cfg.data)}, {int(known.sum())} images, tta {tta or 'none'}): {what} {f1:.4f}")
    if trial is None:
        for m in members:
            print(f"  {m.name:>12} (weight {m.weight}): {member_f1[m.name]:.4f}")
        if log_to_wandb:
            _log_eval_to_wandb(cfg, members, scores, matrix, names, content["per_class_f1"])
    return scores


def _log_eval_to_wandb(cfg, members: list[Member], scores: dict, matrix: np.ndarray, names: list[str],
                       class_f1: list[float]) -> None:
    from harness.tracking import log_ensemble

    frame = pd.DataFrame([{"member": m.name, "weight": m.weight, "eval_f1": scores["member_eval_f1"][m.name]}
                          for m in members])
    flat = {"eval/f1": scores["eval_f1"], "eval/n_images": scores["n_scored"], "eval/tta": scores["tta"] or "none",
            **{f"eval/member_{m.name}_f1": scores["member_eval_f1"][m.name] for m in members},
            **{f"eval/f1_class_{name}": value for name, value in zip(names, class_f1, strict=True)}}
    log_ensemble(cfg, frame, flat, matrix, names)


def held_out_scores(cfg: StudyConfig) -> tuple[str, dict] | None:
    """("promotion" | "ensemble", eval_metrics.json) of the last scored prediction of the held-out set: the
    promotion's where it has one, else the single-split ensemble's; None where nothing was scored."""
    for name, folder in (("promotion", PromotionFolder.of(cfg)), ("ensemble", EnsembleFolder.of(cfg))):
        scores = folder.held_out_scores()
        if scores is not None:
            return name, scores
    return None


def describe_held_out(cfg: StudyConfig) -> str | None:
    """One line for `make status`: the held-out prediction's score, shown only."""
    found = held_out_scores(cfg)
    if found is None:
        return None
    source, scores = found
    return (f"held-out set ({truth_source(cfg.data)}, {scores['n_scored']} images): macro F1 {scores['eval_f1']:.4f} "
            f"of the {source}'s prediction (tta {scores.get('tta') or 'none'}); shown only, nothing is chosen by it")


def score_trials_on_eval(cfg: StudyConfig, storage: str | None = None, progress: bool = False) -> dict[str, float]:
    """Eval macro F1 (eval/gt.csv) of each finished trial's best epoch: the truth beside each trial's objective.

    Stored with the study (user attribute "eval_f1": {trial: F1}, read by trials_frame) and only ever shown:
    nothing is ranked, pruned or promoted by it. Trials scored before are not scored again. Empty without
    an eval set with ground truth.
    """
    from harness.store import find_trial_folder

    try:
        images = EvalImages(cfg, progress)
    except PredictError:
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
