"""`make bench` group "machines": one study on two simulated machines against the same study on one.

The default study's smoke variant (pruner off, 3 epochs, 3 trials), run twice: on one machine (SQLite, one
process) and on two (two `harness study` processes, each with its own runs folder and decoded cache, one
PostgreSQL study, trial files in S3-compatible object storage served by `rclone serve s3`). Then a third,
empty runs folder chooses the ensemble, fetching what it needs from the store.

  machines_same_trials        harness = trials complete on two machines with the same params as on one,
                              reference = trials complete on one; ratio = harness / reference, met at >= 1.0
  machines_same_ensemble      harness = 1 when the ensemble chosen from the third runs folder has the same
                              members (trial and weight) as on one machine; reference 1 (a constant)
  machines_store_cost         harness = the store's seconds per trial (every claim, pull and push the trial
                              made, from its manifest's store_seconds, plus fetching every file of the trial
                              into an empty folder), reference = a
                              trial's wall seconds (mean of the two-machine trials); ratio = harness /
                              reference, met at <= 0.05
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from harness.bench.common import Bench, row
from harness.config import StudyConfig

SAME_TARGET = 1.0
COST_TARGET = 0.05
STORE_TRIALS = 2  # the default study's first two trials (its recipes, at full size)
SMOKE = {"search.pruner.name": "none", "train.epochs": 3, "search.trials": 3, "tracking.mode": "disabled",
         "search.heartbeat_s": 2}


def bench_machines(bench: Bench) -> list[dict]:
    from harness.bench.postgres import create_database, running_postgres
    from harness.bench.servers import S3_KEYS, running_s3
    from harness.promotion.ensemble import run_ensemble
    from harness.runtime import load_existing_study
    from harness.study import trials_frame

    root = bench.out / "machines"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    one = machine_cfg(bench, root / "one")
    # as a process of its own too: the same threads, so the same numbers as each simulated machine
    if start_machine(bench, root, "one", None, {}).wait(timeout=1800):
        raise RuntimeError(f"the one-machine study failed; see {root / 'one.log'}")
    one_frame = trials_frame(load_existing_study(one))
    one_members = members_of(run_ensemble(one, log_to_wandb=False))
    with running_postgres(root / "postgres") as server, running_s3(root / "s3") as endpoint:
        storage = create_database(server, "machines")
        store = {"store.url": "s3://harness-bucket/bench", "store.endpoint_url": endpoint}
        os.environ.update(S3_KEYS)
        workers = [start_machine(bench, root, name, storage, store) for name in ("machine-a", "machine-b")]
        codes = [worker.wait(timeout=1800) for worker in workers]
        if any(codes):
            raise RuntimeError(f"a simulated machine failed (exit codes {codes}); see {root}/*.log")
        third = machine_cfg(bench, root / "machine-c", store)
        two_frame = finished(trials_frame(load_existing_study(third, storage)))
        two_members = members_of(run_ensemble(third, storage=storage, log_to_wandb=False))
        upload_s, fetch_s = store_seconds(third, two_frame, root / "fetch")
    same = same_trials(one_frame, two_frame)
    complete = int((one_frame["state"] == "complete").sum())
    trial_s = float(two_frame["duration_s"].mean())
    cost = (upload_s + fetch_s) / len(two_frame)
    rows = [row("machines_same_trials", same, complete, "complete trials with the same params", SAME_TARGET),
            row("machines_same_ensemble", float(one_members == two_members), 1.0, "same members (1 = yes)",
                SAME_TARGET, constant="1 = the same members and weights"),
            row("machines_store_cost", cost, trial_s, "store seconds per trial / trial seconds", COST_TARGET,
                better="lower")]
    rows[1].update(one_machine=one_members, two_machines=two_members)
    rows[2].update(store_seconds=round(upload_s, 2), fetch_seconds=round(fetch_s, 2), trials=len(two_frame),
                   machines=sorted(set(two_frame["machine"])))
    return rows


def bench_store_cost(bench: Bench) -> list[dict]:
    """Group "store": the store's cost at the default study's own size (its images, input size and epochs; smoke
    with --quick): STORE_TRIALS trials, the pruner off, one `harness study` process whose trial files go to
    S3-compatible object storage (`rclone serve s3`), then every trial fetched into an empty folder.

      store_cost_default   harness = store seconds per trial (every claim, pull and push, from the trial's
                           manifest, plus fetching its files into an empty folder), reference = the trial's
                           wall seconds; ratio = harness / reference, met at <= 0.05
    """
    from harness.bench.servers import S3_KEYS, running_s3
    from harness.runtime import load_existing_study
    from harness.study import trials_frame

    root = bench.out / "store"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = bench.default_study()
    settings = {"search.trials": STORE_TRIALS, "search.pruner.name": "none", "tracking.mode": "disabled",
                "runs_dir": str(root / "runs"), "data.root": base.data.root, "data.cache_dir": base.data.cache_dir}
    with running_s3(root / "s3") as endpoint:
        settings.update({"store.url": "s3://harness-bucket/bench", "store.endpoint_url": endpoint})
        command = [sys.executable, "-m", "harness.cli", "study", str(bench.study_file),
                   *(["--smoke"] if bench.quick else [])]
        for key, value in settings.items():
            command += ["--set", f"{key}={value}"]
        with open(root / "study.log", "w") as log:
            code = subprocess.run(command, env={**os.environ, **S3_KEYS}, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=3600).returncode
        if code:
            raise RuntimeError(f"the store study failed (exit {code}); see {root / 'study.log'}")
        os.environ.update(S3_KEYS)
        cfg = base.replace(settings)
        frame = finished(trials_frame(load_existing_study(cfg)))  # not the recipes the trial count left waiting
        store_s, fetch_s = store_seconds(cfg, frame, root / "fetch")
    trial_s = float(frame["duration_s"].mean())
    cost = (store_s + fetch_s) / len(frame)
    result = row("store_cost_default", cost, trial_s, "store seconds per trial / trial seconds", COST_TARGET,
                 better="lower")
    result.update(store_seconds=round(store_s, 2), fetch_seconds=round(fetch_s, 2), trials=len(frame),
                  epochs=int(cfg.train.epochs), images=f"{cfg.data.image_size.height}x{cfg.data.image_size.width}",
                  size="smoke" if bench.quick else "the default study's own")
    return [result]


def machine_cfg(bench: Bench, folder, store: dict | None = None) -> StudyConfig:
    return bench.default_study(smoke=True).replace({**SMOKE, "runs_dir": str(folder / "runs"),
                                                    "data.cache_dir": str(folder / "cache"), **(store or {})})


def start_machine(bench: Bench, root, name: str, storage: str | None, store: dict) -> subprocess.Popen:
    cfg = machine_cfg(bench, root / name, store)
    settings = {**SMOKE, "runs_dir": cfg.runs_dir, "data.root": cfg.data.root, "data.cache_dir": cfg.data.cache_dir,
                **store}
    command = [sys.executable, "-m", "harness.cli", "study", str(bench.study_file), "--smoke",
               *(["--storage", storage] if storage else [])]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    log = open(root / f"{name}.log", "w")
    env = {**os.environ, "HARNESS_MACHINE": name, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(frame):
    """The trials that ran to an end (complete or pruned): the store's cost is per trial that trained."""
    return frame[frame["state"].isin(["complete", "pruned"])]


def members_of(summary: dict) -> list[tuple[int, int]]:
    return sorted((int(m["trial"]), int(m["weight"])) for m in summary["members"])


def same_trials(one, two) -> int:
    """Complete trials of `two` whose params equal the same trial's on `one`."""
    def params(frame):
        columns = [c for c in frame.columns if c.startswith("param_")]
        return {int(r["trial"]): tuple(str(r[c]) for c in sorted(columns))
                for _, r in frame[frame["state"] == "complete"].iterrows()}

    first, second = params(one), params(two)
    return sum(1 for trial, values in second.items() if first.get(trial) == values)


def store_seconds(cfg: StudyConfig, frame, folder) -> tuple[float, float]:
    """(the store seconds the trials' manifests record: every claim, pull and push; seconds to fetch every trial's
    files into `folder`)."""
    from harness.folders import StudyFolder
    from harness.store import folder_store

    upload, started = 0.0, time.perf_counter()
    for identity in frame["trial"]:
        store = folder_store(cfg, StudyFolder.of(cfg).trial(int(identity)).path)  # its key: the study's identity
        upload += float(store.manifest().get("store_seconds", 0.0))
        store.pull(folder / str(int(identity)))
    return upload, time.perf_counter() - started

