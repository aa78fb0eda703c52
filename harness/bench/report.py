"""`make bench` group "report": how long the HTML report of a 50-trial study takes, and how big it is.

    python -m harness.bench --only report [--quick]

The study is generated without training: a real SQLite Optuna study whose trials are
added with `optuna.trial.create_trial` (params drawn from the default study's search
space, val F1 per epoch, the user attributes a real trial stores, some pruned and
failed ones) plus a tiny folder per trial (metrics.csv, per_class_f1.npy,
confusion.npy, result.json) and an ensemble folder, all under runs/bench/report-study.
Targets: under 10 seconds and under 10 MB with every script inlined. The same generator
builds the fast studies of tests/test_report.py.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import harness
from harness.bench.common import DEFAULT_STUDY, Bench, row
from harness.config import StudyConfig, load_study
from harness.data.labels import NUM_CLASSES, class_name
from harness.folders import EnsembleFolder, StudyFolder, TrialFolder
from harness.records import TrialResult
from harness.runtime import default_storage
from harness.study import trials_frame

EPOCHS = 4
REPORT_SECONDS_TARGET = 10.0
REPORT_MEGABYTES_TARGET = 10.0


# ------------------------------------------------------------------------ fake trials


def distribution(spec) -> BaseDistribution:
    if spec.type == "categorical":
        return CategoricalDistribution(spec.choices)
    if spec.type == "int":
        return IntDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    return FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)


def sample_params(cfg: StudyConfig, rng: np.random.Generator) -> tuple[dict, dict]:
    """Params and distributions of one trial, conditional params only when their parents allow them."""
    values, params, distributions = cfg.params.model_dump(), {}, {}
    for name, spec in cfg.search.space.items():
        if not spec.active(values):
            continue
        dist = distribution(spec)
        if isinstance(dist, CategoricalDistribution):
            value = dist.choices[rng.integers(len(dist.choices))]
        elif dist.log:
            value = float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
        else:
            value = float(rng.uniform(dist.low, dist.high))
        if isinstance(dist, IntDistribution):
            value = int(round(value))
        values[name], params[name], distributions[name] = value, value, dist
    return params, distributions


def plausible_f1(params: dict, rng: np.random.Generator) -> float:
    """A val F1 that depends on the params the way a real search might (so importances have signal)."""
    score = 0.62 + 0.08 * params.get("aug_strength", 0.3) - 0.06 * abs(math.log10(params.get("lr", 2e-3)) + 2.6)
    score += {"multihead": 0.03}.get(params.get("head"), 0.0) + rng.normal(0, 0.02)
    return float(np.clip(score, 0.05, 0.98))


def epoch_rows(final_f1: float, epochs: int, rng: np.random.Generator) -> list[dict]:
    """metrics.csv rows with the columns harness.train writes: val F1 rising to final_f1, the gap widening."""
    rows = []
    for epoch in range(epochs):
        progress = 1.0 - 0.5 ** (epoch + 1)
        val = final_f1 * (0.6 + 0.4 * progress / (1.0 - 0.5 ** EPOCHS))
        probe = min(1.0, val + 0.03 + 0.05 * epoch + rng.normal(0, 0.01))
        swapped = val - abs(rng.normal(0.08, 0.03))
        rows.append({"epoch": epoch, "train/loss": 2.5 * (1 - progress) + 0.2, "val/loss": 2.4 * (1 - progress) + 0.4,
                     "val/f1": val, "val/f1_mask": min(1.0, val + 0.1), "val/f1_gender": min(1.0, val + 0.15),
                     "val/f1_age": val - 0.05, "val/acc": min(1.0, val + 0.08), "train/f1_probe": probe,
                     "gap/f1": probe - val, "val/f1_bgswap": swapped, "gap/bgswap": val - swapped,
                     "objective": min(val, swapped),
                     "lr": 2e-3 * (1 - epoch / epochs), "epoch_time": 30 + rng.normal(0, 1),
                     "images_per_s": 480 + rng.normal(0, 15), "probe_time": 4 + rng.normal(0, 0.2)})
    return rows


def fake_confusion(f1: float, rng: np.random.Generator, per_class: int = 40) -> np.ndarray:
    """An (18, 18) count matrix whose diagonal share follows the F1."""
    matrix = rng.poisson((1 - f1) * per_class / NUM_CLASSES, (NUM_CLASSES, NUM_CLASSES))
    np.fill_diagonal(matrix, rng.poisson(f1 * per_class, NUM_CLASSES))
    return matrix.astype(np.int64)


def per_class_from(confusion: np.ndarray) -> np.ndarray:
    true_positive = np.diag(confusion).astype(float)
    precision = true_positive / np.maximum(confusion.sum(axis=0), 1)
    recall = true_positive / np.maximum(confusion.sum(axis=1), 1)
    return np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)


def write_trial_folder(folder: TrialFolder, rows: list[dict], state: str, rng: np.random.Generator) -> TrialResult:
    """The trial's folder as harness.train leaves it; its result (the best epoch's figures)."""
    folder.prepare()
    folder.write_metrics(rows)
    result = TrialResult(state=state, run_dir=str(folder.path), seconds=35.0 * len(rows))
    result.fill(rows, max(rows, key=lambda r: r["objective"])["epoch"])
    confusion = fake_confusion(result.best["val/f1"], rng)
    folder.save_best_scores(per_class_from(confusion), confusion)
    folder.write_result(result.as_json())
    return result


def fake_trial(cfg: StudyConfig, number: int, rng: np.random.Generator, hostile: str | None = None):
    """One finished trial as Optuna stores it, and its folder. Every 7th is pruned, every 11th failed."""
    params, distributions = sample_params(cfg, rng)
    if hostile is not None:  # a user string that must come out escaped (tests); one of the backbone choices
        params["backbone"] = hostile
    run_dir = StudyFolder.of(cfg).trial(number).path
    attrs: dict[str, Any] = {"identity": number, "run_dir": str(run_dir), "wandb_run_id": f"{cfg.name}-t{number:04d}"}
    if number % 11 == 10:
        attrs.update(state="failed", reason="RuntimeError: non-finite loss (nan) at epoch 1, step 3", epochs_run=1)
        return optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=distributions,
                                         user_attrs=attrs)
    pruned = number % 7 == 6
    rows = epoch_rows(plausible_f1(params, rng), 2 if pruned else EPOCHS, rng)
    result = write_trial_folder(TrialFolder(run_dir), rows, "pruned" if pruned else "complete", rng)
    attrs.update(result.user_attrs())
    return optuna.trial.create_trial(
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
        value=rows[-1]["objective"] if pruned else result.objective,
        params=params, distributions=distributions, user_attrs=attrs,
        intermediate_values={r["epoch"] + 1: r["objective"] for r in rows})


def fake_data_summary(rng: np.random.Generator, persons: int = 2700) -> dict:
    """A competition-scale data summary in the shape of harness.report.data_summary."""
    valid_persons = persons // 5
    shares = rng.dirichlet(np.full(NUM_CLASSES, 2.0))
    train, valid = (rng.multinomial(n * 7, shares).tolist() for n in (persons - valid_persons, valid_persons))
    return {"persons": {"train": persons - valid_persons, "valid": valid_persons},
            "images": {"train": sum(train), "valid": sum(valid)}, "class_counts": {"train": train, "valid": valid},
            "class_names": [class_name(i) for i in range(NUM_CLASSES)], "split_hash": "0123456789abcdef",
            "excluded_images": 0}


def make_fake_study(cfg: StudyConfig, trials: int, seed: int = 0, hostile: str | None = None,
                    with_data_summary: bool = True) -> optuna.Study:
    """A real SQLite study of `trials` finished trials at the study's default storage, in seconds."""
    rng = np.random.default_rng(seed)
    cfg.study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=cfg.name, storage=default_storage(cfg), direction="maximize")
    summary = fake_data_summary(rng)
    for key, value in {"split_hash": summary["split_hash"], "space_hash": cfg.search_space_hash(),
                       "harness_version": harness.__version__}.items():
        study.set_user_attr(key, value)
    if with_data_summary:
        study.set_user_attr("data_summary", summary)
    study.add_trials([fake_trial(cfg, n, rng, hostile if n == 1 else None) for n in range(trials)])
    return study


def write_fake_ensemble(cfg: StudyConfig, study: optuna.Study, top_k: int = 5, seed: int = 0) -> Path:
    """runs/<study>/ensemble/ in the shape harness.promotion.ensemble writes, from the study's best trials (no logits needed)."""
    rng = np.random.default_rng(seed)
    frame = trials_frame(study)
    top = frame[frame["state"] == "complete"].head(top_k)
    weights = rng.integers(1, 6, len(top))  # greedy selection with replacement: how often each was added
    members = [{"trial": int(r["trial"]), "weight": int(w), "objective": float(r["objective"]),
                "val_f1": float(r["val_f1"]),
                "gap_f1": float(r["gap_f1"]), "run_dir": str(r["run_dir"])} for (_, r), w in zip(top.iterrows(), weights)]
    best = float(top["objective"].iloc[0])
    halves = [{"fit_images": 1890, "held_images": 1890, "best_single": best - 0.01 + 0.01 * half,
               "average_top_k": best + 0.004, "greedy": best + 0.006, "fit_persons": 270, "held_persons": 270,
               "greedy_weights": {str(m["trial"]): m["weight"] for m in members}} for half in range(2)]
    scores = {"best_single": best - 0.005, "average_top_k": best + 0.004, "greedy": best + 0.006}
    confusion = fake_confusion(min(0.98, best + 0.02), rng)
    folder = EnsembleFolder.of(cfg)
    folder.write(
        {"members": members, "method": "greedy", "rounds": 25, "rounds_kept": int(weights.sum()),
         "candidates": len(top), "candidate_trials": [m["trial"] for m in members], "note": None},
        {"method": "greedy", "objective": "robust/f1", "honest": {**scores, "halves": halves},
         "fitted_on_all_valid": {"greedy": best + 0.02, "best_single": best, "average_top_k": best + 0.01},
         "n_valid": 3780, "n_persons": 540, "trajectory": [best + 0.02 * (1 - 0.5 ** r) for r in range(25)]},
        np.full((3780, NUM_CLASSES), 1 / NUM_CLASSES), per_class_from(confusion), confusion)
    return folder.path


# ------------------------------------------------------------------------------ bench


def bench_study_config(out: Path, study_file: Path = DEFAULT_STUDY, name: str = "report-study") -> StudyConfig:
    """A study file's search space under `out`, with a data root that does not exist (no data needed)."""
    return load_study(study_file).replace(
        {"name": name, "runs_dir": str(out), "data.root": str(out / name / "no-data"), "data.synthetic": None})


def bench_report(bench: Bench) -> list[dict]:
    from harness.report import external_references, write_report

    cfg = bench_study_config(bench.out, bench.study_file)
    shutil.rmtree(cfg.study_dir, ignore_errors=True)  # a fresh study each run
    study = make_fake_study(cfg, trials=12 if bench.quick else 50)
    write_fake_ensemble(cfg, study)
    start = time.perf_counter()
    path = write_report(cfg)
    seconds = time.perf_counter() - start
    page = path.read_text()
    if external_references(page):
        raise RuntimeError(f"{path} references the network: {external_references(page)[:3]}")
    megabytes = path.stat().st_size / 1e6
    return [row("report_seconds", seconds, REPORT_SECONDS_TARGET, "seconds", 1.0, better="lower",
                constant=f"the budget of {REPORT_SECONDS_TARGET:g} s for a report"),
            row("report_megabytes", megabytes, REPORT_MEGABYTES_TARGET, "MB", 1.0, better="lower",
                constant=f"the budget of {REPORT_MEGABYTES_TARGET:g} MB for one self-contained file")]
