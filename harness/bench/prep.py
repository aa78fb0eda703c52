"""`make bench` group "prep": the default study's data preparation at the competition's size.

The default study's synthetic data made with 120, 540 and 2,700 persons (the competition's 2,700 x 7
images; --quick: 24 and 48), each prepared from nothing in a process of its own, step by step as a study
does it: the photos written, decoded into the cache, faces and person masks found, the context audit fitted (on a
sample of whole persons beyond shortcuts.audit_images).
Each step's seconds per train image and the peak memory (the process, and the largest of its workers) go in
the row.

  prep_seconds_per_image   harness = seconds per train image of the whole preparation at the largest size,
                           reference = the same at the smallest size; ratio = harness / reference, met at <= 1.2
  prep_audit_sample_verdicts
                           at the largest size, where the audit reads a sample of whole persons
                           (shortcuts.audit_images): harness = view/task pairs whose verdict (flagged or
                           not) is the one the audit of every image gives, reference = the pairs; met at >= 1.0
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness.bench.common import Bench, row

SIZES = (120, 540, 2700)
QUICK_SIZES = (24, 48)
SCALING_TARGET = 1.2


def bench_prep(bench: Bench) -> list[dict]:
    root = bench.out / "prep"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    measured = {}
    sizes = QUICK_SIZES if bench.quick else SIZES
    for people in sizes:
        compare = ["--compare-audit"] if people == max(sizes) else []
        done = subprocess.run([sys.executable, "-m", "harness.bench.prep", str(bench.study_file), str(people),
                               str(root / f"people-{people}"), *compare], capture_output=True, text=True,
                              timeout=4 * 3600)
        if done.returncode:
            raise RuntimeError(f"preparing {people} persons failed: {done.stderr[-3000:]}")
        measured[people] = json.loads(done.stdout.strip().splitlines()[-1])
    smallest, largest = measured[min(measured)], measured[max(measured)]
    result = row("prep_seconds_per_image", largest["seconds_per_image"], smallest["seconds_per_image"],
                 f"seconds per train image, {max(measured)} persons against {min(measured)}", SCALING_TARGET,
                 better="lower")
    result["sizes"] = measured
    same, pairs = largest["audit_same_verdicts"], largest["audit_pairs"]
    verdicts = row("prep_audit_sample_verdicts", same, pairs, "view/task verdicts the same as on every image",
                   1.0)
    verdicts.update(sampled=largest["audit_sampled"], sample_seconds=largest["seconds"]["context audit"],
                    every_image_seconds=largest["audit_every_image_seconds"])
    return [result, verdicts]


def prepare(study_file: Path, people: int, folder: Path, compare_audit: bool = False) -> dict:
    """Prepare the study's data at `people` persons under `folder`, timing each step as a study runs it; with
    `compare_audit`, the audit of every image too (not counted), and whether its verdicts are the study's."""
    from harness.applicability import prepare_foreground
    from harness.config import load_study
    from harness.context_audit import shortcut_record
    from harness.data.cache import build_cache
    from harness.data.prepare import ensure_dataset, prepare_data, read_checked

    cfg = load_study(study_file).replace({"data.root": str(folder / "data"), "data.cache_dir": str(folder / "cache"),
                                          "data.synthetic.people": people})
    data = cfg.data
    seconds = {}
    started = time.perf_counter()
    ensure_dataset(data)
    seconds["generate"] = time.perf_counter() - started
    started = time.perf_counter()
    frame = read_checked(data).frame
    cache = build_cache(list(frame["path"]), data.image_size.height, data.image_size.width, Path(data.cache_dir),
                        resize=data.resize, workers=data.cache_workers, on_bad_image=data.on_bad_image,
                        progress=False)
    seconds["index and decode"] = time.perf_counter() - started
    started = time.perf_counter()
    prepare_foreground(cfg, cache)
    seconds["faces and masks"] = time.perf_counter() - started
    prepared = prepare_data(cfg, progress=False)  # everything above read back from the cache, as a study does
    started = time.perf_counter()
    audit = shortcut_record(cfg, prepared)["audit"]
    seconds["context audit"] = time.perf_counter() - started
    images = len(frame)
    compared = compare_audits(cfg, prepared, audit) if compare_audit else {}
    return {"persons": people, "images": images, "seconds": {k: round(v, 2) for k, v in seconds.items()}, **compared,
            "seconds_per_image": round(sum(seconds.values()) / images, 5),
            "step_seconds_per_image": {k: round(v / images, 5) for k, v in seconds.items()},
            "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_worker_memory_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def compare_audits(cfg, prepared, audit: list[dict]) -> dict:
    """The audit of every image beside the study's (a sample where it has more than shortcuts.audit_images)."""
    from harness.context_audit import as_records, audit_views, study_methods

    started = time.perf_counter()
    every = as_records(audit_views(prepared.cache.images, prepared.frame, prepared.foreground, study_methods(cfg),
                                   cfg.shortcuts.audit_folds, cfg.shortcuts.audit_permutations, seed=cfg.seed))
    verdict = [(row["view"], row["task"], row["flagged"]) for row in audit]
    return {"audit_every_image_seconds": round(time.perf_counter() - started, 2),
            "audit_sampled": audit[0]["sampled"] or "every image", "audit_pairs": len(verdict),
            "audit_same_verdicts": sum(a == (b["view"], b["task"], b["flagged"]) for a, b in zip(verdict, every,
                                                                                             strict=True)),
            "audit_flagged": sum(flag for _, _, flag in verdict)}


if __name__ == "__main__":
    print(json.dumps(prepare(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]),
                             compare_audit="--compare-audit" in sys.argv[4:])))
