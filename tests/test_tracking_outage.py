"""W&B outages with real servers: a study never stalls on an unreachable server and loses no history.

The servers are real sockets on 127.0.0.1: one that accepts and never answers (the deadline case), a
closed port (the refused case) and a stand-in W&B HTTP server (tests/wandb_server.py) that the real
wandb client starts runs on, streams history to and `wandb sync` uploads to; it is stopped mid-trial for
the lost-connection case. What the runs kept is read back from W&B's own files, and what arrived from the
server's records. Wall-time ratios against tracking disabled live in `make bench` (tracking_outage).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from wandb_server import FAKE_API_KEY, BlackHole, FakeWandbServer, closed_port

from conftest import REPO, harness_env
from harness.folders import StudyFolder
from harness.records import TrialResult
from harness.report import write_report
from harness.study import run_study, status
from harness.tracking import (
    TrialTracker,
    pending_folders,
    read_offline_run,
    run_id_for,
    run_states,
    study_key,
    study_key_at,
    study_run_id,
    sync_runs,
)


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """A W&B client with a key and folders of its own; the server URL is set by each test."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name, value in {"WANDB_API_KEY": FAKE_API_KEY, "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data",
                        "WANDB_DISABLE_GIT": "true", "NETRC": tmp_path / "no-netrc"}.items():
        monkeypatch.setenv(name, str(value))
    return tmp_path


def online_study(smoke_study, **overrides):
    return smoke_study(**{"tracking.mode": "online", "tracking.init_timeout_s": 2, "tracking.finish_timeout_s": 3,
                          "search.pruner.name": "none", **overrides})


def assert_every_epoch_kept(cfg, frame) -> None:
    """Every trial's W&B files hold each epoch it trained, counted from 1, exactly once."""
    for row in frame.itertuples():
        run = read_offline_run(cfg.study_dir / "wandb", run_id_for(study_key(cfg), int(row.trial)))
        epochs = [int(h["epoch"]) for h in run["history"] if "val/f1" in h]
        assert epochs == list(range(1, row.epochs + 1)), (row.trial, epochs)


def outage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "harness.tracking" and "unreachable" in r.getMessage()]


@pytest.mark.parametrize("server", ["black hole", "refused"])
def test_an_unreachable_server_is_asked_once_and_every_trial_logs_offline(smoke_study, wandb_home, monkeypatch,
                                                                         caplog, server):
    caplog.set_level(logging.WARNING, logger="harness.tracking")
    cfg = online_study(smoke_study)
    with BlackHole(lifetime_s=300) as hole:
        url = hole.url if server == "black hole" else f"http://127.0.0.1:{closed_port()}"
        monkeypatch.setenv("WANDB_BASE_URL", url)
        study = run_study(cfg, progress=False)
        asked = hole.accepted
    frame = status(cfg)
    assert len(frame) == cfg.search.trials
    assert_every_epoch_kept(cfg, frame)
    assert set(frame["wandb"]) == {"offline"}  # waiting for `make sync`
    assert asked == (1 if server == "black hole" else 0)  # the breaker: one probe for the whole study
    # wandb's own analytics are off too: they would make the process's exit wait 10 s on the server
    from wandb.analytics.opentelemetry import opentelemetry_proxy
    assert opentelemetry_proxy.get_open_telemetry_proxy() is None
    assert len(outage_warnings(caplog)) == 1
    outage = json.loads(StudyFolder.of(cfg).outage.read_text())
    assert outage["url"] == url and outage["retry_at"] > time.time()
    assert run_states(cfg.study_dir)[study_run_id(study_key(cfg))] == "offline"  # the study's table too
    page = write_report(cfg).read_text()
    assert f"0 trial run(s) online, {cfg.search.trials} offline, 0 synced" in page
    assert study.user_attrs  # the study itself went on as usual


def test_after_the_back_off_one_start_tries_online_again_and_says_so(smoke_study, wandb_home, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="harness.tracking")
    cfg = online_study(smoke_study, **{"tracking.retry_online_s": 0})
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    with TrialTracker(cfg, 0, {}, {}) as down:
        assert down.mode == "offline"
    with FakeWandbServer(lifetime_s=120) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        with TrialTracker(cfg, 1, {}, {}) as back:
            back.log_epoch({"epoch": 0, "val/f1": 0.5})
        assert back.mode == "online" and [h["epoch"] for h in server.history(back.run_id)] == [1]
    assert not StudyFolder.of(cfg).outage.exists()
    messages = [r.getMessage() for r in caplog.records if r.name == "harness.tracking"]
    assert len(outage_warnings(caplog)) == 1 and sum("answers again" in m for m in messages) == 1
    assert run_states(cfg.study_dir) == {down.run_id: "offline", back.run_id: "online"}


def stop_after_first_epoch(server: FakeWandbServer, metrics: Path) -> threading.Thread:
    """Stop the server (refusing new connections, cutting open ones) once trial 0 has trained one epoch."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) > 1):
            time.sleep(0.05)
        server.stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_server_lost_mid_trial_loses_nothing_and_make_sync_uploads_it_all(smoke_study, wandb_home, monkeypatch,
                                                                          tmp_path):
    cfg = online_study(smoke_study, **{"train.epochs": 3})
    server = FakeWandbServer(lifetime_s=300).start()
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    watcher = stop_after_first_epoch(server, StudyFolder.of(cfg).trial(0).path / "metrics.csv")
    run_study(cfg, progress=False)
    watcher.join(5)
    frame = status(cfg)
    assert_every_epoch_kept(cfg, frame)
    assert set(frame["wandb"]) == {"offline"}
    trial0 = run_id_for(study_key(cfg), 0)
    assert len([h for h in server.history(trial0) if "val/f1" in h]) < 3  # the server saw only a part of trial 0
    assert pending_folders(cfg.study_dir)

    with FakeWandbServer(lifetime_s=300) as again:  # the network is back: `make sync`, as a new user runs it
        env = harness_env(WANDB_BASE_URL=again.url, PATH="/usr/bin:/bin")  # no venv on PATH
        args = [str(REPO / "studies" / "default.yaml"), "--smoke", *[f"--set={k}={v}" for k, v in {
            "name": cfg.name, "runs_dir": cfg.runs_dir, "data.root": cfg.data.root}.items()]]
        done = subprocess.run([sys.executable, "-m", "harness.cli", "sync", *args], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        for row in frame.itertuples():
            rows = [h for h in again.history(run_id_for(study_key(cfg), int(row.trial))) if "val/f1" in h]
            assert [h["epoch"] for h in rows] == list(range(1, row.epochs + 1)), row.trial
        assert study_run_id(study_key(cfg)) in again.upserted_run_ids()
    assert set(status(cfg)["wandb"]) == {"synced"} and not pending_folders(cfg.study_dir)
    again = subprocess.run([sys.executable, "-m", "harness.cli", "sync", *args], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "nothing to upload" in again.stdout


def test_a_resumed_offline_run_has_a_folder_per_attempt_and_sync_joins_them_in_order(smoke_study, wandb_home,
                                                                                     monkeypatch):
    cfg = smoke_study(**{"tracking.mode": "offline"})
    for epochs in ((0, 1, 2), (3, 4)):  # a trial, killed and resumed: two offline-run-* folders, one id
        with TrialTracker(cfg, 0, {}, {}) as tracker:
            for epoch in epochs:
                tracker.log_epoch({"epoch": epoch, "val/f1": epoch / 10})
        time.sleep(1.1)  # W&B names folders by the second
    assert len(pending_folders(cfg.study_dir)) == 2
    with FakeWandbServer(lifetime_s=120) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        synced, failed = sync_runs(cfg)
        assert len(synced) == 2 and not failed
        assert [h["epoch"] for h in server.history(tracker.run_id) if "val/f1" in h] == [1, 2, 3, 4, 5]
    assert run_states(cfg.study_dir) == {tracker.run_id: "synced"}


def test_make_sync_names_the_folders_it_could_not_upload(smoke_study, wandb_home, monkeypatch):
    cfg = smoke_study(**{"tracking.mode": "offline"})
    with TrialTracker(cfg, 0, {}, {}) as tracker:
        tracker.log_epoch({"epoch": 0, "val/f1": 0.1})
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    synced, failed = sync_runs(cfg)
    assert not synced and failed == pending_folders(cfg.study_dir)
    assert run_states(cfg.study_dir) == {tracker.run_id: "offline"}


def test_make_sync_uploads_a_cut_off_online_attempt_before_its_later_offline_one(smoke_study, wandb_home,
                                                                                   monkeypatch):
    """`run-*` (an online start whose connection was lost) and `offline-run-*` (the resumed attempt) of one run
    id go to the server by the time of their first record, not by their names (offline- sorts first)."""
    cfg = smoke_study(**{"tracking.mode": "offline"})
    for epochs in ((0, 1, 2), (3, 4)):
        with TrialTracker(cfg, 0, {}, {}) as tracker:
            for epoch in epochs:
                tracker.log_epoch({"epoch": epoch, "val/f1": epoch / 10})
        time.sleep(1.1)  # W&B names folders by the second
    first, second = sorted((cfg.study_dir / "wandb").glob("offline-run-*"))
    online = first.with_name(first.name.removeprefix("offline-"))  # what a cut-off online attempt leaves
    first.rename(online)
    marker = json.loads((online / "harness-run.json").read_text())
    (online / "harness-run.json").write_text(json.dumps({**marker, "mode": "online", "uploaded": False}))
    assert pending_folders(cfg.study_dir) == [online, second]
    with FakeWandbServer(lifetime_s=120) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        synced, failed = sync_runs(cfg)
        assert len(synced) == 2 and not failed
        assert [h["epoch"] for h in server.history(tracker.run_id) if "val/f1" in h] == [1, 2, 3, 4, 5]


def test_a_probe_that_answers_ends_only_the_outage_it_saw(smoke_study, tmp_path):
    from harness.tracking import Outage

    cfg = smoke_study()
    outage = Outage(cfg.study_dir, cfg.tracking)
    outage.begin("no answer within 10 s")
    seen = outage._read()
    time.sleep(0.01)
    Outage(cfg.study_dir, cfg.tracking).begin("another worker: no answer within 10 s")  # a fresh record
    outage.end(seen)  # this worker's probe answered, but only for the record it saw
    assert outage._read()["reason"] == "another worker: no answer within 10 s"
    outage.end(outage._read())
    assert not StudyFolder.of(cfg).outage.exists()


def test_a_slow_but_healthy_server_means_online_and_the_run_does_not_wait_for_it(smoke_study, wandb_home,
                                                                              monkeypatch):
    """The probe's answer comes after 2 s, within tracking.init_timeout_s (5 s): the run is online, and every
    record logged before the answer came reaches the server, in order. The start did not wait for the answer
    (training goes on): the run is still waiting for it after the first records."""
    cfg = online_study(smoke_study, **{"tracking.init_timeout_s": 5})
    with FakeWandbServer(lifetime_s=120) as server:
        server.probe_delay_s = 2.0
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        with TrialTracker(cfg, 0, {}, {}) as tracker:
            tracker.log_epoch({"epoch": 0, "val/f1": 0.5})
            tracker.log_epoch({"epoch": 1, "val/f1": 0.6})
            assert tracker.mode == "waiting" and tracker.run is None
            time.sleep(2.5)
            tracker.log_epoch({"epoch": 2, "val/f1": 0.7})  # the answer is in: the run starts, the kept go first
            assert tracker.mode == "online" and tracker.run is not None
            tracker.log_epoch({"epoch": 3, "val/f1": 0.8})
        assert [h["epoch"] for h in server.history(tracker.run_id) if "val/f1" in h] == [1, 2, 3, 4]
    assert tracker.state == "online" and run_states(cfg.study_dir) == {tracker.run_id: "online"}
    assert not StudyFolder.of(cfg).outage.exists()


def test_runs_that_end_before_the_answer_are_written_once_it_comes_with_every_record(smoke_study, wandb_home,
                                                                                    monkeypatch):
    """A black-holed server: two runs end before the probe gives up (2 s) and do not wait for it; the first
    record after it gave up starts and closes them offline, with every epoch and their outcome."""
    cfg = online_study(smoke_study)
    with BlackHole(lifetime_s=120) as hole:
        monkeypatch.setenv("WANDB_BASE_URL", hole.url)
        ended = []
        for identity in range(2):
            with TrialTracker(cfg, identity, {}, {}) as tracker:
                for epoch in range(3):
                    tracker.log_epoch({"epoch": epoch, "val/f1": 0.5})
                tracker.finish(TrialResult(state="complete", run_dir="", best={"objective": 0.5}, best_epoch=2,
                                           epochs_run=3))
            assert tracker.state == "waiting" and tracker.run is None  # nothing waited for the server
            ended.append(tracker)
        assert not list(StudyFolder.of(cfg).wandb.glob("*run-*"))
        time.sleep(3)
        with TrialTracker(cfg, 2, {}, {}) as later:
            later.log_epoch({"epoch": 0, "val/f1": 0.5})
    assert [t.state for t in (*ended, later)] == ["offline"] * 3
    for tracker in ended:
        run = read_offline_run(StudyFolder.of(cfg).wandb, tracker.run_id)
        assert [h["epoch"] for h in run["history"] if "val/f1" in h] == [1, 2, 3]
        assert run["summary"]["state"] == "complete" and run["exit_code"] == 0
    assert StudyFolder.of(cfg).outage.exists()
    assert run_states(cfg.study_dir) == {t.run_id: "offline" for t in (*ended, later)}


def test_an_upload_cut_short_by_the_finish_timeout_is_left_for_make_sync(smoke_study, wandb_home, monkeypatch):
    """The server answers every probe at once but takes 5 s per history post: W&B gives up at
    tracking.finish_timeout_s (1 s) with records unsent, so the run is not counted as uploaded."""
    cfg = online_study(smoke_study, **{"tracking.finish_timeout_s": 1})
    with FakeWandbServer(lifetime_s=120) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        with TrialTracker(cfg, 0, {}, {}) as tracker:
            assert tracker.mode == "online"
            server.upload_delay_s = 5.0
            for epoch in range(3):
                tracker.log_epoch({"epoch": epoch, "val/f1": 0.5})
    assert tracker.state == "offline" and len(pending_folders(cfg.study_dir)) == 1
    assert run_states(cfg.study_dir) == {tracker.run_id: "offline"}


def test_a_server_answering_5xx_after_the_run_does_not_make_it_uploaded(smoke_study, wandb_home, monkeypatch):
    """An answer is not an upload: a server error when the run finished leaves the run for `make sync`."""
    cfg = online_study(smoke_study)
    with FakeWandbServer(lifetime_s=120) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        with TrialTracker(cfg, 0, {}, {}) as tracker:
            assert tracker.mode == "online"
            tracker.log_epoch({"epoch": 0, "val/f1": 0.5})
            server.probe_status = 503
    assert tracker.state == "offline" and len(pending_folders(cfg.study_dir)) == 1
    assert run_states(cfg.study_dir) == {tracker.run_id: "offline"}


def test_a_resumed_online_run_logs_every_epoch_the_server_lacks_and_none_twice(smoke_study, wandb_home, monkeypatch):
    cfg = online_study(smoke_study)
    rows = [{"epoch": epoch, "val/f1": epoch / 10} for epoch in range(4)]
    with FakeWandbServer(lifetime_s=120) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        with TrialTracker(cfg, 0, {}, {}) as first:  # the attempt a kill cut: W&B took 1 of the 3 epochs trained
            first.log_epoch(rows[0])
        with TrialTracker(cfg, 0, {}, {}) as second:  # resumed from the third epoch's checkpoint
            second.catch_up(rows[:3])
            second.log_epoch(rows[3])
        with TrialTracker(cfg, 0, {}, {}) as third:  # resumed again with nothing new: nothing logged twice
            third.catch_up(rows)
        assert [h["epoch"] for h in server.history(first.run_id) if "val/f1" in h] == [1, 2, 3, 4]
    ledger = StudyFolder.of(cfg).trial(0).tracked()
    assert ledger["epochs"] == [1, 2, 3, 4] and ledger["finished"] and ledger["run_id"] == first.run_id


@pytest.mark.slow
def test_records_waiting_for_the_servers_answer_survive_a_sigkill_and_reach_the_server(tmp_path, shared_data,
                                                                                         wandb_home):
    """A real `harness study` whose W&B server never answers, SIGKILLed once its trial ended with every record
    still waiting in memory; the same command run again with the server back logs them, each epoch once."""
    from conftest import smoke_study_args, wait_for

    args = smoke_study_args(tmp_path, shared_data, "--set", "name=waiting", "--set", "tracking.mode=online",
                            "--set", "tracking.init_timeout_s=120", "--set", "train.epochs=2", "--trials", "1")
    folder = tmp_path / "runs" / "waiting" / "trials" / "0"
    with BlackHole(lifetime_s=600) as hole:
        env = harness_env(WANDB_BASE_URL=hole.url, WANDB_API_KEY=FAKE_API_KEY)
        process = subprocess.Popen([sys.executable, "-m", "harness.cli", "study", *args], env=env, cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        assert wait_for(folder / "result.json", process), "the trial never ended"
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    ledger = json.loads((folder / "tracked.json").read_text())
    assert ledger["epochs"] == [] and not ledger["finished"]  # nothing reached W&B; the ledger says so on disk
    with FakeWandbServer(lifetime_s=300) as server:
        env = harness_env(WANDB_BASE_URL=server.url, WANDB_API_KEY=FAKE_API_KEY)
        done = subprocess.run([sys.executable, "-m", "harness.cli", "study", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "their records were logged again" in done.stderr
        rows = [h for h in server.history(run_id_for(study_key_at("waiting", tmp_path / "runs" / "waiting"), 0)) if "val/f1" in h]
        assert [h["epoch"] for h in rows] == [1, 2]
    ledger = json.loads((folder / "tracked.json").read_text())
    assert ledger["finished"] and ledger["epochs"] == [1, 2]
