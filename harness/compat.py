"""Every use of a third-party library's private API, in one place.

The harness leans on a few things its libraries do not export publicly. Each lives here and
nowhere else, setup.cfg bounds the library to the versions it was tested with, and
tests/test_compat.py has one canary per item that fails with a message naming this module
when an upgrade changes it:

    timm     `timm.models._manipulate.group_with_matcher`: a backbone's parameters grouped into
             stages by its own `group_matcher` (freeze policy "partial")
    optuna   the RDB storage's heartbeat table: whether a RUNNING trial ever sent a heartbeat
             (a process killed before its first beat leaves a trial Optuna never declares stale);
             its SQLAlchemy engine (`RDBStorage.engine`), so that SQLite transactions begin IMMEDIATE
    wandb    the run's transaction log `run-<id>.wandb`: a LevelDB-style log of protobuf
             `Record`s (wandb.proto.wandb_internal_pb2), read back to know what a run holds
             (its history after a kill, whether its exit record was flushed)
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("harness.compat")


# --------------------------------------------------------------------------------- timm


def group_with_matcher(named_objects, group_matcher) -> dict:
    """timm's grouping of (name, object) pairs by a model's `group_matcher` (not re-exported by timm.models)."""
    from timm.models._manipulate import group_with_matcher as grouped

    return grouped(named_objects, group_matcher)


# ------------------------------------------------------------------------------- optuna


def _rdb_backend(study):
    storage = study._storage
    return getattr(storage, "_backend", storage)  # a cached storage wraps the RDB one


def has_heartbeat(study, trial) -> bool:
    """Whether the RUNNING `trial` (a FrozenTrial of `study`, on an RDB storage) ever sent a heartbeat."""
    from optuna.storages._rdb import models

    session = _rdb_backend(study).scoped_session()
    try:
        return models.TrialHeartbeatModel.where_trial_id(trial._trial_id, session) is not None
    finally:
        session.close()


def record_heartbeat(study, trial) -> None:
    """Send one heartbeat for `trial` on behalf of whoever runs it (so that it can go stale)."""
    _rdb_backend(study).record_heartbeat(trial._trial_id)


def storage_trial_id(trial) -> int:
    """The storage's own id of a FrozenTrial (not its number within the study)."""
    return trial._trial_id


def immediate_sqlite_transactions(storage) -> None:
    """Make every transaction of an RDB storage on SQLite take the database's write lock when it begins.

    Optuna pops an enqueued (WAITING) trial by reading its state and setting RUNNING in one transaction
    `SELECT ... FOR UPDATE`, which SQLite ignores: two processes can both read WAITING and both run the
    same trial (measured: 15 of 180 asks by three processes got a trial another had). `BEGIN IMMEDIATE`
    makes the read and the write one step (SQLAlchemy's recipe for pysqlite); the connection must be
    opened with `isolation_level=None` so that pysqlite does not begin transactions of its own."""
    from sqlalchemy import event

    event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))


# -------------------------------------------------------------------------------- wandb
#
# A run's `run-<id>.wandb` file is a LevelDB-style log (github.com/google/leveldb doc/log_format.md)
# of protobuf `Record`s: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of
# records, each `crc32 (of type byte + data), length uint16, type uint8, data`; a record that does
# not fit a block is split into FIRST / MIDDLE / LAST pieces. wandb >= 0.19 writes it from its Go
# core and no longer ships a Python reader, hence this one.

_FILE_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_IDENT, _MAGIC = b":W&B", 0xBEE1
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _scan_blobs(path: Path, warn: bool) -> Iterator[bytes]:
    """The raw records of one log; stops (with a warning) at a cut-short or corrupt tail."""
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:  # nothing flushed yet, or killed before the first flush
        return
    if _FILE_HEADER.unpack_from(data)[:2] != (_IDENT, _MAGIC):
        raise ValueError(f"{path}: not a W&B transaction log (no ':W&B' header); pass the run-<id>.wandb file")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _RECORD_HEADER.size:  # block trailer: zero padding
            pos += room
            continue
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        start = pos + _RECORD_HEADER.size
        chunk = data[start:start + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            if warn:
                log.warning("%s: record at byte %d is cut short or corrupt (was the process killed while writing?); "
                            "reading stops there", path, pos)
            return
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def wandb_records(path: Path, warn: bool = True) -> Iterator[tuple[str, Any]]:
    """(record type, record) for each record W&B wrote to a run's transaction log, in order.

    The type is the protobuf oneof name: "history", "summary", "config", "run", "exit", ...
    """
    from wandb.proto import wandb_internal_pb2

    for blob in _scan_blobs(Path(path), warn):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        yield record.WhichOneof("record_type"), record


def has_exit_record(path: Path) -> bool:
    """Whether W&B has flushed a run's exit record (the end of a finished run) to its transaction log."""
    return any(kind == "exit" for kind, _ in wandb_records(path, warn=False))


def was_synced(folder: Path, run_id: str, since: float = 0.0) -> bool:
    """Whether `wandb sync` finished uploading this run folder (its marker file), at or after `since`."""
    marker = Path(folder) / f"run-{run_id}.wandb.synced"
    try:
        return marker.stat().st_mtime >= since - 1.0  # mtimes may be rounded to the second
    except OSError:
        return False


def _run_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every folder holding this run's log, oldest first (a resumed run has one per attempt)."""
    pattern = re.compile(rf"^(?:offline-)?run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?$")
    found = []
    for log_file in wandb_dir.glob(f"*run-*/run-{run_id}.wandb"):
        match = pattern.match(log_file.parent.name)
        if match:
            found.append(((match.group(1), int(match.group(2) or 0)), log_file.parent))
    return [folder for _, folder in sorted(found)]


def _keys(item) -> list[str]:
    return list(item.nested_key) or [item.key]


def _set_nested(target: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[keys[-1]] = value


def _remove_nested(target: dict, keys: list[str]) -> None:
    for key in keys[:-1]:
        target = target.get(key)
        if not isinstance(target, dict):
            return
    target.pop(keys[-1], None)


def _apply(target: dict, updates, removes=()) -> None:
    for item in updates:
        _set_nested(target, _keys(item), json.loads(item.value_json))
    for item in removes:
        _remove_nested(target, _keys(item))


def read_offline_run(wandb_dir: Path, run_id: str) -> dict[str, Any]:
    """What W&B wrote for `run_id` under `wandb_dir` (runs/<study>/wandb), all attempts merged in order.

    Returns {"run_id", "history": [row dict per logged step, values decoded], "config", "summary"
    (both without W&B's internal "_wandb" key), "tags", "job_type", "group", "name", "exit_code"
    (of the last attempt that finished), "tables": {history key: {"columns", "data"}} (the last
    table logged under each key, read from its file), "folders": [attempt folders, oldest first]}.
    """
    wandb_dir = Path(wandb_dir)
    if not any(wandb_dir.glob("*run-*")) and (wandb_dir / "wandb").is_dir():
        wandb_dir = wandb_dir / "wandb"  # given the study folder instead of its wandb folder
    folders = _run_folders(wandb_dir, run_id)
    if not folders:
        raise FileNotFoundError(f"{wandb_dir}: no W&B run folder holds run-{run_id}.wandb; "
                                "check the run id (run_id_for) and that this is the study's wandb folder")
    run: dict[str, Any] = {"run_id": run_id, "history": [], "config": {}, "summary": {}, "tags": [], "job_type": None,
                           "group": None, "name": None, "exit_code": None, "tables": {},
                           "folders": [str(f) for f in folders]}
    for folder in folders:
        for kind, record in wandb_records(folder / f"run-{run_id}.wandb"):
            _merge_record(run, kind, record, folder)
    for section in ("config", "summary"):
        run[section].pop("_wandb", None)
    return run


def _merge_record(run: dict, kind: str, record, folder: Path) -> None:
    if kind == "history":
        row: dict[str, Any] = {}
        _apply(row, record.history.item)
        run["history"].append(row)
        _collect_tables(run, row, folder)
    elif kind == "summary":
        _apply(run["summary"], record.summary.update, record.summary.remove)
    elif kind == "config":
        _apply(run["config"], record.config.update, record.config.remove)
    elif kind == "run":
        info = record.run
        _apply(run["config"], info.config.update, info.config.remove)
        _apply(run["summary"], info.summary.update, info.summary.remove)
        # A later attempt starts with no tags offline; keep the last non-empty set.
        run["tags"] = list(info.tags) or run["tags"]
        run["job_type"] = info.job_type or run["job_type"]
        run["group"] = info.run_group or run["group"]
        run["name"] = info.display_name or run["name"]
    elif kind == "exit":
        run["exit_code"] = record.exit.exit_code


def _collect_tables(run: dict, row: dict, folder: Path) -> None:
    for key, value in row.items():
        if isinstance(value, dict) and value.get("_type") == "table-file" and "path" in value:
            table_file = folder / "files" / value["path"]
            if table_file.is_file():
                table = json.loads(table_file.read_text())
                run["tables"][key] = {"columns": table["columns"], "data": table["data"]}
