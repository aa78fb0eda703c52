"""A study across machines: trial files in a store (a shared folder, or S3 from a real server), a killed machine's
trial continued by another from the stored last.pt, every later step from a third, empty runs folder."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from conftest import REPO, harness_env
from harness.bench.postgres import create_database
from harness.bench.servers import S3_KEYS, closed_port, running_s3
from harness.cli import main
from harness.config import load_study
from harness.folders import StudyFolder
from harness.preflight import PreflightError, check_study
from harness.store import MANIFESTS, check_store, folder_store, open_backend

SLURM = REPO / "deploy" / "slurm-study.sbatch"
KUBERNETES = REPO / "deploy" / "kubernetes-study.yaml"
KEYS = S3_KEYS


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (`rclone serve s3`); yields (endpoint URL, the folder holding its buckets)."""
    root = tmp_path_factory.mktemp("s3")
    with running_s3(root) as endpoint:
        yield endpoint, root


@pytest.fixture
def s3_keys(monkeypatch):
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)


def worker_line() -> str:
    """The worker command of the SLURM script (the line after its `# worker` comment)."""
    lines = SLURM.read_text().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("# worker")) + 1]


def start_machine(name: str, tmp_path: Path, storage: str, store_url: str, endpoint: str, data: Path) -> subprocess.Popen:
    """One simulated machine: the SLURM script's worker line, its own runs folder and decoded cache."""
    args = (f"--smoke --set data.root={data} --set data.cache_dir={tmp_path / name / 'cache'} "
            "--set search.heartbeat_s=1 --set search.pruner.name=none --set train.epochs=3 --trials 3")
    env = harness_env(**KEYS, STUDY="studies/default.yaml", HARNESS_STORAGE=storage, HARNESS_STORE_URL=store_url,
                      HARNESS_STORE_ENDPOINT=endpoint, HARNESS_RUNS_DIR=str(tmp_path / name / "runs"),
                      HARNESS_MACHINE=name, HARNESS_ARGS=args)
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(["bash", "-c", worker_line()], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def stored_names(mirrored: Path) -> set[str]:
    """The file names the store's newest manifest of a folder names (none while it has none)."""
    for path in sorted(mirrored.glob(f"{MANIFESTS}/*.json"), reverse=True):
        try:
            return set(json.loads(path.read_text())["files"])
        except (FileNotFoundError, ValueError):  # replaced by a newer one while read
            continue
    return set()


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the process ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_machines_trial_is_continued_elsewhere_and_a_third_runs_folder_does_every_later_step(
        tmp_path, shared_data, postgres_server, s3_server, s3_keys, capsys):
    endpoint, s3_root = s3_server
    storage = create_database(postgres_server, f"machines_{os.getpid()}_{int(time.time())}")
    store_url = f"s3://harness-bucket/{tmp_path.name}"
    data = shared_data / "default" / "data"
    a = start_machine("machine-a", tmp_path, storage, store_url, endpoint, data)
    # A's trial 0 has pushed an epoch's last.pt to the store: kill A mid-trial, with its runs folder out of reach
    wait_for_file(tmp_path / "machine-a" / "runs" / "default" / "identity", a)
    identity = (tmp_path / "machine-a" / "runs" / "default" / "identity").read_text()
    mirrored = s3_root / "harness-bucket" / tmp_path.name / f"default@{identity}" / "trials" / "0"
    # A's trial 0 has pushed an epoch's last.pt (its first manifest, the claim, names no file yet)
    deadline = time.monotonic() + 300
    while not stored_names(mirrored) & {"last.pt"}:
        assert a.poll() is None and time.monotonic() < deadline, "A never pushed a last.pt"
        time.sleep(0.05)
    b = start_machine("machine-b", tmp_path, storage, store_url, endpoint, data)
    time.sleep(1.0)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert b.wait(timeout=600) == 0, (tmp_path / "machine-b.log").read_text()[-3000:]
    shutil.rmtree(tmp_path / "machine-a")  # the dead machine's disk is gone

    study = optuna.load_study(study_name="default", storage=storage)
    attempts = [t for t in study.trials if t.user_attrs.get("identity") == 0]
    assert [t.state for t in attempts] == [TrialState.FAIL, TrialState.COMPLETE]
    assert [t.user_attrs["machine"] for t in attempts] == ["machine-a", "machine-b"]
    # continued, not restarted: B's record of trial 0 starts with the epochs A trained and the store kept
    stored = json.loads(max((mirrored / MANIFESTS).glob("*.json")).read_text())
    assert stored["owner"]["machine"] == "machine-b"
    finished = pd.read_csv(tmp_path / "machine-b" / "runs" / "default" / "trials" / "0" / "metrics.csv")
    assert finished["epoch"].tolist() == [0, 1, 2]
    assert "machine-b" in {record["machine"] for record in stored["files"].values()}
    log_b = (tmp_path / "machine-b.log").read_text()
    assert "trial    0 epoch 1/3" not in log_b  # B never trained trial 0's first epoch again
    shutil.rmtree(tmp_path / "machine-b")  # out of reach from the third machine too

    # a third machine with an empty runs folder: every step finds every trial's files in the store
    third = ["--smoke", "--storage", storage, "--set", f"runs_dir={tmp_path / 'machine-c' / 'runs'}",
             "--set", f"data.root={data}", "--set", f"data.cache_dir={tmp_path / 'machine-c' / 'cache'}",
             "--set", f"store.url={store_url}", "--set", f"store.endpoint_url={endpoint}"]
    study_file = str(REPO / "studies" / "default.yaml")
    assert main(["status", study_file, *third]) == 0
    table = pd.read_csv(tmp_path / "machine-c" / "runs" / "default" / "trials.csv")
    assert len(table) == 3 and set(table["machine"]) <= {"machine-a", "machine-b"}
    assert table["stored"].str.endswith("file(s)").all() and table["objective_low"].notna().all()
    for verb in (["ensemble"], ["predict", "--from", "ensemble"], ["promote"], ["predict"], ["report"]):
        assert main([*verb, study_file, *third]) == 0, verb
    runs_c = tmp_path / "machine-c" / "runs" / "default"
    members = json.loads((runs_c / "ensemble" / "members.json").read_text())["members"]
    assert members and all(Path(runs_c / "trials" / str(m["trial"]) / "best.pt").is_file() for m in members)
    assert (runs_c / "submission.csv").is_file() and (runs_c / "promotion" / "summary.json").is_file()
    assert "machine-b" in (runs_c / "report.html").read_text()


def test_a_store_that_cannot_be_written_is_refused_before_any_trial(smoke_study, tmp_path, s3_keys):
    closed = closed_port()
    for url, endpoint in (("s3://bucket/x", f"http://127.0.0.1:{closed}"), ("/proc/harness-store", None)):
        cfg = smoke_study(**{"store.url": url, "store.endpoint_url": endpoint})
        with pytest.raises(PreflightError, match=re.escape(f"store {url} (store.url) cannot be written")):
            check_study(cfg)
        assert not cfg.study_dir.exists()


def test_the_store_mirrors_folders_under_runs_dir_only(tmp_path):
    cfg = load_study(REPO / "studies" / "default.yaml", overrides={"runs_dir": str(tmp_path / "runs"),
                                                                   "store.url": str(tmp_path / "store")})
    assert folder_store(cfg, StudyFolder.of(cfg).trial(4).path).prefix == "default/trials/4"  # no identity yet
    cfg.study_dir.mkdir(parents=True)
    (cfg.study_dir / "identity").write_text("a1b2")
    assert folder_store(cfg, StudyFolder.of(cfg).trial(4).path).prefix == "default@a1b2/trials/4"
    assert folder_store(cfg, tmp_path / "elsewhere") is None
    assert folder_store(load_study(REPO / "studies" / "default.yaml"), Path("runs/default/trials/4")) is None


def test_the_launch_recipes_parse_and_run_the_command_the_tests_run():
    line = worker_line()
    assert line.startswith(".venv/bin/harness study ") and "store.url=" in line
    assert "--storage" not in line and "PASSWORD" not in line  # the URL and its password come from the environment
    script = SLURM.read_text()
    assert "#SBATCH --array=" in script and "#SBATCH --gres=gpu:1" in script
    assert subprocess.run(["bash", "-n", str(SLURM)]).returncode == 0
    documents = list(yaml.safe_load_all(KUBERNETES.read_text()))
    kinds = {document["kind"]: document for document in documents}
    assert {"StatefulSet", "Service", "Job"} <= set(kinds)
    job = kinds["Job"]["spec"]
    assert job["parallelism"] >= 2
    container = job["template"]["spec"]["containers"][0]
    env = {item["name"] for item in container["env"]}
    assert {"HARNESS_STORAGE", "PGPASSWORD", "HARNESS_STORE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    storage = next(item["value"] for item in container["env"] if item["name"] == "HARNESS_STORAGE")
    assert "@" in storage and ":" not in storage.partition("://")[2].partition("@")[0]  # no password in the URL
    # the same worker command: Kubernetes' $(VAR) is the script's "$VAR"
    slurm_words = shlex.split(line.replace(" ${HARNESS_ARGS:-}", ""))
    kube_words = [re.sub(r"\$\((\w+)\)", r"$\1", word) for word in container["command"]]
    assert kube_words == slurm_words
    secrets = [ref["valueFrom"]["secretKeyRef"]["name"] for ref in container["env"] if "valueFrom" in ref
               and "secretKeyRef" in ref["valueFrom"]]
    assert secrets and set(secrets) == {"harness-secrets"}


def test_an_s3_server_that_ignores_conditional_writes_is_named_before_any_trial(smoke_study, s3_server, s3_keys,
                                                                                  tmp_path, caplog):
    endpoint, _ = s3_server  # rclone serve s3 accepts If-None-Match and ignores it
    cfg = smoke_study(**{"store.url": f"s3://harness-bucket/{tmp_path.name}", "store.endpoint_url": endpoint})
    with caplog.at_level(logging.WARNING, logger="harness.store"):
        check_store(cfg)
    assert f"store {cfg.store.url} ignores conditional writes" in caplog.text
    assert open_backend(cfg.store.url, endpoint).conditional is False  # its pushes read back what they wrote



def test_the_storage_comes_from_the_environment_and_a_password_on_the_command_line_is_warned(tmp_path, monkeypatch,
                                                                                            caplog):
    from harness.cli import storage_url

    monkeypatch.setenv("HARNESS_STORAGE", "postgresql://harness@db:5432/harness")
    assert storage_url(None) == "postgresql://harness@db:5432/harness"
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert storage_url("sqlite:///x.db") == "sqlite:///x.db"
        assert "password" not in caplog.text
        storage_url("postgresql://harness:secret@db:5432/harness")
    assert "--storage holds a password, which `ps` shows" in caplog.text and "secret" not in caplog.text
    monkeypatch.delenv("HARNESS_STORAGE")
    assert storage_url(None) is None
