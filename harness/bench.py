"""`make bench`: every benchmark row, each a harness figure against a reference measured in the same run.

    python -m harness.bench [--only loader,trial] [--quick] [--out runs/bench] [--resume]

Rows go to OUT/bench.json (OUT: --out, else $HARNESS_BENCH_OUT, else runs/bench), rewritten
after every group so a crash late in a long run keeps the rows already measured; --resume
runs only the groups that file lacks (after a crash, or after a run of --only). A row is
{name, harness, reference, ratio, unit, target, better, met}; `ratio` is defined so that
the target reads "ratio >= target" or, for costs, "ratio <= target" (see `better`).
A row may carry more keys (sizes, notes). Something a group could not measure on this
machine (no CUDA device, say) is a line under "notes", never a made-up row.
docs/performance.md explains every row and keeps the latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.config import load_study
from harness.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO / "studies" / "default.yaml"
OUT = Path(os.environ.get("HARNESS_BENCH_OUT", "runs/bench"))  # main() sets it from --out
NOTES: list[str] = []  # what a group skipped and why; main() writes them to bench.json


def row(name: str, harness: float, reference: float, unit: str, target: float, better: str = "higher",
        ratio: float | None = None) -> dict:
    ratio = harness / reference if ratio is None else ratio
    met = ratio >= target if better == "higher" else ratio <= target
    return {"name": name, "harness": round(harness, 4), "reference": round(reference, 4), "ratio": round(ratio, 3),
            "unit": unit, "target": target, "better": better, "met": bool(met)}


# ------------------------------------------------------------------------- loader


def bench_loader(quick: bool) -> list[dict]:
    from harness.bench_loader import run_loader_bench

    return run_loader_bench(OUT, people=10 if quick else 100, quick=quick)["rows"]


# -------------------------------------------------------------------------- trial


def default_study(quick: bool, overrides: dict | None = None):
    """studies/default.yaml at its real size, or its smoke variant with its data and cache under OUT."""
    cfg = load_study(DEFAULT_STUDY, smoke=quick)
    if quick:  # tiny synthetic data of the bench's own, so a --quick run writes nothing outside OUT
        cfg = cfg.replace({"data.root": str(OUT / "smoke-data" / "default"),
                           "data.cache_dir": str(OUT / "smoke-data" / "cache")})
    return cfg.replace(overrides or {})


def _bench_cfg(quick: bool):
    return default_study(quick, {"runs_dir": str(OUT / "runs"), "params.pretrained": False,
                                 "params.aug_strength": 0.0, "train.epochs": 2 if quick else 3})


def bare_loop_images_per_s(cfg, data, steps: int, device: torch.device | None = None, mixed: bool = False,
                           passes: int = 1) -> float:
    """The reference: the same model, batch, loss, optimizer and gradient clipping (the training
    recipe the config asks for) over tensors already on `device`: what is left is the harness's own cost.

    `mixed` is what train_one_epoch does on CUDA: float16 autocast, channels_last model and
    batches, a GradScaler. With mixed=False the loop is plain float32.
    """
    from harness.augment import build_transform
    from harness.losses import build_loss
    from harness.model import build_model

    device = device or torch.device("cpu")
    params, size = cfg.params, cfg.data.image_size
    transform = build_transform(0.0, size.height, size.width, train=False)
    rows = data.rows("train")[: cfg.train.batch_size * steps]
    x_all = torch.stack([transform(np.array(data.cache.images[r])) for r in rows]).to(device)
    y_all = torch.as_tensor(data.frame["label"].to_numpy()[rows]).to(device)
    torch.manual_seed(0)
    model = build_model(params.backbone, params.head, 18, pretrained=False,
                        image_size=(size.height, size.width)).to(device)
    layout = torch.channels_last if mixed else torch.contiguous_format
    model = model.to(memory_format=layout)
    loss_fn = build_loss(params.loss, params.head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed)
    model.train()
    batches = [(x.contiguous(memory_format=layout), y)
               for x, y in zip(x_all.split(cfg.train.batch_size), y_all.split(cfg.train.batch_size))]

    def train_step(x, y) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=mixed):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    train_step(*batches[0])  # warm-up: allocations, and cuDNN's choice of kernels on CUDA
    _synchronize(device)
    start, seen = time.perf_counter(), 0
    for _ in range(passes):
        for x, y in batches:
            train_step(x, y)
            seen += len(y)
    _synchronize(device)  # CUDA runs asynchronously: stop the clock when the work is done
    return seen / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_trial(quick: bool) -> list[dict]:
    from harness.data.prepare import prepare_data
    from harness.train import pick_device, run_trial

    cfg = _bench_cfg(quick)
    data = prepare_data(cfg.data, progress=False)
    run_dir = OUT / "runs" / "trial"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh trial, not a resume of the last bench's
    result = run_trial(cfg, data=data, run_dir=run_dir)
    if result.state != "complete":
        raise RuntimeError(f"bench trial failed: {result.reason}")
    metrics = pd.read_csv(Path(result.run_dir) / "metrics.csv")
    steps = len(data.rows("train")) // cfg.train.batch_size
    device = pick_device(cfg.train.device)  # the trial's own device, with its own precision and layout
    cuda = device.type == "cuda"
    # the machine is noisy: best epoch of the harness against the best of as many bare passes
    reference = max(bare_loop_images_per_s(cfg, data, steps, device, mixed=cuda) for _ in range(len(metrics)))
    harness_speed = float(metrics["images_per_s"].max())
    rows = [row("trial_train_images_per_s", harness_speed, reference, "images/s", 0.9),
            row("probe_cost_share_of_epoch", float(metrics["probe_time"].sum()), float(metrics["epoch_time"].sum()),
                "seconds", 0.25, better="lower")]
    if cuda:
        rows.append(mixed_precision_row(cfg, data, steps, device, quick))
    else:
        NOTES.append("trial_amp_channels_last_images_per_s: no CUDA device: skipped")
    return rows


def mixed_precision_row(cfg, data, steps: int, device: torch.device, quick: bool) -> dict:
    """On CUDA: the train loop with float16 autocast + channels_last (what the harness does) against float32.

    Met when mixed precision is at least as fast: the harness chooses it on every CUDA device,
    so it must never be the slower path. Best of 3 alternating measurements of a few passes each.
    """
    passes, repeats = (2, 1) if quick else (5, 3)
    mixed, plain = 0.0, 0.0
    for _ in range(repeats):
        mixed = max(mixed, bare_loop_images_per_s(cfg, data, steps, device, mixed=True, passes=passes))
        plain = max(plain, bare_loop_images_per_s(cfg, data, steps, device, mixed=False, passes=passes))
    result = row("trial_amp_channels_last_images_per_s", mixed, plain, "images/s", 1.0)
    result["size"] = (f"{cfg.params.backbone}, batch {cfg.train.batch_size}, {cfg.data.image_size.height}x"
                      f"{cfg.data.image_size.width}, {steps * passes} steps, {torch.cuda.get_device_name(device)}")
    return result


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
    return [row("study_overhead_share_of_trial", overhead, total, "seconds", 0.10, better="lower")]


def bench_report(quick: bool) -> list[dict]:
    from harness.bench_report import bench_report as rows

    return rows(quick)


def bench_ensemble(quick: bool) -> list[dict]:
    from harness.bench_ensemble import bench_ensemble as rows

    return rows(quick, OUT)


def bench_search(quick: bool) -> list[dict]:
    from harness.bench_study import bench_search as rows

    return rows(quick, OUT)


def bench_workers(quick: bool) -> list[dict]:
    from harness.bench_study import bench_workers as rows

    return rows(quick, OUT)


GROUPS = {"loader": bench_loader, "trial": bench_trial, "overhead": bench_study_overhead, "ensemble": bench_ensemble,
          "report": bench_report, "workers": bench_workers, "search": bench_search}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the shared CPUs were (figures are noisy above ~cpus)."""
    return [round(value, 2) for value in os.getloadavg()]


def print_rows(rows: list[dict]) -> None:
    print(f"{'row':36} {'harness':>12} {'reference':>12} {'ratio':>8} {'target':>10}  met")
    for r in rows:
        sign = ">=" if r["better"] == "higher" else "<="
        figures = [f"{r[key]:>12.4g}" if r[key] is not None else f"{'-':>12}" for key in ("harness", "reference")]
        ratio = f"{r['ratio']:>8.3f}" if r["ratio"] is not None else f"{'-':>8}"
        print(f"{r['name']:36} {figures[0]} {figures[1]} {ratio} {sign + str(r['target']):>10}  "
              f"{'yes' if r['met'] else 'NO'}" + (f"  ({r['note']})" if r.get("note") else ""))


def write_report(report: dict) -> None:
    atomic_write_text(OUT / "bench.json", json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {list(GROUPS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every row runs")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT}; env HARNESS_BENCH_OUT)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the groups OUT/bench.json already holds (a crashed run, or one of --only), run the rest")
    args = parser.parse_args(argv)
    groups = args.only.split(",")
    for name in groups:
        if name not in GROUPS:
            parser.error(f"unknown group {name!r}; choose from {list(GROUPS)}")
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    report = earlier_report(args.quick) if args.resume else None
    NOTES[:] = report["notes"] if report else []
    report = report or {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "quick": args.quick,
                        "load_average_start": load_average(), "complete": False, "group_seconds": {}, "rows": []}
    report["notes"] = NOTES
    for name in groups:
        if name in report["group_seconds"]:
            print(f"group {name}: kept from the run of {report['when']}")
            continue
        started = time.perf_counter()
        report["rows"] += GROUPS[name](args.quick)
        report["group_seconds"][name] = round(time.perf_counter() - started, 1)
        report["load_average_end"] = load_average()
        write_report(report)  # after every group: a late crash keeps what was measured (--resume goes on)
    report["complete"] = True
    write_report(report)
    print_rows(report["rows"])
    for text in NOTES:
        print(f"note: {text}")
    print(f"load average {report['load_average_start']} at the start, {report.get('load_average_end')} at the end "
          f"({os.cpu_count()} CPUs); wrote {OUT / 'bench.json'}")
    return 0


def earlier_report(quick: bool) -> dict | None:
    """OUT/bench.json at the same size, to add the missing groups to; None when there is none.

    It may be an interrupted run, or a finished one that measured only some groups (--only).
    """
    path = OUT / "bench.json"
    if not path.is_file():
        print(f"--resume: no {path} yet; starting a fresh run")
        return None
    report = json.loads(path.read_text())
    if report.get("quick") != quick:
        print(f"--resume: {path} is of the other size; starting a fresh run")
        return None
    report.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))
    return report


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: the bench_* modules read
    # harness.bench.OUT and NOTES, which would otherwise be a second, untouched set.
    from harness import bench

    raise SystemExit(bench.main())
