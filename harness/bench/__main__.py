"""`make bench`: every benchmark row, each a harness figure against a reference measured in the same run.

    python -m harness.bench [--only loader,trial] [--quick] [--out runs/bench] [--resume] [--study FILE]
                            [--seeds 33,44,55]

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
import time
from collections.abc import Callable
from pathlib import Path

from harness.bench.applicability import bench_applicability
from harness.bench.budget import bench_budget
from harness.bench.common import DEFAULT_STUDY, Bench, load_average, machine, print_rows
from harness.bench.ensemble import bench_ensemble
from harness.bench.estimate import bench_estimate
from harness.bench.faults import bench_faults
from harness.bench.loader import bench_loader
from harness.bench.machines import bench_machines, bench_store_cost
from harness.bench.outage import bench_tracking_outage
from harness.bench.own_data import bench_own_data
from harness.bench.prep import bench_prep
from harness.bench.promotion import bench_promotion
from harness.bench.real import bench_real
from harness.bench.report import bench_report
from harness.bench.shortcut import bench_remedies, bench_shortcut
from harness.bench.spread import bench_spread
from harness.bench.study import bench_search, bench_workers
from harness.bench.trial import bench_study_overhead, bench_trial
from harness.io import atomic_write_text

GROUPS: dict[str, Callable[[Bench], list[dict]]] = {
    "loader": bench_loader, "trial": bench_trial, "overhead": bench_study_overhead, "ensemble": bench_ensemble,
    "report": bench_report, "workers": bench_workers, "search": bench_search, "real": bench_real,
    "shortcut": bench_shortcut, "remedies": bench_remedies, "promotion": bench_promotion,
    "tracking": bench_tracking_outage, "applicability": bench_applicability, "spread": bench_spread,
    "own_data": bench_own_data, "machines": bench_machines, "estimate": bench_estimate, "budget": bench_budget,
    "faults": bench_faults, "store": bench_store_cost, "prep": bench_prep}


def write_bench_json(out: Path, report: dict) -> None:
    atomic_write_text(out / "bench.json", json.dumps(report, indent=2))


def earlier_report(out: Path, quick: bool) -> dict | None:
    """out/bench.json at the same size, to add the missing groups to; None when there is none.

    It may be an interrupted run, or a finished one that measured only some groups (--only).
    """
    path = out / "bench.json"
    if not path.is_file():
        print(f"--resume: no {path} yet; starting a fresh run")
        return None
    report = json.loads(path.read_text())
    if report.get("quick") != quick:
        print(f"--resume: {path} is of the other size; starting a fresh run")
        return None
    report.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))
    return report


def main(argv: list[str] | None = None) -> int:
    default_out = Path(os.environ.get("HARNESS_BENCH_OUT", "runs/bench"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {list(GROUPS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every row runs")
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"output folder (default {default_out}; env HARNESS_BENCH_OUT)")
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help=f"the study file (default {DEFAULT_STUDY})")
    parser.add_argument("--resume", action="store_true",
                        help="keep the groups OUT/bench.json already holds (a crashed run, or one of --only), run the rest")
    parser.add_argument("--seeds", help="comma-separated generator seeds for the groups that take them (budget); "
                        "each group names its own tuning and report seeds")
    args = parser.parse_args(argv)
    groups = args.only.split(",")
    for name in groups:
        if name not in GROUPS:
            parser.error(f"unknown group {name!r}; choose from {list(GROUPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = earlier_report(args.out, args.quick) if args.resume else None
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else None
    bench = Bench(quick=args.quick, out=args.out, study_file=args.study, notes=report["notes"] if report else [],
                  seeds=seeds)
    report = report or {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "quick": args.quick,
                        "load_average_start": load_average(), "complete": False, "group_seconds": {}, "rows": []}
    report["notes"] = bench.notes
    for name in groups:
        if name in report["group_seconds"]:
            print(f"group {name}: kept from the run of {report['when']}")
            continue
        started = time.perf_counter()
        report["rows"] += GROUPS[name](bench)
        report["group_seconds"][name] = round(time.perf_counter() - started, 1)
        report["load_average_end"] = load_average()
        write_bench_json(args.out, report)  # after every group: a late crash keeps what was measured
    report["complete"] = True
    write_bench_json(args.out, report)
    print_rows(report["rows"])
    for text in bench.notes:
        print(f"note: {text}")
    print(f"load average {report['load_average_start']} at the start, {report.get('load_average_end')} at the end "
          f"({os.cpu_count()} CPUs); wrote {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
