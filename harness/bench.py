"""`make bench`: every benchmark row, each a harness figure against a reference measured in the same run.

    python -m harness.bench [--only loader,trial] [--quick]

Rows go to runs/bench/bench.json (and each group's own json). A row is
{name, harness, reference, ratio, unit, target, met}; `ratio` is defined so that
the target reads "ratio >= target" or, for costs, "ratio <= target" (see `better`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.config import load_study
from harness.io import atomic_write_text

OUT = Path("runs/bench")


def row(name: str, harness: float, reference: float, unit: str, target: float, better: str = "higher",
        ratio: float | None = None) -> dict:
    ratio = harness / reference if ratio is None else ratio
    met = ratio >= target if better == "higher" else ratio <= target
    return {"name": name, "harness": round(harness, 4), "reference": round(reference, 4), "ratio": round(ratio, 3),
            "unit": unit, "target": target, "better": better, "met": bool(met)}


# ------------------------------------------------------------------------- loader


def bench_loader(quick: bool) -> list[dict]:
    from harness.bench_loader import run_loader_bench

    result = run_loader_bench(OUT, people=10 if quick else 100, quick=quick)
    rows = []
    for item in result["rows"]:
        rows.append(row(item["name"], item["harness"], item["reference"], item["unit"], item["target"],
                        ratio=item["ratio"]))
    return rows


# -------------------------------------------------------------------------- trial


def _bench_cfg(quick: bool):
    cfg = load_study("studies/default.yaml", smoke=quick)
    return cfg.replace({"runs_dir": str(OUT / "runs"), "params.pretrained": False, "params.aug_strength": 0.0,
                        "train.epochs": 2 if quick else 3})


def bare_loop_images_per_s(cfg, data, steps: int) -> float:
    """The reference: the same model, batch, loss and optimizer over tensors already in memory."""
    from harness.augment import build_transform
    from harness.losses import build_loss
    from harness.model import build_model

    params, size = cfg.params, cfg.data.image_size
    transform = build_transform(0.0, size.height, size.width, train=False)
    rows = data.rows("train")[: cfg.train.batch_size * steps]
    x_all = torch.stack([transform(np.array(data.cache.images[r])) for r in rows])
    y_all = torch.as_tensor(data.frame["label"].to_numpy()[rows])
    torch.manual_seed(0)
    model = build_model(params.backbone, params.head, 18, pretrained=False, image_size=(size.height, size.width))
    loss_fn = build_loss(params.loss, params.head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    model.train()
    batches = list(zip(x_all.split(cfg.train.batch_size), y_all.split(cfg.train.batch_size)))
    x, y = batches[0]
    loss_fn(model(x), y).backward()  # warm-up
    optimizer.zero_grad(set_to_none=True)
    start, seen = time.perf_counter(), 0
    for x, y in batches:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def bench_trial(quick: bool) -> list[dict]:
    from harness.data.prepare import prepare_data
    from harness.train import run_trial

    cfg = _bench_cfg(quick)
    data = prepare_data(cfg.data, progress=False)
    run_dir = OUT / "runs" / "trial"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh trial, not a resume of the last bench's
    result = run_trial(cfg, data=data, run_dir=run_dir)
    if result.state != "complete":
        raise RuntimeError(f"bench trial failed: {result.reason}")
    metrics = pd.read_csv(Path(result.run_dir) / "metrics.csv")
    steps = len(data.rows("train")) // cfg.train.batch_size
    # the machine is noisy: best epoch of the harness against the best of as many bare passes
    reference = max(bare_loop_images_per_s(cfg, data, steps) for _ in range(len(metrics)))
    harness_speed = float(metrics["images_per_s"].max())
    probe_share = float(metrics["probe_time"].sum() / metrics["epoch_time"].sum())
    return [row("trial_train_images_per_s", harness_speed, reference, "images/s", 0.9),
            row("probe_cost_share_of_epoch", float(metrics["probe_time"].sum()), float(metrics["epoch_time"].sum()),
                "seconds", 0.25, better="lower", ratio=probe_share)]


def bench_study_overhead(quick: bool) -> list[dict]:
    """Per-trial harness overhead: trial wall time not spent in training or evaluation epochs.

    That is model construction, loaders, checkpoint and metrics writes, Optuna storage and the
    W&B run (init, per-epoch logs, finish); measured on the default study, two trials.
    """
    from harness.study import run_study, trials_frame

    cfg = _bench_cfg(quick).replace({"name": "bench-overhead", "search.trials": 2, "search.pruner.name": "none",
                                     "ensemble.enabled": False})
    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    frame = trials_frame(run_study(cfg, progress=False))
    total, compute = 0.0, 0.0
    for item in frame.itertuples():
        metrics = pd.read_csv(Path(item.run_dir) / "metrics.csv")
        total += item.duration_s
        compute += float(metrics["epoch_time"].sum() + metrics["probe_time"].sum())
    overhead = total - compute
    return [row("study_overhead_share_of_trial", overhead, total, "seconds", 0.10, better="lower",
                ratio=overhead / total)]


def bench_report(quick: bool) -> list[dict]:
    from harness.bench_report import bench_report as rows

    return rows(quick)


def bench_ensemble(quick: bool) -> list[dict]:
    from harness.bench_ensemble import bench_ensemble as rows

    return rows(quick)


GROUPS = {"loader": bench_loader, "trial": bench_trial, "overhead": bench_study_overhead, "ensemble": bench_ensemble,
          "report": bench_report}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_rows(rows: list[dict]) -> None:
    print(f"{'row':34} {'harness':>12} {'reference':>12} {'ratio':>8} {'target':>10}  met")
    for r in rows:
        sign = ">=" if r["better"] == "higher" else "<="
        print(f"{r['name']:34} {r['harness']:>12.4g} {r['reference']:>12.4g} {r['ratio']:>8.3f} "
              f"{sign + str(r['target']):>10}  {'yes' if r['met'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {list(GROUPS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every row runs")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only.split(","):
        if name not in GROUPS:
            parser.error(f"unknown group {name!r}; choose from {list(GROUPS)}")
        rows += GROUPS[name](args.quick)
    print_rows(rows)
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "quick": args.quick, "rows": rows}
    atomic_write_text(OUT / "bench.json", json.dumps(report, indent=2))
    print(f"wrote {OUT / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
