"""The store keeps studies apart and has one writer per folder: a study's identity in every key, a checkpoint used
only for what it was made for, a manifest generation created once, names checked before anything is written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from harness.bench.servers import S3_KEYS, closed_port
from harness.folders import EARLIER, PromotionFolder, StudyFolder, read_identity
from harness.runtime import IDENTITY_ATTR, load_existing_study
from harness.store import (
    MANIFESTS,
    FolderStore,
    SharedDirectory,
    StoreError,
    Superseded,
    check_store,
    folder_store,
    forget_tree,
    open_backend,
)
from harness.study import run_study
from harness.train import run_trial


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real S3 server that honours conditional writes (moto's, in a thread), with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = closed_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="team")
    yield endpoint
    server.stop()


@pytest.fixture(params=["shared", "s3"])
def backend(request, tmp_path, monkeypatch):
    if request.param == "shared":
        return SharedDirectory(tmp_path / "store")
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    return open_backend(f"s3://team/{tmp_path.name}", request.getfixturevalue("moto_endpoint"))


def trial_files(folder: Path, **content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in content.items():
        (folder / name.replace("_", ".", 1)).write_bytes(data)
    return folder


def stored_objects(backend, prefix: str) -> set[str]:
    return set(backend.names(prefix))


# ----------------------------------------------------------------------------------------- one writer


def test_of_two_writers_racing_for_one_generation_exactly_one_wins(backend):
    wins = []
    start = threading.Barrier(8)

    def race(n: int) -> None:
        start.wait()
        wins.append(backend.create("f/manifests/000000001.json", f"writer {n}".encode()))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert backend.get_bytes("f/manifests/000000001.json").startswith(b"writer ")


def test_a_superseded_writer_stops_without_writing_or_deleting(backend, tmp_path):
    original = FolderStore(backend, "store", "s@a/trials/0")
    original.claim("Optuna trial 0 of 0")
    mine = trial_files(tmp_path / "a", last_pt=b"epoch 0 of the original", metrics_csv=b"epoch\n0\n")
    assert sorted(original.push(mine)) == ["last.pt", "metrics.csv"]
    original_cost = original.manifest()["store_seconds"]  # its claim and push, timed
    assert original_cost > 0

    retry = FolderStore(backend, "store", "s@a/trials/0")  # the stale original's retry on another machine
    taken_over = retry.claim("Optuna trial 3 of 0")
    assert set(taken_over["files"]) == {"last.pt", "metrics.csv"}
    theirs = trial_files(tmp_path / "b")
    retry.pull(theirs)
    (theirs / "last.pt").write_bytes(b"epoch 1 of the retry")
    assert retry.push(theirs) == ["last.pt"]
    generation, manifest = retry.latest()
    objects = stored_objects(backend, "s@a/trials/0")

    (mine / "last.pt").write_bytes(b"epoch 1 of the original")
    with pytest.raises(Superseded, match="Optuna trial 3 of 0 .* took over s@a/trials/0; Optuna trial 0 of 0 .* stops"):
        original.push(mine)
    with pytest.raises(Superseded):
        original.push_quietly(mine)  # never swallowed: the attempt must stop
    assert retry.latest() == (generation, manifest)  # nothing written, nothing deleted
    assert stored_objects(backend, "s@a/trials/0") == objects
    assert manifest["owner"]["label"] == "Optuna trial 3 of 0"
    assert manifest["store_seconds"] > original_cost  # the folder's store cost: the original's, then the retry's
    for name, record in manifest["files"].items():  # every object the manifest names exists
        assert f"{name}@{record['sha256']}" in objects


def test_a_push_mirrors_the_folder_and_removes_what_no_manifest_names(backend, tmp_path):
    store = FolderStore(backend, "store", "s@a/trials/1")
    store.claim("trial 1")
    folder = trial_files(tmp_path / "runs" / "trials" / "1")
    for epoch in range(3):
        (folder / "last.pt").write_bytes(f"epoch {epoch}".encode())
        os.utime(folder / "last.pt", ns=(epoch * 10**9, epoch * 10**9))
        assert store.push(folder) == ["last.pt"]
    assert store.push(folder) == []  # nothing changed, nothing written
    objects = stored_objects(backend, "s@a/trials/1")
    assert len(objects) == 1 and objects == {f"last.pt@{store.manifest()['files']['last.pt']['sha256']}"}
    assert len(backend.names(f"s@a/trials/1/{MANIFESTS}")) == 1  # older generations went once replaced


def test_a_fetched_file_whose_checksum_differs_or_is_missing_is_fetched_again_then_refused(backend, tmp_path):
    writer = FolderStore(backend, "store", "study@a/trials/0")
    writer.claim("trial 0")
    source = trial_files(tmp_path / "a", best_pt=b"the model" * 100, metrics_csv=b"epoch\n0\n")
    assert sorted(writer.push(source)) == ["best.pt", "metrics.csv"]
    target = tmp_path / "b"
    assert sorted(FolderStore(backend, "store", "study@a/trials/0").pull(target)) == ["best.pt", "metrics.csv"]
    assert (target / "best.pt").read_bytes() == b"the model" * 100
    record = writer.manifest()["files"]["best.pt"]
    backend.put_bytes(f"study@a/trials/0/best.pt@{record['sha256']}", b"corrupt")
    other = tmp_path / "c"
    with pytest.raises(StoreError, match="best.pt does not match its sha256 in the manifest of study@a/trials/0"):
        FolderStore(backend, "store", "study@a/trials/0").pull(other)
    backend.delete(f"study@a/trials/0/best.pt@{record['sha256']}")
    with pytest.raises(StoreError, match="best.pt is missing from the store of study@a/trials/0"):
        FolderStore(backend, "store", "study@a/trials/0").pull(other)
    assert not (other / "best.pt").exists() and not list(other.glob(".best.pt.fetch-*"))


@pytest.mark.parametrize("name", ["../../outside.txt", "/tmp/absolute.txt", "sub/dir.txt", ".hidden", "run.sh", ".."])
def test_a_hostile_manifest_name_is_refused_naming_the_key_and_nothing_is_written(tmp_path, name):
    backend = SharedDirectory(tmp_path / "store")
    backend.put_bytes("s@a/trials/0/evil@0", b"#!/bin/sh\n")
    manifest = {"files": {"metrics.csv": {"sha256": "0", "bytes": 1}, name: {"sha256": "0", "bytes": 10}}}
    backend.put_bytes(f"s@a/trials/0/{MANIFESTS}/000000001.json", json.dumps(manifest).encode())
    store = FolderStore(backend, "store", "s@a/trials/0", allowed=frozenset({"metrics.csv", "best.pt"}))
    target = tmp_path / "runs" / "s" / "trials" / "0"
    with pytest.raises(StoreError, match=rf"s@a/trials/0/{MANIFESTS}/000000001.json names {name!r}"):
        store.pull(target)
    assert not target.exists() and not (tmp_path / "outside.txt").exists() and not Path("/tmp/absolute.txt").exists()
    with pytest.raises(StoreError):
        store.claim("trial 0")  # a writer refuses it too, before writing anything


# ------------------------------------------------------------------------------- identity


@pytest.mark.slow
def test_a_recreated_study_never_continues_the_earlier_ones_trials(smoke_study, tmp_path):
    cfg = smoke_study(**{"store.url": str(tmp_path / "store"), "train.epochs": 1})
    run_study(cfg, trials=1, progress=False, track_study=False)
    earlier = StudyFolder.of(cfg).trial(0)
    first_identity = read_identity(cfg.study_dir)
    first_metrics = earlier.file("metrics.csv").read_bytes()
    shutil.rmtree(cfg.study_dir)  # the study deleted as its own refusal advises, and created again
    again = cfg.replace({"params.lr": 0.0003})
    run_study(again, trials=1, progress=False, track_study=False)
    second_identity = read_identity(again.study_dir)
    assert first_identity and second_identity and first_identity != second_identity
    trial = StudyFolder.of(again).trial(0)
    assert torch.load(trial.file("last.pt"), weights_only=False)["made_for"]["params"]["lr"] == 0.0003
    assert trial.file("metrics.csv").read_bytes() != first_metrics  # trained, not the earlier study's record
    stored = {p.name for p in (tmp_path / "store").iterdir()}
    assert stored == {f"{cfg.name}@{first_identity}", f"{cfg.name}@{second_identity}"}
    assert folder_store(again, trial.path).prefix == f"{cfg.name}@{second_identity}/trials/0"


def test_a_study_recreated_in_a_server_storage_moves_the_runs_folders_leftovers_aside(smoke_study, tmp_path, caplog):
    cfg = smoke_study(**{"train.epochs": 1})
    storage = f"sqlite:///{tmp_path / 'server.db'}"
    run_study(cfg, trials=1, storage=storage, progress=False, track_study=False)
    old = read_identity(cfg.study_dir)
    optuna.delete_study(study_name=cfg.name, storage=storage)  # a teammate starts the study over
    with caplog.at_level(logging.WARNING, logger="harness.runtime"):
        run_study(cfg.replace({"params.lr": 0.0003}), trials=1, storage=storage, progress=False, track_study=False)
    assert "held the files of an earlier study" in caplog.text
    aside = list((cfg.study_dir / EARLIER).glob(f"study-{old}-*"))
    assert len(aside) == 1 and (aside[0] / "trials" / "0" / "metrics.csv").is_file()  # moved, not lost
    now = load_existing_study(cfg, storage)
    assert read_identity(cfg.study_dir) == now.user_attrs[IDENTITY_ATTR] != old
    assert pd.read_csv(StudyFolder.of(cfg).trial(0).file("metrics.csv"))["epoch"].tolist() == [0]


def test_a_checkpoint_made_for_other_params_is_not_resumed(smoke_study, tmp_path, caplog):
    cfg = smoke_study(**{"train.epochs": 2})
    run_dir = tmp_path / "runs" / "one"
    run_trial(cfg, {"lr": 0.002}, run_dir=run_dir, stop_after_epochs=1)
    with caplog.at_level(logging.WARNING, logger="harness.train"):
        result = run_trial(cfg, {"lr": 0.0003}, run_dir=run_dir)
    assert "last.pt was made for something else (params.lr 0.002 there, 0.0003 now); training afresh" in caplog.text
    assert result.state == "complete" and result.epochs_run == 2  # both epochs trained at the new lr
    caplog.clear()
    run_trial(cfg, {"lr": 0.0003}, run_dir=tmp_path / "runs" / "two", stop_after_epochs=1)
    with caplog.at_level(logging.WARNING, logger="harness.train"):
        resumed = run_trial(cfg, {"lr": 0.0003}, run_dir=tmp_path / "runs" / "two")
    assert "training afresh" not in caplog.text and resumed.epochs_run == 2


def test_a_store_that_cannot_give_the_stored_progress_fails_the_trial_and_keeps_it(smoke_study, tmp_path):
    cfg = smoke_study(**{"store.url": str(tmp_path / "store"), "train.epochs": 2})
    folder = StudyFolder.of(cfg).trial(0)
    run_trial(cfg, {}, run_dir=folder.path, stop_after_epochs=1)
    store = folder_store(cfg, folder.path)
    stored = store.manifest()["files"]
    backend = SharedDirectory(tmp_path / "store")
    backend.put_bytes(f"{store.prefix}/last.pt@{stored['last.pt']['sha256']}", b"corrupt")
    shutil.rmtree(folder.path)  # this machine never had it: a stale retry elsewhere
    result = run_trial(cfg, {}, run_dir=folder.path)
    assert result.state == "failed" and "last.pt does not match its sha256" in result.reason
    assert "stored progress is kept" in result.reason
    assert folder_store(cfg, folder.path).manifest()["files"] == stored


def test_a_restarted_promotion_deletes_its_store_copy_and_moves_local_leftovers(smoke_study, tmp_path):
    cfg = smoke_study(**{"store.url": str(tmp_path / "store")})
    cfg.study_dir.mkdir(parents=True)
    (cfg.study_dir / "identity").write_text("study1")
    promotion = PromotionFolder.of(cfg)
    assert promotion.adopt_identity("p1") is None
    fold = promotion.fold(3, 0)
    trial_files(fold.path, best_pt=b"fold model")
    store = folder_store(cfg, fold.path)
    assert store.prefix == f"{cfg.name}@study1/promotion@p1/trial-3/fold-0"
    store.claim("fold")
    store.push(fold.path)
    aside = promotion.adopt_identity("p2")  # a new promotion finds the earlier one's folders
    assert aside is not None and (aside / "trial-3" / "fold-0" / "best.pt").is_file()
    assert aside.parent == cfg.study_dir / EARLIER and aside.name.startswith("promotion-p1-")
    forget_tree(cfg, promotion.path, "p1")
    assert not (tmp_path / "store" / f"{cfg.name}@study1" / "promotion@p1").exists()


def test_a_server_that_honours_conditional_writes_passes_the_probe_quietly(smoke_study, moto_endpoint, tmp_path,
                                                                           monkeypatch, caplog):
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    cfg = smoke_study(**{"store.url": f"s3://team/{tmp_path.name}", "store.endpoint_url": moto_endpoint})
    with caplog.at_level(logging.WARNING, logger="harness.store"):
        check_store(cfg)
    assert "conditional" not in caplog.text and open_backend(cfg.store.url, moto_endpoint).conditional
