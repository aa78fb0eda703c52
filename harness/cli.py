"""The user verbs: `harness <verb> STUDY.yaml ...` (the Makefile wraps them)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from harness.config import ConfigError, Params, load_study, parse_duration
from harness.data.cache import ImageDecodeError
from harness.data.readers import DataError
from harness.folders import StudyFolder
from harness.records import shown_figures
from harness.runtime import StudyError

log = logging.getLogger("harness")
STARTED = time.time()  # a budget (harness study --budget) counts from the command's start

# errors that carry a message for the user: printed without a traceback
USER_ERRORS = (ConfigError, DataError, ImageDecodeError, FileExistsError, StudyError, OSError)


def parse_overrides(items: list[str]) -> dict:
    """`--set train.epochs=2 lr=0.01` -> {"train.epochs": 2, "params.lr": 0.01}; values are YAML."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=0.01 or --set train.epochs=2")
        if key in Params.model_fields:
            key = f"params.{key}"  # bare param names: lr=0.01 means params.lr
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(error).splitlines()[0]}); "
                              "quote it or fix the brackets") from None
    return overrides


def load(args: argparse.Namespace):
    """The study file of a verb, with its smoke variant and --set overrides applied."""
    return load_study(args.study, smoke=args.smoke, overrides=parse_overrides(args.set))


def cmd_check_data(args: argparse.Namespace) -> int:
    from harness.data.check import check_data

    report, ok = check_data(load(args), progress=not args.quiet)
    print(report)
    return 0 if ok else 1


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from harness.data.synthetic import make_synthetic

    width, sep, height = args.size.lower().partition("x")
    if not sep or not (width.isdigit() and height.isdigit()):
        raise ConfigError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 384x512")
    summary = make_synthetic(Path(args.dir), people=args.people, seed=args.seed, width=int(width), height=int(height))
    print(f"wrote {args.dir}: {summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from harness.data.prepare import prepare_data
    from harness.preflight import check_study
    from harness.train import run_trial

    cfg = load(args)
    check_study(cfg)
    data = prepare_data(cfg)  # a person-based measure where it does not apply is refused here, not as a failed trial
    result = run_trial(cfg, data=data)
    print(f"{result.run_dir}: {result.summary()}")
    return 0 if result.state == "complete" else 1


def cmd_weights(args: argparse.Namespace) -> int:
    """Where each backbone of the study gets its ImageNet weights; --download fetches the missing ones."""
    from harness.preflight import study_backbones, wants_pretrained
    from harness.weights import download_weights, find_weights

    cfg = load(args)
    sources = [find_weights(name) for name in study_backbones(cfg)]
    if args.download:
        for source in sources:
            if source.downloadable:
                print(f"{source.backbone}: downloading {source.hub_id or source.url} ...", flush=True)
                try:
                    download_weights(source.backbone)
                except Exception as error:  # noqa: BLE001 - offline, unreachable, not found: each is reported
                    print(f"{source.backbone}: download failed: {type(error).__name__}: {error}", file=sys.stderr)
        sources = [find_weights(name) for name in study_backbones(cfg)]
    width = max(len(source.backbone) for source in sources)
    print(f"ImageNet weights of the backbones of study {cfg.name!r} (params.backbone, search.space.backbone):")
    for source in sources:
        print(f"  {source.backbone:{width}}  {source.describe()}")
    missing = [source.backbone for source in sources if not source.found]
    if not missing:
        return 0
    if not wants_pretrained(cfg):
        print("params.pretrained is false and not searched: the study needs none of them")
        return 0
    hint = "" if args.download else f"; `harness weights {args.study} --download` fetches them on an online machine"
    print(f"{len(missing)} backbone(s) without ImageNet weights: {', '.join(missing)}{hint}")
    return 1


INTERVAL_NOTE = ("objective_low/high: 95% person-bootstrap interval of the objective on valid; tied_with_best: "
                 "cannot be told apart from the best trial (the paired interval of the difference holds 0)")


def print_top(cfg, frame, limit: int = 5) -> None:
    """The best trials, and where their W&B runs and files are."""
    if frame.empty:
        print("no trials yet")
        return
    columns = ["trial", "state", *shown_figures(frame), "best_epoch", "epochs", "duration_s", "wandb"]
    params = [c for c in frame.columns if c.startswith("param_")]
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4f}".format):
        print(frame[columns + params].head(limit).to_string(index=False))
    print(INTERVAL_NOTE)
    from harness.tracking import describe_states
    from harness.uncertainty import winner_certainty

    if "objective_low" in frame and (certainty := winner_certainty(frame)):
        print(certainty)

    best = frame.iloc[0]
    print(f"\nbest trial {best['trial']}: files in {best['run_dir']}, W&B run {best['wandb_run_id']}")
    print(describe_states(frame, cfg))



def cmd_study(args: argparse.Namespace) -> int:
    from harness.pipeline import make_study

    cfg = load(args)
    keep_wandb_files_in_study(cfg)
    warm = None
    if args.warm_start:  # refused before any data is prepared where the spaces differ
        from harness.runtime import load_existing_study
        from harness.warm_start import best_params, check_same_space

        other = load_study(args.warm_start, smoke=args.smoke)
        check_same_space(cfg, other)
        warm = (other.name, best_params(other.name, load_existing_study(other, args.storage), args.warm_start_top))

    def show(frame, eval_f1) -> None:
        if eval_f1:
            from harness.data.readers import truth_source

            print(f"eval_f1: each trial's best epoch on the held-out images against {truth_source(cfg.data)} "
                  "(shown only: nothing is selected by it)")
        print(f"\nstudy {cfg.name!r}: {len(frame)} trial(s); table in {StudyFolder.of(cfg).trials_table}")
        print_top(cfg, frame)
        if cfg.ensemble.enabled:
            print()

    budget = None
    if args.budget:
        try:
            budget = parse_duration(args.budget)
        except ValueError as error:
            raise ConfigError(f"--budget: {error}") from None
    outcome = make_study(cfg, trials=args.trials, timeout=args.timeout, storage=args.storage, workers=args.workers,
                         warm_start=warm, after_search=show, budget=budget, started=STARTED)
    print(f"report: {outcome.report}")
    return 0


def keep_wandb_files_in_study(cfg) -> None:
    """W&B stages tables and writes logs outside the run folders unless told: keep them in the study's."""
    wandb_dir = StudyFolder.of(cfg).wandb
    os.environ.setdefault("WANDB_DATA_DIR", str(wandb_dir / "data"))
    os.environ.setdefault("WANDB_CACHE_DIR", str(wandb_dir / "cache"))


def cmd_ensemble(args: argparse.Namespace) -> int:
    from harness.promotion.ensemble import run_ensemble

    cfg = load(args)
    keep_wandb_files_in_study(cfg)
    run_ensemble(cfg, storage=args.storage)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from harness.predict import predict_images, predict_submission

    cfg = load(args)
    keep_wandb_files_in_study(cfg)
    if args.images:
        predict_images(cfg, Path(args.images), Path(args.out) if args.out else None, tta=args.tta, trial=args.trial,
                       storage=args.storage, source=args.source)
        return 0
    if args.out:
        raise ConfigError("--out goes with --images DIR; the held-out set's predictions go to runs/<study>/")
    predict_submission(cfg, tta=args.tta, trial=args.trial, storage=args.storage, progress=True, source=args.source)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from harness.export import export_model

    cfg = load(args)
    export_model(cfg, Path(args.out) if args.out else None, tta=args.tta, trial=args.trial, storage=args.storage,
                 source=args.source)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from harness.preflight import check_study
    from harness.promotion.folds import promote, restart

    cfg = load(args)
    keep_wandb_files_in_study(cfg)
    check_study(cfg)
    if args.restart:
        restart(cfg, args.storage)
    promote(cfg, storage=args.storage, workers=args.workers, timeout=args.timeout)
    return 0


def cmd_corrections(args: argparse.Namespace) -> int:
    from harness.promotion.audit import write_corrections

    cfg = load(args)
    path, count = write_corrections(cfg, Path(args.out) if args.out else None, top=args.top)
    print(f"wrote {path}: {count} correction(s). To train on them, set in {args.study}:\n"
          f"  data:\n    corrections: {path}")
    return 0


def cmd_remedies(args: argparse.Namespace) -> int:
    from harness.preflight import check_study
    from harness.remedies import run_remedies

    cfg = load(args)
    check_study(cfg)
    keep_wandb_files_in_study(cfg)
    run_remedies(cfg, seeds=args.seeds, names=args.only.split(",") if args.only else None)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from harness.study import status
    from harness.tracking import describe_states

    cfg = load(args)
    frame = status(cfg, args.storage)
    columns = [c for c in frame.columns if c not in ("run_dir", "wandb_run_id", "optuna_trial", "weights")]
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.4f}".format):
        print(frame[columns].to_string(index=False) if not frame.empty else "no trials yet")
    print(f"\nwritten to {StudyFolder.of(cfg).trials_table}")
    print(INTERVAL_NOTE)
    if not frame.empty:
        print(describe_states(frame, cfg))
    from harness.folders import PromotionFolder
    from harness.predict import describe_held_out
    from harness.promotion.folds import describe_estimate

    try:
        if line := describe_estimate(PromotionFolder.of(cfg).summary() or {}):
            print(f"promotion: {line}")
    except OSError as error:  # status reports it and goes on
        print(f"promotion: {error}")
    if line := describe_held_out(cfg):
        print(line)
    from harness.budget import describe, read_record

    if line := describe(read_record(cfg)):
        print(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    cfg = load(args)
    print(f"wrote {write_report(cfg, args.storage)}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the study's storage, on 127.0.0.1 unless told otherwise."""
    from optuna_dashboard import run_server

    from harness.runtime import default_storage, load_existing_study, redact

    cfg = load(args)
    load_existing_study(cfg, args.storage)  # a clear error when the study does not exist yet
    url = args.storage or default_storage(cfg)
    print(f"optuna-dashboard for study {cfg.name!r} ({redact(url)}) at http://{args.host}:{args.port}/dashboard "
          "(Ctrl-C stops it)", flush=True)
    run_server(url, host=args.host, port=args.port)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Upload the study's W&B runs that did not reach the server (offline ones, and online ones cut off by
    a lost connection) with `wandb sync`, through this interpreter (after `wandb login`)."""
    from harness.tracking import pending_folders, run_folders, sync_runs

    cfg = load(args)
    keep_wandb_files_in_study(cfg)
    if not run_folders(cfg.study_dir):
        raise ConfigError(f"no W&B runs under {StudyFolder.of(cfg).wandb}; run the study first")
    pending = pending_folders(cfg.study_dir)
    if not pending:
        print(f"nothing to upload: every W&B run of study {cfg.name!r} is online or synced")
        return 0
    print(f"uploading {len(pending)} W&B run folder(s) of study {cfg.name!r} to project {cfg.tracking.project!r}; "
          "folders of one run id (a resumed run's attempts) go oldest first into the same run", flush=True)
    synced, failed = sync_runs(cfg)
    print(f"synced {len(synced)} of {len(pending)} folder(s)")
    for folder in failed:
        print(f"  not synced: {folder} (see `{sys.executable} -m wandb sync {folder}` for the reason)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    # what every verb on a study file takes
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("study", help="study file (YAML)")
    common.add_argument("--smoke", action="store_true", help="apply the study's smoke variant")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param (lr=0.01) or any setting (train.epochs=2); repeatable")
    with_storage = argparse.ArgumentParser(add_help=False, parents=[common])
    with_storage.add_argument("--storage", help="Optuna RDB URL (default: $HARNESS_STORAGE, else "
                              "sqlite:///runs/<study>/study.db). Keep a password off the command line, where `ps` "
                              "shows it: set PGPASSWORD (or ~/.pgpass) and leave it out of the URL")

    def verb(name: str, run, help: str, parent=common) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, parents=[parent])
        sub.set_defaults(run=run)
        return sub

    check = verb("check-data", cmd_check_data, "count persons, images and classes; list every data problem")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    verb("train", cmd_train, "run one trial with the study's defaults plus --set overrides")
    weights = verb("weights", cmd_weights, "where each backbone's ImageNet weights come from (--download fetches)")
    weights.add_argument("--download", action="store_true",
                         help="fetch missing weights into the standard cache (needs the network; never done by trials)")
    study = verb("study", cmd_study, "create or resume the study and run trials until the target is met", with_storage)
    study.add_argument("--trials", type=int, help="target number of finished trials (raises the file's)")
    study.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    study.add_argument("--budget", metavar="DURATION", help="wall clock for the whole pipeline (e.g. 20m, 1h30m): "
                       "search, eval scores, ensemble, a promotion sized to what is left and its submission, planned "
                       "from measured costs (default: search.budget; none: the search runs its trials)")
    study.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    study.add_argument("--warm-start", metavar="OTHER_STUDY", help="another study file of the same search space: "
                       "its best configurations are trained first (once per study)")
    study.add_argument("--warm-start-top", type=int, default=3, metavar="K",
                       help="how many of the other study's best configurations (default 3)")
    verb("status", cmd_status, "table of trials sorted by the objective (also runs/<study>/trials.csv)", with_storage)
    verb("ensemble", cmd_ensemble, "promote the best trials to a greedy ensemble with an honest score", with_storage)
    predict = verb("predict", cmd_predict, "predict the held-out set (runs/<study>/submission.csv, or "
                   "test_predictions.csv for data.test), or any folder with --images DIR", with_storage)
    predict.add_argument("--images", metavar="DIR", help="predict every image under DIR (recursively): a CSV of "
                         "file, predicted class and probabilities")
    predict.add_argument("--out", help="with --images: the CSV to write (default runs/<study>/predictions.csv)")
    export = verb("export", cmd_export, "write the promoted ensemble as one file plain PyTorch loads (torch.export) "
                  "(runs/<study>/model.pt2)", with_storage)
    export.add_argument("--out", help="file to write (default runs/<study>/model.pt2)")
    for command in (predict, export):
        command.add_argument("--tta", choices=["none", "hflip"], default="none", help="test-time augmentation")
        command.add_argument("--trial", type=int, help="this single trial instead of the ensemble")
        command.add_argument("--from", dest="source", choices=["auto", "promotion", "ensemble"], default="auto",
                             help="whose members: the promotion's fold models (auto: once `harness promote` has "
                                  "run) or the single-split ensemble's")
    promote = verb("promote", cmd_promote, "retrain the top configurations on person-grouped folds; out-of-fold "
                   "ensemble, CV F1 with intervals, label audit: runs/<study>/promotion/", with_storage)
    promote.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    promote.add_argument("--timeout", type=float, help="stop starting new fold runs after this many seconds")
    promote.add_argument("--restart", action="store_true",
                         help="discard the promotion (its folds and companion study) and choose again")
    corrections = verb("corrections", cmd_corrections, "turn accepted label-audit rows into a data.corrections file")
    corrections.add_argument("--top", type=int, help="accept the N most suspicious rows (default: the rows whose "
                             "accept column says yes)")
    corrections.add_argument("--out", help="file to write (default: runs/<study>/promotion/corrections.csv)")
    remedies = verb("remedies", cmd_remedies, "train the defaults once per background remedy and score each "
                    "(eval/gt.csv too): runs/<study>/remedies.json")
    remedies.add_argument("--seeds", type=int, default=1, help="seeds per remedy (default 1)")
    remedies.add_argument("--only", help="comma-separated remedies (default: all)")
    verb("report", cmd_report, "write runs/<study>/report.html, one self-contained file", with_storage)
    dash = verb("dashboard", cmd_dashboard, "serve optuna-dashboard on the study's storage", with_storage)
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    verb("sync", cmd_sync, "upload the study's W&B runs that did not reach the server (after `python -m wandb login`)")

    synth = verbs.add_parser("make-synthetic", help="write a synthetic dataset in the competition layout")
    synth.add_argument("dir", help="output folder (must not exist or be empty)")
    synth.add_argument("--people", type=int, default=120)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", default="384x512", help="image WIDTHxHEIGHT (default 384x512)")
    synth.set_defaults(run=cmd_make_synthetic)
    return parser


def storage_url(given: str | None) -> str | None:
    """--storage, else $HARNESS_STORAGE (a cluster's Secret mounts it there), else None (the study's SQLite file).
    A password in --storage is visible to every user of the node (`ps`): said, and left to the user to move."""
    if given is not None:
        from harness.runtime import redact

        if redact(given) != given:  # it hid a password: one is in the URL
            log.warning("--storage holds a password, which `ps` shows to every user of this machine: set PGPASSWORD "
                        "(or ~/.pgpass, or HARNESS_STORAGE) and leave it out of the command line")
        return given
    return os.environ.get("HARNESS_STORAGE") or None


def main(argv: list[str] | None = None) -> int:
    # A W&B service inherited from a parent process would hold this process's runs: a kill -9
    # here would then leave them open there. Each harness process owns its own service.
    os.environ.pop("WANDB_SERVICE", None)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if hasattr(args, "storage"):
            args.storage = storage_url(args.storage)
        return args.run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
