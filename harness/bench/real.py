"""`make bench` group "real": the default search on real images against a classical baseline.

  real_<sample>_f1_vs_svm   studies/digits.yaml (scikit-learn's handwritten digits; also run on
                            scikit-image's LFW faces / non-faces with `data.sample: faces`): the
                            study, its ensemble, and its honest F1 (weights chosen on one half of
                            the valid images, scored on the other, both ways, averaged) against an
                            RBF SVM on the same decoded pixels (grey levels of the study's image
                            size), its C chosen by 5-fold cross-validation on the train split only,
                            scored on the same valid halves. ratio = harness / SVM, met at >= 1.0:
                            the harness should not lose to an SVM on pixels.
The row also carries the study's trial 0 (its defaults, not selected) and best trial val F1s, and
the wall seconds of each side. --quick runs the smoke variant (2 trials, random init).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from harness.bench.common import Bench, row
from harness.config import load_study
from harness.metrics import macro_f1
from harness.promotion.selection import person_halves

REAL_STUDY = Path("studies/digits.yaml")
SAMPLES_RUN = ("digits", "faces")


def bench_real(bench: Bench) -> list[dict]:
    return [sample_row(bench, sample) for sample in SAMPLES_RUN]


def sample_row(bench: Bench, sample: str) -> dict:
    from harness.promotion.ensemble import run_ensemble
    from harness.study import run_study, trials_frame

    root = bench.out / "real" / sample
    cfg = load_study(REAL_STUDY, smoke=bench.quick).replace({
        "name": f"bench-real-{sample}", "runs_dir": str(root / "runs"), "data.sample": sample,
        "data.root": str(bench.out / "real-data" / sample), "data.cache_dir": str(bench.out / "real-data" / "cache"),
        "tracking.mode": "disabled"})
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    frame = trials_frame(run_study(cfg, progress=False))
    summary = run_ensemble(cfg, log_to_wandb=False)
    harness_seconds = time.perf_counter() - started
    svm, svm_seconds = svm_honest_f1(cfg)
    result = row(f"real_{sample}_f1_vs_svm", summary["metrics"]["honest"][cfg.ensemble.method], svm, "macro F1", 1.0)
    complete = frame[frame["state"] == "complete"]
    result.update(
        size=f"{cfg.data.sample} at {cfg.data.image_size.height}x{cfg.data.image_size.width}, "
             f"{cfg.search.trials} trials x {cfg.train.epochs} epochs",
        trial0_val_f1=round(float(frame.loc[frame["trial"] == 0, "val_f1"].iloc[0]), 4),
        best_val_f1=round(float(complete["val_f1"].max()), 4) if len(complete) else None,
        seconds={"harness": round(harness_seconds, 1), "svm": round(svm_seconds, 1)})
    return result


def svm_honest_f1(cfg) -> tuple[float, float]:
    """The baseline: an RBF SVM on the study's decoded pixels, its C chosen by CV on train, scored on the
    valid halves the ensemble's honest figure uses. Returns (mean held-out macro F1, seconds)."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    from harness.data.prepare import prepare_data

    started = time.perf_counter()
    data = prepare_data(cfg, progress=False)
    pixels = np.asarray(data.cache.images, dtype=np.float32).mean(axis=3).reshape(len(data.cache.images), -1) / 255
    labels, train, valid = data.frame["label"].to_numpy(), data.rows("train"), data.rows("valid")
    search = GridSearchCV(SVC(), {"C": [1, 3, 10, 30], "gamma": ["scale"]}, cv=5).fit(pixels[train], labels[train])
    predicted = search.predict(pixels[valid])
    valid_labels, persons = labels[valid], data.frame["person"].to_numpy()[valid]
    halves = person_halves(valid_labels, persons, seed=cfg.seed)
    scores = [macro_f1(predicted[held], valid_labels[held], data.num_classes) for _, held in halves]
    return float(np.mean(scores)), time.perf_counter() - started
