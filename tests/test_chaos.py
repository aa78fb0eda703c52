"""Chaos: a study SIGKILLed at random moments of every phase still ends exactly where an uninterrupted one does.

The default study's smoke variant, scaled up a little (4 trials x 3 epochs, 1 s heartbeats) and
given fresh data and cache folders so that generating the data and building the cache happen
inside the study command, is started with the user's command and killed with SIGKILL once per
phase of PLAN: while the synthetic data is written, during the cache build, while the study is
created in storage, while a trial starts (params, identity), while a checkpoint is written,
inside an epoch, while W&B finishes a trial's run, during promotion (the ensemble) and while the
report is written. Each kill waits for its phase to show (a temp file, a storage row, a line of output),
then for a random delay drawn from a seeded RNG. After each kill the same command runs again;
after the last one, it runs to the end. Then nothing may be lost:

- exactly the target number of trials finished (complete + pruned), none RUNNING or WAITING;
- every trial identity has one folder, one W&B run id, and loadable last.pt / best.pt; storage
  holds no other identity; trial 0 (the study file's defaults) ran, once;
- every epoch of every trial is in its W&B history exactly once (read from W&B's own files,
  including attempts killed before W&B wrote their exit record);
- the cache is the one an uninterrupted study builds, and no temporary of it survives;
- the ensemble and the report exist;
- epochs trained (the "epoch k/n" lines of all runs) exceed an uninterrupted study's by at
  most one per kill, and no checkpointed epoch is trained twice;
- no two trials have the same params (a rerun samples on, it does not start its stream over).

An epoch cut short by a kill prints no line; each kill cuts at most one, which the "one per
kill" allowance covers. The uninterrupted study runs the same command in another folder.

The targeted tests below replay single kill moments that the random plan hits only sometimes.

The kill is SIGKILL to the study's whole process group (the harness process and its cache
decoders), as a scheduler or an OOM-killed container does; wandb-core lives in its own session
and is left to notice its parent's death, as it would be.

Replay: the test prints its seed; `HARNESS_CHAOS_SEED=<seed>` draws the same delays again (on a
loaded machine the phases themselves still move a little in time).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from harness.cli import parse_overrides
from harness.compat import has_exit_record
from harness.config import load_study
from harness.data.prepare import prepare_data
from harness.io import load_checkpoint
from harness.runtime import default_storage, open_storage
from harness.study import default_trial_params, open_study, run_study, suggest_params, trials_frame
from harness.tracking import ensemble_run_id, read_offline_run, run_id_for, study_key_at, study_run_id
from harness.train import run_trial

# the tests that rebuild a killed process's storage call study.ask() outside study.optimize
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")

REPO = Path(__file__).resolve().parents[1]
STUDY_FILE = REPO / "studies" / "default.yaml"
NAME = "chaos"
TRIALS, EPOCHS = 4, 3
SETTINGS = [f"name={NAME}", f"search.trials={TRIALS}", f"train.epochs={EPOCHS}", "search.heartbeat_s=1"]
RUN_TIMEOUT_S = 180  # one run of the study command, killed or not
EPOCH_LINE = re.compile(r"^trial\s+(\d+) epoch (\d+)/(\d+) ")


@dataclass
class Layout:
    """Where one study (chaos or reference) keeps everything, and the command that runs it."""

    root: Path
    data: Path | None = None  # default: root/data (fresh, so the study command generates it)
    cache: Path | None = None  # default: root/cache
    settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.data = self.data or self.root / "data"
        self.cache = self.cache or self.root / "cache"

    @property
    def study(self) -> Path:
        return self.root / "runs" / NAME

    @property
    def wandb(self) -> Path:
        return self.study / "wandb"

    def overrides(self) -> list[str]:
        return [*SETTINGS, *self.settings, f"runs_dir={self.root / 'runs'}", f"data.root={self.data}",
                f"data.cache_dir={self.cache}"]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "harness.cli", "study", str(STUDY_FILE), "--smoke",
                *[part for setting in self.overrides() for part in ("--set", setting)]]

    def config(self):
        return load_study(STUDY_FILE, smoke=True, overrides=parse_overrides(self.overrides()))


class Run:
    """One study command in its own process group, its output collected line by line as it comes."""

    def __init__(self, layout: Layout) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
        self.started, self.wall_started = time.monotonic(), time.time()
        self.process = subprocess.Popen(layout.command(), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group, then wait for the wandb-core it leaves to notice and exit."""
        pid = self.process.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.reader.join(timeout=30)
        wait_for_wandb_core_of(pid)

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the study command ran over {RUN_TIMEOUT_S} s; output:\n{self.tail()}")
        self.reader.join(timeout=30)
        wait_for_wandb_core_of(self.process.pid)
        return code

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])


def wandb_core_of(pid: int) -> list[int]:
    """wandb-core processes serving `pid` (W&B starts them in their own session with `--pid <parent>`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"wandb-core" in argv[0] and b"--pid" in argv and argv[argv.index(b"--pid") + 1:][:1] == [
                str(pid).encode()]:
            found.append(int(entry.name))
    return found


def wait_for_wandb_core_of(pid: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while wandb_core_of(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for orphan in wandb_core_of(pid):  # still there: ours (started by our study command), so ours to end
        os.kill(orphan, signal.SIGKILL)


# ------------------------------------------------------------------------------ the phases
#
# A trigger looks at the run's output and files and says whether its phase is under way;
# it returns a short description of what it saw (printed with the kill), or None. A killed
# run's temp files may still lie there: only this run's count (by pid in the name, or by mtime).


def temporaries(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern)) if folder.is_dir() else []


def modified_since(path: Path, run: Run) -> bool:
    try:
        return path.stat().st_mtime >= run.wall_started
    except FileNotFoundError:
        return False


def data_written(layout: Layout, run: Run) -> str | None:
    partial = temporaries(layout.data.parent, f"{layout.data.name}.partial-{run.process.pid}")
    return f"{partial[0].name} appeared" if partial else None


def cache_built(layout: Layout, run: Run) -> str | None:
    partial = temporaries(layout.cache, f"*.tmp-{run.process.pid}*")
    return f"cache temporary {partial[0].name[:16]}... appeared" if partial else None


def study_created(layout: Layout, run: Run) -> str | None:
    """Optuna logs the creation; the study's attributes and trial 0 are written in the next ~100 ms."""
    created = any("A new study created in RDB" in line for line in run.lines)
    return "Optuna created the study" if created else None


def trial_starting(layout: Layout, run: Run) -> str | None:
    """A fresh trial RUNNING in storage, heartbeat started, identity not stored yet: it is starting.

    Read straight from the study's SQLite file, read-only (a retry arrives with its identity). The
    moment before the first heartbeat is test_trial_killed_before_its_first_heartbeat_is_retried's.
    """
    database = layout.study / "study.db"
    if not database.exists():
        return None
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.01)) as connection:
            starting = connection.execute(
                "SELECT number FROM trials t WHERE state = 'RUNNING' "
                "AND EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id) "
                "AND NOT EXISTS (SELECT 1 FROM trial_user_attributes a WHERE a.trial_id = t.trial_id "
                "AND a.key = 'identity')").fetchall()
    except sqlite3.Error:  # not created yet, or locked by a write this very moment
        return None
    return f"trial {starting[0][0]} RUNNING without its identity attribute" if starting else None


def inside_epoch(layout: Layout, run: Run) -> str | None:
    epochs = [line for line in run.lines if EPOCH_LINE.match(line)]
    return f"after {epochs[0].split(' val/')[0]!r}" if epochs else None


def checkpoint_written(layout: Layout, run: Run) -> str | None:
    trials = layout.study / "trials"
    writing = [p for name in ("last.pt", "best.pt") for p in temporaries(trials, f"*/.{name}.*tmp*")
               if modified_since(p, run)]
    if writing:
        return f"writing {writing[0].relative_to(trials)}"
    # the temp file lived too briefly to be seen: at least kill right after the commit
    for last in temporaries(trials, "*/last.pt"):
        if modified_since(last, run):
            return f"{last.relative_to(trials)} just replaced"
    return None


def wandb_finishing(layout: Layout, run: Run) -> str | None:
    """result.json is written just before the trial's W&B run is finished."""
    for result in temporaries(layout.study / "trials", "*/result.json"):
        if modified_since(result, run):
            return f"{result.relative_to(layout.study)} written"
    return None


def promoting(layout: Layout, run: Run) -> str | None:
    shown = any(re.match(rf"^study '{NAME}': \d+ trial\(s\)", line) for line in run.lines)
    return "trials table printed, ensemble next" if shown else None


def reporting(layout: Layout, run: Run) -> str | None:
    if any(modified_since(p, run) for p in temporaries(layout.study, ".report.html.*tmp*")):
        return "report temporary appeared"
    wrote = any(line.strip().startswith("wrote ") and "ensemble" in line for line in run.lines)
    return "ensemble written, report next" if wrote else None


@dataclass(frozen=True)
class Phase:
    name: str
    trigger: Callable[[Layout, Run], str | None]
    max_delay_s: float  # the kill comes uniform(0, max_delay_s) after the trigger


PLAN = [
    Phase("synthetic data written", data_written, 0.6),
    Phase("cache build", cache_built, 0.15),
    Phase("study created in storage", study_created, 0.12),
    Phase("trial starting", trial_starting, 0.1),
    Phase("checkpoint write", checkpoint_written, 0.01),  # before the epoch line the next phase waits for
    Phase("inside an epoch", inside_epoch, 1.5),
    Phase("W&B finishing a trial's run", wandb_finishing, 0.12),
    Phase("promotion (ensemble)", promoting, 0.5),
    Phase("report writing", reporting, 1.0),
]


@dataclass
class Kill:
    phase: str
    saw: str
    delay_s: float
    at_s: float  # seconds after the run started
    last_line: str


@dataclass
class Chaos:
    kills: list[Kill] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # phases a run went past, or ended in, before a kill
    outputs: list[list[str]] = field(default_factory=list)  # every run's output, in order


def run_once(layout: Layout, pending: list[tuple[Phase, float]], chaos: Chaos) -> list[tuple[Phase, float]]:
    """Start the study command and kill it in the first pending phase that shows; returns the phases left.

    Phases come in the order a study goes through them; one that does not show before a later one
    does (the previous kill came after it, or the machine was quicker than the delay) is skipped,
    so a run never goes on to the end of the study just because its phase is already past.
    """
    run = Run(layout)
    hit = None
    while run.alive() and hit is None and run.elapsed() < RUN_TIMEOUT_S:
        hit = next(((i, saw) for i, (phase, _) in enumerate(pending) if (saw := phase.trigger(layout, run))), None)
        if hit is None:
            time.sleep(0.003)
    if hit is None and run.alive():
        run.kill()
        pytest.fail(f"the study command ran {RUN_TIMEOUT_S} s without reaching a phase; output:\n{run.tail()}")
    index, saw = hit if hit is not None else (len(pending), None)
    chaos.skipped.extend(phase.name for phase, _ in pending[:index])
    if hit is not None:
        phase, delay = pending[index]
        time.sleep(delay)
    if hit is not None and run.alive():
        at = run.elapsed()
        run.kill()
        chaos.kills.append(Kill(phase.name, saw, delay, at, run.lines[-1] if run.lines else ""))
        print(f"  kill {len(chaos.kills)}: {phase.name}: {saw}, +{delay:.3f} s -> SIGKILL at {at:.2f} s "
              f"(last line: {chaos.kills[-1].last_line[:90]!r})", flush=True)
    else:
        code = run.wait()
        assert code == 0, f"the study command failed (exit {code}):\n{run.tail()}"
        if hit is not None:
            chaos.skipped.append(phase.name)
        print(f"  the run ended before a kill; skipped so far: {chaos.skipped}", flush=True)
    chaos.outputs.append(run.lines)
    return pending[index + 1:]


def run_to_the_end(layout: Layout) -> list[str]:
    run = Run(layout)
    code = run.wait()
    assert code == 0, f"the study command failed (exit {code}):\n{run.tail()}"
    return run.lines


# ------------------------------------------------------------------------------ the checks


def epoch_lines(outputs: list[list[str]]) -> Counter:
    """(trial identity, epoch) -> how many runs printed that epoch as trained and checkpointed."""
    return Counter((int(m[1]), int(m[2]) - 1) for lines in outputs for line in lines if (m := EPOCH_LINE.match(line)))


def open_finished_study(layout: Layout) -> optuna.Study:
    return optuna.load_study(study_name=NAME, storage=f"sqlite:///{layout.study / 'study.db'}")


def unreadable_checkpoints(layout: Layout, identities: list[int]) -> list[str]:
    bad = []
    for identity in identities:
        for name in ("last.pt", "best.pt"):
            path = layout.study / "trials" / str(identity) / name
            try:
                load_checkpoint(path)
            except Exception as error:  # noqa: BLE001 - any failure to load is the finding
                bad.append(f"{path}: {type(error).__name__}: {error}")
    return bad


def wandb_history_problems(layout: Layout, frame: pd.DataFrame) -> tuple[list[str], int]:
    """Each identity's W&B history (all attempts, read from W&B's own files) holds each epoch exactly once.

    Also returns how many attempt folders have no exit record (killed before W&B closed them):
    read_offline_run must read those too.
    """
    problems, unfinished = [], 0
    for row in frame.itertuples():
        try:
            run = read_offline_run(layout.wandb, run_id_for(study_key_at(NAME, layout.study), int(row.trial)))
        except FileNotFoundError as error:
            problems.append(f"trial {row.trial}: {error}")
            continue
        logged = Counter(int(h["epoch"]) - 1 for h in run["history"] if "val/f1" in h)  # W&B counts from 1
        if sorted(logged) != list(range(row.epochs)) or set(logged.values()) - {1}:
            problems.append(f"trial {row.trial}: W&B holds epochs {dict(logged)} (epoch: times) for "
                            f"{row.epochs} epoch(s) trained")
        if run["group"] != NAME or run["job_type"] != "trial":
            problems.append(f"trial {row.trial}: W&B group {run['group']!r}, job_type {run['job_type']!r}")
        unfinished += sum(not has_exit_record(Path(f) / f"run-{run['run_id']}.wandb") for f in run["folders"])
    return problems, unfinished


def wandb_run_ids_on_disk(layout: Layout) -> set[str]:
    return {log.stem.removeprefix("run-") for log in layout.wandb.glob("offline-run-*/run-*.wandb")}


def leftover_temporaries(layout: Layout) -> list[str]:
    """Temp files and partial folders of killed writers that nothing removed."""
    found = [p for p in layout.study.rglob(".*tmp*") if "wandb" not in p.parts]
    found += temporaries(layout.data.parent, f"{layout.data.name}.partial-*")
    return [f"{p.relative_to(layout.root)} ({p.stat().st_size} B)" if p.is_file() else f"{p.name}/"
            for p in found]


def committed_caches(layout: Layout) -> list[np.ndarray]:
    """Each committed file of the cache folder: a decoded cache (<key>.npy with <key>.json) or a foreground's
    masks (<key>.fg<v>.masks.npy with <key>.fg<v>.json). Keys hold file times, so they differ between runs."""
    found = []
    for path in sorted(layout.cache.glob("*.npy")):
        stem = path.name.removesuffix(".npy")
        marker = path.parent / (stem.removesuffix(".masks") + ".json")
        if marker.is_file() and (path.name.count(".") == 1 or stem.endswith(".masks")):
            found.append(np.load(path, mmap_mode="r"))
    return found


def same_arrays(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    """The same arrays, in any order."""
    unmatched = list(second)
    for array in first:
        match = next((i for i, other in enumerate(unmatched) if other.shape == array.shape
                      and np.array_equal(other, array)), None)
        if match is None:
            return False
        unmatched.pop(match)
    return not unmatched


def params_of(frame: pd.DataFrame) -> list[tuple]:
    columns = [c for c in frame.columns if c.startswith("param_")]
    return [tuple((c, row[c]) for c in columns if pd.notna(row[c])) for _, row in frame.iterrows()]


def show(frame: pd.DataFrame) -> str:
    columns = ["trial", "optuna_trial", "state", "epochs", "objective"] + sorted(
        c for c in frame.columns if c.startswith("param_"))
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        return frame.reindex(columns=columns).to_string(index=False)


def check_outcome(layout: Layout, reference: Layout, chaos: Chaos, reference_output: list[str]) -> list[str]:
    """Every way the killed study differs from what it should be, as readable lines (empty: none)."""
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    cfg, kills = layout.config(), len(chaos.kills)
    study = open_finished_study(layout)
    states = Counter(t.state.name.lower() for t in study.trials)
    frame, reference_frame = trials_frame(study), trials_frame(open_finished_study(reference))
    finished = states["complete"] + states["pruned"]
    zombies = [t.number for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    identities = sorted(int(n) for n in frame["trial"])
    folders = sorted(int(p.name) for p in (layout.study / "trials").iterdir())
    unreadable = unreadable_checkpoints(layout, folders)
    wandb_issues, unfinished_attempts = wandb_history_problems(layout, frame)
    lines = epoch_lines(chaos.outputs)
    trained, reference_trained = sum(lines.values()), sum(epoch_lines([reference_output]).values())
    print(f"  trials by state in storage (attempts): {dict(states)}; lost {TRIALS - finished}, "
          f"zombies {len(zombies)}, unreadable checkpoints {len(unreadable)}")
    print(f"  epochs trained (epoch lines of all runs): {trained}; uninterrupted: {reference_trained}; "
          f"W&B attempt folders without an exit record: {unfinished_attempts}")
    leftovers = leftover_temporaries(layout)
    print(f"  leftover temporaries: {leftovers or 'none'}")
    print(f"  killed study, one row per identity:\n{show(frame)}\n  uninterrupted study:\n{show(reference_frame)}")

    # nothing lost, nothing left hanging
    check(finished == TRIALS, f"{finished} finished trials (complete + pruned), target {TRIALS}: {dict(states)}")
    check(not zombies, f"trials left RUNNING or WAITING: {zombies}")
    check(not leftovers, f"half-written files of killed writers left: {leftovers}")
    # one identity = one folder = one W&B run id; storage holds no identity besides the finished ones
    check(frame["trial"].is_unique and len(frame) == TRIALS and set(frame["state"]) <= {"complete", "pruned"},
          f"trial identities in storage (latest attempt each):\n{show(frame)}")
    check(folders == identities, f"trial folders {folders} but trial identities {identities}")
    key = study_key_at(NAME, layout.study)  # the W&B ids carry the study's identity
    for t in study.trials:
        expected = run_id_for(key, int(t.user_attrs.get("identity", t.number)))
        check(t.user_attrs.get("wandb_run_id", expected) == expected, f"attempt {t.number}: W&B run id "
              f"{t.user_attrs.get('wandb_run_id')} is not its identity's {expected}")
    strays = wandb_run_ids_on_disk(layout) - {run_id_for(key, i) for i in identities} - {
        study_run_id(key), ensemble_run_id(key)}
    check(not strays, f"W&B runs of no trial identity in the study: {sorted(strays)}")
    problems.extend(wandb_issues)
    # trial 0 is the study file's defaults, exactly once
    references = {int(t.user_attrs.get("identity", t.number)) for t in study.trials if t.user_attrs.get("reference")}
    check(len(references) == 1, f"trial identities marked as the reference (the study file's defaults): {references}")
    check(default_trial_params(cfg) in [t.params for t in study.trials if t.state == TrialState.COMPLETE],
          "no complete trial ran the study file's defaults (trial 0)")
    # checkpoints and per-trial files agree with storage
    problems.extend(unreadable)
    for row in frame.itertuples():
        folder = layout.study / "trials" / str(row.trial)
        if row.state not in ("complete", "pruned") or not folder.is_dir() or unreadable:
            continue
        check(load_checkpoint(folder / "last.pt")["next_epoch"] == row.epochs, f"trial {row.trial}: last.pt epoch")
        check(pd.read_csv(folder / "metrics.csv")["epoch"].tolist() == list(range(row.epochs)),
              f"trial {row.trial}: metrics.csv epochs")
        check(json.loads((folder / "result.json").read_text())["state"] == row.state,
              f"trial {row.trial}: result.json state")
    # the cache: no temporary left, no half cache used: the pixels of an uninterrupted build
    cache_leftovers = temporaries(layout.cache, "*.tmp-*")
    check(not cache_leftovers, f"cache temporaries left: {cache_leftovers}")
    check(same_arrays(committed_caches(layout), committed_caches(reference)),
          f"the caches and foreground masks in {layout.cache} are not the uninterrupted study's: "
          f"{sorted(os.listdir(layout.cache))}")
    # promotion and report
    members = json.loads((layout.study / "ensemble" / "members.json").read_text())
    check({m["trial"] for m in members["members"]} <= set(frame.loc[frame["state"] == "complete", "trial"]),
          f"ensemble members {members['members']} are not all complete trials")
    check("honest" in json.loads((layout.study / "ensemble" / "metrics.json").read_text()), "ensemble metrics.json")
    check((layout.study / "report.html").read_text().rstrip().endswith("</html>"), "report.html is incomplete")
    # work: no checkpointed epoch trained twice, at most one epoch more per kill than uninterrupted
    check(not [key for key, n in lines.items() if n > 1],
          f"checkpointed epochs trained again: {sorted(k for k, n in lines.items() if n > 1)}")
    check(trained <= reference_trained + kills, f"{trained} epochs trained, uninterrupted {reference_trained}, "
                                                f"{kills} kills")
    # a rerun samples new params, not the killed process's again
    repeated = [p for p, n in Counter(params_of(frame)).items() if n > 1]
    check(not repeated, f"trial identities with identical params: {repeated}")
    return problems


# ------------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_study_survives_sigkill_in_every_phase(tmp_path):
    seed = int(os.environ.get("HARNESS_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\nchaos seed {seed} (replay: HARNESS_CHAOS_SEED={seed})", flush=True)
    rng, chaos = random.Random(seed), Chaos()
    delays = [rng.uniform(0, phase.max_delay_s) for phase in PLAN]
    layout, reference = Layout(tmp_path / "chaos"), Layout(tmp_path / "reference")
    started = time.monotonic()
    pending = list(zip(PLAN, delays, strict=True))
    while pending:
        pending = run_once(layout, pending, chaos)
    chaos.outputs.append(run_to_the_end(layout))
    chaos_s = time.monotonic() - started
    reference_output = run_to_the_end(reference)
    print(f"chaos seed {seed}: {len(chaos.kills)} kill(s), killed study {chaos_s:.0f} s, uninterrupted study "
          f"{time.monotonic() - started - chaos_s:.0f} s; phases not reached: {chaos.skipped or 'none'}")
    for kill in chaos.kills:
        print(f"  {kill.phase:28s} {kill.saw}, +{kill.delay_s:.3f} s: killed at {kill.at_s:.2f} s")

    problems = check_outcome(layout, reference, chaos, reference_output)
    assert len(chaos.kills) >= 6, f"only {len(chaos.kills)} kill(s) landed; phases not reached: {chaos.skipped}"
    assert not problems, f"chaos seed {seed}:\n" + "\n".join(problems)


def started_and_died(cfg, first_heartbeat: bool) -> None:
    """The storage a study process leaves when killed as trial 0 starts, before the objective stored
    anything: trial 0 RUNNING; its heartbeat thread had or had not beaten once."""
    data = prepare_data(cfg, progress=False)
    study = open_study(cfg, None, data.split.hash, data.summary())
    trial = study.ask()  # trial 0: the study file's defaults
    if first_heartbeat:
        open_storage(default_storage(cfg), cfg.search.heartbeat_s).record_heartbeat(trial._trial_id)


@pytest.mark.slow
def test_trial_killed_before_its_identity_was_stored_keeps_it_on_retry(smoke_study):
    """The retry of a trial killed before its `identity` attribute was stored still continues trial 0.

    The objective stores `identity` after sampling the params (one storage write each); a trial
    killed before that leaves its retry nothing to copy, so the retry takes its own Optuna
    number: trial 0 stays in storage as a failed trial, and the retry is trial 1 with another
    folder and W&B run. Optuna's retry record (`retried_trial_number`) knows the original.
    """
    cfg = smoke_study(**{"search.trials": 1, "train.epochs": 1, "search.heartbeat_s": 1})
    started_and_died(cfg, first_heartbeat=True)
    frame = trials_frame(run_study(cfg, progress=False))
    assert frame[["trial", "state"]].values.tolist() == [[0, "complete"]], (
        f"killed before its identity was stored, trial 0 came back as another identity:\n{show(frame)}")
    assert sorted(p.name for p in (cfg.study_dir / "trials").iterdir()) == ["0"]


@pytest.mark.slow
def test_trial_killed_before_its_first_heartbeat_is_retried(smoke_study):
    """A trial that never beat is never stale for Optuna: run_study must not wait for it forever.

    Between `study.ask()` and the heartbeat thread's first write (milliseconds) a kill leaves a
    RUNNING trial with no heartbeat; fail_stale_trials ignores such trials by design, and
    run_study counts it as running in another process, so the rerun sleeps forever.
    """
    cfg = smoke_study(**{"search.trials": 1, "train.epochs": 1, "search.heartbeat_s": 1})
    started_and_died(cfg, first_heartbeat=False)
    study = run_study(cfg, timeout=30, progress=False)  # stops starting trials after 30 s; a retry is due in ~3 s
    states = [t.state.name for t in study.trials]
    assert "COMPLETE" in states and "RUNNING" not in states, f"after 30 s the rerun still waits: {states}"


def test_rerun_does_not_sample_the_killed_process_params_again(smoke_study):
    """A sampler seeded with search.sampler.seed restarts its random stream in every process.

    So the first trial a rerun samples repeats the first trial the killed process sampled: a
    study resumed k times spends k trials of its budget on one configuration.
    """
    cfg = smoke_study()
    first_process = open_study(cfg, None, split_hash="h")
    reference = first_process.ask()  # trial 0: the study file's defaults, enqueued
    first_process.tell(reference, 0.1)
    killed = first_process.ask()
    suggest_params(killed, cfg)  # the process dies while this trial trains
    rerun = open_study(cfg, None, split_hash="h")  # the same command again: a new process
    fresh = rerun.ask()
    suggest_params(fresh, cfg)
    assert fresh.params != killed.params, f"the rerun sampled the killed trial's params again: {fresh.params}"


@pytest.mark.slow
def test_trial_killed_after_its_pruning_is_not_trained_further(smoke_study, tmp_path):
    """A pruned trial killed before Optuna recorded it (W&B finish, storage writes) stays pruned on retry.

    The retry replays the reported epochs to its new Optuna trial and continues from last.pt,
    without asking the pruner about the last one again (the same holds for a kill between an
    epoch's last.pt and its pruning decision): it trains past the pruning point until the
    pruner next decides. Pruners that decide at some steps only (hyperband and successive-halving
    rungs, as in studies/mask.yaml) make that several epochs; here one that decides every second
    epoch.
    """
    cfg = smoke_study(**{"train.epochs": 3})
    decides_every_second_epoch = optuna.pruners.ThresholdPruner(lower=1.1, n_warmup_steps=1, interval_steps=2)
    study = optuna.create_study(direction="maximize", pruner=decides_every_second_epoch)
    run_dir = tmp_path / "trial"
    pruned = run_trial(cfg, trial=study.ask(), run_dir=run_dir)
    assert (pruned.state, pruned.epochs_run) == ("pruned", 1)
    # killed here: Optuna never learned of the pruning; the heartbeat retry is a new trial, same folder
    retry = run_trial(cfg, trial=study.ask(), run_dir=run_dir)
    assert (retry.state, retry.epochs_run) == ("pruned", 1), f"the retry trained on to {retry.epochs_run} epochs"
