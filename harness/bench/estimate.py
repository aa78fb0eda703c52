"""`make bench` group "estimate": does the promotion's estimate of the submission hold against the truth?

The default study (--quick: its smoke variant) run as a user runs it (`make study`, `make promote`, `make
submit`; bench.spread.run_as_user) on synthetic data: the default data (the trap, generator seed 0), then
trap-free data of SEEDS generator seeds, with NOISE of the persons given a wrong label and without. Per
run: the promotion's estimate of the submission (promotion.submission_estimate: read from the submitted
fold models' probabilities on the eval images at their own confidence, its interval from out-of-fold sets
as large) and its 95% interval, the new-set estimate it replaced (the honest out-of-fold ensemble scored on
draws of as many persons as the eval set has), the same on the audit's corrected labels, the cv F1 over all
persons, and the submission's eval F1 against eval/gt.csv.

  estimate_error_default     harness = |estimate - eval F1| on the default data, reference = |new-set
                             estimate - eval F1| (the figure shown before); ratio = harness, met at <= 0.05.
  estimate_error_noisy       the same, the mean over the trap-free runs with label noise.
  estimate_coverage          harness = runs whose eval F1 lies inside the estimate's 95% interval,
                             reference = runs; ratio = harness / reference, met at >= 0.8 (4 of 5).
  estimate_cost              harness = seconds of `make promote` with the estimate, reference = the same
                             less the estimate's own seconds (its summary's); ratio met at <= 1.5.
"""

from __future__ import annotations

import numpy as np

from harness.bench.common import Bench, row
from harness.config import StudyConfig

SEEDS = (1, 2, 3, 4, 5)
NOISE = 0.05
ERROR_TARGET = 0.05
COVERAGE_TARGET = 0.8
COST_TARGET = 1.5


def estimate_study(bench: Bench, seed: int, noise: float, trap: float) -> StudyConfig:
    base = bench.default_study()
    root = bench.out / "estimate"
    key = f"trap{trap}-noise{noise}-seed{seed}"
    synthetic = {**base.data.synthetic.model_dump(), "seed": seed, "trap_strength": trap, "label_noise": noise}
    return base.replace({"name": f"bench-estimate-{key}", "runs_dir": str(root / "runs"),
                         "data.root": str(root / "data" / key), "data.cache_dir": str(root / "cache"),
                         "tracking.mode": "disabled", "data.synthetic": synthetic})


def measure(cfg: StudyConfig) -> dict:
    """One run as a user runs it; the estimate beside the truth."""
    from harness.bench.spread import run_as_user
    from harness.folders import PromotionFolder

    figures = run_as_user(cfg)
    summary = PromotionFolder.of(cfg).summary()
    estimate = summary["estimate"]
    truth = figures["eval_f1"]
    new_set = estimate["new_set"]
    return {"eval_f1": truth, "estimate": round(estimate["f1"], 4), "ci95": [round(v, 4) for v in estimate["ci95"]],
            "inside": bool(estimate["ci95"][0] <= truth <= estimate["ci95"][1]), "basis": estimate["basis"],
            "new_set": round(new_set["f1"], 4), "new_set_ci95": [round(v, 4) for v in new_set["ci95"]],
            "new_set_inside": bool(new_set["ci95"][0] <= truth <= new_set["ci95"][1]),
            "estimate_corrected_labels": round(estimate["corrected_labels"]["f1"], 4),
            "cv_f1": round(summary["cv_f1"], 4), "promote_seconds": summary["seconds"],
            "estimate_seconds": estimate["seconds"], "winner": figures["winner"]}


def bench_estimate(bench: Bench) -> list[dict]:
    default = measure(estimate_study(bench, 0, 0.0, bench.default_study().data.synthetic.trap_strength))
    runs = {(noise, seed): measure(estimate_study(bench, seed, noise, 0.0)) for noise in (NOISE, 0.0) for seed in SEEDS}
    every = [default, *runs.values()]

    def error(run: dict, key: str) -> float:
        return abs(run[key] - run["eval_f1"])

    first = row("estimate_error_default", error(default, "estimate"), error(default, "new_set"), "|F1 - eval F1|",
                ERROR_TARGET, better="lower", ratio=error(default, "estimate"))
    first.update(run=default)
    noisy = [runs[(NOISE, seed)] for seed in SEEDS]
    mean_error = float(np.mean([error(r, "estimate") for r in noisy]))
    second = row("estimate_error_noisy", mean_error, float(np.mean([error(r, "new_set") for r in noisy])),
                 "mean |F1 - eval F1|", ERROR_TARGET, better="lower", ratio=mean_error)
    second.update(runs={f"noise{n}-seed{s}": r for (n, s), r in runs.items()}, seeds=list(SEEDS), noise=NOISE)
    inside = sum(r["inside"] for r in every)
    coverage = row("estimate_coverage", inside, len(every), "runs with eval F1 inside the 95% interval",
                   COVERAGE_TARGET)
    promote = float(np.mean([r["promote_seconds"] for r in every]))
    spent = float(np.mean([r["estimate_seconds"] for r in every]))
    cost = row("estimate_cost", promote, promote - spent, "s of make promote", COST_TARGET, better="lower")
    return [first, second, coverage, cost]
