"""Network failures as real sockets on 127.0.0.1, for the `tracking_outage` bench row and the tracking tests:
a server that accepts connections and never answers, and a port where nothing listens."""

from __future__ import annotations

import socket
import threading
import time


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
