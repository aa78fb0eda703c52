"""Trial files beside the local runs folder: a shared directory or S3-compatible object storage.

    store:
      url: s3://team-bucket/harness      # or a shared folder: /mnt/shared/harness, file:///mnt/shared/harness
      endpoint_url: http://minio:9000    # S3-compatible servers other than AWS; credentials come from the
                                         # standard AWS environment (AWS_ACCESS_KEY_ID, ...) or ~/.aws

A folder under `runs_dir` (a trial's, a promotion fold's) has a mirror in the store under its relative path,
with the identity the study's storage recorded at its creation (and the promotion's, for fold folders) in the
key: `<study>@<identity>/trials/<n>`, `<study>@<identity>/promotion@<identity>/trial-<c>/fold-<k>`. A study
deleted and created again under the same name, or another team's study of that name in the same bucket,
never reads these files; a resume or a stale trial's retry (the same study) does. (A study created before
identities existed keeps the plain `<study>/trials/<n>` keys.)

Each file is an object named by its content (`<name>@<sha256>`), and `manifests/<generation>.json` names the
current object of each file with its sha256 and size, the machine that wrote it, the upload seconds and the
folder's owner. Each generation is created once, exclusively (a hard link on a shared folder, `If-None-Match:
*` on S3): of two writers racing for one generation exactly one wins. The attempt that trains a trial first
claims the folder (a new generation naming it owner); every later push of an attempt that is no longer the
owner (a stale original, once its retry claimed the folder) stops it with `Superseded` instead of writing.
Pushes after every epoch (`last.pt`, `metrics.csv`, and the best epoch's model, log-probabilities and index
when it improved) and at the end (`result.json`) upload new objects first, then the next generation, then
delete older generations and the objects no current manifest names: a writer killed at any point leaves a
manifest whose objects exist. Readers on any machine (ensemble, promote, predict, report, remedies, a stale
trial's retry) pull the files they lack: each name checked first (a plain file name the folder defines, or the
pull is refused naming the key, with nothing written), downloaded beside its target, checked against the
manifest's sha256 and only then renamed into place; a missing or mismatched object is fetched again from a
fresh manifest and, if it persists, refused saying which.

The guarantee each backend gives: a shared folder (POSIX, NFS) and S3 servers that honour conditional writes
(AWS S3, MinIO, Cloudflare R2, moto) prevent a second writer; an S3 server that ignores them (`rclone serve
s3`, older Ceph) is found by `check_store`'s probe and named in a warning: there a lost race is detected at
the loser's next push (it then stops), not prevented.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from harness.config import ConfigError, StudyConfig
from harness.folders import StudyFolder, TrialFolder, read_identity

log = logging.getLogger(__name__)

MANIFESTS = "manifests"  # <folder key>/manifests/<generation>.json
LEGACY_MANIFEST = "manifest.json"  # the one manifest of a store written before generations
FETCH_ATTEMPTS = 3
CLAIM_ATTEMPTS = 20


class StoreError(ConfigError):
    """A store that cannot be reached or written, a refused name, or a file whose checksum does not match."""


class Superseded(StoreError):
    """Another attempt of the trial claimed its folder in the store: this one stops writing there."""


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
    """A folder every machine mounts (NFS, a cluster file system); writes are temp file + rename, an exclusive
    create is temp file + hard link (atomic on POSIX and NFS: it fails when the name exists)."""

    conditional = True  # `create` never replaces

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _temporary(self, key: str) -> tuple[Path, Path]:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        return target, target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")

    def put(self, key: str, source: Path) -> None:
        target, temporary = self._temporary(key)
        try:
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        target, temporary = self._temporary(key)
        try:
            temporary.write_bytes(data)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; False when it did (another writer's)."""
        target, temporary = self._temporary(key)
        try:
            temporary.write_bytes(data)
            os.link(temporary, target)
            return True
        except FileExistsError:
            return False
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

    def names(self, key: str) -> list[str]:
        """The names of the objects directly under `key/`."""
        try:
            return [p.name for p in (self.root / key).iterdir() if p.is_file() and not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def delete_tree(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)


class Bucket:
    """S3-compatible object storage through boto3 (an object appears whole or not at all; `create` sends
    `If-None-Match: *`, which AWS S3, MinIO and R2 honour and some servers ignore: see `check_store`)."""

    conditional = True  # until check_store's probe finds the server ignores conditional writes

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

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                  "ConditionalRequestConflict", "409"):
                return False
            raise

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

    def _keys_under(self, key: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=self._key(key).rstrip("/") + "/")
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def names(self, key: str) -> list[str]:
        start = len(self._key(key).rstrip("/")) + 1
        return [full[start:] for full in self._keys_under(key) if "/" not in full[start:]]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_tree(self, key: str) -> None:
        for full in self._keys_under(key):
            self.client.delete_object(Bucket=self.bucket, Key=full)


def open_backend(url: str, endpoint_url: str | None = None, region: str | None = None):
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store.url {url!r}: name the bucket, s3://BUCKET[/PREFIX]")
        backend = Bucket(parsed.netloc, parsed.path, endpoint_url, region)
        backend.conditional = url not in _IGNORES_CONDITIONS
        return backend
    if parsed.scheme in ("", "file"):
        return SharedDirectory(Path(parsed.path if parsed.scheme == "file" else url))
    raise StoreError(f"store.url {url!r}: use s3://BUCKET[/PREFIX] or a shared folder (/path or file:///path)")


_IGNORES_CONDITIONS: set[str] = set()  # store URLs whose server check_store found ignoring If-None-Match


# ------------------------------------------------------------------------- one folder


def checked_name(name: object, key: str, allowed: frozenset[str] | None) -> str:
    """A manifest's file name, refused (naming the key) unless it is a plain name the folder defines: a name with
    a separator or `..`, an absolute or hidden one would write outside the folder or over its temporaries."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not name.startswith(".") \
        and "/" not in name and "\\" not in name and "\0" not in name
    if not plain or (allowed is not None and name not in allowed):
        what = "is not a plain file name" if not plain else f"is not a file this folder holds ({sorted(allowed)})"
        raise StoreError(f"store: {key} names {name!r}, which {what}; nothing was fetched. Someone wrote this "
                         "manifest by hand or with another tool: remove the folder's key from the store, or rerun "
                         "the trial")
    return name


class FolderStore:
    """The store's mirror of one folder under runs_dir (a trial's, a promotion fold's)."""

    def __init__(self, backend, url: str, prefix: str, allowed: frozenset[str] | None = None) -> None:
        self.backend, self.url, self.prefix, self.allowed = backend, url, prefix, allowed
        self.owner: dict | None = None  # set by `claim`: this attempt writes the folder
        self._digests: dict[str, tuple[int, int, str]] = {}  # name -> (size, mtime_ns, sha256) hashed here
        # what the store costs the folder, in its manifests' `store_seconds`: every claim, pull and push of this
        # attempt (each push's own manifest write and clean-up counted in the next one's) and the earlier ones'
        self._spent = 0.0
        self._earlier = 0.0

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._spent += time.perf_counter() - started

    # ----------------------------------------------------------------- reading
    def latest(self) -> tuple[int, dict]:
        """(generation, manifest) of the newest manifest; (0, an empty one) for a folder the store lacks."""
        for _ in range(FETCH_ATTEMPTS):
            generations = sorted(int(n.removesuffix(".json")) for n in self.backend.names(f"{self.prefix}/{MANIFESTS}")
                                 if n.removesuffix(".json").isdigit())
            if not generations:
                legacy = self.backend.get_bytes(f"{self.prefix}/{LEGACY_MANIFEST}")
                return 0, self._parsed(legacy, LEGACY_MANIFEST) if legacy else {"files": {}, "store_seconds": 0.0}
            data = self.backend.get_bytes(self._manifest_key(generations[-1]))
            if data is not None:  # else a writer removed it after a newer one appeared: list again
                return generations[-1], self._parsed(data, self._manifest_key(generations[-1]))
        raise StoreError(f"store {self.url}: the manifests of {self.prefix} kept changing while being read")

    def manifest(self) -> dict:
        return self.latest()[1]

    def _manifest_key(self, generation: int) -> str:
        return f"{self.prefix}/{MANIFESTS}/{generation:09d}.json"

    def _parsed(self, data: bytes, key: str) -> dict:
        try:
            manifest = json.loads(data)
            files = manifest["files"]
            assert isinstance(files, dict)
        except (ValueError, KeyError, AssertionError):
            raise StoreError(f"store {self.url}: {key} is not a manifest this harness wrote; remove {self.prefix} "
                             "from the store, or rerun the trial") from None
        for name in files:
            checked_name(name, key, self.allowed)
        return manifest

    # ----------------------------------------------------------------- writing
    def claim(self, label: str) -> dict:
        """Make this attempt the folder's one writer (a new generation naming it); returns the manifest it
        took over. An earlier owner still running stops at its next push."""
        self.owner = {"id": uuid.uuid4().hex, "label": label, "machine": machine_name(), "pid": os.getpid(),
                      "since": time.time()}
        with self._timed():
            manifest = self._claim(label)
        self._earlier = manifest.get("store_seconds", manifest.get("upload_seconds", 0.0))
        return manifest

    def _claim(self, label: str) -> dict:
        for _ in range(CLAIM_ATTEMPTS):
            generation, manifest = self.latest()
            claimed = {**manifest, "generation": generation + 1, "owner": self.owner}
            if self._write(generation + 1, claimed):
                self._collect(generation + 1, manifest["files"], manifest["files"])  # older generations only
                previous = manifest.get("owner")
                if previous:
                    log.info("store %s: %s took over %s from %s", self.url, label, self.prefix, previous["label"])
                return manifest
        raise StoreError(f"store {self.url}: {self.prefix} changed {CLAIM_ATTEMPTS} times while {label} claimed it")

    def push(self, folder: Path) -> list[str]:
        """Make the store's manifest name exactly the folder's files, uploading those that changed; returns their
        names. Raises Superseded, writing nothing, when another attempt owns the folder now."""
        if self.owner is None:
            raise RuntimeError("FolderStore.push before claim: only the attempt that claimed a folder writes it")
        with self._timed():
            return self._push(folder)

    def _push(self, folder: Path) -> list[str]:
        started = time.perf_counter()
        generation, manifest = self.latest()
        self._check_owner(manifest)
        files, changed = {}, []
        for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
            digest, size = self._digest(path)
            known = manifest["files"].get(path.name)
            if known is not None and known["sha256"] == digest:
                files[path.name] = known
                continue
            self.backend.put(f"{self.prefix}/{path.name}@{digest}", path)
            files[path.name] = {"sha256": digest, "bytes": size, "machine": machine_name(), "time": time.time()}
            changed.append(path.name)
        if files == manifest["files"]:
            return []
        seconds = self._earlier + self._spent + time.perf_counter() - started
        written = {"files": files, "store_seconds": seconds, "machine": machine_name(),
                   "generation": generation + 1, "owner": self.owner}
        if not self._write(generation + 1, written):
            self._check_owner(self.latest()[1])  # a claim came between: raises Superseded
            raise StoreError(f"store {self.url}: {self._manifest_key(generation + 1)} was written by another "
                             "writer of this attempt's identity")
        self._collect(generation + 1, manifest["files"], files)
        return changed

    def push_quietly(self, folder: Path) -> None:
        """`push`, a failure logged (the next push retries): a trial never fails for its mirror, except when
        another attempt owns the folder (Superseded is raised: this attempt must stop)."""
        try:
            self.push(folder)
        except Superseded:
            raise
        except Exception as error:  # noqa: BLE001 - network, credentials, a full disk: each is reported
            log.warning("store %s: upload of %s failed (%s: %s); retried after the next epoch", self.url, folder,
                        type(error).__name__, error)

    def _check_owner(self, manifest: dict) -> None:
        owner = manifest.get("owner") or {}
        if owner.get("id") != self.owner["id"]:
            raise Superseded(f"store {self.url}: {owner.get('label', 'another attempt')} on "
                             f"{owner.get('machine', '?')} took over {self.prefix}; "
                             f"{self.owner['label']} on {self.owner['machine']} stops without writing to it")

    def _write(self, generation: int, manifest: dict) -> bool:
        key = self._manifest_key(generation)
        data = json.dumps(manifest, indent=1).encode()
        if not self.backend.create(key, data):
            return False
        # a server that ignores If-None-Match lets a racing writer replace it: the read-back shows who won
        return self.backend.conditional or self.backend.get_bytes(key) == data

    def _collect(self, generation: int, before: dict, now: dict) -> None:
        """Delete the manifests older than `generation`, then the objects only they named."""
        for name in self.backend.names(f"{self.prefix}/{MANIFESTS}"):
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) < generation:
                self.backend.delete(f"{self.prefix}/{MANIFESTS}/{name}")
        if generation == 1:  # the claim that took over a store written before generations
            self.backend.delete(f"{self.prefix}/{LEGACY_MANIFEST}")
        named = {(name, record["sha256"]) for name, record in self.latest()[1]["files"].items()}
        named |= {(name, record["sha256"]) for name, record in now.items()}
        for name, record in before.items():
            if (name, record["sha256"]) not in named:
                self.backend.delete(f"{self.prefix}/{name}@{record['sha256']}")

    def _digest(self, path: Path) -> tuple[str, int]:
        stat = path.stat()
        known = self._digests.get(path.name)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2], stat.st_size
        digest = sha256_of(path)
        self._digests[path.name] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest, stat.st_size

    # ----------------------------------------------------------------- pulling
    def pull(self, folder: Path, names: tuple[str, ...] | None = None, replace_differing: bool = False) -> list[str]:
        """Download the manifest's files (or `names` among them) that the folder lacks (and, with
        `replace_differing`, those whose local copy differs); each name checked and each file verified before
        it is used. A missing or mismatched object is tried again from a fresh manifest."""
        with self._timed():
            return self._pull(Path(folder), names, replace_differing)

    def _pull(self, folder: Path, names: tuple[str, ...] | None, replace_differing: bool) -> list[str]:
        fetched: list[str] = []
        problems: dict[str, str] = {}
        for attempt in range(FETCH_ATTEMPTS):
            wanted = self._wanted(folder, self.manifest()["files"], names, replace_differing)
            if not wanted:
                return fetched
            folder.mkdir(parents=True, exist_ok=True)
            problems = {}
            for name, record in wanted.items():
                problem = self._fetch_one(folder, name, record)
                if problem:
                    problems[name] = problem
                else:
                    fetched.append(name)
            if not problems:
                return fetched
            log.warning("store %s: %s of %s (attempt %d of %d); fetching again", self.url,
                        ", ".join(f"{n} {p}" for n, p in problems.items()), self.prefix, attempt + 1, FETCH_ATTEMPTS)
        raise StoreError(f"store {self.url}: {', '.join(f'{n} {p}' for n, p in problems.items())} of {self.prefix} "
                         f"after {FETCH_ATTEMPTS} attempts; not used. Rerun the trial, or remove {self.prefix} from "
                         "the store")

    def _wanted(self, folder: Path, files: dict, names: tuple[str, ...] | None, replace_differing: bool) -> dict:
        wanted = {}
        for name, record in files.items():
            if names is not None and name not in names:
                continue
            local = folder / name
            if not local.is_file() or (replace_differing and sha256_of(local) != record["sha256"]):
                wanted[name] = record
        return wanted

    def _fetch_one(self, folder: Path, name: str, record: dict) -> str:
        """"" once `name` is in place, else what went wrong."""
        temporary = folder / f".{name}.fetch-{uuid.uuid4().hex}"
        try:
            if not self.backend.get(f"{self.prefix}/{name}@{record['sha256']}", temporary):
                return "is missing from the store"
            if sha256_of(temporary) != record["sha256"]:
                return "does not match its sha256 in the manifest"
            os.replace(temporary, folder / name)
            return ""
        finally:
            temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------- identities


def store_key(cfg: StudyConfig, folder: Path) -> str | None:
    """The store key of a folder under runs_dir: its relative path, each folder that records an identity (the
    study's, the promotion's: folders.read_identity) followed by `@<identity>`; None for a folder outside runs_dir."""
    runs = Path(cfg.runs_dir).resolve()
    try:
        relative = Path(folder).resolve().relative_to(runs)
    except ValueError:
        return None
    parts, here = [], runs
    for part in relative.parts:
        here = here / part
        identity = read_identity(here)
        parts.append(f"{part}@{identity}" if identity else part)
    return "/".join(parts)


def folder_store(cfg: StudyConfig, folder: Path) -> FolderStore | None:
    """The store's mirror of `folder`, or None without a store or for a folder outside runs_dir."""
    if cfg.store.url is None:
        return None
    key = store_key(cfg, folder)
    if key is None:
        return None
    return FolderStore(open_backend(cfg.store.url, cfg.store.endpoint_url, cfg.store.region), cfg.store.url, key,
                       allowed=TrialFolder.FILES)


def find_trial_folder(cfg: StudyConfig, stored: str | None, identity: int,
                      needs: tuple[str, ...] = ()) -> tuple[TrialFolder | None, list[Path]]:
    """The trial's folder holding `needs`: the one stored with the trial, else the study's trial folder
    (the runs folder may have moved), else the study's trial folder filled from the store (store.url: the
    trial ran on another machine). Returns (folder or None, the places looked at)."""
    options = [Path(stored)] if stored else []
    own = StudyFolder.of(cfg).trial(identity).path
    options.append(own)
    for path in options:
        if path.is_dir() and TrialFolder(path).has(needs):
            return TrialFolder(path), options
    fetched = fetch_folder(cfg, own, needs)
    return (fetched, options) if fetched is not None else (None, options)


def fetch_folder(cfg: StudyConfig, path: Path, needs: tuple[str, ...]) -> TrialFolder | None:
    """The folder at `path` with `needs` fetched from the store where it lacks them (every file the store has
    when `needs` is empty); None without a store or when the store lacks them too."""
    store = folder_store(cfg, path)
    if store is None:
        return None
    store.pull(path, names=needs or None)
    folder = TrialFolder(path)
    return folder if path.is_dir() and folder.has(needs) else None


def forget_tree(cfg: StudyConfig, folder: Path, identity: str | None) -> None:
    """Delete the store's copy of everything under `folder` as of `identity` (the promotion `promote --restart`
    discards): out of every new run's reach already (a new promotion has another identity), deleted so that it
    costs nothing; a failure is a warning."""
    if cfg.store.url is None:
        return
    parent = store_key(cfg, Path(folder).parent)
    if parent is None:
        return
    key = f"{parent}/{Path(folder).name}" + (f"@{identity}" if identity else "")
    try:
        open_backend(cfg.store.url, cfg.store.endpoint_url, cfg.store.region).delete_tree(key)
    except Exception as error:  # noqa: BLE001 - the store's copy is already out of every new run's reach
        log.warning("store %s: could not delete %s (%s: %s); nothing reads it any more, remove it by hand to free "
                    "the space", cfg.store.url, key, type(error).__name__, error)


def check_store(cfg: StudyConfig) -> None:
    """Write, read back and delete a probe object, and try an exclusive create twice: a store that cannot be used
    is refused before any trial; one that ignores conditional writes is named in a warning."""
    if cfg.store.url is None:
        return
    key = f".probe-{cfg.name}-{machine_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # at the root: no folder left
    try:
        backend = open_backend(cfg.store.url, cfg.store.endpoint_url, cfg.store.region)
        backend.put_bytes(key, b"harness")
        if backend.get_bytes(key) != b"harness":
            raise OSError("the probe object read back differs from what was written")
        backend.delete(key)
        first, second = backend.create(key, b"first"), backend.create(key, b"second")
        backend.delete(key)
    except StoreError:
        raise
    except Exception as error:  # noqa: BLE001 - the user gets the backend's own error
        raise StoreError(f"store {cfg.store.url} (store.url) cannot be written and read: {type(error).__name__}: "
                         f"{error}. Check the URL, store.endpoint_url and the credentials (AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY) or the shared folder's permissions") from None
    if first and second:
        _IGNORES_CONDITIONS.add(cfg.store.url)
        log.warning("store %s ignores conditional writes (If-None-Match): two attempts of one trial writing at "
                    "once are found at the loser's next push, not prevented. AWS S3, MinIO and R2 honour them",
                    cfg.store.url)


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
