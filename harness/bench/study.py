"""`make bench` groups "search" and "workers": what pruning saves, and what a second worker buys.

search   studies/default.yaml at its real size (--quick: its smoke variant) run twice from
         scratch, same seeds and trial count: once with its own pruner, once with
         `search.pruner.name: none`. W&B is off (tracking.mode disabled) and so is the
         ensemble: neither changes what the rows count, both cost time.
  search_epochs        harness = epochs the pruned study trained (sum of epochs_run over its
                       trials), reference = the unpruned study's. ratio = harness / reference,
                       met at <= 0.6 (at least 40% fewer epochs).
  search_best_objective_gap   harness = the pruned study's best objective over its complete trials,
                       reference = the unpruned study's. ratio = reference - harness, met at
                       <= 0.01.
  pretrained_trials_share  harness = trials of the pruned study whose backbone started from ImageNet
                       weights, reference = its trials that built a model; met at 1.0 (all of them).
         `fewest_possible_ratio` on the epochs row is the floor the pruner's settings allow:
         its startup trials run in full and every later trial runs at least until its first
         prunable epoch. HARNESS_BENCH_SEARCH_TRIALS=N runs both studies with N trials.

workers  One fixed study (the smoke variant, 12 trials x 6 epochs, no pruner; --quick: 2 trials
         x 1 epoch of 2 batches) on a throwaway PostgreSQL server (harness.bench.postgres), one database
         per run. Harness figure of both rows: wall time of run_search_workers(cfg, 2), two spawned
         processes with one torch thread each (runtime.run_workers gives each cpu_count // workers).
         The size keeps the fixed costs of workers (spawn and imports, about 5-10 s; the idle
         tail, up to search.heartbeat_s) small against the work: at 6 trials x 2 epochs the
         whole study took ~20-30 s on two cores and no worker count could meet the target.
         HARNESS_BENCH_WORKERS_TRIALS=N changes the trial count.
  workers_wall_seconds the reference is run_study(cfg) in this process with torch's default
                       thread count, os.cpu_count() whatever the caller's OMP_NUM_THREADS: the
                       machine used as a plain `harness study` uses it. ratio = harness /
                       reference, met at <= 0.65.
  workers_wall_seconds_vs_one_thread
                       the same with run_study at one torch thread: pure process parallelism.
                       On a small machine whose cores are shared, torch's threads spin against
                       the other load and one thread can be several times faster than two,
                       which flatters the first row; this one cannot be flattered that way.
         Every clock runs from the call to the return with the data cache already built, so
         the workers' process start-up and imports count against them, as they do for a user.
         The searched space is narrowed to lr, weight_decay and loss (backbone, freeze policy
         and the rest at their defaults) so that every trial does the same work and the ratio
         measures parallelism, not which backbones the sampler happened to draw. The rows also
         report `idle_tail_s` (from the last trial's end to run_search_workers' return: a worker with
         nothing left to start polls every search.heartbeat_s) and `duplicate_param_sets`.
         When the server cannot start, both rows have no figures, met False and a note.

    python -m harness.bench --only search,workers [--quick]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from harness.bench.common import Bench, load_average, row, unmeasured
from harness.bench.postgres import PostgresUnavailable, create_database, running_postgres
from harness.config import StudyConfig
from harness.folders import StudyFolder
from harness.io import atomic_write_text

EPOCHS_TARGET = 0.6  # pruned epochs / unpruned epochs
F1_GAP_TARGET = 0.01  # unpruned best objective - pruned best objective
WORKERS_TARGET = 0.65  # wall time of 2 workers / wall time of 1
WORKERS_SPACE = ("lr", "weight_decay", "loss")  # searched params that leave a trial's cost unchanged


# -------------------------------------------------------------------------- search


def bench_search(bench: Bench) -> list[dict]:
    from harness.data.prepare import prepare_data
    from harness.study import run_study, trials_frame

    quick, out = bench.quick, bench.out
    pruned_cfg, unpruned_cfg = search_configs(bench)
    shutil.rmtree(out / "search", ignore_errors=True)
    prepare_data(pruned_cfg, progress=False)  # data and cache exist before either clock starts
    outcome = {}
    for label, cfg in (("pruned", pruned_cfg), ("unpruned", unpruned_cfg)):
        started, load_before = time.perf_counter(), load_average()[0]
        frame = trials_frame(run_study(cfg, progress=False))
        seconds = time.perf_counter() - started
        atomic_write_text(StudyFolder.of(cfg).trials_table, frame.to_csv(index=False))
        outcome[label] = {**summarize(frame, seconds), "load_average_1min": [load_before, load_average()[0]]}
    pruned, unpruned = outcome["pruned"], outcome["unpruned"]
    size = (f"{pruned_cfg.search.trials} trials x {pruned_cfg.train.epochs} epochs, pruner "
            f"{pruned_cfg.search.pruner.model_dump()} vs none, {'smoke variant' if quick else 'full size'}")
    epochs = row("search_epochs", pruned["epochs"], unpruned["epochs"], "epochs", EPOCHS_TARGET, better="lower")
    floor = fewest_epochs(pruned_cfg)
    epochs.update(size=size, pruned_trials=pruned["pruned"], trials=pruned["trials"],
                  seconds={"pruned": round(pruned["seconds"], 1), "unpruned": round(unpruned["seconds"], 1)},
                  load_average_1min={"pruned": pruned["load_average_1min"],
                                     "unpruned": unpruned["load_average_1min"]},
                  fewest_possible_ratio=None if floor is None else round(floor / max(1, unpruned["epochs"]), 3))
    gap = row("search_best_objective_gap", pruned["best"], unpruned["best"], pruned_cfg.search.objective,
              F1_GAP_TARGET, better="lower", ratio=unpruned["best"] - pruned["best"])
    gap.update(size=size, best_trial={"pruned": pruned["best_trial"], "unpruned": unpruned["best_trial"]})
    imagenet = row("pretrained_trials_share", pruned["imagenet_trials"], pruned["built_trials"], "trials", 1.0)
    imagenet.update(size=size, note="trials whose backbone started from ImageNet weights / trials that built a model")
    return [epochs, gap, imagenet]


def search_configs(bench: Bench) -> tuple[StudyConfig, StudyConfig]:
    """The default study with its pruner and without, fresh names and folders under out/search."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = {"runs_dir": str(bench.out / "search"), "tracking.mode": "disabled", "ensemble.enabled": False}
    trials = os.environ.get("HARNESS_BENCH_SEARCH_TRIALS")
    if trials:
        overrides["search.trials"] = int(trials)
    pruned = bench.default_study({**overrides, "name": f"bench-search-pruned-{stamp}"})
    unpruned = pruned.replace({"name": f"bench-search-unpruned-{stamp}", "search.pruner.name": "none"})
    return pruned, unpruned


def summarize(frame: pd.DataFrame, seconds: float) -> dict:
    complete = frame[frame["state"] == "complete"]
    best = complete.iloc[0] if len(complete) else None  # trials_frame sorts by val F1, best first
    weights = frame["weights"].fillna("").astype(str) if "weights" in frame else pd.Series([], dtype=str)
    return {"epochs": float(frame["epochs"].sum()), "trials": len(frame),
            "built_trials": int((weights != "").sum()),
            "imagenet_trials": int(((weights != "") & (weights != "random init")).sum()),
            "pruned": int((frame["state"] == "pruned").sum()),
            "best": float(best["objective"]) if best is not None else float("nan"),
            "best_trial": int(best["trial"]) if best is not None else None, "seconds": seconds}


def fewest_epochs(cfg: StudyConfig) -> int | None:
    """The fewest epochs the pruner's settings allow; None for hyperband (its brackets differ)."""
    spec, epochs, trials = cfg.search.pruner, cfg.train.epochs, cfg.search.trials
    earliest_stop = min(epochs, max(1, spec.n_warmup_steps))  # steps count epochs trained, from 1
    if spec.name == "median":
        startup = min(spec.n_startup_trials, trials)  # pruning starts once this many trials have completed
        return startup * epochs + (trials - startup) * earliest_stop
    if spec.name == "successive_halving":  # the first trial has no rival at its rungs and runs in full
        return epochs + (trials - 1) * earliest_stop
    return None


# ------------------------------------------------------------------------- workers


def bench_workers(bench: Bench) -> list[dict]:
    cfg = workers_config(bench)
    size = (f"smoke variant, {cfg.search.trials} trials x {cfg.train.epochs} epoch(s)"
            f"{f' of {cfg.train.max_train_batches} batches' if cfg.train.max_train_batches else ''}, pruner none, "
            f"space {list(WORKERS_SPACE)}")
    try:
        with tempfile.TemporaryDirectory(prefix="harness-bench-pg-") as folder, \
                running_postgres(Path(folder) / "server") as server:
            return workers_rows(cfg, server, bench.out, size)
    except PostgresUnavailable as error:
        return [unmeasured(name, "seconds", WORKERS_TARGET, "lower", str(error), size=size) for name in WORKERS_ROWS]


WORKERS_ROWS = ("workers_wall_seconds", "workers_wall_seconds_vs_one_thread")


def workers_config(bench: Bench) -> StudyConfig:
    smoke = bench.default_study(smoke=True)  # the smoke variant at either size, its data under out/smoke-data
    out = bench.out
    size = {"search.trials": 2, "train.epochs": 1, "train.max_train_batches": 2} if bench.quick else \
        {"search.trials": int(os.environ.get("HARNESS_BENCH_WORKERS_TRIALS", 12)), "train.epochs": 6}
    return smoke.replace({
        "runs_dir": str(out / "workers"), "name": "bench-workers", "search.pruner.name": "none", **size,
        "search.space": {name: smoke.search.space[name].model_dump(mode="json") for name in WORKERS_SPACE}})


def workers_rows(cfg: StudyConfig, server: str, out: Path, size: str) -> list[dict]:
    """Two rows, one clock each for: 1 process at torch's default threads, 1 process at 1 thread, 2 workers."""
    from harness.data.prepare import prepare_data
    from harness.study import run_search_workers

    shutil.rmtree(out / "workers", ignore_errors=True)
    prepare_data(cfg, progress=False)  # the cache exists before any clock starts
    stamp = f"{os.getpid()}_{int(time.time())}"
    cpus = os.cpu_count() or 1
    default_threads = timed_single_process(cfg, server, out, f"default_{stamp}", threads=cpus)
    one_thread = timed_single_process(cfg, server, out, f"one_{stamp}", threads=1)

    two = cfg.replace({"runs_dir": str(out / "workers" / "two")})
    started, load_before = time.perf_counter(), load_average()[0]
    study = run_search_workers(two, 2, storage=create_database(server, f"bench_two_{stamp}"), progress=False)
    seconds, finished_at = time.perf_counter() - started, time.time()
    loads = {"workers": [load_before, load_average()[0]]}
    last_trial_done = max(t.datetime_complete.timestamp() for t in study.trials if t.datetime_complete)
    details = {"size": size, "per_worker_threads": max(1, cpus // 2), "trials": len(study.trials),
               # a worker with nothing left to start polls every search.heartbeat_s until the others finish
               "idle_tail_s": round(finished_at - last_trial_done, 1),
               "duplicate_param_sets": duplicate_param_sets(study)}
    rows = []
    for name, (reference, threads, reference_study, reference_load) in zip(WORKERS_ROWS,
                                                                            (default_threads, one_thread)):
        result = row(name, seconds, reference, "seconds", WORKERS_TARGET, better="lower")
        # 1-minute load average before and after each clock: the cores are shared, and a busy
        # neighbour during one clock and not the other moves the ratio more than the harness does
        result.update(details, reference_threads=threads, load_average_1min={**loads, "reference": reference_load},
                      reference_duplicate_param_sets=duplicate_param_sets(reference_study))
        rows.append(result)
    return rows


def timed_single_process(cfg: StudyConfig, server: str, out: Path, label: str, threads: int):
    """(seconds, threads, study, load averages) of run_study in this process at `threads` torch threads."""
    from harness.study import run_study

    side = cfg.replace({"runs_dir": str(out / "workers" / label.split("_")[0])})
    url = create_database(server, f"bench_{label}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started, load_before = time.perf_counter(), load_average()[0]
        study = run_study(side, storage=url, progress=False)
        return time.perf_counter() - started, threads, study, [load_before, load_average()[0]]
    finally:
        torch.set_num_threads(previous)


def duplicate_param_sets(study) -> int:
    """Trials whose params repeat an earlier trial's exactly (seeded samplers in parallel workers can do this)."""
    seen = [tuple(sorted(t.params.items())) for t in study.trials if t.params]
    return len(seen) - len(set(seen))
