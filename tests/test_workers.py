"""Several workers on one study: SQLite on one machine, PostgreSQL across "machines", kills included."""

import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import HARNESS_STUDY, REPO, harness_env, smoke_study_args, wait_for
from harness.bench.postgres import create_database
from harness.runtime import open_storage
from harness.study import run_study, trials_frame
from harness.tracking import read_offline_run, study_key_at, study_run_id


def start(command, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(command, env=harness_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def check_outcome(study, target, workers):
    states = [t.state for t in study.trials]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    assert target <= finished <= target + workers - 1
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    frame = trials_frame(study)
    assert frame["trial"].is_unique
    for row in frame.itertuples():
        epochs = pd.read_csv(Path(row.run_dir) / "metrics.csv")["epoch"].tolist()
        assert epochs == sorted(set(epochs)), (row.trial, epochs)  # no epoch twice in a trial's own record
    return frame


def _ask(url: str, asks: int, answers) -> None:
    """A process that asks the study for `asks` trials (an enqueued one first, while any waits)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="pop", storage=open_storage(url, 60))
    answers.put([study.ask().number for _ in range(asks)])


@pytest.mark.slow  # a long end-to-end run: make test-long
def test_an_enqueued_trial_is_given_to_one_process_only_on_sqlite(tmp_path):
    """Optuna's SELECT ... FOR UPDATE does nothing on SQLite: three processes popping enqueued trials got one
    another's trials (15 of 180 asks) until the storage's transactions began IMMEDIATE."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="pop", storage=open_storage(url, 60))
    for x in range(200):
        study.enqueue_trial({"x": x})
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    processes = [context.Process(target=_ask, args=(url, 60, answers)) for _ in range(3)]
    for process in processes:
        process.start()
    given = [number for _ in processes for number in answers.get(timeout=300)]
    for process in processes:
        process.join()
    assert len(given) == 180 and len(set(given)) == 180, sorted(n for n in given if given.count(n) > 1)
    assert sum(t.state == TrialState.WAITING for t in study.get_trials()) == 20


def test_a_study_on_postgres_runs_to_its_target_and_resumes_from_the_server(smoke_study, postgres_server):
    """The real PostgreSQL server in the quick suite: trials, their identities and attributes are stored
    there, and a rerun finds them there (the killed-worker test is in make test-long)."""
    url = create_database(postgres_server, f"quick_{os.getpid()}_{int(time.time())}")
    cfg = smoke_study(**{"search.pruner.name": "none", "train.epochs": 1, "tracking.mode": "disabled"})
    run_study(cfg, trials=2, storage=url, progress=False)
    study = optuna.load_study(study_name=cfg.name, storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs["identity"] for t in study.trials] == [0, 1]
    assert all(Path(t.user_attrs["run_dir"], "metrics.csv").is_file() for t in study.trials)
    assert not (cfg.study_dir / "study.db").exists()  # nothing went to a local SQLite file
    assert len(run_study(cfg, trials=2, storage=url, progress=False).trials) == 2  # the rerun: nothing to do


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path, shared_data):
    command = HARNESS_STUDY + smoke_study_args(tmp_path, shared_data, "--workers", "2", "--trials", "4")
    process = start(command, tmp_path, "workers")
    assert process.wait(timeout=600) == 0, (tmp_path / "workers.log").read_text()[-3000:]
    output = (tmp_path / "workers.log").read_text()
    assert "database is locked" not in output
    assert "in use" not in output  # one writer for the study's W&B run
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'runs' / 'default' / 'study.db'}")
    frame = check_outcome(study, target=4, workers=2)
    drawn = [repr(sorted(t.params.items())) for t in study.trials]
    assert len(set(drawn)) == len(drawn), "two workers drew the same params"
    folder = tmp_path / "runs" / "default"
    run = read_offline_run(folder / "wandb", study_run_id(study_key_at("default", folder)))
    assert len(run["folders"]) == 1
    table = run["tables"]["trials"]
    numbers = sorted(row[table["columns"].index("trial")] for row in table["data"])
    assert numbers == sorted(frame["trial"].tolist())  # the last table has every trial


@pytest.mark.slow
def test_a_killed_worker_on_postgres_has_its_trial_retried_by_the_survivor(tmp_path, shared_data, postgres_server):
    url = create_database(postgres_server, f"harness_{os.getpid()}_{int(time.time())}")
    command = HARNESS_STUDY + smoke_study_args(tmp_path, shared_data, "--storage", url, "--trials", "3")
    first = start(command, tmp_path, "first")  # "machine" one
    first_checkpoint = tmp_path / "runs" / "default" / "trials" / "0" / "last.pt"
    assert wait_for(first_checkpoint, first), f"{first_checkpoint} never appeared"
    second = start(command, tmp_path, "second")  # "machine" two joins the same study
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)  # mid-trial 0, after its first checkpoint
    first.wait()
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    study = optuna.load_study(study_name="default", storage=url)
    frame = check_outcome(study, target=3, workers=2)
    attempts = [t for t in study.trials if t.user_attrs.get("identity") == 0]
    assert [t.state for t in attempts] == [TrialState.FAIL, TrialState.COMPLETE]
    resumed = pd.read_csv(Path(frame.set_index("trial").loc[0, "run_dir"]) / "metrics.csv")
    assert resumed["epoch"].tolist() == [0, 1, 2]
