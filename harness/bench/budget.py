"""`make bench` group "budget": the best answer inside a budget, against a plain script's wall.

On the default study's data with the trap (trap_strength 0.85) of each report seed, in one run and on the same
data (--quick: the smoke variant, a plain script of 2 trials x 1 epoch of 2 batches, seed 0, and budgets of at
least QUICK_FLOOR_S: a check that every row runs, not a figure):

  plain       the plain Optuna + timm script (harness.bench.plain): its wall P, its eval F1
  reference   the pipeline without a budget, as a user runs it (make study, make promote, make submit): eval F1 R
  budget P    make study --budget P (its promoted submission): eval F1 and wall
  budget P/2  make study --budget P/2: eval F1 and wall

  budget_half_eval_f1   harness = mean eval F1 at P/2, reference = mean R; ratio = the smallest F1(P/2) / R over
                        the seeds, met at >= 0.95
  budget_full_eval_f1   the same at P; met at >= 1.0
  budget_wall           harness = the largest wall / budget over the budgeted runs, reference = 1 (a constant: the
                        budget itself); met at <= 1.05
  budget_half_cost      harness = the wall at P/2, reference = the reference pipeline's wall (summed over the seeds);
                        ratio = harness / reference: what the budget cut from the cost of the best answer (shown,
                        no target of its own: 1/3 is the issue's aim)

The planner's settings (harness.budget PROMOTION_SHARE, MARGIN) are to be chosen on TUNING_SEEDS and reported on
REPORT_SEEDS, which none of its choices looked at. `--seeds` runs other seeds (say which set they belong to).
Full size: 4 pipelines and a plain script per seed, about 75-110 minutes a seed on two cores.

    python -m harness.bench --only budget [--seeds 33,44,55] [--quick]
"""

from __future__ import annotations

import shutil
import time

import numpy as np

from harness.bench.common import Bench, row
from harness.bench.spread import run_as_user, spread_study
from harness.config import StudyConfig

TUNING_SEEDS = (0, 11, 22)
REPORT_SEEDS = (33, 44, 55)
TRAP = 0.85
HALF_TARGET, FULL_TARGET, WALL_TARGET = 0.95, 1.0, 1.05
QUICK_FLOOR_S = 90.0  # the smoke pipeline's prep and one trial fit in it; the quick plain script takes seconds


def bench_budget(bench: Bench) -> list[dict]:
    seeds = bench.seeds or ([0] if bench.quick else list(REPORT_SEEDS))
    runs = {seed: one_seed(bench, seed) for seed in seeds}
    half = [runs[s]["half"]["eval_f1"] for s in seeds]
    full = [runs[s]["full"]["eval_f1"] for s in seeds]
    reference = [runs[s]["reference"]["eval_f1"] for s in seeds]
    walls = [runs[s][k]["wall_s"] / runs[s][k]["budget_s"] for s in seeds for k in ("half", "full")]
    tuned = sorted(set(seeds) & set(TUNING_SEEDS))
    common = {"seeds": seeds, "runs": runs, "seeds_used_for_tuning": tuned}
    rows = [row("budget_half_eval_f1", float(np.mean(half)), float(np.mean(reference)), "eval F1", HALF_TARGET,
                ratio=min(h / r for h, r in zip(half, reference, strict=True))),
            row("budget_full_eval_f1", float(np.mean(full)), float(np.mean(reference)), "eval F1", FULL_TARGET,
                ratio=min(f / r for f, r in zip(full, reference, strict=True))),
            row("budget_wall", max(walls), 1.0, "wall / budget", WALL_TARGET, better="lower",
                constant="the budget itself"),
            row("budget_half_cost", sum(runs[s]["half"]["wall_s"] for s in seeds),
                sum(runs[s]["reference"]["wall_s"] for s in seeds), "seconds", 0.333, better="lower")]
    for result in rows:
        result.update(common)
    return rows


def one_seed(bench: Bench, seed: int) -> dict:
    """The plain script, the unbudgeted pipeline and the two budgeted ones on one generator seed's data."""
    from harness.bench.plain import run_plain
    from harness.data.prepare import ensure_dataset
    from harness.preflight import study_backbones

    base = spread_study(bench, TRAP, seed).replace({"runs_dir": str(bench.out / "budget" / "runs")})
    ensure_dataset(base.data)  # the data exists before any clock starts: every run reads the same files
    size = (base.data.image_size.height, base.data.image_size.width)
    quick = {"trials": 2, "epochs": 1, "max_batches": 2} if bench.quick else {}
    plain = run_plain(base.data.root, size, study_backbones(base), seed=seed, **quick)
    started = time.perf_counter()
    # every pipeline decodes, segments and audits the data afresh (a cache of its own), as a first run does
    reference = run_as_user(base.replace({"name": f"bench-budget-reference-seed{seed}",
                                          "data.cache_dir": str(bench.out / "budget" / f"cache-reference-seed{seed}")}))
    reference["wall_s"] = round(time.perf_counter() - started, 1)
    result = {"plain": plain, "reference": reference}
    for label, share in (("full", 1.0), ("half", 0.5)):
        cfg = base.replace({"name": f"bench-budget-{label}-seed{seed}",
                            "data.cache_dir": str(bench.out / "budget" / f"cache-{label}-seed{seed}")})
        seconds = plain["seconds"] * share
        result[label] = budgeted(cfg, max(seconds, QUICK_FLOOR_S * share) if bench.quick else seconds)
    return result


def budgeted(cfg: StudyConfig, seconds: float) -> dict:
    """make study --budget SECONDS from scratch: its submission's eval F1, its wall and what the budget left out."""
    from harness.pipeline import make_study

    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    started = time.time()
    outcome = make_study(cfg, budget=seconds, started=started, progress=False, log_to_wandb=False)
    record = outcome.budget
    return {"budget_s": round(seconds, 1), "wall_s": round(time.time() - started, 1),
            "eval_f1": round(outcome.submission["eval_f1"], 4), "source": record["submission"]["source"],
            "trials_finished": record["search"]["trials_finished"], "steps": record["steps"],
            "promotion": {k: v for k, v in record["promotion"].items() if k != "candidates"},
            "left_out": record["left_out"]}
