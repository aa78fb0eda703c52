"""Loader benchmark: the decoded-image cache against the per-item loader of the competition baseline.

Rows (every `ratio` is the harness's speed-up over the reference; the target is met when
ratio >= target):
  loader_images_per_s   CachedImageDataset over the memmap vs a Dataset that opens, converts and
                        resizes each file on every access; same DataLoader settings for both
                        (NUM_WORKERS = 2 worker processes).
  loader_images_per_s_in_process
                        the same two loaders with num_workers=0, the harness's CPU default
                        (train.num_workers: 0): batches are made in the training process, so
                        no float batch crosses a process boundary.
  cache_build_seconds   build_cache with JPEG draft decoding vs full decode then resize, each into
                        an emptied cache folder, with one decoding process per CPU.
Loader figures are the best of 5 full passes after a warm-up pass (the four loaders alternate),
build figures the best of 5 builds (1 of each with quick=True): the CPUs are shared, and the best
run is the least disturbed.

The images are this module's own: smooth random pictures with shapes, written as JPEG files
of the competition's size (384x512, W x H) under `out_dir/loader_data`, resized to 128x96 (H x W).

    python -m harness.bench --only loader [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from harness.bench.common import Bench, print_rows, row
from harness.data.cache import CachedImageDataset, build_cache, to_float_tensor
from harness.io import atomic_write_text

SOURCE_SIZE = (384, 512)  # (width, height) of the competition's images
TARGET_HEIGHT, TARGET_WIDTH = 128, 96
IMAGES_PER_PERSON = 7
BATCH_SIZE = 64
NUM_WORKERS = 2


class PerItemDataset(Dataset):
    """The competition baseline's loader: open, convert to RGB and resize the file on every access."""

    def __init__(self, paths: list[str], labels: np.ndarray, height: int, width: int) -> None:
        self.paths, self.labels, self.size = paths, labels, (width, height)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            resized = image.convert("RGB").resize(self.size, Image.Resampling.BILINEAR)
        return to_float_tensor(np.array(resized)), int(self.labels[index])


def bench_loader(bench: Bench) -> list[dict]:
    """The loader rows (100 persons' worth of images; 2 with --quick); details in `out/loader.json`."""
    return run_loader_bench(bench.out, people=2 if bench.quick else 100, quick=bench.quick)["rows"]


def run_loader_bench(out_dir: Path, people: int = 100, quick: bool = False) -> dict:
    """Measure the loader rows, write `out_dir/loader.json` atomically, print a table, return the dict."""
    out_dir = Path(out_dir)
    people = min(people, 2) if quick else people
    paths = write_source_images(out_dir / "loader_data", people * IMAGES_PER_PERSON)
    labels = np.arange(len(paths), dtype=np.int64) % 18

    repeats = 1 if quick else 5  # the best of a few runs: the CPUs are shared with other work
    draft_seconds, draft_cache = timed_fresh_build(paths, out_dir / "loader_cache_draft", True, repeats)
    full_seconds, full_cache = timed_fresh_build(paths, out_dir / "loader_cache_full", False, repeats)
    draft_difference = float(np.abs(draft_cache.images.astype(np.int16) - full_cache.images).mean())

    rows = np.array([draft_cache.row_of(path) for path in paths])
    cached = CachedImageDataset(draft_cache.images, rows, labels)
    per_item = PerItemDataset(paths, labels, TARGET_HEIGHT, TARGET_WIDTH)
    loaders = [make_loader(cached, NUM_WORKERS), make_loader(per_item, NUM_WORKERS), make_loader(cached, 0),
               make_loader(per_item, 0)]
    cached_rate, per_item_rate, cached_in_process_rate, per_item_in_process_rate = images_per_second(loaders, repeats)

    result = {
        "rows": [
            row("loader_images_per_s", cached_rate, per_item_rate, "images/s", 10.0),
            row("loader_images_per_s_in_process", cached_in_process_rate, per_item_in_process_rate, "images/s", 10.0),
            # a cost: the ratio is how many times faster the draft build is
            row("cache_build_seconds", draft_seconds, full_seconds, "s", 2.0, ratio=full_seconds / draft_seconds),
        ],
        "images": len(paths),
        "source_size_wh": list(SOURCE_SIZE),
        "target_size_hw": [TARGET_HEIGHT, TARGET_WIDTH],
        "batch_size": BATCH_SIZE,
        "num_workers": NUM_WORKERS,
        "cpu_count": os.cpu_count(),
        "repeats": repeats,  # each figure is the best of this many timed runs
        "draft_vs_full_mean_abs_diff": draft_difference,  # grey levels, 0..255
        # also the harness figure of the loader_images_per_s_in_process row (kept for readers of this key)
        "cache_loader_in_process_images_per_s": round(cached_in_process_rate, 1),
        "quick": quick,
    }
    atomic_write_text(out_dir / "loader.json", json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def write_source_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` smooth random JPEGs of SOURCE_SIZE (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        picture = random_picture(rng)  # drawn even when the file exists, so the sequence stays the same
        if not path.exists():
            temporary = folder / f".{path.name}.tmp-{os.getpid()}"
            picture.save(temporary, format="JPEG", quality=90)
            os.replace(temporary, path)
        paths.append(str(path))
    return paths


def random_picture(rng: np.random.Generator) -> Image.Image:
    """Upscaled colour noise (smooth like a photo background) with a few filled shapes on top."""
    width, height = SOURCE_SIZE
    noise = rng.integers(0, 256, size=(height // 32, width // 32, 3), dtype=np.uint8)
    picture = Image.fromarray(noise).resize(SOURCE_SIZE, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(picture)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(30, 160)), y0 + int(rng.integers(30, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return picture


def timed_fresh_build(paths: list[str], cache_dir: Path, draft: bool, repeats: int):
    """Fewest seconds to build the cache into an emptied `cache_dir` over `repeats` builds, and the cache."""
    best = float("inf")
    for _ in range(repeats):
        shutil.rmtree(cache_dir, ignore_errors=True)
        start = time.perf_counter()
        cache = build_cache(paths, TARGET_HEIGHT, TARGET_WIDTH, cache_dir, draft=draft, progress=False)
        best = min(best, time.perf_counter() - start)
    return best, cache


def make_loader(dataset: Dataset, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def images_per_second(loaders: list[DataLoader], repeats: int) -> list[float]:
    """Best throughput of each loader over `repeats` full passes, after an untimed warm-up pass.

    The passes alternate between the loaders, so a burst of load from elsewhere hits all alike.
    The warm-up pass (not just a batch) keeps worker start-up and the prefetch queue out of the
    timed passes; the workers persist, as they do across a trial's epochs.
    """
    # One intra-op thread here, as DataLoader workers have: on a busy machine with few cores, torch's
    # OpenMP threads in this process spin against each other and slowed the in-process loader 3-50x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for loader in loaders:
            for _ in loader:
                pass
        best = [0.0] * len(loaders)
        for _ in range(repeats):
            for which, loader in enumerate(loaders):
                start, seen = time.perf_counter(), 0
                for images, _labels in loader:
                    seen += len(images)
                best[which] = max(best[which], seen / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return best


def print_table(result: dict) -> None:
    print(
        f"loader benchmark: {result['images']} images {result['source_size_wh'][0]}x{result['source_size_wh'][1]}"
        f" -> {result['target_size_hw'][1]}x{result['target_size_hw'][0]} (W x H), batch {result['batch_size']},"
        f" {result['num_workers']} workers (0 for the in-process row), {result['cpu_count']} CPUs"
    )
    print_rows(result["rows"])
    print(f"draft vs full decode: mean absolute difference {result['draft_vs_full_mean_abs_diff']:.3f} grey levels")

