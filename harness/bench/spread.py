"""`make bench` group "spread": does the default study's answer depend on luck?

The default study (--quick: its smoke variant) on synthetic data of SEEDS generator seeds, with the
background trap (trap_strength 0.85) and without it (0), each run as a user runs it: `make study`
(search, eval scores, ensemble), `make promote`, `make submit`. Per run: the submission's eval F1
against the truth, the single-split ensemble's, and the winning configuration.

  spread_eval_f1_range_trap      harness = max - min of the promoted eval F1 over the seeds with the trap,
                                 reference = the same without it; ratio = the range with the trap, met at
                                 <= 0.08.
  spread_trap_vs_no_trap         harness = mean promoted eval F1 with the trap, reference = without;
                                 ratio = harness / reference, met at >= 0.9.
  pruning_precision              of the configurations the first trapped run's pruner stopped, continued
                                 from their last.pt to train.epochs without a pruner: harness = how many
                                 would have ended among the run's top 3 by the objective, reference = how
                                 many were pruned; ratio = 1 - harness / reference (the share rightly
                                 stopped), met at >= 0.8.
"""

from __future__ import annotations

import shutil
import time

import numpy as np

from harness.bench.common import Bench, row
from harness.config import StudyConfig

SEEDS = (0, 11, 22)
TRAPS = (0.85, 0.0)
RANGE_TARGET = 0.08
RATIO_TARGET = 0.9
PRECISION_TARGET = 0.8
SHOWN = ("backbone", "head", "preprocess", "bgswap_p", "loss")


def spread_study(bench: Bench, trap: float, seed: int) -> StudyConfig:
    base = bench.default_study()
    root = bench.out / "spread"
    synthetic = {**base.data.synthetic.model_dump(), "seed": seed, "trap_strength": trap}
    return base.replace({"name": f"bench-spread-trap{trap}-seed{seed}", "runs_dir": str(root / "runs"),
                         "data.root": str(root / "data" / f"trap{trap}-seed{seed}"),
                         "data.cache_dir": str(root / "cache"), "tracking.mode": "disabled",
                         "data.synthetic": synthetic})


def run_as_user(cfg: StudyConfig, promote_too: bool = True) -> dict:
    """`make study`, `make promote`, `make submit`; the figures of one run (`promote_too` False: the
    single-split ensemble's submission only, `eval_f1` None)."""
    from harness.pipeline import make_study
    from harness.predict import predict_submission
    from harness.promotion.folds import promote
    from harness.study import trials_frame

    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    started = time.perf_counter()
    study = make_study(cfg, progress=False, log_to_wandb=False, report=False).study
    study_seconds = time.perf_counter() - started
    single = predict_submission(cfg, log_to_wandb=False, source="ensemble")
    promoted = None
    if promote_too:
        promote(cfg)
        promoted = predict_submission(cfg, log_to_wandb=False, source="promotion")["eval_f1"]
    frame = trials_frame(study)
    best = frame.iloc[0]  # sorted by the objective
    return {"eval_f1": round(promoted, 4) if promoted is not None else None,
            "single_split_eval_f1": round(single["eval_f1"], 4),
            "winner": {"trial": int(best["trial"]), **{k: best.get(f"param_{k}") for k in SHOWN
                                                       if f"param_{k}" in best}},
            "complete": int((frame["state"] == "complete").sum()), "pruned": int((frame["state"] == "pruned").sum()),
            "study_seconds": round(study_seconds, 1)}


def bench_spread(bench: Bench) -> list[dict]:
    runs = {(trap, seed): run_as_user(spread_study(bench, trap, seed)) for trap in TRAPS for seed in SEEDS}
    scores = {trap: [runs[(trap, seed)]["eval_f1"] for seed in SEEDS] for trap in TRAPS}
    details = {f"trap{trap}-seed{seed}": figures for (trap, seed), figures in runs.items()}
    spread = row("spread_eval_f1_range_trap", float(np.ptp(scores[0.85])), float(np.ptp(scores[0.0])),
                 "eval F1 range over seeds", RANGE_TARGET, better="lower", ratio=float(np.ptp(scores[0.85])))
    spread.update(runs=details, seeds=list(SEEDS))
    ratio = row("spread_trap_vs_no_trap", float(np.mean(scores[0.85])), float(np.mean(scores[0.0])),
                "mean eval F1", RATIO_TARGET)
    ratio.update(trap=scores[0.85], no_trap=scores[0.0])
    return [spread, ratio, pruning_precision(spread_study(bench, TRAPS[0], SEEDS[0]))]


def pruning_precision(cfg: StudyConfig) -> dict:
    """Continue every pruned trial of a finished study from its last.pt to train.epochs, unpruned, in a copy of
    its folder; count the pruned configurations that would have ended among the top 3 by the objective."""
    from harness.config import Params
    from harness.data.prepare import prepare_data
    from harness.folders import StudyFolder, TrialFolder
    from harness.runtime import load_existing_study
    from harness.study import trials_frame
    from harness.train import run_trial

    frame = trials_frame(load_existing_study(cfg))
    final = {int(r.trial): float(r.objective) for r in frame.itertuples() if r.state == "complete"}
    pruned = frame[frame["state"] == "pruned"]
    data = prepare_data(cfg, progress=False)
    for trial in pruned.itertuples():
        copy = StudyFolder.of(cfg).unpruned_copy(int(trial.trial)).path
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(trial.run_dir, copy)
        params = Params.model_validate(TrialFolder(copy).read_config()["params"])
        final[int(trial.trial)] = run_trial(cfg, params, data=data, run_dir=copy).objective
    top = sorted(final, key=lambda n: (-final[n], n))[:3]
    wrong = [n for n in pruned["trial"].astype(int) if n in top]
    result = row("pruning_precision", len(wrong), len(pruned), "pruned configurations in the final top 3",
                 PRECISION_TARGET, ratio=1 - len(wrong) / max(1, len(pruned)))
    result.update(top3=top, pruned=sorted(pruned["trial"].astype(int).tolist()), wrongly_pruned=wrong,
                  final_objective={str(n): round(v, 4) for n, v in sorted(final.items())})
    return result
