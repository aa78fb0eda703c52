"""`make bench` group "faults": shared state under restarts, two writers and hostile files, each case a real process.

The default study's smoke variant (pruner off, 2 epochs; one trial unless a case needs more), run with `harness`
commands as a user runs them, on real storage (SQLite files; two processes share one), a shared folder and an
S3 server that honours conditional writes (moto's, in this process). Each case counts the files (or W&B epochs)
it lost and the stale files (another study's, another promotion's, another attempt's) that entered a result,
and keeps the line that told the user what happened:

  recreated      a study deleted and created again under the same name with another lr, a store on a shared
                 folder: trial 0 must train at the new lr (stale = its last.pt made for the old one); lost = the
                 earlier study's stored objects gone
  restart        `promote`, then `promote --restart` with promotion.folds changed, store on S3: stale = fold
                 models made for the earlier promotion; lost = the earlier promotion's store copy still there
                 (it must be deleted: counted as left over, not lost)
  two_writers    trial 0's process frozen (SIGSTOP) until its trial goes stale and a second machine's retry
                 claims it, then thawed (both push, S3): stale = files of the frozen attempt in the final
                 manifest written after the claim; lost = objects the final manifest names that are missing
  hostile_name   a manifest naming `../../escaped.txt`, read by `status` and `ensemble` from an empty runs
                 folder: stale = files written outside the trial folder
  wandb_waiting  SIGKILL once the trial ended with its W&B records waiting for a server that never answers;
                 the same command again with a server: lost = epochs the server never got, stale = epochs
                 it got twice
  params_changed the study file's lr changed while trial 0 is half trained: refused; lost = files of the trial
                 folder changed

  faults_files_lost   harness = files (epochs) lost over the cases, reference 0 (a constant); met at 0
  faults_stale_used   harness = stale files used over the cases, reference 0 (a constant); met at 0

    python -m harness.bench --only faults [--quick]   (about 6 minutes on two cores; --quick is the same size)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.bench.common import Bench, row
from harness.folders import TrialFolder, read_identity

SMOKE = {"search.pruner.name": "none", "train.epochs": 2, "search.heartbeat_s": 1, "tracking.mode": "disabled"}


class Case:
    """One fault case's folder and `harness` commands (the default study's smoke variant, as a user runs it)."""

    def __init__(self, bench: Bench, name: str, **settings) -> None:
        self.root = bench.out.resolve() / "faults" / name
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.study_file, self.data = bench.study_file, bench.out.resolve() / "faults" / "data"
        self.settings = {**SMOKE, "name": name, "data.root": str(self.data), "data.cache_dir": str(self.data.parent
                                                                                                      / "cache"),
                         **settings}
        self.log = self.root / "commands.log"

    def runs(self, machine: str = "a") -> Path:
        return self.root / machine / "runs" / self.settings["name"]

    def command(self, verb: str, *extra: str, machine: str = "a", **settings) -> list[str]:
        merged = {**self.settings, "runs_dir": str(self.root / machine / "runs"), **settings}
        sets = [word for key, value in merged.items() for word in ("--set", f"{key}={value}")]
        return [sys.executable, "-m", "harness.cli", verb, str(self.study_file), "--smoke", *sets, *extra]

    def run(self, verb: str, *extra: str, env: dict | None = None, machine: str = "a", **settings
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(verb, *extra, machine=machine, **settings), capture_output=True,
                              text=True, timeout=900, env=self.env(machine, env))
        with open(self.log, "a") as log:
            log.write(f"$ {verb} {' '.join(extra)} ({machine})\nexit {done.returncode}\n{done.stdout}{done.stderr}\n")
        return done

    def start(self, verb: str, *extra: str, env: dict | None = None, machine: str = "a", **settings
              ) -> subprocess.Popen:
        log = open(self.root / f"{machine}.log", "w")
        return subprocess.Popen(self.command(verb, *extra, machine=machine, **settings), stdout=log,
                                stderr=subprocess.STDOUT, env=self.env(machine, env), start_new_session=True)

    @staticmethod
    def env(machine: str, extra: dict | None) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HARNESS_MACHINE": machine,
                **(extra or {})}


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.05)


def last_line(text: str, *needles: str) -> str:
    lines = [line for line in text.splitlines() if any(needle in line for needle in needles)]
    return lines[-1].strip()[:300] if lines else ""


def made_for(folder: Path) -> dict:
    return TrialFolder(folder).load_last()["made_for"]


# ------------------------------------------------------------------------------------------- cases


def recreated(bench: Bench) -> dict:
    case = Case(bench, "recreated")
    store = str(case.root / "store")
    first = case.run("study", "--trials", "1", **{"store.url": store})
    earlier = {p.relative_to(case.root / "store") for p in (case.root / "store").rglob("*@*") if p.is_file()}
    shutil.rmtree(case.runs())  # the study deleted, as its refusal advises to start over, and created again
    again = case.run("study", "--trials", "1", **{"store.url": store, "params.lr": 0.0003})
    trial = case.runs() / "trials" / "0"
    stale = int(made_for(trial)["params"]["lr"] != 0.0003)
    lost = sum(not (case.root / "store" / p).is_file() for p in earlier)
    return {"exit": [first.returncode, again.returncode], "stale_used": stale, "files_lost": lost,
            "said": f"store keys {sorted({p.parts[0] for p in earlier})} then {read_identity_key(case)}"}


def read_identity_key(case: Case) -> str:
    return f"{case.settings['name']}@{read_identity(case.runs())}"


def restart(bench: Bench, endpoint: str) -> dict:
    case = Case(bench, "restart")
    store = {"store.url": f"s3://team/{bench.out.name}-restart", "store.endpoint_url": endpoint}
    steps = [case.run("study", "--trials", "2", **store), case.run("promote", **store)]
    earlier = read_identity(case.runs() / "promotion")
    steps.append(case.run("promote", "--restart", **store, **{"promotion.folds": 3}))
    now = read_identity(case.runs() / "promotion")
    folds = sorted((case.runs() / "promotion").glob("trial-*/fold-*"))
    stale = sum(f"promotion@{now}/" not in made_for(fold)["folder"] for fold in folds)
    left = count_keys(store, f"promotion@{earlier}/")
    return {"exit": [s.returncode for s in steps], "stale_used": stale, "files_lost": 0, "left_over": left,
            "said": f"{len(folds)} fold models of promotion {now}, none of {earlier}; its store copy: {left} objects"}


def count_keys(store: dict, needle: str) -> int:
    from harness.store import open_backend

    backend = open_backend(store["store.url"], store["store.endpoint_url"])
    pages = backend.client.get_paginator("list_objects_v2").paginate(Bucket=backend.bucket, Prefix=backend.prefix)
    return sum(needle in item["Key"] for page in pages for item in page.get("Contents", []))


def two_writers(bench: Bench, endpoint: str) -> dict:
    from harness.store import MANIFESTS, open_backend

    case = Case(bench, "two_writers", **{"train.epochs": 4})
    storage = f"sqlite:///{case.root / 'shared-storage.sqlite'}"
    store = {"store.url": f"s3://team/{bench.out.name}-two", "store.endpoint_url": endpoint}
    frozen = case.start("study", "--trials", "1", "--storage", storage, machine="a", **store)
    wait_for(TrialFolder(case.runs("a") / "trials" / "0").file(TrialFolder.LAST), frozen)
    os.kill(frozen.pid, signal.SIGSTOP)  # alive, silent: its trial goes stale after 3 heartbeats
    retry = case.start("study", "--trials", "1", "--storage", storage, machine="b", **store)
    key = f"{case.settings['name']}@{read_identity(case.runs('a'))}/trials/0"
    backend = open_backend(store["store.url"], endpoint)
    deadline = time.monotonic() + 600
    while not any(b"machine\": \"b\"" in (backend.get_bytes(f"{key}/{MANIFESTS}/{n}") or b"")
                  for n in backend.names(f"{key}/{MANIFESTS}")):
        if retry.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the retry never claimed trial 0")
        time.sleep(0.2)
    os.kill(frozen.pid, signal.SIGCONT)  # both push now
    codes = [retry.wait(timeout=900), frozen.wait(timeout=900)]
    generation = max(int(n.removesuffix(".json")) for n in backend.names(f"{key}/{MANIFESTS}"))
    final = json.loads(backend.get_bytes(f"{key}/{MANIFESTS}/{generation:09d}.json"))
    stale = sum(record["machine"] == "a" and record["time"] > final["owner"]["since"]
                for record in final["files"].values())
    lost = sum(backend.get_bytes(f"{key}/{name}@{record['sha256']}") is None for name, record in final["files"].items())
    said = last_line((case.root / "a.log").read_text(), "was taken over by another attempt")
    return {"exit": codes, "stale_used": stale, "files_lost": lost, "owner": final["owner"]["machine"], "said": said}


def hostile_name(bench: Bench) -> dict:
    from harness.store import MANIFESTS

    case = Case(bench, "hostile_name")
    store = str(case.root / "store")
    first = case.run("study", "--trials", "1", **{"store.url": store})
    key = case.root / "store" / read_identity_key(case) / "trials" / "0" / MANIFESTS
    newest = max(key.glob("*.json"))
    manifest = json.loads(newest.read_text())
    manifest["files"]["../../escaped.txt"] = manifest["files"][TrialFolder.METRICS]
    newest.write_text(json.dumps(manifest))
    outputs = []
    shutil.copytree(case.runs(), case.runs("b"), ignore=shutil.ignore_patterns("trials", "ensemble"))
    (case.runs() / "trials").rename(case.root / "a-trials")  # machine a out of reach: b must fetch from the store
    for verb in ("status", "ensemble"):
        outputs.append(case.run(verb, machine="b", **{"store.url": store}))
    escaped = list(case.root.rglob("escaped.txt"))
    said = last_line("".join(o.stdout + o.stderr for o in outputs), "../../escaped.txt")
    return {"exit": [first.returncode, *(o.returncode for o in outputs)], "stale_used": len(escaped),
            "files_lost": 0, "said": said}


def wandb_waiting(bench: Bench) -> dict:
    from harness.bench.servers import BlackHole
    from harness.compat import read_offline_run
    from harness.tracking import run_id_for, study_key_at

    case = Case(bench, "wandb_waiting", **{"tracking.init_timeout_s": 300})
    trial = case.runs() / "trials" / "0"
    with BlackHole(lifetime_s=900) as hole:  # accepts, never answers: every record waits in memory
        env = {"WANDB_BASE_URL": hole.url, "WANDB_API_KEY": "x" * 40, "WANDB_MODE": ""}
        process = case.start("study", "--trials", "1", env=env, **{"tracking.mode": "online"})
        wait_for(trial / TrialFolder.RESULT, process)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    epochs = int(TrialFolder(trial).read_result()["epochs_run"])
    again = case.run("study", "--trials", "1", env={"WANDB_MODE": "offline"}, **{"tracking.mode": "offline"})
    history = read_offline_run(case.runs() / "wandb", run_id_for(study_key_at(case.settings["name"], case.runs()), 0))["history"]
    logged = [int(h["epoch"]) for h in history if "val/f1" in h]
    lost = len(set(range(1, epochs + 1)) - set(logged))
    return {"exit": [again.returncode], "stale_used": len(logged) - len(set(logged)), "files_lost": lost,
            "epochs": epochs, "said": last_line(again.stderr, "logged again")}


def params_changed(bench: Bench) -> dict:
    case = Case(bench, "params_changed", **{"train.epochs": 4})
    process = case.start("study", "--trials", "1")
    trial = case.runs() / "trials" / "0"
    wait_for(trial / TrialFolder.LAST, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {p.name: p.read_bytes() for p in trial.iterdir() if p.is_file()}
    changed = case.run("study", "--trials", "1", **{"params.lr": 0.0003})
    after = {p.name: p.read_bytes() for p in trial.iterdir() if p.is_file()}
    lost = sum(after.get(name) != data for name, data in before.items())
    return {"exit": [changed.returncode], "stale_used": 0, "files_lost": lost,
            "said": last_line(changed.stderr, "different search space")}


# ------------------------------------------------------------------------------------------- the group


def bench_faults(bench: Bench) -> list[dict]:
    import boto3
    from moto.server import ThreadedMotoServer

    from harness.bench.servers import S3_KEYS, closed_port

    os.environ.update(S3_KEYS)
    port = closed_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="team")
        cases = {"recreated": lambda: recreated(bench), "restart": lambda: restart(bench, endpoint),
                 "two_writers": lambda: two_writers(bench, endpoint), "hostile_name": lambda: hostile_name(bench),
                 "wandb_waiting": lambda: wandb_waiting(bench), "params_changed": lambda: params_changed(bench)}
        results = {}
        for name, run in cases.items():
            started = time.perf_counter()
            results[name] = {**run(), "seconds": round(time.perf_counter() - started, 1)}
            print(f"faults {name}: {results[name]}", flush=True)
    finally:
        server.stop()
    lost = sum(r["files_lost"] for r in results.values())
    stale = sum(r["stale_used"] for r in results.values())
    rows = [row("faults_files_lost", lost, 0, "files", 0, better="lower", ratio=float(lost), constant="nothing lost"),
            row("faults_stale_used", stale, 0, "files", 0, better="lower", ratio=float(stale),
                constant="nothing stale used")]
    for result in rows:
        result["cases"] = results
    return rows
