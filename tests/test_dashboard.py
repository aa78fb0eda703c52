"""optuna-dashboard on a real study: started, read through its HTTP API, stopped."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.study import run_study

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, deadline: float):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_dashboard_serves_the_study_and_its_trial_attributes(smoke_study, shared_data, tmp_path):
    cfg = smoke_study(**{"search.trials": 2, "train.epochs": 1})
    run_study(cfg, progress=False)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "dashboard", str(REPO / "studies" / "default.yaml"), "--smoke",
         "--port", str(port), "--set", f"name={cfg.name}", "--storage", f"sqlite:///{cfg.study_dir / 'study.db'}"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + 60
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", deadline)["study_summaries"]
        study = next(s for s in studies if s["study_name"] == cfg.name)
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", deadline)
        assert len(detail["trials"]) == 2
        for trial in detail["trials"]:
            attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
            assert {"gap_f1", "gap_bgswap", "val_f1", "val_f1_bgswap", "best_epoch", "wandb_run_id", "run_dir"} <= set(attrs)
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/dashboard" in output
