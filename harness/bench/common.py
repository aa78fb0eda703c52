"""What every bench group shares: the run's settings, the row format, the default study at bench size."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.config import StudyConfig, load_study

DEFAULT_STUDY = Path("studies/default.yaml")  # relative to the working folder, as every verb's study file is


@dataclass
class Bench:
    """One `make bench` run: its size, output folder and study file; `notes` collects what a group skipped."""

    quick: bool
    out: Path
    study_file: Path = DEFAULT_STUDY
    notes: list[str] = field(default_factory=list)
    seeds: list[int] | None = None  # --seeds: generator seeds for the groups that take them (their own defaults else)

    def default_study(self, overrides: dict[str, Any] | None = None, smoke: bool | None = None) -> StudyConfig:
        """The study file at its real size, or its smoke variant (`quick`) with the data and cache under `out`."""
        smoke = self.quick if smoke is None else smoke
        cfg = load_study(self.study_file, smoke=smoke)
        if smoke:  # tiny synthetic data of the bench's own, so a quick run writes nothing outside `out`
            cfg = cfg.replace({"data.root": str(self.out / "smoke-data" / "default"),
                               "data.cache_dir": str(self.out / "smoke-data" / "cache")})
        return cfg.replace(overrides or {})


def row(name: str, harness: float, reference: float, unit: str, target: float, better: str = "higher",
        ratio: float | None = None, constant: str | None = None) -> dict:
    """One bench row: `ratio` (harness / reference unless given) is met at >= target, or <= for better="lower".
    `constant` says what a reference that is a fixed number (not measured in this run) stands for; the row
    then carries it as `reference_is`."""
    ratio = harness / reference if ratio is None else ratio
    met = ratio >= target if better == "higher" else ratio <= target
    result = {"name": name, "harness": round(harness, 4), "reference": round(reference, 4), "ratio": round(ratio, 3),
              "unit": unit, "target": target, "better": better, "met": bool(met)}
    if constant:
        result["reference_is"] = f"a constant, not measured: {constant}"
    return result


def unmeasured(name: str, unit: str, target: float, better: str, why: str, **details: Any) -> dict:
    """A row a machine could not measure: no figures, not met, and the reason."""
    return {"name": name, "harness": None, "reference": None, "ratio": None, "unit": unit, "target": target,
            "better": better, "met": False, **details, "note": f"not measured: {why}"}


def print_rows(rows: list[dict]) -> None:
    print(f"{'row':36} {'harness':>12} {'reference':>12} {'ratio':>8} {'target':>10}  met")
    for r in rows:
        sign = ">=" if r["better"] == "higher" else "<="
        figures = [f"{r[key]:>12.4g}" if r[key] is not None else f"{'-':>12}" for key in ("harness", "reference")]
        ratio = f"{r['ratio']:>8.3f}" if r["ratio"] is not None else f"{'-':>8}"
        print(f"{r['name']:36} {figures[0]} {figures[1]} {ratio} {sign + str(r['target']):>10}  "
              f"{'yes' if r['met'] else 'NO'}" + (f"  ({r['note']})" if r.get("note") else ""))


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the shared CPUs were (figures are noisy above ~cpus)."""
    return [round(value, 2) for value in os.getloadavg()]
