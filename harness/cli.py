"""The user verbs: `harness <verb> STUDY.yaml ...` (the Makefile wraps them)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import yaml

from harness.config import ConfigError, Params, load_study
from harness.data.cache import ImageDecodeError
from harness.data.readers import DataError
from harness.study import StudyError

log = logging.getLogger("harness")

# errors that carry a message for the user: printed without a traceback
USER_ERRORS = (ConfigError, DataError, ImageDecodeError, FileExistsError, StudyError)


def parse_overrides(items: list[str]) -> dict:
    """`--set train.epochs=2 lr=0.01` -> {"train.epochs": 2, "params.lr": 0.01}; values are YAML."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=0.01 or --set train.epochs=2")
        if key in Params.model_fields:
            key = f"params.{key}"  # bare param names: lr=0.01 means params.lr
        overrides[key] = yaml.safe_load(value)
    return overrides


def cmd_check_data(args: argparse.Namespace) -> int:
    from harness.data.check import check_data

    report, ok = check_data(load_study(args.study, smoke=args.smoke), progress=not args.quiet)
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
    from harness.train import run_trial

    overrides = parse_overrides(args.set)
    cfg = load_study(args.study, smoke=args.smoke, overrides=overrides)
    result = run_trial(cfg)
    print(f"{result.run_dir}: {result.summary()}")
    return 0 if result.state == "complete" else 1


def print_top(cfg, frame, limit: int = 5) -> None:
    """The best trials, and where their W&B runs and files are."""
    if frame.empty:
        print("no trials yet")
        return
    columns = ["number", "state", "val_f1", "gap_f1", "gap_bg", "best_epoch", "epochs", "duration_s"]
    params = [c for c in frame.columns if c.startswith("param_")]
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4f}".format):
        print(frame[columns + params].head(limit).to_string(index=False))
    best = frame.iloc[0]
    print(f"\nbest trial {best['number']}: files in {best['run_dir']}, W&B run {best['wandb_run_id']} "
          f"(offline under {cfg.study_dir / 'wandb'}; `make sync` uploads)")


def cmd_study(args: argparse.Namespace) -> int:
    from harness.study import run_study, run_workers, status

    cfg = load_study(args.study, smoke=args.smoke, overrides=parse_overrides(args.set))
    # W&B keeps staged tables and its logs outside the run folders unless told; keep them in the study's
    os.environ.setdefault("WANDB_DATA_DIR", str(cfg.study_dir / "wandb" / "data"))
    os.environ.setdefault("WANDB_CACHE_DIR", str(cfg.study_dir / "wandb" / "cache"))
    if args.workers > 1:
        run_workers(cfg, args.workers, trials=args.trials, timeout=args.timeout, storage=args.storage)
    else:
        run_study(cfg, trials=args.trials, timeout=args.timeout, storage=args.storage)
    frame = status(cfg, args.storage)
    print(f"\nstudy {cfg.name!r}: {len(frame)} trial(s); table in {cfg.study_dir / 'trials.csv'}")
    print_top(cfg, frame)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from harness.study import status

    cfg = load_study(args.study, smoke=args.smoke)
    frame = status(cfg, args.storage)
    columns = [c for c in frame.columns if c not in ("run_dir", "wandb_run_id", "attempt")]
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.4f}".format):
        print(frame[columns].to_string(index=False) if not frame.empty else "no trials yet")
    print(f"\nwritten to {cfg.study_dir / 'trials.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser("check-data", help="count persons, images and classes; list every data problem")
    check.add_argument("study", help="study file (YAML)")
    check.add_argument("--smoke", action="store_true", help="apply the study's smoke variant")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(run=cmd_check_data)

    train = verbs.add_parser("train", help="run one trial with the study's defaults plus --set overrides")
    train.add_argument("study", help="study file (YAML)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param (lr=0.01) or any setting (train.epochs=2); repeatable")
    train.add_argument("--smoke", action="store_true", help="apply the study's smoke variant")
    train.set_defaults(run=cmd_train)

    study = verbs.add_parser("study", help="create or resume the study and run trials until the target is met")
    study.add_argument("study", help="study file (YAML)")
    study.add_argument("--trials", type=int, help="target number of finished trials (raises the file's)")
    study.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    study.add_argument("--storage", help="Optuna RDB URL (default: sqlite:///runs/<study>/study.db)")
    study.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    study.add_argument("--smoke", action="store_true", help="apply the study's smoke variant")
    study.set_defaults(run=cmd_study)

    stat = verbs.add_parser("status", help="table of trials sorted by val F1 (also runs/<study>/trials.csv)")
    stat.add_argument("study", help="study file (YAML)")
    stat.add_argument("--storage", help="Optuna RDB URL (default: sqlite:///runs/<study>/study.db)")
    stat.add_argument("--smoke", action="store_true", help="apply the study's smoke variant")
    stat.set_defaults(run=cmd_status)

    synth = verbs.add_parser("make-synthetic", help="write a synthetic dataset in the competition layout")
    synth.add_argument("dir", help="output folder (must not exist or be empty)")
    synth.add_argument("--people", type=int, default=120)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", default="384x512", help="image WIDTHxHEIGHT (default 384x512)")
    synth.set_defaults(run=cmd_make_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
