"""A stand-in W&B server for the tracking tests (stdlib only, bound to 127.0.0.1): a real HTTP server that
the real wandb client talks to, recording what arrives.

Enough for wandb 0.31.0 (wandb-core) to
  * start an online run: `wandb.init(mode="online")` with WANDB_BASE_URL=http://127.0.0.1:PORT
    and any 40-character WANDB_API_KEY,
  * log / finish it (file_stream + file uploads),
  * run `wandb sync <offline-run-folder>` to completion.

Everything that arrives is recorded in `server.events` (list of dicts, thread-safe append) and,
optionally, as JSON lines in a log file.  Helpers:
    server.operations()            -> GraphQL operation names, in order
    server.history(run_id)         -> history rows (dicts) received over file_stream for run_id
    server.upserted_run_ids()      -> run ids ("name" variable) seen in UpsertBucket
`BlackHole` (accepts TCP connections, never answers) and `closed_port()` (nothing listening: refused)
come from harness.bench.servers, which the `tracking_outage` bench row uses too.

    with FakeWandbServer() as srv:
        os.environ["WANDB_BASE_URL"] = srv.url
        ...
    assert srv.history("my-run-id")

"""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from harness.bench.servers import BlackHole, closed_port  # noqa: F401 - the tests take all servers from here

FAKE_API_KEY = "x" * 40  # wandb only checks the length/format locally; the fake server accepts anything
ENTITY = "fake-entity"

_OP_RE = re.compile(r"\b(query|mutation)\s+([A-Za-z_][A-Za-z0-9_]*)")
_FS_RE = re.compile(r"^/files/([^/]+)/([^/]+)/([^/]+)/file_stream$")


def _op_name(body: dict) -> str:
    if body.get("operationName"):
        return body["operationName"]
    m = _OP_RE.search(body.get("query") or "")
    if m:
        return m.group(2)
    # anonymous query: name it by its first field, e.g. "{ serverInfo {...} }"
    m = re.search(r"\{\s*([A-Za-z_]+)", body.get("query") or "")
    return f"<anonymous:{m.group(1) if m else '?'}>"


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeWandb/0.1"
    protocol_version = "HTTP/1.1"
    timeout = 30  # per-connection socket timeout: an idle keep-alive connection is dropped

    def log_message(self, fmt, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else b""
        if self.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        return data

    def _send(self, code: int, payload=None, ctype="application/json"):
        raw = b"" if payload is None else (json.dumps(payload).encode() if ctype == "application/json" else payload)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    # ------------------------------------------------------------------ verbs
    def do_GET(self):
        self._body()
        self.server.fake.record({"method": "GET", "path": self.path})
        self._send(200, {})

    def do_PUT(self):
        data = self._body()
        self.server.fake.record({"method": "PUT", "path": self.path, "bytes": len(data),
                                 "content": data[:4096].decode("utf-8", "replace")})
        self._send(200, b"", ctype="text/plain")

    def do_POST(self):
        data = self._body()
        path = urlparse(self.path).path
        if path.rstrip("/") == "/graphql":
            if b"{ serverInfo { features } }" in data:  # the harness's reachability probe
                time.sleep(self.server.fake.probe_delay_s)
                if self.server.fake.probe_status >= 500:
                    return self._send(self.server.fake.probe_status, {"error": "unavailable"})
            return self._graphql(data)
        m = _FS_RE.match(path)
        if m:
            return self._file_stream(m.groups(), data)
        self.server.fake.record({"method": "POST", "path": self.path, "bytes": len(data)})
        self._send(200, {})

    # ------------------------------------------------------------------ graphql
    def _graphql(self, data: bytes):
        fake = self.server.fake
        try:
            body = json.loads(data or b"{}")
        except ValueError:
            body = {}
        op = _op_name(body)
        variables = body.get("variables") or {}
        fake.record({"method": "POST", "path": "/graphql", "op": op, "variables": variables})
        self._send(200, {"data": fake.graphql_answer(op, variables, body.get("query") or "")})

    # ------------------------------------------------------------------ file_stream
    def _file_stream(self, parts, data: bytes):
        time.sleep(self.server.fake.upload_delay_s)
        entity, project, run = parts
        try:
            body = json.loads(data or b"{}")
        except ValueError:
            body = {"_unparsed": data[:200].decode("utf-8", "replace")}
        event = {"method": "POST", "path": "file_stream", "entity": entity, "project": project, "run": run,
                 "complete": body.get("complete"), "exitcode": body.get("exitcode"), "files": {}}
        for name, chunk in (body.get("files") or {}).items():
            event["files"][name] = {"offset": chunk.get("offset"), "content": chunk.get("content") or []}
        for key in ("uploaded", "preempting", "dropped"):
            if key in body:
                event[key] = body[key]
        self.server.fake.record(event)
        self.server.fake.store_file_stream(run, event["files"])
        self._send(200, {"exitcode": None, "limits": {}})


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client hanging up is not news
        pass


class FakeWandbServer:
    """Threaded fake backend. `lifetime_s` bounds how long it serves even if never stopped."""

    def __init__(self, port: int = 0, log_path: str | None = None, lifetime_s: float = 600.0,
                 remember_runs: bool = True):
        self.httpd = _QuietServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._log = open(log_path, "a") if log_path else None
        self._lifetime_s = lifetime_s
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._conns: set[socket.socket] = set()
        # What a real server would remember per run name: enough to answer RunResumeStatus so that
        # a resumed run / a later sync continues the history at the right file_stream offset.
        self.runs: dict[str, dict] = {}
        self.remember_runs = remember_runs  # False: RunResumeStatus always says "no such run"
        self.probe_delay_s = 0.0  # a slow but healthy server: the reachability probe's answer comes this late
        self.probe_status = 200  # 5xx: a server that is there but cannot take records
        self.upload_delay_s = 0.0  # a slow upload: every history post is answered this late

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeWandbServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self._lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Like a server that died: close the listening socket (new connections are refused) and
        cut every open keep-alive connection (otherwise clients keep talking over them)."""
        if self._timer:
            self._timer.cancel()
        if self._thread and self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        if self._log:
            self._log.flush()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- recording
    def record(self, event: dict) -> None:
        event = {"t": round(time.time(), 3), **event}
        with self._lock:
            self.events.append(event)
            if self._log:
                self._log.write(json.dumps(event) + "\n")
                self._log.flush()

    def operations(self) -> list[str]:
        with self._lock:
            return [e["op"] for e in self.events if "op" in e]

    def upserted_run_ids(self) -> list[str]:
        with self._lock:
            return [e["variables"].get("name") for e in self.events if e.get("op") == "UpsertBucket"]

    def file_stream_lines(self, run_id: str, name: str = "wandb-history.jsonl") -> list[tuple[int, str]]:
        """(offset, line) pairs received for one file of one run, in arrival order."""
        out = []
        with self._lock:
            for e in self.events:
                if e.get("path") == "file_stream" and e["run"] == run_id and name in e["files"]:
                    chunk = e["files"][name]
                    out += [(chunk["offset"] + i, line) for i, line in enumerate(chunk["content"])]
        return out

    def history(self, run_id: str) -> list[dict]:
        """The run's history as the server now holds it: one row per line offset, the last line
        written at an offset wins (a retry resends lines; an upload starting at offset 0 again
        overwrites)."""
        with self._lock:
            st = self.runs.get(run_id) or {"history": {}}
            return [json.loads(st["history"][k]) for k in sorted(st["history"])]

    # ---------------------------------------------------------------- state
    def _run_state(self, name: str) -> dict:
        return self.runs.setdefault(name, {"config": None, "summary": "{}", "history": {}, "events": {},
                                           "logs": {}, "tags": [], "display_name": None})

    def store_file_stream(self, run: str, files: dict) -> None:
        with self._lock:
            st = self._run_state(run)
            for name, chunk in files.items():
                lines = chunk["content"]
                if name == "wandb-summary.json" and lines:
                    st["summary"] = lines[-1]
                    continue
                key = {"wandb-history.jsonl": "history", "wandb-events.jsonl": "events", "output.log": "logs"}.get(name)
                if key:
                    for i, line in enumerate(lines):
                        st[key][chunk["offset"] + i] = line

    def _bucket(self, name: str):
        st = self.runs.get(name)
        if not st or st["config"] is None:
            return None
        try:
            t = json.loads(st["config"]).get("_wandb", {}).get("value", {}).get("t", {})
        except ValueError:
            t = {}
        hist = [st["history"][k] for k in sorted(st["history"])]
        return {"id": f"UnVuOi{name}", "name": name, "summaryMetrics": st["summary"], "displayName": st["display_name"],
                "logLineCount": len(st["logs"]), "historyLineCount": len(hist), "eventsLineCount": len(st["events"]),
                "historyTail": json.dumps(hist[-10:]), "eventsTail": "[]", "config": st["config"],
                "tags": st["tags"], "notes": None, "wandbConfig": json.dumps({"t": t})}

    # ---------------------------------------------------------------- answers
    def graphql_answer(self, op: str, v: dict, query: str) -> dict:
        with self._lock:
            return self._graphql_answer(op, v, query)

    def _graphql_answer(self, op: str, v: dict, query: str) -> dict:
        project = v.get("project") or v.get("projectName") or "uncategorized"
        entity = v.get("entity") or v.get("entityName") or ENTITY
        run = v.get("name") or v.get("run") or "run"
        if op == "Viewer" or "viewer" in query and "serverInfo" not in query:
            return {"viewer": {"id": "VXNlcjox", "entity": ENTITY, "username": "fake", "email": "fake@example.invalid",
                               "flags": "{}", "admin": False, "teams": {"edges": []}}}
        if "serverInfo" in query:
            return {"serverInfo": {"features": [], "cliVersionInfo": {}, "latestLocalVersionInfo": None,
                                   "availableBucketProviders": []}}
        if op == "RunResumeStatus":  # bucket null = "no such run yet" -> a fresh run
            return {"model": {"id": "UHJvamVjdDox", "name": project, "entity": {"id": "RW50aXR5OjE=", "name": entity},
                              "bucket": self._bucket(run) if self.remember_runs else None}}
        if op == "UpsertBucket":
            inserted = run not in self.runs or self.runs[run]["config"] is None
            st = self._run_state(run)
            if v.get("config"):
                st["config"] = v["config"]
            if v.get("tags") is not None:
                st["tags"] = v["tags"]
            st["display_name"] = v.get("displayName") or st["display_name"] or run
            return {"upsertBucket": {"inserted": inserted, "bucket": {
                "id": f"UnVuOi{run}", "name": run, "displayName": st["display_name"],
                "description": v.get("description"), "config": st["config"] or "{}", "sweepName": None,
                "historyLineCount": len(st["history"]),
                "project": {"id": "UHJvamVjdDox", "name": project,
                            "entity": {"id": "RW50aXR5OjE=", "name": entity}}}}}
        if op == "CreateRunFiles":
            files = v.get("files") or []
            return {"createRunFiles": {"runID": f"UnVuOi{run}", "uploadHeaders": [], "files": [
                {"name": f, "uploadUrl": f"{self.url}/upload/{entity}/{project}/{run}/{f}"} for f in files]}}
        if op == "CreateArtifact":  # tables travel as artifacts; "COMMITTED" = already stored, nothing to upload
            return {"createArtifact": {"artifact": {"id": "QXJ0aWZhY3Q6MQ==", "state": "COMMITTED",
                                                    "artifactSequence": {"latestArtifact": {"id": "QXJ0aWZhY3Q6MQ=="}}}}}
        if op in ("CreateArtifactManifest", "UpdateArtifactManifest"):
            key = "createArtifactManifest" if op == "CreateArtifactManifest" else "updateArtifactManifest"
            return {key: {"artifactManifest": {"id": "TWFuaWZlc3Q6MQ==", "file": {
                "id": "RmlsZTox", "uploadUrl": f"{self.url}/upload/manifest", "uploadHeaders": []}}}}
        if op == "CreateArtifactFiles":
            return {"createArtifactFiles": {"files": {"edges": [{"node": {
                "storagePath": f"artifacts/{i}", "uploadUrl": f"{self.url}/upload/artifact/{i}", "uploadHeaders": [],
                "uploadMultipartUrls": None, "artifact": {"id": spec.get("artifactID")}}}
                for i, spec in enumerate(v.get("artifactFiles") or [])]}}}
        if op == "CommitArtifact":
            return {"commitArtifact": {"artifact": {"id": v.get("artifactID"), "digest": "0"}}}
        if op == "ClientIDMapping":
            return {"clientIDMapping": None}
        if op == "RunStoppedStatus":
            return {"project": {"run": {"stopped": False}}}
        return {}
