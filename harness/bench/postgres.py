"""A throwaway PostgreSQL server for the multi-worker tests and the bench, from the `pgserver` wheel's binaries.

    with running_postgres(tmp / "pg") as url:      # postgresql+psycopg://postgres@127.0.0.1:PORT/harness
        run_search_workers(cfg, 2, storage=create_database(url, "one_study"))

No apt, no root needed (pip installs the wheel with the dev extras). pgserver's own `get_server()`
listens on a Unix socket only and sets neither the port nor max_connections, so this runs the
bundled initdb and postgres itself: loopback TCP on a free port, no Unix socket (test paths can be
too long for one), fsync off. PostgreSQL refuses to run as root; as root the server runs as a
system user made with useradd (as pgserver does), which needs search (o+x, not read) permission
on the folders above the data and the binaries. The server is this process's child and receives
SIGINT if this process dies, so a killed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SERVER_USER = "harness-pg"  # the system user that runs the server when we are root


class PostgresUnavailable(RuntimeError):
    """The throwaway server could not be started; the message says why and how to fix it."""


def binaries() -> Path:
    """pgserver/pginstall/bin, found without importing pgserver (its import writes a lock file and warns)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable("the pgserver package is not installed; `make install` (the dev extras) brings it")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_user() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_USER)
    # a concurrent useradd of the same name fails; the look-up below settles it either way
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
                   capture_output=True, check=False)
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root, and the user {SERVER_USER!r} for the server could not be "
                                  "created with useradd (PostgreSQL refuses to run as root)") from None


def _let_others_traverse(path: Path) -> None:
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def _stop_with_parent() -> None:  # in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG: fast shutdown


def _run(command: list, **kwargs) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, **kwargs)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        raise PostgresUnavailable(f"{Path(command[0]).name} failed: {error} {detail.decode(errors='replace')[-500:]}") \
            from None


@contextlib.contextmanager
def running_postgres(folder: Path, database: str = "harness", max_connections: int = 300,
                     timeout_s: float = 60.0) -> Iterator[str]:
    """A server with its data under `folder` for the duration; yields the URL of `database` on it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    bindir, data, log = binaries(), folder / "data", folder / "server.log"
    as_user: dict = {}
    if os.geteuid() == 0:
        user = _server_user()
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        _let_others_traverse(bindir.parent)
        _let_others_traverse(folder.parent)
        os.chown(folder, user.pw_uid, user.pw_gid)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}
    _run([bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
         env=env, cwd="/", **as_user)
    server, port = None, 0
    for _attempt in range(5):  # the free port can be taken before the server binds it: try another
        port = free_port()
        with open(log, "ab") as output:
            server = subprocess.Popen(
                [bindir / "postgres", "-D", data, "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                 "-c", "unix_socket_directories=", "-c", f"max_connections={max_connections}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd="/",
                preexec_fn=_stop_with_parent, **as_user)
        deadline = time.monotonic() + timeout_s
        while server.poll() is None and time.monotonic() < deadline:
            ready = subprocess.run([bindir / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)], env=env)
            if ready.returncode == 0:
                break
            time.sleep(0.05)
        if server.poll() is None:
            break
    else:
        raise PostgresUnavailable(f"postgres did not start; its log {log} ends:\n{log.read_text()[-2000:]}")
    try:
        _run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database], env=env)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, checkpoint, exit
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def create_database(server_url: str, name: str) -> str:
    """A new, empty database on the server of `server_url`; returns its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE refuses a transaction
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise PostgresUnavailable(f"cannot create database {name}: {error}") from None
    finally:
        engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
