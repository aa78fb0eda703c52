"""`make bench` group "applicability": the shortcut measures know where they apply, on data we did not make.

  applicability_digits_refused      studies/default.yaml copied onto scikit-learn's digits as a user would
                                    (multihead and the portrait crops removed, a 50/50 split): the study is
                                    refused before any trial folder or storage is written. 1 = refused.
  applicability_realphoto_refused   the same on the real-photo trap (harness.data.realphoto): faces are
                                    half the subjects, so the person-based probe does not apply. 1 = refused.
  audit_<data>_flags_trap           the context audit's largest context-over-chance F1 lift on the trapped
                                    data against the trap-free twin's (the same subjects on random
                                    backgrounds); met when the trap is flagged and the twin is not.
  audit_digits_quiet                the audit on digits: met when nothing is flagged.
  realphoto_face_hit_rate           BlazeFace/Haar on the real face subjects (IoU >= 0.4 with the pasted face
                                    crop); reference: the share of faces (1.0). Mask IoU and false faces on
                                    non-faces beside it.
  realphoto_remedies                `harness remedies` there: eval F1 of the best remedy that applies (the
                                    centre crop) against no remedy; the person-based ones are reported
                                    as not applying.
  realphoto_trap_eval_f1            the search that applies there (studies/digits.yaml's: val/f1, no
                                    person-based remedy) on the trapped data and on its twin, each ensemble
                                    scored on the held-out eval photos: ratio trap / no trap, target 0.9.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from harness.bench.common import Bench, row
from harness.config import StudyConfig, load_study
from harness.folders import StudyFolder

PORTRAIT_ONLY = {"search.space.head.choices": ["multiclass"], "params.head": "multiclass",
                 "params.preprocess": "none", "search.space.preprocess.choices": ["none", "center_crop"],
                 "search.enqueue": []}  # the recipes name multihead and the portrait crops too


def bench_applicability(bench: Bench) -> list[dict]:
    from harness.data.realphoto import make_realphoto

    root = bench.out / "applicability"
    shutil.rmtree(root, ignore_errors=True)
    rows = [refusal_row(bench, "digits", digits_as_user(bench, root))]
    data = {trap: root / f"realphoto-{trap}" for trap in (0.9, 0.0)}
    for trap, folder in data.items():
        make_realphoto(folder, trap_strength=trap)
    rows.append(refusal_row(bench, "realphoto", realphoto_as_user(bench, root, data[0.9], "default")))
    rows += audit_rows(bench, root, data)
    rows.append(detection_row(bench, root, data[0.9]))
    rows.append(trap_eval_row(bench, root, data))
    rows.append(remedies_row(bench, root, data[0.9]))
    return rows


def digits_as_user(bench: Bench, root: Path) -> StudyConfig:
    return bench.default_study({"name": "bench-digits-default", "runs_dir": str(root / "runs"),
                                "data.format": "imagefolder", "data.synthetic": None, "data.sample": "digits",
                                "data.root": str(root / "digits"), "data.cache_dir": str(root / "cache"),
                                "data.valid_fraction": 0.5, "data.image_size": {"height": 64, "width": 64},
                                "tracking.mode": "disabled", **PORTRAIT_ONLY}, smoke=False)


def realphoto_as_user(bench: Bench, root: Path, data: Path, base: str, smoke: bool = False) -> StudyConfig:
    """The default study (`base` "default") or the digits study ("digits") pointed at a real-photo dataset."""
    overrides = {"name": f"bench-realphoto-{base}-{data.name}", "runs_dir": str(root / "runs"),
                 "data.format": "csv", "data.csv": "train.csv", "data.synthetic": None, "data.sample": None,
                 "data.root": str(data), "data.cache_dir": str(root / "cache"), "data.resize": "area",
                 "data.image_size": {"height": 64, "width": 64}, "tracking.mode": "disabled"}
    if base == "default":
        return bench.default_study({**overrides, **PORTRAIT_ONLY}, smoke=False)
    cfg = load_study(Path("studies/digits.yaml"), smoke=smoke)
    return cfg.replace({**overrides, "data.sample": None})


def refusal_row(bench: Bench, name: str, cfg: StudyConfig) -> dict:
    from harness.applicability import NotApplicable
    from harness.study import run_study

    started, message = time.perf_counter(), ""
    try:
        run_study(cfg, progress=False)
        refused = False
    except NotApplicable as error:
        refused, message = True, str(error)
    seconds = time.perf_counter() - started
    study = StudyFolder.of(cfg)
    untouched = not study.trials.exists() and not study.database.exists()
    result = row(f"applicability_{name}_refused", float(refused and untouched), 1.0, "refused before any trial", 1.0)
    result.update(seconds_to_refusal=round(seconds, 1), message=message.splitlines()[0] if message else None)
    return result


def audit_rows(bench: Bench, root: Path, data: dict[float, Path]) -> list[dict]:
    from harness.context_audit import audit_study_data
    from harness.data.prepare import prepare_data

    def audit(cfg):
        return audit_study_data(cfg, prepare_data(cfg, progress=False, refuse_foreground=False))

    def lift(found) -> float:
        return max(item.f1 - item.chance for item in found)

    rows = []
    synthetic = {trap: bench.default_study({"name": f"bench-audit-{trap}", "runs_dir": str(root / "runs"),
                                            "data.root": str(root / f"synthetic-{trap}"),
                                            "data.synthetic.trap_strength": trap,
                                            "data.cache_dir": str(root / "cache")}) for trap in (0.85, 0.0)}
    real = {trap: realphoto_as_user(bench, root, folder, "digits") for trap, folder in data.items()}
    for name, configs in (("synthetic", synthetic), ("realphoto", real)):
        trapped, free = (audit(cfg) for cfg in configs.values())
        flags = (any(item.flagged for item in trapped), any(item.flagged for item in free))
        result = row(f"audit_{name}_flags_trap", lift(trapped), lift(free), "context F1 above chance (trap vs none)",
                     1.0, ratio=float(flags[0] and not flags[1]))
        result.update(flagged_with_trap=[item.line() for item in trapped if item.flagged],
                      flagged_without_trap=[item.line() for item in free if item.flagged])
        rows.append(result)
    digits = audit(load_study(Path("studies/digits.yaml")).replace({
        "data.root": str(root / "digits"), "data.cache_dir": str(root / "cache")}))
    result = row("audit_digits_quiet", lift(digits), 0.0, "context F1 above chance", 1.0,
                 ratio=float(not any(item.flagged for item in digits)))
    result.update(lines=[item.line() for item in digits])
    rows.append(result)
    return rows


def detection_row(bench: Bench, root: Path, data: Path) -> dict:
    """Faces and person masks found on real photos against the pasted truth."""
    import pandas as pd

    from harness.data.cache import build_cache
    from harness.data.realphoto import read_realphoto_truth
    from harness.foreground import box_iou, compute_foreground, mask_iou

    data = Path(data).resolve()
    table = pd.read_csv(data / "truth.csv")
    paths = [str(data / p) for p in table["path"]]
    cache = build_cache(paths, 96, 96, root / "cache", progress=False)
    truth = read_realphoto_truth(data, list(cache.paths), 96, 96)
    fg = compute_foreground(np.asarray(cache.images))
    faces = truth["face"].to_numpy()
    boxes = np.stack(truth["box"].to_numpy())
    hits = (box_iou(fg.faces, boxes) >= 0.4) & fg.found
    iou = mask_iou(fg.masks[faces], np.stack(truth["mask"].to_numpy())[faces])
    result = row("realphoto_face_hit_rate", float(hits[faces].mean()), 1.0, "faces found (IoU >= 0.4)", 0.8)
    result.update(false_faces_on_non_faces=round(float(fg.found[~faces].mean()), 3),
                  mask_iou_mean=round(float(iou.mean()), 3), mask_iou_p10=round(float(np.percentile(iou, 10)), 3),
                  mask_fallback_share=round(fg.stats["mask_fallback"] / len(faces), 3))
    return result


def trap_eval_row(bench: Bench, root: Path, data: dict[float, Path]) -> dict:
    from harness.promotion.ensemble import run_ensemble
    from harness.study import run_study, trials_frame

    scores, details = {}, {}
    for trap, folder in data.items():
        cfg = realphoto_as_user(bench, root, folder, "digits", smoke=bench.quick)
        started = time.perf_counter()
        frame = trials_frame(run_study(cfg, progress=False))
        run_ensemble(cfg, log_to_wandb=False)
        scores[trap] = eval_f1(cfg, folder)
        best = frame.sort_values("objective", ascending=False).iloc[0]
        details[f"trap_{trap}"] = {"eval_f1": round(scores[trap], 4), "best_val_f1": round(float(best["val_f1"]), 4),
                                   "seconds": round(time.perf_counter() - started, 1)}
    result = row("realphoto_trap_eval_f1", scores[0.9], scores[0.0], "eval F1, trap / no trap", 0.9)
    result.update(**details)
    return result


def remedies_row(bench: Bench, root: Path, data: Path) -> dict:
    """`harness remedies` on the trapped real photos: the remedies that apply trained and scored on eval, the
    others reported as not applying (faces are half the subjects)."""
    from harness.folders import TrialFolder
    from harness.remedies import run_remedies

    cfg = realphoto_as_user(bench, root, data, "digits", smoke=bench.quick).replace({"name": "bench-realphoto-remedies"})
    table = run_remedies(cfg)
    scores = {}
    for entry in table["rows"]:
        if entry["applies"]:
            folders = [TrialFolder(StudyFolder.of(cfg).remedy_run(entry["remedy"], run["seed"])) for run in entry["runs"]
                       if run["state"] == "complete"]
            scores[entry["remedy"]] = round(eval_f1(cfg, data, folders), 4)
    remedies = {name: score for name, score in scores.items() if name != "none"}
    best = max(remedies, key=remedies.get)
    result = row("realphoto_remedies", remedies[best], scores["none"], f"eval F1, best remedy ({best}) / none", 1.0)
    result.update(eval_f1=scores, val_f1={e["remedy"]: e.get("val_f1") for e in table["rows"] if e["applies"]},
                  not_applying={e["remedy"]: e["reason"] for e in table["rows"] if not e["applies"]})
    return result


def eval_f1(cfg: StudyConfig, data: Path, folders: list | None = None) -> float:
    """Macro F1 on the held-out eval photos of a real-photo dataset: of the study's ensemble, or of the trial
    folders given (equal weights)."""
    import pandas as pd

    from harness.augment import preprocess
    from harness.data.cache import build_cache
    from harness.metrics import macro_f1
    from harness.predict import load_member_model, load_members, member_params, member_probabilities
    from harness.train import pick_device

    data = Path(data).resolve()
    table = pd.read_csv(data / "eval.csv")
    names = sorted(set(pd.read_csv(data / "train.csv")["label"]))
    size = cfg.data.image_size
    cache = build_cache([str(data / p) for p in table["path"]], size.height, size.width, Path(cfg.data.cache_dir),
                        resize=cfg.data.resize, progress=False)
    order = np.array([cache.row_of(str(data / p)) for p in table["path"]])
    weighted = [(folder, 1) for folder in folders] if folders is not None else \
        [(member.folder, member.weight) for member in load_members(cfg, source="ensemble")[0]]
    total = 0.0
    for folder, weight in weighted:
        params = member_params(folder, cfg)
        images = preprocess(np.asarray(cache.images), params.preprocess)
        probs = member_probabilities(load_member_model(folder, params, cfg), images,
                                     pick_device(cfg.train.device), rows=order)
        total = total + weight * probs
    labels = table["label"].map({name: i for i, name in enumerate(names)}).to_numpy()
    return macro_f1(np.asarray(total).argmax(axis=1), labels, len(names))
