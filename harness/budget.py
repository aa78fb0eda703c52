"""A wall-clock budget for the whole of `make study` (`--budget 20m`, `search.budget`): search, eval scores,
ensemble, promotion and submission planned inside it, from costs measured on this machine.

Measured, never guessed:
    the prep        preflight, data, foreground and context audit: timed as they run, before the first plan
    epoch costs     per backbone, seconds per training image and per evaluated image, from the epochs the study's
                    trials ran (metrics.csv: epoch_time, probe_time); before a backbone has run an epoch, from
                    a few training steps timed at the study's batch and image size (`time_steps`) plus what an
                    epoch added per image to the timed steps of the backbones that ran (loading, augmenting,
                    preprocessing: the same whatever the backbone)
    trial overhead  a trial's seconds outside its epochs (model, views, files, W&B), from result.json
The plan (`Budget`):
    search          until `search_until()`: the budget less what was spent, the steps after the search and a
                    reserve for the promotion (its full size, at most PROMOTION_SHARE of what the prep left),
                    revised after every trial as costs are learnt. No trial starts unless its first rung fits,
                    and a trial whose next epoch would end past it stops there (pruned, reason "budget")
    promotion       sized to the time actually left once the search, eval scores and ensemble are done
                    (`size_promotion`): the configurations the study cannot tell from the winner, at the study
                    file's folds and epochs; what does not fit is cut in this order: epochs to each
                    configuration's own best epoch, configurations (the last first), folds (down to MIN_FOLDS).
                    When nothing fits, the single-split ensemble is submitted (a trial the budget stopped is
                    one of its candidates, as a complete one)
    submission      predicted with the promoted fold models
runs/<study>/budget.json keeps every plan, what each step took and what the budget left out (`describe`).

The planner's settings (PROMOTION_SHARE, MARGIN, MIN_FOLDS) are constants here, named with the runs they were
chosen on.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from harness.config import StudyConfig, format_duration
from harness.folders import StudyFolder, TrialFolder
from harness.io import atomic_write_text, json_ready
from harness.records import BUDGET_STOP
from harness.runtime import StudyError

log = logging.getLogger("harness.budget")

# Chosen before any tuning run (generator seeds 0, 11 and 22 are the ones to tune them on): the promotion may
# claim at most this share of the time the prep leaves, and this share of the budget is kept for the steps
# that are not planned from measured costs (ensemble, report, W&B's finish).
PROMOTION_SHARE = 0.5
MARGIN = 0.05
# fewer folds than this train each fold model on too few persons: on the tuning seed 0 at half the plain script's
# wall, 1 configuration x 2 folds x 3 epochs scored 0.510 on eval where its own single-split trial scored 0.676
MIN_FOLDS = 3
STEPS_TIMED = 3  # training steps timed per backbone before it has run an epoch (after WARMUP_STEPS)
WARMUP_STEPS = 2  # the first steps of a model run slower (allocations, kernels chosen): not timed


# ------------------------------------------------------------------------------------------ costs


@dataclass(frozen=True)
class EpochCost:
    """What an epoch of a backbone costs here: seconds per training image and per evaluated image."""

    train_s: float
    eval_s: float
    source: str  # "N epoch(s) of trial(s) ...", or "timed steps + ..." (what epochs add to them)


@dataclass(frozen=True)
class Sizes:
    """How many images each step handles: the search's split, all labelled images (the promotion's folds),
    the images evaluated per search epoch (valid and its probes) and the held-out set."""

    train: int
    valid: int
    labelled: int
    eval_views: int  # evaluated images per epoch and per valid image (valid, train probe, swapped backgrounds)
    held_out: int

    def fold_train(self, folds: int) -> float:
        return self.labelled * (folds - 1) / folds

    def fold_eval(self, folds: int) -> float:
        return self.labelled / folds * self.eval_views


class CostBook:
    """Epoch costs per backbone, read from the study's trial folders, and timed steps where none ran yet."""

    def __init__(self, cfg: StudyConfig, sizes: Sizes, timed: dict[str, EpochCost] | None = None) -> None:
        self.cfg, self.sizes = cfg, sizes
        self.timed = dict(timed or {})  # backbone -> cost from timed steps (uncalibrated)
        self.measured: dict[str, EpochCost] = {}
        self.overhead_s = 0.0
        self.added = (0.0, 0.0)  # seconds per training and per evaluated image an epoch adds to the timed steps

    def observe(self) -> None:
        """Read every trial folder's epochs: per backbone the median cost per image, the median trial overhead,
        and how far timed steps missed the epochs of the backbones that have both."""
        per_backbone: dict[str, list[tuple[float, float]]] = {}
        trials: dict[str, list[int]] = {}
        overheads = []
        root = StudyFolder.of(self.cfg).trials
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            trial = TrialFolder(folder)
            frame = trial.metrics()
            if frame is None or "epoch_time" not in frame or not trial.file(trial.CONFIG).is_file():
                continue
            backbone = trial.read_config()["params"]["backbone"]
            images = frame["epoch_time"] * frame["images_per_s"]
            for seconds, count, probe in zip(frame["epoch_time"], images, frame["probe_time"], strict=True):
                if count > 0:
                    per_backbone.setdefault(backbone, []).append(
                        (seconds / count, probe / (self.sizes.valid * self.sizes.eval_views)))
            trials.setdefault(backbone, []).append(int(folder.name) if folder.name.isdigit() else -1)
            result = trial.read_result()
            if result and result.get("seconds"):
                overheads.append(max(0.0, float(result["seconds"]) - float((frame["epoch_time"] + frame["probe_time"]).sum())))
        for backbone, pairs in per_backbone.items():
            self.measured[backbone] = EpochCost(statistics.median(p[0] for p in pairs),
                                                statistics.median(p[1] for p in pairs),
                                                f"{len(pairs)} epoch(s) of trial(s) {sorted(trials[backbone])}")
        self.overhead_s = statistics.median(overheads) if overheads else 0.0
        both = [b for b in self.measured if b in self.timed]
        # what an epoch adds to the timed steps per image, whatever the backbone: loading, augmenting and
        # preprocessing the images (the timed steps run on tensors already made)
        self.added = (statistics.median(self.measured[b].train_s - self.timed[b].train_s for b in both),
                      statistics.median(self.measured[b].eval_s - self.timed[b].eval_s for b in both)) if both else (0.0, 0.0)

    def epoch(self, backbone: str) -> EpochCost:
        if backbone in self.measured:
            return self.measured[backbone]
        if backbone not in self.timed:
            raise KeyError(f"no cost for backbone {backbone!r}: it was neither timed nor trained")
        timed, (train_added, eval_added) = self.timed[backbone], self.added
        if not self.measured:
            return EpochCost(timed.train_s, timed.eval_s, "timed steps (no epoch has run here yet)")
        return EpochCost(max(timed.train_s / 2, timed.train_s + train_added), max(timed.eval_s / 2, timed.eval_s + eval_added),
                         f"timed steps + {train_added * 1000:.1f} ms per image measured on the trained backbones")

    def search_epoch_s(self, backbone: str) -> float:
        """One epoch of a search trial: its training pass and the evaluation of valid and its probes."""
        cost = self.epoch(backbone)
        return self.sizes.train * cost.train_s + self.sizes.valid * self.sizes.eval_views * cost.eval_s

    def fold_s(self, backbone: str, epochs: int, folds: int) -> float:
        """One fold run of the promotion: `epochs` over the other folds' persons, evaluated on its own."""
        cost = self.epoch(backbone)
        per_epoch = self.sizes.fold_train(folds) * cost.train_s + self.sizes.fold_eval(folds) * cost.eval_s
        return self.overhead_s + epochs * per_epoch

    def predict_s(self, backbone: str, images: int) -> float:
        return images * self.epoch(backbone).eval_s


def time_steps(cfg: StudyConfig, backbones: list[str], num_classes: int) -> dict[str, EpochCost]:
    """Seconds per image of a training step and of an evaluation, per backbone, timed on random images at the
    study's batch and image size (STEPS_TIMED steps after WARMUP_STEPS): the cost of a backbone before it has
    run an epoch here."""
    import torch

    from harness.heads import build_loss
    from harness.model import build_model
    from harness.train import backward_step, build_optimizer, forward_loss, pick_device

    device = pick_device(cfg.train.device)
    size, batch = cfg.data.image_size, cfg.train.batch_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size.height, size.width, generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    costs = {}
    for backbone in backbones:
        model = build_model(backbone, "multiclass", num_classes, pretrained=False,
                            image_size=(size.height, size.width)).to(device)
        loss_fn = build_loss("ce", "multiclass", num_classes)
        optimizer = build_optimizer(model, cfg.params)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        model.train()
        seconds = []
        for _ in range(WARMUP_STEPS + STEPS_TIMED):
            started = time.perf_counter()
            backward_step(model, forward_loss(model, x, y, loss_fn, mixed=False), optimizer, scaler, cfg.train.grad_clip)
            seconds.append(time.perf_counter() - started)
        model.eval()
        with torch.no_grad():
            model(x)  # warms up
            started = time.perf_counter()
            model(x)
            eval_s = (time.perf_counter() - started) / batch
        costs[backbone] = EpochCost(statistics.median(seconds[WARMUP_STEPS:]) / batch, eval_s, "timed steps")
    return costs


# -------------------------------------------------------------------------------- the promotion


@dataclass(frozen=True)
class Candidate:
    """A configuration the promotion could retrain: its trial, backbone, the epochs of its best epoch (counted
    from 1) and whether the study can tell it apart from the winner."""

    trial: int
    backbone: str
    best_epochs: int
    tied: bool = True


@dataclass(frozen=True)
class PromotionSize:
    configs: tuple[int, ...]
    folds: int
    epochs: str  # "full": the study file's train.epochs; "best": each configuration's own best epoch
    seconds: float
    left_out: tuple[str, ...] = ()

    @property
    def settings(self) -> dict:
        """The promotion: overrides that give `harness promote` this size."""
        return {"promotion.top_k": len(self.configs), "promotion.folds": self.folds, "promotion.epochs": self.epochs}


def promotion_cost(costs: CostBook, chosen: list[Candidate], folds: int, epochs: str, full_epochs: int) -> float:
    """Every fold run of the chosen configurations, and the held-out images predicted twice by every fold model
    (the estimate reads them, the submission predicts them)."""
    seconds = 0.0
    for candidate in chosen:
        run_epochs = full_epochs if epochs == "full" else candidate.best_epochs
        seconds += folds * costs.fold_s(candidate.backbone, run_epochs, folds)
        seconds += 2 * folds * costs.predict_s(candidate.backbone, costs.sizes.held_out)
    return seconds


def promotable(candidates: list[Candidate]) -> list[Candidate]:
    """The winner and the candidates after it until the first the study can tell apart from it."""
    return candidates[:1] + list(itertools.takewhile(lambda c: c.tied, candidates[1:]))


def sizes_to_try(candidates: list[Candidate], folds: int) -> Iterator[tuple[list[Candidate], int, str]]:
    """Promotions from the largest down, in the order the budget cuts: each configuration's own best epoch
    first, then configurations (the last first), then folds (down to MIN_FOLDS)."""
    for fold_count in range(folds, min(folds, MIN_FOLDS) - 1, -1):
        for count in range(len(candidates), 0, -1):
            for epochs in ("full", "best"):
                yield candidates[:count], fold_count, epochs


def size_promotion(costs: CostBook, candidates: list[Candidate], folds: int, full_epochs: int,
                   seconds: float) -> PromotionSize | None:
    """The largest promotion (sizes_to_try) whose measured cost fits in `seconds`; None when none does. Only the
    configurations the study cannot tell from the winner are candidates: `candidates` best first (the winner
    first), up to the first one the study can tell apart."""
    tied = promotable(candidates)
    dropped = [f"trial {c.trial} (the study can tell it from the winner)" for c in candidates if c not in tied]
    for chosen, fold_count, epochs in sizes_to_try(tied, folds):
        cost = promotion_cost(costs, chosen, fold_count, epochs, full_epochs)
        if cost <= seconds:
            left_out = list(dropped)
            left_out += [f"trial {c.trial} (no time)" for c in tied[len(chosen):]]
            if fold_count < folds:
                left_out.append(f"folds {folds} -> {fold_count}")
            if epochs == "best":
                cut = [f"trial {c.trial} {full_epochs} -> {c.best_epochs}" for c in chosen if c.best_epochs < full_epochs]
                if cut:
                    left_out.append(f"epochs {', '.join(cut)}")
            return PromotionSize(tuple(c.trial for c in chosen), fold_count, epochs, cost, tuple(left_out))
    return None


# ------------------------------------------------------------------------------------- the budget


@dataclass
class Record:
    """runs/<study>/budget.json: what the budget planned, what each step took and what it left out."""

    budget_s: float
    started: float  # wall clock (time.time())
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds it took
    plans: list[dict] = field(default_factory=list)  # each plan as printed: at_s, search_until_s, eta_s, ...
    search: dict = field(default_factory=dict)
    promotion: dict = field(default_factory=dict)
    submission: dict = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    wall_s: float | None = None

    def write(self, cfg: StudyConfig) -> None:
        atomic_write_text(StudyFolder.of(cfg).budget, json.dumps(json_ready(asdict(self)), indent=2))


def read_record(cfg: StudyConfig) -> dict | None:
    path = StudyFolder.of(cfg).budget
    return json.loads(path.read_text()) if path.is_file() else None


class Budget:
    """One budgeted `make study`: the clock, the costs learnt so far, the plan and its record."""

    def __init__(self, cfg: StudyConfig, seconds: float, started: float | None = None) -> None:
        """`started`: when the command began (time.time()); the budget counts from there."""
        self.cfg = cfg
        self.record = Record(budget_s=seconds, started=started or time.time())
        self.costs: CostBook | None = None
        self._search_until = math.inf
        self._step_started = self.record.started
        self._search_backbones: list[str] = []
        self._search_started = 0.0  # seconds from the start to the search's first plan

    # ------------------------------------------------------------------ the clock
    def elapsed(self) -> float:
        return time.time() - self.record.started

    def left(self) -> float:
        """Seconds until the budget ends, less the margin for the steps not planned from measured costs."""
        return self.record.budget_s * (1 - MARGIN) - self.elapsed()

    def step_done(self, name: str) -> float:
        """Record the seconds since the last step ended as step `name`'s."""
        now = time.time()
        self.record.steps[name] = round(now - self._step_started, 1)
        self._step_started = now
        return self.record.steps[name]

    # ------------------------------------------------------------------ the search
    def start_search(self, data, study, backbones: list[str]) -> None:
        """After the prep: time the backbones that have not run an epoch here, plan and print."""
        from harness.data.readers import read_eval

        self.step_done("prep")
        held_out = read_eval(self.cfg.data)
        sizes = Sizes(train=len(data.rows("train")), valid=len(data.rows("valid")), labelled=len(data.frame),
                      eval_views=3 if data.foreground is not None else 2,
                      held_out=0 if held_out is None else len(held_out.frame))
        self._search_backbones = backbones
        costs = CostBook(self.cfg, sizes)
        costs.observe()
        untimed = [b for b in backbones if b not in costs.measured]
        trained = [b for b in backbones if b in costs.measured][:1]  # what an epoch adds is read on one of them
        costs.timed = time_steps(self.cfg, untimed + trained, data.num_classes) if untimed else {}
        self.costs = costs
        self.step_done("timing")
        self._search_started = self.elapsed()
        self.revise(study, first=True)

    def revise(self, study, first: bool = False) -> None:
        """Read the costs again and move the end of the search so that the promotion keeps its reserve."""
        costs = self.costs
        costs.observe()
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
        after = self._after_search_s(len(finished) + 1)
        # the promotion's share of what the prep left, fixed when the search started (a share of what is left
        # now would move the search's end later after every trial)
        after_prep = self.record.budget_s * (1 - MARGIN) - self._search_started - after
        full = self._full_promotion_s(study)
        reserve = min(full, PROMOTION_SHARE * max(0.0, after_prep))
        if reserve < self._smallest_promotion_s(study):  # a reserve no promotion fits in goes to the search
            reserve = 0.0
        until = self.left() - after - reserve
        self._search_until = self.record.started + self.elapsed() + until
        search = min(max(0.0, until), self._rest_of_search_s(study, len(finished)))
        promotion = min(full, max(0.0, self.left() - search - after))
        eta = self.elapsed() + search + after + promotion
        plan = {"at_s": round(self.elapsed(), 1), "search_left_s": round(until, 1),
                "promotion_reserve_s": round(reserve, 1), "after_search_s": round(after, 1), "eta_s": round(eta, 1),
                "costs": {b: asdict(costs.epoch(b)) for b in self._search_backbones},
                "epoch_s": {b: round(costs.search_epoch_s(b), 1) for b in self._search_backbones}}
        self.record.plans.append(plan)
        self.record.write(self.cfg)
        epochs = ", ".join(f"{b} {s:.0f}s" for b, s in plan["epoch_s"].items())
        what = "plan" if first else "plan revised"
        print(f"budget {format_duration(self.record.budget_s)}: {what} at {format_duration(plan['at_s'])}: search "
              f"~{format_duration(search)} more (at most {format_duration(max(0.0, until))}; one epoch: {epochs}; "
              f"{costs.epoch(self._search_backbones[0]).source}), eval scores ~{format_duration(after)}, promotion "
              f"~{format_duration(promotion)}; ETA {time.strftime('%H:%M:%S', time.localtime(self.record.started + eta))}"
              f" (budget ends {time.strftime('%H:%M:%S', time.localtime(self.record.started + self.record.budget_s))})",
              flush=True)

    def _rest_of_search_s(self, study, finished: int) -> float:
        """The trials still to run at the mean length of those run (a full trial of the default before any)."""
        left = max(0, self.cfg.search.trials - finished)
        durations = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False)
                     if t.state.name in ("COMPLETE", "PRUNED") and t.duration is not None]
        each = (statistics.mean(durations) if durations else
                self.costs.overhead_s + self.cfg.train.epochs * self.costs.search_epoch_s(self.cfg.params.backbone))
        return left * each

    def _after_search_s(self, trials: int) -> float:
        """Each finished trial predicted on the held-out set (its eval score), at the costliest backbone."""
        costs = self.costs
        return trials * max(costs.predict_s(b, costs.sizes.held_out) for b in self._search_backbones)

    def _ranked(self, study) -> list[Candidate]:
        """The best finished trials so far as promotion candidates (top_k of them; trial 0's backbone before any)."""
        cfg = self.cfg
        ranked = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")
                         and t.user_attrs.get("objective") is not None),
                        key=lambda t: -t.user_attrs["objective"])[: cfg.promotion.top_k]
        chosen = [Candidate(t.number, t.params.get("backbone", cfg.params.backbone),
                            max(int(t.user_attrs.get("best_epoch", cfg.train.epochs - 1)) + 1, cfg.promotion_min_epochs))
                  for t in ranked]
        return chosen + [Candidate(-1, cfg.params.backbone, cfg.train.epochs)] * (cfg.promotion.top_k - len(chosen))

    def _full_promotion_s(self, study) -> float:
        """The promotion at the study file's size, of the best trials so far."""
        cfg = self.cfg
        return promotion_cost(self.costs, self._ranked(study), cfg.promotion.folds, "full", cfg.train.epochs)

    def _smallest_promotion_s(self, study) -> float:
        """The smallest promotion the budget would run: the best trial so far on MIN_FOLDS folds at its best epoch."""
        cfg = self.cfg
        return promotion_cost(self.costs, self._ranked(study)[:1], min(cfg.promotion.folds, MIN_FOLDS), "best",
                              cfg.train.epochs)

    def search_until(self) -> float:
        """When the search must end (wall clock)."""
        return self._search_until

    def may_start_trial(self, study) -> bool:
        """Whether a new trial can train to its first rung before the search must end (at the costliest backbone).
        A budget in which not even the first trial fits is refused, naming what it would need."""
        first_rung = max(1, self.cfg.search.pruner.n_warmup_steps)
        epoch = max(self.costs.search_epoch_s(b) for b in self._search_backbones)
        needed = self.costs.overhead_s + first_rung * epoch
        fits = time.time() + needed <= self._search_until
        if not fits and not any(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False)):
            trial = self.costs.overhead_s + self.cfg.train.epochs * self.costs.search_epoch_s(self.cfg.params.backbone)
            least = self.elapsed() + trial + self._after_search_s(1) + self._full_promotion_s(study)
            self.record.search["stopped"] = "the budget holds no trial"
            self.record.write(self.cfg)
            raise StudyError(
                f"budget {format_duration(self.record.budget_s)}: {format_duration(self.elapsed())} went to preparing "
                f"the study, and one trial of the defaults takes ~{format_duration(trial)} here: no trial fits before "
                f"the search must end. Give a budget of at least ~{format_duration(least / (1 - MARGIN))} (--budget, "
                f"BUDGET=, search.budget), or none")
        if not fits and "stopped" not in self.record.search:
            self.record.search["stopped"] = (f"no trial started after {format_duration(self.elapsed())}: its first "
                                             f"{first_rung} epoch(s) would end past the search's end")
        return fits

    def search_done(self, study) -> None:
        stopped = [int(t.user_attrs.get("identity", t.number)) for t in study.get_trials(deepcopy=False)
                   if str(t.user_attrs.get("reason", "")).startswith(BUDGET_STOP)]
        finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
        self.record.search.update(trials_finished=finished, stopped_by_budget=stopped,
                                  target=self.cfg.search.trials, seconds=self.step_done("search"))
        if finished < self.cfg.search.trials:
            self.record.left_out.append(f"search: {self.cfg.search.trials - finished} of {self.cfg.search.trials} "
                                        "trials not run (search.trials)")
        if stopped:
            self.record.left_out.append(f"search: trial(s) {stopped} stopped before their last epoch")
        self.record.write(self.cfg)

    # ------------------------------------------------------------------ the promotion
    def plan_promotion(self, candidates: list[Candidate]) -> PromotionSize | None:
        """The promotion sized to the time left (less the submission's prediction, counted in its cost)."""
        self.costs.observe()
        cfg = self.cfg
        size = size_promotion(self.costs, candidates, cfg.promotion.folds, cfg.train.epochs, self.left())
        full = promotion_cost(self.costs, promotable(candidates), cfg.promotion.folds,
                              "full", cfg.train.epochs)
        self.record.promotion = {"left_s": round(self.left(), 1), "full_size_s": round(full, 1),
                                 "candidates": [asdict(c) for c in candidates]}
        if size is None:
            smallest = min(cfg.promotion.folds, MIN_FOLDS)
            self.record.promotion["skipped"] = (f"the smallest promotion (1 configuration x {smallest} folds) does not "
                                                f"fit in the {format_duration(max(0.0, self.left()))} left")
            self.record.left_out.append("promotion: none (no time); the single-split ensemble is submitted")
        else:
            self.record.promotion.update(configs=list(size.configs), folds=size.folds, epochs=size.epochs,
                                         planned_s=round(size.seconds, 1))
            self.record.left_out += [f"promotion: {item}" for item in size.left_out]
        self.record.write(self.cfg)
        print(f"budget: {describe_promotion(self.record.promotion)}", flush=True)
        return size

    def finish(self, step: str) -> None:
        self.step_done(step)
        self.record.wall_s = round(self.elapsed(), 1)
        self.record.write(self.cfg)


def describe_promotion(promotion: dict) -> str:
    if "skipped" in promotion:
        return f"no promotion: {promotion['skipped']}"
    if "configs" not in promotion:
        return "promotion not planned"
    return (f"promotion of trial(s) {promotion['configs']} x {promotion['folds']} folds, epochs "
            f"{promotion['epochs']} (~{format_duration(promotion['planned_s'])} of the "
            f"{format_duration(promotion['left_s'])} left; full size ~{format_duration(promotion['full_size_s'])})")


def describe(record: dict | None) -> str:
    """The budget in one line (make status, the report, the end of make study); '' without one."""
    if not record:
        return ""
    used = f"{format_duration(record['wall_s'])} used" if record.get("wall_s") is not None else "still running"
    search = record.get("search", {})
    began = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["started"]))
    parts = [f"budget {format_duration(record['budget_s'])} (the run of {began}): {used}"]
    if search:
        parts.append(f"search {search.get('trials_finished', 0)} trial(s) in "
                     f"{format_duration(search.get('seconds', 0))}")
    if record.get("promotion"):
        parts.append(describe_promotion(record["promotion"]))
    if record.get("submission"):
        parts.append(f"submission from the {record['submission'].get('source', '?')}")
    left_out = record.get("left_out") or []
    parts.append(f"left out: {'; '.join(left_out)}" if left_out else "nothing left out")
    return "; ".join(parts)
