"""`make bench` groups "shortcut" and "remedies": does valid predict the leaderboard when the trap is on?

shortcut  The default study at its real size (--quick: its smoke variant), twice from scratch with the
          same seeds: on synthetic data with the background trap (the study file's trap_strength) and
          on the same people without it (trap_strength 0). Each: the study, its trials scored on the
          eval images against eval/gt.csv, its ensemble, and the ensemble's submission scored there.
  shortcut_eval_f1_trap_vs_no_trap   harness = the trap study's submission eval F1, reference = the
                       trap-free study's; ratio = harness / reference, met at >= 0.9.
  shortcut_best_objective_minus_eval harness = the trap study's best trial's objective (what the study
                       believed), reference = that trial's own eval F1; ratio = |harness - reference|
                       (an objective that understates eval is as wrong as one that overstates it),
                       met at <= 0.10.
  shortcut_objective_eval_spearman   harness = Spearman correlation of the objective with eval F1 over
                       the trap study's complete trials, met at >= 0.7; `val_f1_spearman` beside it is
                       the same for raw val F1 (what the study maximised before the objective).
remedies  `harness remedies` on the trap data (the study file's defaults once per remedy and seed, 2 seeds;
          --quick: 1): a row per remedy, harness = its eval F1, reference = no remedy's, met at >= 1.0; the
          rows carry val F1 and background-swapped val F1 too.
"""

from __future__ import annotations

import shutil

import numpy as np

from harness.bench.common import Bench, row, unmeasured
from harness.config import StudyConfig

RATIO_TARGET = 0.9  # eval F1 with the trap / eval F1 without it
OVERSTATEMENT_TARGET = 0.10  # best trial's objective - its eval F1
SPEARMAN_TARGET = 0.7


def trap_study(bench: Bench, trap_strength: float, label: str) -> StudyConfig:
    """The default study on its own synthetic data with this trap strength, W&B off, fresh folders."""
    base = bench.default_study()
    synthetic = base.data.synthetic.model_dump()
    root = bench.out / "shortcut" / label
    return base.replace({"name": f"bench-shortcut-{label}", "runs_dir": str(root / "runs"),
                         "data.root": str(root / "data"), "data.cache_dir": str(bench.out / "shortcut" / "cache"),
                         "data.synthetic": {**synthetic, "trap_strength": trap_strength},
                         "tracking.mode": "disabled"})


def run_to_submission(cfg: StudyConfig) -> tuple[object, dict]:
    """Study, eval F1 of every trial, ensemble, submission: (trials frame, the submission's eval scores)."""
    from harness.pipeline import make_study
    from harness.predict import predict_submission
    from harness.runtime import load_existing_study
    from harness.study import trials_frame

    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    make_study(cfg, progress=False, log_to_wandb=False, report=False)
    submission = predict_submission(cfg, log_to_wandb=False)
    return trials_frame(load_existing_study(cfg)), submission


def bench_shortcut(bench: Bench) -> list[dict]:
    from scipy.stats import spearmanr

    trap_cfg = trap_study(bench, bench.default_study().data.synthetic.trap_strength, "trap")
    free_cfg = trap_study(bench, 0.0, "no-trap")
    frame, trap = run_to_submission(trap_cfg)
    _, free = run_to_submission(free_cfg)
    size = (f"{trap_cfg.search.trials} trials x {trap_cfg.train.epochs} epochs, objective {trap_cfg.search.objective}, "
            f"trap_strength {trap_cfg.data.synthetic.trap_strength} vs 0")
    ratio = row("shortcut_eval_f1_trap_vs_no_trap", trap["eval_f1"], free["eval_f1"], "eval F1", RATIO_TARGET)
    ratio.update(size=size, members={"trap": trap["members"], "no_trap": free["members"]})
    best = frame.iloc[0]  # trials_frame sorts by the objective
    overstated = row("shortcut_best_objective_minus_eval", float(best["objective"]), float(best["eval_f1"]),
                     "F1", OVERSTATEMENT_TARGET, better="lower",
                     ratio=abs(float(best["objective"]) - float(best["eval_f1"])))  # either way is a wrong belief
    overstated.update(size=size, trial=int(best["trial"]), val_f1=float(best["val_f1"]),
                      val_f1_minus_eval=float(best["val_f1"]) - float(best["eval_f1"]))
    complete = frame[(frame["state"] == "complete") & np.isfinite(frame["eval_f1"].astype(float))]
    if len(complete) < 3:
        return [ratio, overstated, unmeasured("shortcut_objective_eval_spearman", "rho", SPEARMAN_TARGET, "higher",
                                              f"{len(complete)} complete trial(s): a rank correlation needs 3")]
    rho = float(spearmanr(complete["objective"], complete["eval_f1"]).statistic)
    plain = float(spearmanr(complete["val_f1"], complete["eval_f1"]).statistic)
    correlation = row("shortcut_objective_eval_spearman", rho, 1.0, "rho", SPEARMAN_TARGET, ratio=rho,
                      constant="a perfect rank correlation")
    correlation.update(size=size, complete_trials=len(complete), val_f1_spearman=round(plain, 3))
    return [ratio, overstated, correlation]


def bench_remedies(bench: Bench) -> list[dict]:
    from harness.remedies import run_remedies

    cfg = trap_study(bench, bench.default_study().data.synthetic.trap_strength, "remedies")
    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    table = run_remedies(cfg, seeds=1 if bench.quick else 2)
    by_name = {entry["remedy"]: entry for entry in table["rows"]}
    reference = by_name["none"].get("eval_f1")
    rows = []
    for name, entry in by_name.items():
        if name == "none":
            continue
        if reference is None or entry.get("eval_f1") is None:
            rows.append(unmeasured(f"remedy_{name}_eval_f1", "eval F1", 1.0, "higher", "no eval F1 (a failed run?)"))
            continue
        result = row(f"remedy_{name}_eval_f1", entry["eval_f1"], reference, "eval F1", 1.0)
        result.update({key: entry.get(key) for key in ("val_f1", "val_f1_bgswap", "eval_f1_mask", "eval_f1_gender",
                                                        "eval_f1_age")}, seeds=table["seeds"])
        rows.append(result)
    return rows
