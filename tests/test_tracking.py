"""W&B tracking: real offline runs in tmp_path, read back from the files W&B itself wrote."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest

from harness.config import parse_study
from harness.folders import StudyFolder
from harness.records import TrialResult
from harness.tracking import (
    StudyTracker,
    TrialTracker,
    ensemble_run_id,
    fold_run_id,
    log_ensemble,
    promotion_key,
    read_offline_run,
    run_id_for,
    study_key,
    study_run_id,
)

W_AND_B_ID = re.compile(r"^[a-z0-9_-]{1,64}$")
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B API key


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb stages every logged table under WANDB_DATA_DIR (default ~/.local/share/wandb) and its
    # service logs under WANDB_CACHE_DIR (~/.cache/wandb): keep both inside the test.
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    return parse_study("name: t\n").replace({"runs_dir": str(tmp_path / "runs")})


def epoch_row(epoch: int) -> dict:
    return {"epoch": epoch, "train/loss": 1.0 / (epoch + 1), "val/f1": 0.2 + 0.1 * epoch, "gap/f1": 0.05 * epoch,
            "gap/bgswap": 0.01, "lr": np.float32(1e-3), "images_per_s": 100.0, "val/f1_age": float("nan")}


def result(state="complete", best_epoch=2, epochs_run=3, reason=None) -> TrialResult:
    best = {"objective": 0.15 + 0.1 * best_epoch, "val/f1": 0.2 + 0.1 * best_epoch, "gap/f1": 0.05 * best_epoch,
            "gap/bgswap": 0.01}
    return TrialResult(state=state, run_dir="x", best=best, best_epoch=best_epoch, epochs_run=epochs_run, seconds=3.5,
                       reason=reason)


def by_epoch(history: list[dict]) -> dict[int, dict]:
    """The history's epoch rows by metrics.csv's 0-based index (W&B counts epochs from 1)."""
    return {row["epoch"] - 1: row for row in history if "val/f1" in row}


def test_trial_run_is_written_and_read_back(study):
    params = {"backbone": "resnet18", "lr": 0.01}
    with TrialTracker(study, 3, params, {"split_hash": "abc123", "version": "0.1.0"}) as tracker:
        assert tracker.active and tracker.run_id == run_id_for("t", 3)
        for epoch in range(3):
            tracker.log_epoch(epoch_row(epoch))
        tracker.finish(result(), confusion=np.array([[5, 1], [0, 4]]), class_names=["a", "b"])
    assert not tracker.active

    run = read_offline_run(study.study_dir / "wandb", tracker.run_id)
    epochs = by_epoch(run["history"])
    assert sorted(epochs) == [0, 1, 2]
    for epoch, row in epochs.items():
        assert row["val/f1"] == pytest.approx(0.2 + 0.1 * epoch) and row["gap/f1"] == pytest.approx(0.05 * epoch)
        assert "val/f1_age" not in row  # NaN left out
    assert run["config"] == {**params, "split_hash": "abc123", "version": "0.1.0"}
    summary = run["summary"]
    assert summary["best/val_f1"] == pytest.approx(0.4) and summary["best/epoch"] == 3
    assert summary["best/objective"] == pytest.approx(0.35)
    assert summary["state"] == "complete" and summary["epochs_run"] == 3
    assert summary["val/f1"] == {"max": pytest.approx(0.4)}  # define_metric(summary="max")
    assert (run["tags"], run["group"], run["job_type"], run["name"]) == (["complete"], "t", "trial", "trial-0003")
    assert run["exit_code"] == 0
    assert run["tables"]["best/confusion_table"]["data"] == [["a", "a", 5], ["a", "b", 1], ["b", "a", 0], ["b", "b", 4]]


def test_retried_trial_continues_its_own_run(study):
    with TrialTracker(study, 0, {"lr": 0.1}, {}) as first:
        for epoch in range(3):
            first.log_epoch(epoch_row(epoch))
        first.finish(result(state="interrupted", reason="stopped after 3 epoch(s)"))
    with TrialTracker(study, 0, {"lr": 0.1}, {}) as second:
        for epoch in (3, 4):
            second.log_epoch(epoch_row(epoch))
        second.finish(result(best_epoch=4, epochs_run=5))

    assert second.run_id == first.run_id
    run = read_offline_run(study.study_dir / "wandb", first.run_id)
    assert len(run["folders"]) == 2  # one offline folder per attempt, merged oldest first
    assert [row["epoch"] for row in run["history"] if "val/f1" in row] == [1, 2, 3, 4, 5]
    assert run["summary"]["state"] == "complete" and run["summary"]["best/epoch"] == 5
    assert run["tags"] == ["complete"]


def test_run_ids_are_stable_distinct_and_valid():
    assert run_id_for("demo", 3) == "demo-t0003-4c050281"  # fixed: the same in every process and release
    ids = {run_id_for("demo", n) for n in range(50)} | {study_run_id("demo"), ensemble_run_id("demo")}
    assert len(ids) == 52
    similar = ["My.Study", "my-study", "my_study", "x" * 100]
    assert len({run_id_for(name, 1) for name in similar}) == len(similar)
    assert all(W_AND_B_ID.match(i) for i in ids | {run_id_for(name, 12345) for name in similar})
    with pytest.raises(ValueError, match="identity"):
        run_id_for("demo", -1)


def test_a_study_created_again_under_its_name_gets_run_ids_of_its_own(study):
    """The W&B ids carry the identity the storage recorded for the study (runs/<study>/identity): a study deleted
    and created again under the same name never resumes the earlier one's runs; one without an identity keeps
    its name's ids."""
    folder = StudyFolder.of(study)
    unscoped = run_id_for(study_key(study), 0)
    assert unscoped == run_id_for("t", 0)
    folder.adopt_identity("aaaaaaaaaaaa")
    first = {run_id_for(study_key(study), 0), study_run_id(study_key(study)), fold_run_id(promotion_key(study), 0, 0)}
    folder.adopt_identity("bbbbbbbbbbbb")  # the same name, created again
    second = {run_id_for(study_key(study), 0), study_run_id(study_key(study)), fold_run_id(promotion_key(study), 0, 0)}
    assert not first & second and unscoped not in first | second
    assert all(i.startswith("t-") for i in first | second)  # still readable: the study's name first
    with TrialTracker(study, identity=0, params={"lr": 0.1}) as tracker:
        tracker.log_epoch(epoch_row(0))
    run = read_offline_run(folder.wandb, run_id_for(study_key(study), 0))
    assert run["config"]["study_identity"] == "bbbbbbbbbbbb"  # W&B's filter for one study where names repeat


@pytest.mark.parametrize("provoke", ["invalid WANDB_MODE", "runs_dir is a file"])
def test_wandb_failure_is_a_warning_and_training_goes_on(study, tmp_path, monkeypatch, caplog, provoke):
    if provoke == "invalid WANDB_MODE":
        monkeypatch.setenv("WANDB_MODE", "bogus")
    else:
        (tmp_path / "blocker").write_text("a file where the runs folder should be")
        study = study.replace({"runs_dir": str(tmp_path / "blocker")})
    caplog.set_level(logging.WARNING, logger="harness.tracking")

    with TrialTracker(study, 1, {"lr": 0.1}, {}) as tracker:
        assert not tracker.active
        for epoch in range(2):
            tracker.log_epoch(epoch_row(epoch))  # no-ops, no exceptions
        tracker.finish(result())
    warnings = [r.getMessage() for r in caplog.records if r.name == "harness.tracking"]
    assert len(warnings) == 1 and "W&B init failed" in warnings[0] and tracker.run_id in warnings[0]
    assert not list(tmp_path.rglob("*.wandb"))


def test_a_failure_mid_run_keeps_every_later_record_offline(study, caplog):
    caplog.set_level(logging.WARNING, logger="harness.tracking")
    tracker = TrialTracker(study, 2, {}, {})
    tracker.log_epoch(epoch_row(0))
    tracker.run.finish()  # the run closed underneath the tracker: W&B refuses further logging
    tracker.log_epoch(epoch_row(1))
    assert tracker.active and tracker.mode == "offline"  # it went on offline with the same id
    tracker.log_epoch(epoch_row(2))
    tracker.finish(result())
    warnings = [r.getMessage() for r in caplog.records if r.name == "harness.tracking"]
    assert len(warnings) == 1 and "W&B log of epoch 2 failed" in warnings[0]  # counted from 1
    assert "goes on offline with the same id" in warnings[0]
    run = read_offline_run(study.study_dir / "wandb", tracker.run_id)
    assert sorted(int(h["epoch"]) for h in run["history"] if "val/f1" in h) == [1, 2, 3]
    assert tracker.state == "offline"


def test_an_escaping_exception_closes_the_run_as_failed(study):
    with pytest.raises(RuntimeError, match="boom"), TrialTracker(study, 5, {}, {}) as tracker:
        tracker.log_epoch(epoch_row(0))
        raise RuntimeError("boom")
    run = read_offline_run(study.study_dir / "wandb", tracker.run_id)
    assert run["exit_code"] == 1 and run["tags"] == ["failed"]
    assert run["summary"]["state"] == "failed" and run["summary"]["reason"] == "RuntimeError: boom"


def test_secrets_never_reach_wandb(study, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    extra = {"wandb_api_key": "s1-key", "hf_token": "s2-token", "db": {"password": "s3-pass", "host": "h"},
             "client_secret": "s4-secret", "copied": FAKE_KEY}
    with TrialTracker(study, 7, {"lr": 0.1}, extra) as tracker:
        tracker.log_epoch(epoch_row(0))
        tracker.finish(result(best_epoch=0, epochs_run=1))
    run = read_offline_run(study.study_dir / "wandb", tracker.run_id)
    assert run["config"] == {"lr": 0.1, "db": {"host": "h"}}
    written = [path.read_bytes() for path in study.study_dir.rglob("*") if path.is_file()]
    assert written
    for secret in (FAKE_KEY, "s1-key", "s2-token", "s3-pass", "s4-secret"):
        assert not any(secret.encode() in blob for blob in written), secret


def test_wandb_mode_from_env_wins_and_disabled_is_a_noop(study, monkeypatch, caplog):
    online = study.replace({"tracking.mode": "online"})  # the env's "offline" wins: no network touched
    with TrialTracker(online, 0, {}, {}) as tracker:
        tracker.finish(result(best_epoch=-1, epochs_run=0))
    assert read_offline_run(study.study_dir / "wandb", tracker.run_id)["folders"][0].split("/")[-1].startswith("offline-")

    monkeypatch.delenv("WANDB_MODE")
    disabled = study.replace({"tracking.mode": "disabled", "name": "off"})
    with TrialTracker(disabled, 0, {}, {}) as tracker:
        assert not tracker.active
        tracker.log_epoch(epoch_row(0))
    assert not disabled.study_dir.exists()
    assert not [r for r in caplog.records if r.name == "harness.tracking"]


def test_study_run_holds_the_trials_table(study):
    trials = pd.DataFrame({"trial": [0, 1, 2], "state": ["COMPLETE", "PRUNED", "FAIL"],
                           "lr": [0.1, 0.01, 1.0], "backbone": ["a", "b", None],
                           "objective": [0.5, 0.3, float("nan")], "gap_f1": [0.1, 0.2, float("nan")],
                           "gap_bgswap": [0.0, 0.0, float("nan")], "epochs": [3, 1, 0], "duration_s": [2.0, 1.0, 0.1]})
    tracker = StudyTracker(study, {"split_hash": "abc123"})
    tracker.update(trials.iloc[:1])
    tracker.update(trials)
    tracker.finish()

    run = read_offline_run(study.study_dir / "wandb", study_run_id("t"))
    assert (run["job_type"], run["group"], run["name"], run["config"]) == ("study", "t", "study", {"split_hash": "abc123"})
    assert run["summary"]["best/objective"] == 0.5
    assert {k: run["summary"][f"trials/{k}"] for k in ("complete", "pruned", "failed")} == {
        "complete": 1, "pruned": 1, "failed": 1}
    table = run["tables"]["trials"]
    assert table["columns"] == list(trials.columns)
    assert [row[0] for row in table["data"]] == [0, 1, 2] and table["data"][2][4] is None


def test_ensemble_run_is_read_back(study):
    members = pd.DataFrame({"trial": [0, 4], "weight": [0.75, 0.25], "val_f1": [0.5, 0.45]})
    run_id = log_ensemble(study, members, {"val/f1": 0.55, "val/acc": 0.8}, np.eye(3, dtype=int), ["x", "y", "z"])
    assert run_id == ensemble_run_id("t")
    run = read_offline_run(study.study_dir, run_id)  # the study folder works too
    assert (run["job_type"], run["group"], run["name"], run["tags"]) == ("ensemble", "t", "ensemble", ["ensemble"])
    assert run["summary"]["val/f1"] == 0.55 and run["summary"]["val/acc"] == 0.8
    assert run["tables"]["members"]["data"] == [[0, 0.75, 0.5], [4, 0.25, 0.45]]
    assert len(run["tables"]["ensemble/confusion_table"]["data"]) == 9


def test_reader_follows_records_across_blocks(study):
    """A 70 KB config value spans three 32 KiB blocks; 300 epochs fill several more."""
    with TrialTracker(study, 9, {"notes": "n" * 70_000}, {}) as tracker:
        for epoch in range(300):
            tracker.log_epoch(epoch_row(epoch))
        tracker.finish(result(best_epoch=299, epochs_run=300))
    run = read_offline_run(study.study_dir / "wandb", tracker.run_id)
    assert run["config"]["notes"] == "n" * 70_000
    assert sorted(by_epoch(run["history"])) == list(range(300))
    assert run["summary"]["best/epoch"] == 300


def test_reader_names_a_missing_run(study):
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        read_offline_run(study.study_dir / "wandb", "no-such-run")
