"""Trial files beside the local runs folder: a shared directory or S3-compatible object storage.

    store:
      url: s3://team-bucket/harness      # or a shared folder: /mnt/shared/harness, file:///mnt/shared/harness
      endpoint_url: http://minio:9000    # S3-compatible servers other than AWS; credentials come from the
                                         # standard AWS environment (AWS_ACCESS_KEY_ID, ...) or ~/.aws

A folder under `runs_dir` (a trial's, a promotion fold's) has a mirror in the store under the same relative
path: each file as an object named by its content (`<name>@<sha256>`) and a `manifest.json` naming the
current object of each file with its sha256 and size, the machine that wrote it and the upload seconds.
The running trial pushes what changed after every epoch (`last.pt`, `metrics.csv`, and the best epoch's
model, log-probabilities and index when it improved) and at its end (`result.json`): new objects first,
then the manifest, then the objects it replaced, so a writer killed at any point leaves a manifest whose
objects exist. Readers on any machine (ensemble, promote, predict, report, remedies, a stale trial's retry)
pull the files they lack: downloaded beside their target, checked against the manifest's sha256 and only
then renamed into place; a mismatch is fetched again and, if it persists, refused.

Why not Optuna's artifact API (`upload_artifact`, its FileSystem and Boto3 stores): it names each upload by
a fresh UUID recorded in the uploading Optuna trial's attributes, so a retried trial (a new Optuna trial of
the same identity) and every reader would search the identity's trials for the newest `last.pt`, and every
epoch's checkpoint would leave one more artifact and attribute behind; its file-system store writes in place
(a killed upload leaves half a file under the final name) and neither store checksums. The keys here are
the runs folder's own paths, and boto3 (what Optuna's S3 store uses too) is the transport.

Without `store.url` nothing here runs: a single machine's behaviour is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from harness.config import ConfigError, StudyConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FETCH_ATTEMPTS = 3


class StoreError(ConfigError):
    """A store that cannot be reached or written, or a file whose checksum does not match."""


def machine_name() -> str:
    """This machine's name in trial records: $HARNESS_MACHINE, else the host name."""
    return os.environ.get("HARNESS_MACHINE") or socket.gethostname()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- backends


class SharedDirectory:
    """A folder every machine mounts (NFS, a cluster file system); writes are temp file + rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, key: str, source: Path) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def get(self, key: str, target: Path) -> bool:
        try:
            shutil.copyfile(self.root / key, target)
            return True
        except FileNotFoundError:
            return False

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


class Bucket:
    """S3-compatible object storage through boto3 (an object appears whole or not at all)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1",
                                   config=Config(connect_timeout=5, read_timeout=60,
                                                 retries={"max_attempts": 3, "mode": "standard"}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, source: Path) -> None:
        self.client.upload_file(str(source), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str, target: Path) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(target))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def open_backend(url: str, endpoint_url: str | None = None, region: str | None = None):
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store.url {url!r}: name the bucket, s3://BUCKET[/PREFIX]")
        return Bucket(parsed.netloc, parsed.path, endpoint_url, region)
    if parsed.scheme in ("", "file"):
        return SharedDirectory(Path(parsed.path if parsed.scheme == "file" else url))
    raise StoreError(f"store.url {url!r}: use s3://BUCKET[/PREFIX] or a shared folder (/path or file:///path)")


# ------------------------------------------------------------------------- one folder


class FolderStore:
    """The store's mirror of one folder under runs_dir (a trial's, a promotion fold's)."""

    def __init__(self, backend, url: str, prefix: str) -> None:
        self.backend, self.url, self.prefix = backend, url, prefix
        self._pushed: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) as last pushed by this process

    def manifest(self) -> dict:
        data = self.backend.get_bytes(f"{self.prefix}/{MANIFEST}")
        return json.loads(data) if data else {"files": {}, "upload_seconds": 0.0}

    def push(self, folder: Path) -> list[str]:
        """Upload the folder's files that changed since this process last pushed them; returns their names."""
        started = time.perf_counter()
        manifest = self.manifest()
        changed, replaced = [], []
        for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
            stat = path.stat()
            if self._pushed.get(path.name) == (stat.st_size, stat.st_mtime_ns):
                continue
            digest = sha256_of(path)
            known = manifest["files"].get(path.name)
            if known is None or known["sha256"] != digest:
                self.backend.put(f"{self.prefix}/{path.name}@{digest}", path)
                if known is not None:
                    replaced.append(f"{self.prefix}/{path.name}@{known['sha256']}")
                manifest["files"][path.name] = {"sha256": digest, "bytes": stat.st_size, "machine": machine_name(),
                                                "time": time.time()}
                changed.append(path.name)
            self._pushed[path.name] = (stat.st_size, stat.st_mtime_ns)
        if changed:
            manifest["upload_seconds"] = manifest.get("upload_seconds", 0.0) + time.perf_counter() - started
            manifest["machine"] = machine_name()
            self.backend.put_bytes(f"{self.prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
            for key in replaced:  # only once the manifest no longer names them
                self.backend.delete(key)
        return changed

    def push_quietly(self, folder: Path) -> None:
        """`push`, a failure logged (the next push retries): a trial never fails for its mirror."""
        try:
            self.push(folder)
        except Exception as error:  # noqa: BLE001 - network, credentials, a full disk: each is reported
            log.warning("store %s: upload of %s failed (%s: %s); retried after the next epoch", self.url, folder,
                        type(error).__name__, error)

    def pull(self, folder: Path, names: tuple[str, ...] | None = None, replace_differing: bool = False) -> list[str]:
        """Download the manifest's files (or `names` among them) that the folder lacks (and, with
        `replace_differing`, those whose local copy differs); each verified before it is used."""
        folder = Path(folder)
        fetched = []
        for attempt in range(FETCH_ATTEMPTS):
            wanted = self._wanted(folder, self.manifest()["files"], names, replace_differing)
            if not wanted:
                return fetched
            folder.mkdir(parents=True, exist_ok=True)
            bad = []
            for name, record in wanted.items():
                if self._fetch_one(folder, name, record):
                    fetched.append(name)
                else:
                    bad.append(name)
            if not bad:
                return fetched
            log.warning("store %s: %s of %s did not match the manifest's checksum (attempt %d of %d); fetching "
                        "again", self.url, ", ".join(bad), self.prefix, attempt + 1, FETCH_ATTEMPTS)
        raise StoreError(f"store {self.url}: {', '.join(bad)} of {self.prefix} do not match their sha256 in "
                         f"{MANIFEST} after {FETCH_ATTEMPTS} attempts; not used. Rerun the trial, or remove "
                         f"{self.prefix} from the store")

    @staticmethod
    def _wanted(folder: Path, files: dict, names: tuple[str, ...] | None, replace_differing: bool) -> dict:
        wanted = {}
        for name, record in files.items():
            if names is not None and name not in names:
                continue
            local = folder / name
            if not local.is_file() or (replace_differing and sha256_of(local) != record["sha256"]):
                wanted[name] = record
        return wanted

    def _fetch_one(self, folder: Path, name: str, record: dict) -> bool:
        temporary = folder / f".{name}.fetch-{uuid.uuid4().hex}"
        try:
            found = self.backend.get(f"{self.prefix}/{name}@{record['sha256']}", temporary)
            if not found or sha256_of(temporary) != record["sha256"]:
                return False
            os.replace(temporary, folder / name)
            return True
        finally:
            temporary.unlink(missing_ok=True)


def folder_store(cfg: StudyConfig, folder: Path) -> FolderStore | None:
    """The store's mirror of `folder`, or None without a store or for a folder outside runs_dir."""
    if cfg.store.url is None:
        return None
    try:
        relative = Path(folder).resolve().relative_to(Path(cfg.runs_dir).resolve())
    except ValueError:
        return None
    return FolderStore(open_backend(cfg.store.url, cfg.store.endpoint_url, cfg.store.region), cfg.store.url,
                       relative.as_posix())


def check_store(cfg: StudyConfig) -> None:
    """Write, read back and delete a probe object: a store that cannot be used is refused before any trial."""
    if cfg.store.url is None:
        return
    key = f"{cfg.name}/.probe-{machine_name()}-{os.getpid()}"
    try:
        backend = open_backend(cfg.store.url, cfg.store.endpoint_url, cfg.store.region)
        backend.put_bytes(key, b"harness")
        if backend.get_bytes(key) != b"harness":
            raise OSError("the probe object read back differs from what was written")
        backend.delete(key)
    except StoreError:
        raise
    except Exception as error:  # noqa: BLE001 - the user gets the backend's own error
        raise StoreError(f"store {cfg.store.url} (store.url) cannot be written and read: {type(error).__name__}: "
                         f"{error}. Check the URL, store.endpoint_url and the credentials (AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY) or the shared folder's permissions") from None


def stored_state(cfg: StudyConfig, folder: Path) -> str:
    """For status and the report: "" without a store, else how many of the folder's files the store holds."""
    store = folder_store(cfg, folder)
    if store is None:
        return ""
    try:
        files = store.manifest()["files"]
    except Exception as error:  # noqa: BLE001 - status must not fail for an unreachable store
        return f"unknown ({type(error).__name__})"
    return f"{len(files)} file(s)" if files else "no"
