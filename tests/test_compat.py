"""Canaries: one per third-party private API that harness.compat uses. Each fails with a message
naming the library version and what changed, so an upgrade is caught here and not in a study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import timm
import wandb

from harness import compat
from harness.tracking import _wait_for_exit_record


def canary(library: str, version: str, what: str):
    def fail(error: BaseException) -> None:
        pytest.fail(f"{library} {version}: {what} changed ({type(error).__name__}: {error}); harness/compat.py "
                    f"relies on it: update compat.py, and the bound in setup.cfg, for this version")

    return fail


def test_timm_groups_a_backbones_parameters_by_its_matcher():
    fail = canary("timm", timm.__version__, "timm.models._manipulate.group_with_matcher")
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    names = [(name, None) for name, _ in model.named_parameters()]
    try:
        groups = compat.group_with_matcher(names, model.group_matcher(coarse=True))
    except (ImportError, AttributeError, TypeError) as error:
        fail(error)
    grouped = sorted(name for members in groups.values() for name in members)
    if grouped != sorted(name for name, _ in names) or len(groups) < 3:
        fail(AssertionError(f"expected every parameter in one of several stage groups, got {len(groups)} groups"))


def test_optuna_rdb_heartbeats_can_be_read_and_sent(tmp_path):
    fail = canary("optuna", optuna.__version__, "the RDB storage's heartbeat table (optuna.storages._rdb.models)")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    study.ask()
    trial = study.get_trials(deepcopy=False)[0]
    try:
        before = compat.has_heartbeat(study, trial)
        compat.record_heartbeat(study, trial)
        after = compat.has_heartbeat(study, trial)
        storage_id = compat.storage_trial_id(trial)
    except (ImportError, AttributeError, TypeError) as error:
        fail(error)
    if (before, after) != (False, True) or not isinstance(storage_id, int):
        fail(AssertionError(f"heartbeat before/after recording: {before}/{after}, storage id {storage_id!r}"))


def test_optuna_rdb_storage_transactions_on_sqlite_can_begin_immediate(tmp_path):
    fail = canary("optuna", optuna.__version__, "the RDB storage's SQLAlchemy engine (RDBStorage.engine)")
    statements = []
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}",
                                         engine_kwargs={"connect_args": {"isolation_level": None}})
    try:
        compat.immediate_sqlite_transactions(storage)
        from sqlalchemy import event

        event.listen(storage.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        optuna.create_study(storage=storage).enqueue_trial({"x": 1.0})
    except (AttributeError, TypeError) as error:
        fail(error)
    if "BEGIN IMMEDIATE" not in statements:
        fail(AssertionError(f"no BEGIN IMMEDIATE among the storage's statements: {statements[:5]}"))


def test_wandb_transaction_log_reads_back_what_a_run_logged(tmp_path, monkeypatch):
    fail = canary("wandb", wandb.__version__, "the run-<id>.wandb transaction log format or wandb.proto's Record")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="canary", id="canary-run", config={"lr": 0.1},
                     settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
    for epoch in range(3):
        run.log({"epoch": epoch, "val/f1": 0.1 * epoch})
    log_file = run.settings.sync_file
    run.finish()
    try:
        assert _wait_for_exit_record(Path(log_file), 30), "no exit record after 30 s"
        kinds = [kind for kind, _ in compat.wandb_records(log_file)]
        read = compat.read_offline_run(tmp_path / "wandb", "canary-run")
    except (ImportError, AttributeError, ValueError, AssertionError) as error:
        fail(error)
    if "history" not in kinds or "exit" not in kinds:
        fail(AssertionError(f"record types read: {sorted(set(kinds))}"))
    if [row.get("epoch") for row in read["history"]] != [0, 1, 2] or read["config"].get("lr") != 0.1:
        fail(AssertionError(f"history {read['history']}, config {read['config']}"))
