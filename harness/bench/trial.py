"""`make bench` groups "trial" and "overhead": the epoch loop against a bare loop, and what a study adds.

  trial_train_images_per_s      run_trial's training images/s (best epoch), default study, augmentation
                                off, against a bare loop: the same model, batch, loss, optimizer and
                                gradient clipping over tensors already on the device (best pass).
  probe_cost_share_of_epoch     seconds of the per-epoch evaluations (valid and the probes) against
                                the epochs' training seconds.
  trial_channels_last_<device>_images_per_s   the training step in channels_last (build_model's layout)
                                against the same in NCHW, on the trial's device (cpu or cuda).
  trial_amp_images_per_s        (CUDA only) float16 autocast against float32, both channels_last: mixed
                                precision alone.
  trial_compile_<device>_trial_seconds   one default trial's training images in eager mode (what the harness
                                does) against the same through torch.compile, compilation included; met when
                                eager is not slower (with both steady speeds and the break-even images).
  study_overhead_share_of_trial trial wall time not spent in epochs (model build, loaders, checkpoints,
                                Optuna storage, the W&B run) against trial wall time, 2 trials.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.bench.common import Bench, row, unmeasured
from harness.folders import TrialFolder


def _bench_cfg(bench: Bench):
    return bench.default_study({"runs_dir": str(bench.out / "runs"), "params.pretrained": False,
                                "params.aug_strength": 0.0, "train.epochs": 2 if bench.quick else 3})


def bare_loop_images_per_s(cfg, data, steps: int, device: torch.device | None = None, mixed: bool = False,
                           passes: int = 1, layout: torch.memory_format = torch.channels_last,
                           compiled: bool = False, timings: dict | None = None) -> float:
    """The reference: the harness's own training step (model, batch, loss, optimizer, clipping as the study
    file asks) over tensors already on `device`, without the loader, schedule or checks around it.

    `mixed` is what train_one_epoch does on CUDA: float16 autocast and a GradScaler. With mixed=False
    the loop is float32. `layout` is the model's and the batches' memory layout: channels_last is what
    build_model gives the model; torch.contiguous_format (NCHW) is the reference of the layout row.
    `compiled`: the model through torch.compile (its first step compiles it); `timings["warmup_s"]` gets the
    seconds of that first, untimed step.
    """
    from harness.augment import build_transform
    from harness.heads import build_loss
    from harness.model import build_model
    from harness.train import backward_step, forward_loss

    device = device or torch.device("cpu")
    params, size = cfg.params, cfg.data.image_size
    transform = build_transform(0.0, size.height, size.width, train=False)
    rows = data.rows("train")[: cfg.train.batch_size * steps]
    x_all = torch.stack([transform(np.array(data.cache.images[r])) for r in rows]).to(device)
    y_all = torch.as_tensor(data.frame["label"].to_numpy()[rows]).to(device)
    torch.manual_seed(0)
    model = build_model(params.backbone, params.head, 18, pretrained=False,
                        image_size=(size.height, size.width)).to(device).to(memory_format=layout)
    loss_fn = build_loss(params.loss, params.head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed)
    model.train()
    if compiled:
        model = torch.compile(model)
    batches = [(x.contiguous(memory_format=layout), y)
               for x, y in zip(x_all.split(cfg.train.batch_size), y_all.split(cfg.train.batch_size))]

    def train_step(x, y) -> None:
        backward_step(model, forward_loss(model, x, y, loss_fn, mixed), optimizer, scaler, cfg.train.grad_clip)

    warmup = time.perf_counter()
    train_step(*batches[0])  # warm-up: allocations, cuDNN's choice of kernels on CUDA, torch.compile's compilation
    _synchronize(device)
    if timings is not None:
        timings["warmup_s"] = time.perf_counter() - warmup
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


def bench_trial(bench: Bench) -> list[dict]:
    from harness.data.prepare import prepare_data
    from harness.train import pick_device, run_trial

    cfg = _bench_cfg(bench)
    data = prepare_data(cfg, progress=False)
    run_dir = bench.out / "runs" / "trial"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh trial, not a resume of the last bench's
    result = run_trial(cfg, data=data, run_dir=run_dir)
    if result.state != "complete":
        raise RuntimeError(f"bench trial failed: {result.reason}")
    metrics = TrialFolder(run_dir).metrics()
    steps = len(data.rows("train")) // cfg.train.batch_size
    device = pick_device(cfg.train.device)  # the trial's own device, with its own precision and layout
    cuda = device.type == "cuda"
    # the machine is noisy: best epoch of the harness against the best of as many bare passes
    reference = max(bare_loop_images_per_s(cfg, data, steps, device, mixed=cuda) for _ in range(len(metrics)))
    harness_speed = float(metrics["images_per_s"].max())
    rows = [row("trial_train_images_per_s", harness_speed, reference, "images/s", 0.9),
            row("probe_cost_share_of_epoch", float(metrics["probe_time"].sum()), float(metrics["epoch_time"].sum()),
                "seconds", 0.25, better="lower")]
    rows.append(layout_row(cfg, data, steps, device, cuda, bench.quick))
    if bench.quick:  # compilation alone takes a minute or more
        bench.notes.append(f"trial_compile_{device.type}_trial_seconds: skipped at --quick")
    else:
        rows.append(compile_row(cfg, data, steps, device, cuda))
    if cuda:
        rows.append(mixed_precision_row(cfg, data, steps, device, bench.quick))
    else:
        bench.notes.append("trial_amp_images_per_s: no CUDA device: skipped")
    return rows


def layout_row(cfg, data, steps: int, device: torch.device, cuda: bool, quick: bool) -> dict:
    """The training step with the model and batches in channels_last (what build_model chooses) against the
    same in NCHW, on the trial's device; best of 3 alternating measurements. Met when channels_last is not
    slower: the harness uses it on every device."""
    passes, repeats = (1, 1) if quick else (2, 3)
    last, nchw = 0.0, 0.0
    for _ in range(repeats):
        last = max(last, bare_loop_images_per_s(cfg, data, steps, device, mixed=cuda, passes=passes))
        nchw = max(nchw, bare_loop_images_per_s(cfg, data, steps, device, mixed=cuda, passes=passes,
                                                layout=torch.contiguous_format))
    result = row(f"trial_channels_last_{device.type}_images_per_s", last, nchw, "images/s", 1.0)
    result["size"] = (f"{cfg.params.backbone}, batch {cfg.train.batch_size}, {cfg.data.image_size.height}x"
                      f"{cfg.data.image_size.width}, {steps * passes} steps")
    return result


def compile_row(cfg, data, steps: int, device: torch.device, cuda: bool) -> dict:
    """Whether torch.compile would pay for a default trial: the seconds of one trial's training images (train
    images x train.epochs) in eager mode, as the harness trains, against the same through torch.compile, its
    compilation included. Met (ratio <= 1) when eager is not slower: the harness does not compile. The row
    also carries both steady speeds, the compilation's seconds and the images after which it would pay."""
    passes = 2
    eager_timings, compiled_timings = {}, {}
    eager = bare_loop_images_per_s(cfg, data, steps, device, mixed=cuda, passes=passes, timings=eager_timings)
    try:
        fast = bare_loop_images_per_s(cfg, data, steps, device, mixed=cuda, passes=passes, compiled=True,
                                      timings=compiled_timings)
    except Exception as error:  # noqa: BLE001 - no compiler toolchain, an unsupported op: the row says which
        return unmeasured(f"trial_compile_{device.type}_trial_seconds", "seconds", 1.0, "lower",
                          f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    images = len(data.rows("train")) * cfg.train.epochs
    compile_s = max(0.0, compiled_timings["warmup_s"] - eager_timings["warmup_s"])
    eager_s, compiled_s = images / eager, compile_s + images / fast
    result = row(f"trial_compile_{device.type}_trial_seconds", eager_s, compiled_s, "seconds", 1.0, better="lower")
    gain = 1 / eager - 1 / fast
    result.update(eager_images_per_s=round(eager, 1), compiled_images_per_s=round(fast, 1),
                  compile_seconds=round(compile_s, 1), trial_images=images,
                  break_even_images=round(compile_s / gain) if gain > 0 else None,
                  size=(f"{cfg.params.backbone}, batch {cfg.train.batch_size}, {cfg.data.image_size.height}x"
                        f"{cfg.data.image_size.width}, {steps * passes} steps"))
    return result


def mixed_precision_row(cfg, data, steps: int, device: torch.device, quick: bool) -> dict:
    """On CUDA: the train loop with float16 autocast (what the harness does) against float32, both channels_last.

    Met when mixed precision is at least as fast: the harness chooses it on every CUDA device,
    so it must never be the slower path. Best of 3 alternating measurements of a few passes each.
    """
    passes, repeats = (2, 1) if quick else (5, 3)
    mixed, plain = 0.0, 0.0
    for _ in range(repeats):
        mixed = max(mixed, bare_loop_images_per_s(cfg, data, steps, device, mixed=True, passes=passes))
        plain = max(plain, bare_loop_images_per_s(cfg, data, steps, device, mixed=False, passes=passes))
    result = row("trial_amp_images_per_s", mixed, plain, "images/s", 1.0)
    result["size"] = (f"{cfg.params.backbone}, batch {cfg.train.batch_size}, {cfg.data.image_size.height}x"
                      f"{cfg.data.image_size.width}, {steps * passes} steps, {torch.cuda.get_device_name(device)}")
    return result


def bench_study_overhead(bench: Bench) -> list[dict]:
    """Per-trial harness overhead: trial wall time not spent in training or evaluation epochs.

    That is model construction, loaders, checkpoint and metrics writes, Optuna storage and the
    W&B run (init, per-epoch logs, finish); measured on the default study, two trials.
    """
    from harness.study import run_study, trials_frame

    cfg = _bench_cfg(bench).replace({"name": "bench-overhead", "search.trials": 2, "search.pruner.name": "none",
                                     "ensemble.enabled": False})
    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    frame = trials_frame(run_study(cfg, progress=False))
    total, compute = 0.0, 0.0
    for item in frame.itertuples():
        metrics: pd.DataFrame = TrialFolder(Path(item.run_dir)).metrics()
        total += item.duration_s
        compute += float(metrics["epoch_time"].sum() + metrics["probe_time"].sum())
    overhead = total - compute
    return [row("study_overhead_share_of_trial", overhead, total, "seconds", 0.10, better="lower")]
