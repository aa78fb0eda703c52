"""One trial: `run_trial(cfg, params, trial=None) -> TrialResult`.

Read `run_trial` top to bottom: it prepares the data, builds the model, loss,
optimizer and schedule, resumes from `last.pt` when one exists, then runs the
epoch loop (train, evaluate valid + train probe + background-swap probe, write the
epoch's row and checkpoints, report the objective to Optuna).

The background-swap probe: every valid image with its person pasted onto the background of
another valid person (a fixed pairing; harness.foreground), preprocessed as the trial's model
sees images. `val/f1_bgswap` is valid F1 there, `gap/bgswap` what the backgrounds were worth.
A model that reads the background, which similar people share in the competition's photos,
scores high on valid and low there, as it would on the leaderboard. Everything a reviewer needs lands
in the trial folder (harness.folders.TrialFolder: config, metrics per epoch, last and
best checkpoints, the best epoch's valid log-probabilities, the result).

A failed trial (non-finite loss, unknown backbone, out of memory, ...) is a
result with state "failed" and its reason, never an exception for the caller.
"""

from __future__ import annotations

import logging
import math
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from harness.augment import build_transform, normalize_batch, preprocess
from harness.config import Params, StudyConfig
from harness.data.cache import CachedImageDataset
from harness.data.prepare import PreparedData, prepare_data
from harness.folders import StudyFolder, TrialFolder
from harness.foreground import BackgroundSwap, ItemPrepare, swapped_backgrounds
from harness.heads import HEADS, build_loss
from harness.metrics import OBJECTIVES, classification_metrics, confusion, per_class_f1
from harness.model import FREEZE_POLICIES, apply_freeze, build_model, eval_logits
from harness.records import BUDGET_STOP, TrialResult
from harness.store import StoreError, Superseded, folder_store, store_key

log = logging.getLogger(__name__)

EVAL_BATCH = 256


class TrialError(RuntimeError):
    """A trial that cannot go on; its message becomes the result's reason."""


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrialError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(choice)


def probe_rows(frame: pd.DataFrame, train_rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A fixed sample of whole train persons holding about `size` images (the gap probe)."""
    persons = frame["person"].to_numpy()[train_rows]
    order = np.random.default_rng(seed).permutation(np.unique(persons))
    chosen, count = set(), 0
    counts = pd.Series(persons).value_counts()
    for person in order:
        if count >= size:
            break
        chosen.add(person)
        count += counts[person]
    return train_rows[np.isin(persons, list(chosen))]


def lr_lambdas(steps_per_epoch: int, epochs: int, warmup_epochs: float, backbone_scale: Callable[[int], float]):
    """Per-group multipliers (backbone, head): linear warmup, then cosine to zero."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return [lambda step: schedule(step) * backbone_scale(step // steps_per_epoch), schedule]


# ------------------------------------------------------------------------- the pieces


@dataclass
class EvalSet:
    """Images a model is evaluated on each epoch, already preprocessed as the trial's model sees them."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,)


@dataclass
class Loaders:
    train: DataLoader
    generator: torch.Generator
    train_transform: Any
    # "valid", "probe" (train persons, for the gap), "bgswap" (valid, other backgrounds; only where a foreground is)
    views: dict[str, EvalSet]


def make_loaders(cfg: StudyConfig, params: Params, data: PreparedData, device: torch.device, seed: int) -> Loaders:
    size = cfg.data.image_size
    images, fg, persons = data.cache.images, data.foreground, data.frame["person"].to_numpy()
    labels = data.frame["label"].to_numpy()
    train_rows, valid_rows = data.rows("train"), data.rows("valid")
    train_tf = build_transform(params.aug_strength, size.height, size.width, train=True)
    swap = BackgroundSwap(fg, train_rows, persons, params.bgswap_p) if params.bgswap_p > 0 else None
    prepare = None if params.preprocess == "none" and swap is None else ItemPrepare(params.preprocess, fg, swap)
    cuda = device.type == "cuda"
    workers = cfg.train.num_workers
    generator = torch.Generator()
    train = DataLoader(CachedImageDataset(images, train_rows, labels[train_rows], train_tf, prepare=prepare),
                       batch_size=cfg.train.batch_size, shuffle=True, drop_last=len(train_rows) > cfg.train.batch_size,
                       generator=generator, num_workers=workers, pin_memory=cuda,
                       persistent_workers=cuda and workers > 0)
    probe = probe_rows(data.frame, train_rows, len(valid_rows), seed)

    def view(pixels: np.ndarray, rows: np.ndarray) -> EvalSet:
        return EvalSet(preprocess(pixels, params.preprocess, fg, rows), labels[rows])

    valid = view(np.asarray(images[valid_rows]), valid_rows)
    views = {"valid": valid, "probe": view(np.asarray(images[probe]), probe)}
    if fg is not None:  # the background-swap probe, where the person-based measures apply (harness.applicability)
        swapped = view(swapped_backgrounds(images, fg, valid_rows, persons, seed), valid_rows)
        views["bgswap"] = valid if np.array_equal(swapped.images, valid.images) else swapped  # background removed
    return Loaders(train=train, generator=generator, train_transform=train_tf, views=views)


def build_optimizer(model: torch.nn.Module, params: Params) -> torch.optim.Optimizer:
    groups = [{"params": list(model.backbone.parameters()), "name": "backbone"},
              {"params": list(model.head.parameters()), "name": "head"}]
    return torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)


def report_to_pruner(trial, row: dict) -> None:
    """The objective at step = epochs trained so far (1, 2, ...): the resource that Optuna's pruners count,
    so `min_resource: 1` of successive halving can stop a trial after its first epoch. The upper end of its
    interval, where the epoch has one, goes beside it for the evidence pruner (harness.pruners)."""
    from harness.pruners import HIGH_ATTR

    step = int(row["epoch"]) + 1
    if math.isfinite(row.get("objective_high", math.nan)):
        trial.set_user_attr(HIGH_ATTR.format(step=step), float(row["objective_high"]))
    trial.report(row["objective"], step)


def forward_loss(model, x: torch.Tensor, y: torch.Tensor, loss_fn, mixed: bool) -> torch.Tensor:
    """The loss of one batch already on the model's device; `mixed`: float16 autocast (the harness on CUDA)."""
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=mixed):
        return loss_fn(model(x), y)


def backward_step(model, loss: torch.Tensor, optimizer, scaler, grad_clip: float | None) -> None:
    """Gradients of `loss`, clipped to `grad_clip`, then one optimizer step (through the GradScaler)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        # frozen parameters have no gradient (set_to_none above), and clipping skips those
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def may_prune(epochs_trained: int, epochs: int) -> bool:
    """The pruner is asked only while epochs remain: a trial that trained all its epochs is complete."""
    return epochs_trained < epochs


def train_one_epoch(model, frozen, loader, loss_fn, optimizer, scheduler, scaler, device, cfg: StudyConfig,
                    epoch: int):
    """One pass over the train loader with `frozen` modules fixed; returns (mean loss, images, seconds)."""
    model.train()
    apply_freeze(model, frozen)  # after train(): frozen BatchNorm layers keep their statistics
    total_loss, images, start = 0.0, 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if cfg.train.max_train_batches and step >= cfg.train.max_train_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)  # the model's layout (build_model)
        loss = forward_loss(model, x, y, loss_fn, mixed=device.type == "cuda")
        loss_value = loss.item()  # the one wait for the device in a step
        if not math.isfinite(loss_value):
            raise TrialError(f"non-finite loss ({loss_value}) at epoch {epoch + 1}, step {step + 1}; "
                             "lower the learning rate or check the data")
        backward_step(model, loss, optimizer, scaler, cfg.train.grad_clip)
        scheduler.step()
        total_loss += loss_value * len(y)
        images += len(y)
    return total_loss / max(1, images), images, time.perf_counter() - start


@torch.no_grad()
def predict_log_probs(model, images: np.ndarray, labels: np.ndarray, loss_fn, device) -> tuple[np.ndarray, float]:
    """Class log-probabilities (N, C) of uint8 images (N, H, W, 3), evaluated in batches, and the mean loss."""
    model.eval()
    outputs, total_loss = [], 0.0
    for start in range(0, len(images), EVAL_BATCH):
        x = normalize_batch(images[start:start + EVAL_BATCH], device)
        y = torch.as_tensor(labels[start:start + EVAL_BATCH], device=device)
        logits = eval_logits(model, x, device)
        total_loss += loss_fn(logits, y).item() * len(y)
        outputs.append(model.class_log_probs(logits).cpu())
    return torch.cat(outputs).numpy(), total_loss / max(1, len(images))


def evaluate(model, loaders: Loaders, loss_fn, device, data: PreparedData, objective: str,
             interval: bool = False) -> tuple[dict, dict]:
    """Valid metrics, the train-probe gap, valid F1 on swapped backgrounds and the objective (with its 95%
    person-bootstrap interval when `interval`); also the log-probabilities of the views the objective and the
    ensemble use (valid, bgswap)."""
    tasks = data.tasks
    start = time.perf_counter()
    scores, losses = {}, {}
    for name, view in loaders.views.items():
        same = next((other for other in scores if loaders.views[other].images is view.images), None)
        if same is not None:  # the same pixels (a background removed before the swap): evaluated once
            scores[name], losses[name] = scores[same], losses[same]
            continue
        scores[name], losses[name] = predict_log_probs(model, view.images, view.labels, loss_fn, device)
    metrics = {name: classification_metrics(scores[name], view.labels, tasks=tasks)
               for name, view in loaders.views.items()}
    valid, probe = metrics["valid"], metrics["probe"]
    swapped_f1 = metrics["bgswap"]["f1"] if "bgswap" in metrics else math.nan  # nan: the probe does not apply
    row = {"val/loss": losses["valid"], **{f"val/{k}": v for k, v in valid.items()},
           "train/f1_probe": probe["f1"], "gap/f1": probe["f1"] - valid["f1"],
           "val/f1_bgswap": swapped_f1, "gap/bgswap": valid["f1"] - swapped_f1,
           "objective": float(OBJECTIVES.get(objective)({"valid": valid["f1"], "bgswap": swapped_f1})),
           "probe_time": time.perf_counter() - start}
    if interval:
        row["objective_low"], row["objective_high"] = objective_interval(scores, data, objective)
    return row, {name: scores[name] for name in ("valid", "bgswap") if name in scores}


def objective_interval(scores: dict[str, np.ndarray], data: PreparedData, objective: str) -> tuple[float, float]:
    """The 95% person-bootstrap interval of the objective of this epoch's valid predictions."""
    from harness.uncertainty import interval, objective_samples, person_weights

    persons = data.frame["person"].to_numpy()[data.rows("valid")]
    views = {view: scores[view].argmax(axis=1)[None] for view in OBJECTIVES.get(objective).views}
    samples = objective_samples(views, data.labels("valid"), person_weights(persons), objective, data.num_classes)
    return interval(samples[0])


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def save_last(folder: TrialFolder, model, optimizer, scheduler, scaler, epoch: int, best: dict,
              made_for: dict) -> None:
    folder.save_last({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                      "next_epoch": epoch + 1, "best": best, "rng": rng_state(), "made_for": made_for})


def checkpoint_purpose(cfg: StudyConfig, params: Params, data: PreparedData, folder: TrialFolder) -> dict:
    """What a checkpoint is made for: a resume uses last.pt only when all of it is what is asked for now (the
    params, the persons of the split or fold, the input size and seed, and the folder's place with the study's
    and the promotion's identities: a recreated study's leftovers never continue)."""
    return {"params": params.model_dump(mode="json"), "split": data.split.hash, "seed": cfg.seed,
            "image_size": [cfg.data.image_size.height, cfg.data.image_size.width],
            "folder": store_key(cfg, folder.path)}


def purpose_differences(stored: dict | None, wanted: dict) -> list[str]:
    """What differs between the purpose last.pt records and the one asked for, in words."""
    if stored is None:
        return ["the checkpoint records no purpose (written by an earlier harness version)"]
    differences = []
    for key in wanted:
        if key == "params":
            changed = sorted(k for k in set(stored.get("params", {})) | set(wanted["params"])
                             if stored.get("params", {}).get(k) != wanted["params"].get(k))
            differences += [f"params.{k} {stored.get('params', {}).get(k)!r} there, {wanted['params'].get(k)!r} now"
                            for k in changed]
        elif stored.get(key) != wanted[key]:
            differences.append(f"{key} {stored.get(key)!r} there, {wanted[key]!r} now")
    return differences


def resume(folder: TrialFolder, model, optimizer, scheduler, scaler, made_for: dict) -> tuple[int, dict]:
    """Load last.pt into the live objects; returns (next epoch, best so far). A checkpoint made for another
    purpose (purpose_differences) is not used: the folder is cleared, training starts afresh and says why."""
    state = folder.load_last()
    differences = purpose_differences(state.get("made_for"), made_for)
    if differences:
        log.warning("%s was made for something else (%s); training afresh", folder.file(folder.LAST),
                    "; ".join(differences))
        folder.clear()
        return 0, {"objective": -math.inf, "epoch": -1}
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["next_epoch"], state["best"]


# ------------------------------------------------------------------------------ trial


def trial_dir(cfg: StudyConfig, number: int | None) -> Path:
    study = StudyFolder.of(cfg)
    return study.single_run() if number is None else study.trial(number).path


def run_trial(cfg: StudyConfig, params: Params | dict | None = None, trial=None, *, data: PreparedData | None = None,
              run_dir: Path | None = None, on_epoch: Callable[[dict], None] | None = None,
              on_resume: Callable[[list[dict]], None] | None = None,
              stop_after_epochs: int | None = None, keep: str = "best",
              deadline: Callable[[], float] | None = None) -> TrialResult:
    """Train one trial; never raises for a trial's own failure (see the module docstring).

    `trial` is an Optuna trial to report `val/f1` to and ask whether to prune;
    `on_epoch` receives every epoch's metrics row (the study logs it to W&B);
    `on_resume` receives the rows of the epochs a resumed trial already ran;
    `stop_after_epochs` ends the run early as if interrupted (tests of resume);
    `keep` is which epoch's model and valid log-probabilities the folder keeps: the "best" by the objective,
    or the "last" (a fold of a promotion: its held-out fold must not pick its own epoch);
    `deadline()` is when a budget ends the search (time.time()): a trial whose next epoch, at the length of the
    one it just ran, would end past it stops there as pruned, with the reason "budget: ...".
    """
    params = _as_params(cfg, params)
    folder = TrialFolder(run_dir or trial_dir(cfg, trial.number if trial is not None else None))
    folder.prepare()  # half-written checkpoints of a killed attempt go
    result = TrialResult(state="failed", run_dir=str(folder.path), params=params.model_dump())
    started = time.perf_counter()
    mirror = folder_store(cfg, folder.path)
    try:
        if mirror is not None:
            # a trial another machine started (a stale retry): continue from the store's last.pt, not from scratch
            _take_over(mirror, folder, trial)
            on_epoch = _pushing(mirror, folder, on_epoch)
        result = _train(cfg, params, trial, data, folder, on_epoch, on_resume, stop_after_epochs, keep, result,
                        deadline)
    except Superseded as error:  # another attempt owns the folder now: write nothing more there
        mirror = None
        result.state = "failed"
        result.reason = f"superseded: {error}"
    except StoreError as error:  # the stored progress cannot be read: training afresh would overwrite it
        mirror = None
        result.state = "failed"
        result.reason = (f"{error}. The trial did not start, so the stored progress is kept: rerun when the store "
                         "is reachable")
    except torch.OutOfMemoryError as error:
        result.state = "failed"
        result.reason = f"out of memory: {str(error).splitlines()[0]}; lower train.batch_size or the image size"
    except Exception as error:  # noqa: BLE001 - a failed trial is a result, not a crash
        result.state = "failed"
        result.reason = f"{type(error).__name__}: {error}"
        try:
            folder.write_traceback(traceback.format_exc())
        except OSError:
            pass  # e.g. the disk is full: the reason in result.json is what matters
    result.seconds += time.perf_counter() - started
    folder.write_result(result.as_json())
    if mirror is not None:
        mirror.push_quietly(folder.path)
    return result


def _take_over(mirror, folder: TrialFolder, trial) -> None:
    """Claim the folder in the store (an earlier attempt still writing it stops) and fetch what it holds. A store
    out of reach is a StoreError, never a silent start from scratch whose pushes would replace stored progress."""
    label = f"{folder.path.name}" if trial is None else f"Optuna trial {trial.number} of {folder.path.name}"
    try:
        mirror.claim(label)
        mirror.pull(folder.path, replace_differing=True)
    except StoreError:
        raise
    except Exception as error:  # noqa: BLE001 - network, credentials: named in the trial's reason
        raise StoreError(f"store {mirror.url}: could not fetch {mirror.prefix} ({type(error).__name__}: "
                         f"{error})") from None


def _pushing(mirror, folder: TrialFolder, on_epoch: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """`on_epoch` after the epoch's files went to the store (called once last.pt and metrics.csv are written)."""
    def push_then(row: dict) -> None:
        mirror.push_quietly(folder.path)
        if on_epoch is not None:
            on_epoch(row)
            mirror.push_quietly(folder.path)  # the W&B ledger naming this epoch: a retry elsewhere logs it once

    return push_then


def _as_params(cfg: StudyConfig, params: Params | dict | None) -> Params:
    if isinstance(params, Params):
        return params
    return cfg.params.replace(**(params or {}))


def _train(cfg, params: Params, trial, data, folder: TrialFolder, on_epoch, on_resume, stop_after_epochs, keep: str,
           result: TrialResult, deadline: Callable[[], float] | None = None):
    folder.write_config(cfg.model_dump(mode="json"), params.model_dump(mode="json"))
    data = data or prepare_data(cfg, progress=False)
    if HEADS.get(params.head).needs_tasks and not data.tasks:
        raise TrialError(f"head {params.head!r} needs the competition's mask/gender/age tasks; use 'multiclass'")
    device = pick_device(cfg.train.device)
    seed_everything(cfg.seed)
    model = build_model(params.backbone, params.head, data.num_classes, pretrained=params.pretrained,
                        drop_rate=params.drop_rate, missing_weights=cfg.train.missing_weights,
                        image_size=(cfg.data.image_size.height, cfg.data.image_size.width)).to(device)
    result.weights = model.pretrained_from or "random init"
    policy = FREEZE_POLICIES.get(params.freeze)(k=params.freeze_k)
    loss_fn = build_loss(params.loss, params.head, data.num_classes, focal_gamma=params.focal_gamma,
                         label_smoothing=params.label_smoothing, task_weights=cfg.train.task_weights)
    loaders = make_loaders(cfg, params, data, device, cfg.seed)
    if data.foreground is not None:
        result.foreground = data.foreground.counts(np.concatenate([data.rows("train"), data.rows("valid")]))
    optimizer = build_optimizer(model, params)
    steps = len(loaders.train) if not cfg.train.max_train_batches else min(len(loaders.train),
                                                                             cfg.train.max_train_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(
        steps, cfg.train.epochs, cfg.train.warmup_epochs,
        lambda epoch: policy.backbone_lr_scale(epoch, cfg.train.backbone_lr_scale)))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    start_epoch, best = 0, {"objective": -math.inf, "epoch": -1}
    made_for = checkpoint_purpose(cfg, params, data, folder)
    if folder.has_last():
        start_epoch, best = resume(folder, model, optimizer, scheduler, scaler, made_for)
    rows = folder.metrics_before(start_epoch)
    if rows and on_resume is not None:
        on_resume(rows)
    if trial is not None:  # a retried trial is a new Optuna trial: give the pruner the epochs it already saw
        for row in rows:
            report_to_pruner(trial, row)
        if rows and may_prune(len(rows), cfg.train.epochs) and trial.should_prune():
            result.state = "pruned"
            result.fill(rows, best["epoch"])
            return result

    result.state = "complete"
    for epoch in range(start_epoch, cfg.train.epochs):
        if stop_after_epochs is not None and epoch >= start_epoch + stop_after_epochs:
            result.state, result.reason = "interrupted", f"stopped after {stop_after_epochs} epoch(s)"
            break
        epoch_seed = cfg.seed * 100_003 + epoch  # the same shuffle and augmentations after a resume
        loaders.generator.manual_seed(epoch_seed)
        loaders.train_transform.reseed(epoch_seed)
        epoch_started = time.time()
        train_loss, images, seconds = train_one_epoch(model, policy.frozen_modules(model, epoch), loaders.train,
                                                      loss_fn, optimizer, scheduler, scaler, device, cfg, epoch)
        metrics, view_scores = evaluate(model, loaders, loss_fn, device, data, cfg.search.objective,
                                        interval=cfg.search.pruner.evidence)
        row = {"epoch": epoch, "train/loss": train_loss, **metrics, "lr": optimizer.param_groups[1]["lr"],
               "lr_backbone": optimizer.param_groups[0]["lr"], "epoch_time": seconds, "images_per_s": images / seconds}
        rows.append(row)
        if keep == "last" or row["objective"] > best["objective"]:
            best = {"objective": row["objective"], "epoch": epoch}
            _save_best(folder, model, view_scores, data)
        folder.write_metrics(rows)
        save_last(folder, model, optimizer, scheduler, scaler, epoch, best, made_for)
        if on_epoch is not None:
            on_epoch(row)
        if trial is not None:
            report_to_pruner(trial, row)
            if may_prune(epoch + 1, cfg.train.epochs) and trial.should_prune():
                result.state = "pruned"
                break
        if deadline is not None and epoch + 1 < cfg.train.epochs and out_of_time(deadline(), epoch_started):
            result.state = "pruned"
            result.reason = f"{BUDGET_STOP}epoch {epoch + 2} would end after the search's end"
            break
    result.fill(rows, best["epoch"])
    return result


def out_of_time(deadline: float, epoch_started: float) -> bool:
    """Whether one more epoch as long as the one that started at `epoch_started` would end past `deadline`."""
    now = time.time()
    return now + (now - epoch_started) > deadline


def _save_best(folder: TrialFolder, model, view_scores: dict[str, np.ndarray], data: PreparedData) -> None:
    index = data.frame.iloc[data.rows("valid")][["image_id", "person", "label"]]
    predicted, labels = view_scores["valid"].argmax(axis=1), data.labels("valid")
    folder.save_best(model.state_dict(), view_scores, index)
    folder.save_best_scores(per_class_f1(predicted, labels, data.num_classes),
                            confusion(predicted, labels, data.num_classes))
