"""`make bench` group "tracking": what a W&B outage costs a study.

The default study's smoke variant scaled to 12 trials (no pruner: every trial trains all its
epochs), run from scratch with tracking disabled and with tracking online against a server that accepts
connections and never answers (harness.bench.servers.BlackHole), three times each, alternating; each
condition's faster run counts (the machine is shared and noisy).

  tracking_outage_wall_time       harness = the study's wall time with the server black-holed, reference =
                       with tracking disabled; ratio = harness / reference, met at <= 1.05. The offline
                       run's own cost (W&B writing every run to disk) is in it: `offline_s` beside it is the
                       same study with tracking offline and no server at all.
  tracking_outage_vs_offline      harness = the same black-holed wall time, reference = tracking offline with
                       no server (what W&B's own logging costs); ratio met at <= 1.10: the outage itself
                       may cost no more than 10%.
  tracking_outage_history_kept    harness = trials whose every epoch is in their W&B files after the outage,
                       reference = trials; ratio = harness / reference, met at >= 1.0.
  tracking_outage_whole_study     harness = `harness study` in a process of its own (6 smoke trials, ensemble,
                       report and the process's exit included) with the server black-holed, reference = the
                       same command with tracking offline; one run each; ratio met at <= 1.10.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from harness.bench.common import Bench, row
from harness.bench.servers import BlackHole
from harness.config import StudyConfig
from harness.folders import StudyFolder

TRIALS = 12  # at least 6: the fixed costs of a study are a smaller share of a longer one
WALL_TARGET = 1.05
VERSUS_OFFLINE_TARGET = 1.10
REPEATS = 3
WHOLE_TRIALS = 6
FAKE_KEY = "x" * 40


def outage_study(bench: Bench, mode: str) -> StudyConfig:
    base = bench.default_study(smoke=True)
    return base.replace({"name": f"bench-outage-{mode}", "runs_dir": str(bench.out / "outage" / "runs"),
                         "search.trials": max(TRIALS, base.search.trials), "search.pruner.name": "none",
                         "tracking.mode": mode, "ensemble.enabled": False})


@contextmanager
def wandb_client(home: Path, url: str | None):
    """A W&B client with a key and folders of its own, pointed at `url`; the environment is restored after."""
    saved = dict(os.environ)
    os.environ.update({"WANDB_API_KEY": FAKE_KEY, "WANDB_CONFIG_DIR": str(home / "config"),
                       "WANDB_DISABLE_GIT": "true", "WANDB_SILENT": "true"})
    os.environ.pop("WANDB_MODE", None)
    if url:
        os.environ["WANDB_BASE_URL"] = url
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def timed_study(cfg: StudyConfig) -> float:
    from harness.study import run_study

    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    started = time.perf_counter()
    run_study(cfg, progress=False)
    return time.perf_counter() - started


def complete_histories(cfg: StudyConfig) -> tuple[int, int]:
    """(trials whose every trained epoch is in their W&B files, trials)."""
    from harness.runtime import load_existing_study
    from harness.study import trials_frame
    from harness.tracking import read_offline_run, run_id_for, study_key

    frame = trials_frame(load_existing_study(cfg))
    kept = 0
    for trial in frame.itertuples():
        try:
            history = read_offline_run(StudyFolder.of(cfg).wandb, run_id_for(study_key(cfg), int(trial.trial)))["history"]
        except FileNotFoundError:
            continue
        kept += sorted(int(h["epoch"]) for h in history if "val/f1" in h) == list(range(1, trial.epochs + 1))
    return kept, len(frame)


def bench_tracking_outage(bench: Bench) -> list[dict]:
    disabled, outage, offline = [], [], []
    home = bench.out / "outage" / "wandb-home"
    timed_study(outage_study(bench, "disabled"))  # data and cache built once, outside the timings
    for _ in range(REPEATS):
        disabled.append(timed_study(outage_study(bench, "disabled")))
        with BlackHole(lifetime_s=3600) as hole, wandb_client(home, hole.url):
            outage.append(timed_study(outage_study(bench, "online")))
            kept, trials = complete_histories(outage_study(bench, "online"))
        with wandb_client(home, None):
            offline.append(timed_study(outage_study(bench, "offline")))
    cfg = outage_study(bench, "online")
    size = f"{cfg.search.trials} smoke trials x {cfg.train.epochs} epochs, init_timeout_s {cfg.tracking.init_timeout_s}"
    wall = row("tracking_outage_wall_time", min(outage), min(disabled), "seconds", WALL_TARGET, better="lower")
    wall.update(size=size, offline_s=round(min(offline), 2), runs={"outage": outage, "disabled": disabled,
                                                                  "offline": offline})
    versus_offline = row("tracking_outage_vs_offline", min(outage), min(offline), "seconds", VERSUS_OFFLINE_TARGET,
                         better="lower")
    versus_offline.update(size=size)
    history = row("tracking_outage_history_kept", kept, trials, "trials", 1.0)
    history.update(size=size)
    return [wall, versus_offline, history, whole_study_row(bench, home)]


def whole_study_row(bench: Bench, home: Path) -> dict:
    """`harness study` as a user runs it (its own process: ensemble, report and the process's exit included),
    WHOLE_TRIALS smoke trials, once with the server black-holed and once offline, one run each."""
    walls = {}
    for mode in ("offline", "online"):
        runs = bench.out / "outage" / f"whole-{mode}"
        shutil.rmtree(runs, ignore_errors=True)
        base = bench.default_study(smoke=True)
        command = [sys.executable, "-m", "harness.cli", "study", str(bench.study_file), "--smoke", "--trials",
                   str(WHOLE_TRIALS)]
        for key, value in {"runs_dir": runs, "data.root": base.data.root, "data.cache_dir": base.data.cache_dir,
                           "search.pruner.name": "none", "tracking.mode": mode}.items():
            command += ["--set", f"{key}={value}"]
        with BlackHole(lifetime_s=3600) as hole, wandb_client(home, hole.url if mode == "online" else None):
            started = time.perf_counter()
            done = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True, timeout=1800)
            walls[mode] = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"harness study ({mode}) failed: {done.stderr[-2000:]}")
    result = row("tracking_outage_whole_study", walls["online"], walls["offline"], "seconds", VERSUS_OFFLINE_TARGET,
                 better="lower")
    result.update(size=f"{WHOLE_TRIALS} smoke trials, ensemble and report, one run each")
    return result
