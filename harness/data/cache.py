"""Decoded-image cache: every image decoded and resized once, shared by all trials.

`build_cache` decodes each file once to (height, width) RGB uint8 and stores the stack as one
memory-mapped `.npy` file under `cache_dir`.  Trials and DataLoader workers map that file
read-only, so the operating system's page cache holds the pixels once for everyone; nothing is
decoded again per epoch, per worker or per trial.

Files in `cache_dir`:
    <key>.npy            (N, H, W, 3) uint8, the decoded images in `paths` order
    <key>.json           paths, excluded images, shape: the commit marker, written last
    <key>.*.tmp-<pid>    a build in progress (or a crashed one's, removed by the next build)

The key is a sha256 over the ordered file list with each file's size and mtime_ns, the target
size, the resize method, the draft flag and FORMAT_VERSION: touching, replacing, adding or
reordering a file gives a new key and a rebuild; anything else reuses the existing file.

Decoding: PIL, `convert("RGB")` (alpha dropped, palette/grey expanded).  EXIF orientation is
not applied: the competition images are stored upright and carry no rotation tag, and the
per-item baseline loader did not apply it either.  With `draft=True` JPEGs are decoded by
libjpeg at 1/2, 1/4 or 1/8 scale (see `draft_request`: exactly the target size when a reduction
lands on it, else at least twice the target) and then resized to the exact size.  The result has
the shape of a full decode and differs from it by under one grey level on average on real
photos.  When the reduced decode already has the target size (512x384 -> 128x96 is exactly 1/4)
no resize runs, so `resize` makes no difference there.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from tqdm import tqdm

from harness.io import atomic_write_text, writer_gone

__all__ = [
    "FORMAT_VERSION",
    "CachedImageDataset",
    "DecodedCache",
    "ImageDecodeError",
    "build_cache",
    "cache_key",
    "decode_image",
    "draft_request",
    "to_float_tensor",
]

# Bump when the decoding or the file layout changes, so old caches are not reused.
FORMAT_VERSION = 1

ResizeMethod = Literal["area", "bilinear"]
BadImagePolicy = Literal["fail", "exclude"]

# "area" is PIL's BOX filter: each output pixel is the area-weighted mean of the source pixels it
# covers (what cv2.INTER_AREA does), the least aliasing for downscaling.
RESAMPLE = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; names the file and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot decode image {path}: {reason}. Replace or delete the file, or set "
            f"`data.on_bad_image: exclude` in the study file to leave unreadable images out of the cache"
        )

    def __reduce__(self):  # survives pickling (errors cross process boundaries in studies)
        return type(self), (self.path, self.reason)


# ----------------------------------------------------------------------------- decoding


def decode_image(path: str, height: int, width: int, resize: ResizeMethod = "area", draft: bool = True) -> np.ndarray:
    """Decode one image file to an RGB uint8 array of shape (height, width, 3).

    Raises ImageDecodeError for a missing, empty, truncated or otherwise unreadable file.
    """
    size = _file_size(path)
    if size < 0:
        raise ImageDecodeError(path, "file not found")
    if size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    # PIL decodes a truncated file without complaint when this global is True (someone may have
    # set it); we want the error, so force False for the duration of the decode.
    allow_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            if draft:
                image.draft("RGB", draft_request(image.size, height, width))  # a no-op except for JPEG
            rgb = image.convert("RGB")  # convert() loads, so truncation raises here
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), RESAMPLE[resize])
        return np.asarray(rgb)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageDecodeError(path, f"{type(error).__name__}: {error}") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated


def draft_request(source_size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """The (width, height) to ask libjpeg's reduced decode (1/2, 1/4, 1/8) for.

    When a reduction lands exactly on the target (512x384 -> 128x96 is 1/4) the decode is the whole
    resize.  Otherwise keep at least twice the target, as Pillow's thumbnail() does (reducing_gap):
    an area resize by a factor between 1 and 2 after the reduced decode barely averages and gave
    2-5 grey levels mean difference from a full decode on real photos, against < 1 with the margin.
    """
    source_width, source_height = source_size
    factor = source_width // width
    if factor in (2, 4, 8) and (source_width, source_height) == (width * factor, height * factor):
        return width, height
    return 2 * width, 2 * height


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


# ----------------------------------------------------------------------------- the cache


@dataclass
class DecodedCache:
    """The decoded images of one build: `images[row_of(path)]` is that file's pixels."""

    images: np.memmap  # (N, H, W, 3) uint8, read-only
    paths: list[str]
    key: str
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    built: bool = False  # True when this call decoded the images, False when it reused a cache
    _rows: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._rows = {path: row for row, path in enumerate(self.paths)}

    def row_of(self, path: str) -> int:
        try:
            return self._rows[path]
        except KeyError:
            reasons = dict(self.excluded)
            if path in reasons:
                raise KeyError(f"{path} was excluded from cache {self.key[:12]}: {reasons[path]}") from None
            raise KeyError(f"{path} is not in cache {self.key[:12]} (built from {len(self.paths)} files)") from None

    def __len__(self) -> int:
        return len(self.paths)


def cache_key(paths: list[str], height: int, width: int, resize: ResizeMethod, draft: bool) -> str:
    """sha256 over everything that decides the cache content (see the module docstring)."""
    files = []
    for path in paths:
        try:
            stat = os.stat(path)
            files.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([path, -1, 0])  # missing now; decoding will report it
    content = {"version": FORMAT_VERSION, "height": height, "width": width, "resize": resize, "draft": draft}
    content["files"] = files
    return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()


def build_cache(
    paths: list[str],
    height: int,
    width: int,
    cache_dir: Path,
    resize: ResizeMethod = "area",
    workers: int = 0,
    on_bad_image: BadImagePolicy = "fail",
    draft: bool = True,
    progress: bool = True,
) -> DecodedCache:
    """Decode `paths` once into `cache_dir/<key>.npy`, or reuse it when the key is unchanged.

    workers: decoding processes, 0 = one per CPU core, 1 = in this process.
    on_bad_image: "fail" raises ImageDecodeError at the first unreadable file and leaves no cache;
        "exclude" leaves unreadable files out (`excluded` lists them with the reason).
    """
    paths = [str(path) for path in paths]
    _check_arguments(paths, height, width, resize, on_bad_image)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, height, width, resize, draft)
    cache = _load_committed(cache_dir, key, (height, width))
    if cache is None:
        _remove_stale_temporaries(cache_dir)
        cache = _build(paths, height, width, cache_dir, key, resize, workers, on_bad_image, draft, progress)
    if on_bad_image == "fail" and cache.excluded:
        # A cache built with "exclude" is reused, but a "fail" caller still gets its error.
        raise ImageDecodeError(*cache.excluded[0])
    return cache


def _check_arguments(paths: list[str], height: int, width: int, resize: str, on_bad_image: str) -> None:
    if not paths:
        raise ValueError("build_cache got no image paths; check the data index (data.root in the study file)")
    if height < 1 or width < 1:
        raise ValueError(f"cache image size must be positive, got height={height} width={width}")
    if resize not in RESAMPLE:
        raise ValueError(f"unknown resize method {resize!r}; choose one of {sorted(RESAMPLE)}")
    if on_bad_image not in ("fail", "exclude"):
        raise ValueError(f"unknown on_bad_image {on_bad_image!r}; choose 'fail' or 'exclude'")
    if len(set(paths)) != len(paths):
        seen: set[str] = set()
        duplicates = sorted({path for path in paths if path in seen or seen.add(path)})
        raise ValueError(
            f"build_cache got {len(duplicates)} duplicate paths, e.g. {duplicates[:3]}; pass each file once"
        )


def _load_committed(cache_dir: Path, key: str, size: tuple[int, int]) -> DecodedCache | None:
    """The committed cache for `key`, or None when it is missing, half-written or inconsistent."""
    npy, marker = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    try:
        meta = json.loads(marker.read_text())
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    shape = (len(meta.get("paths", [])), *size, 3)
    if meta.get("key") != key or tuple(meta.get("shape", ())) != shape or images.shape != shape:
        return None
    if images.dtype != np.uint8:
        return None
    excluded = [(path, reason) for path, reason in meta.get("excluded", [])]
    return DecodedCache(images, list(meta["paths"]), key, excluded, built=False)


def _remove_stale_temporaries(cache_dir: Path) -> None:
    """Delete temporaries left by builds whose process is gone (a crash or a kill)."""
    for temporary in cache_dir.glob("*.tmp-*"):
        pid_text = temporary.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid_text.isdigit() and not writer_gone(pid_text):
            continue  # another process is building right now; leave its file alone
        temporary.unlink(missing_ok=True)


def _build(
    paths: list[str],
    height: int,
    width: int,
    cache_dir: Path,
    key: str,
    resize: ResizeMethod,
    workers: int,
    on_bad_image: BadImagePolicy,
    draft: bool,
    progress: bool,
) -> DecodedCache:
    temporary = cache_dir / f"{key}.npy.tmp-{os.getpid()}"
    compacted = cache_dir / f"{key}.npy.tmp-{os.getpid()}-compact"
    try:
        _create_array_file(temporary, (len(paths), height, width, 3))
        failures = _decode_all(paths, temporary, (height, width, resize, draft), workers, on_bad_image, progress)
        excluded = [(paths[index], reason) for index, reason in sorted(failures.items())]
        good = [path for index, path in enumerate(paths) if index not in failures]
        if not good:
            first_path, first_reason = excluded[0]
            raise ValueError(f"none of the {len(paths)} images could be decoded; first: {first_path}: {first_reason}")
        if failures:
            _copy_rows(temporary, compacted, [index for index in range(len(paths)) if index not in failures])
            os.replace(compacted, temporary)
        _fsync(temporary)
        npy = cache_dir / f"{key}.npy"
        os.replace(temporary, npy)
        meta = {
            "key": key,
            "format_version": FORMAT_VERSION,
            "shape": [len(good), height, width, 3],
            "dtype": "uint8",
            "resize": resize,
            "draft": draft,
            "paths": good,
            "excluded": excluded,
        }
        _write_json(cache_dir / f"{key}.json", meta)  # the commit marker, always last
    finally:
        temporary.unlink(missing_ok=True)
        compacted.unlink(missing_ok=True)
    return DecodedCache(np.load(npy, mmap_mode="r"), good, key, excluded, built=True)


def _create_array_file(path: Path, shape: tuple[int, ...]) -> None:
    """An .npy file of zeros with its disk space reserved up front.

    Without the reservation a full disk shows up as SIGBUS in a decoder writing to the mapping.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    size = array.offset + array.nbytes
    del array  # the decoders map the file themselves
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot reserve {size / 2**20:.0f} MiB for the image cache {path} ({error.strerror}); "
            f"free disk space or point data.cache_dir at a larger disk",
        ) from error
    finally:
        os.close(descriptor)


def _decode_all(
    paths: list[str], temporary: Path, recipe: tuple, workers: int, on_bad_image: BadImagePolicy, progress: bool
) -> dict[int, str]:
    """Decode every path into its row of `temporary`; returns {index: reason} of failures."""
    workers = workers or os.cpu_count() or 1
    chunk = max(1, min(64, math.ceil(len(paths) / (workers * 4))))
    tasks = [(start, paths[start : start + chunk]) for start in range(0, len(paths), chunk)]
    failures: dict[int, str] = {}
    bar = tqdm(total=len(paths), desc="decoding images", unit="img", disable=not progress or not sys.stderr.isatty())
    with bar:
        if workers == 1 or len(tasks) == 1:
            _open_target(str(temporary), recipe)
            try:
                _consume(map(_decode_chunk, tasks), paths, failures, on_bad_image, bar)
            finally:
                _close_target()
        else:
            _decode_in_processes(
                tasks, min(workers, len(tasks)), (str(temporary), recipe), paths, failures, on_bad_image, bar
            )
    return failures


def _decode_in_processes(
    tasks: list,
    processes: int,
    target: tuple,
    paths: list[str],
    failures: dict[int, str],
    on_bad_image: BadImagePolicy,
    bar: tqdm,
) -> None:
    # A process pool that reports a dead worker (out of memory, a crash inside an image library)
    # instead of waiting forever for its lost task, as multiprocessing.Pool would.
    context = multiprocessing.get_context()
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_open_target, initargs=target) as executor:
        futures = [executor.submit(_decode_chunk, task) for task in tasks]
        try:
            _consume((future.result() for future in as_completed(futures)), paths, failures, on_bad_image, bar)
        except BrokenProcessPool as error:
            raise RuntimeError(
                f"an image decoding process died (out of memory, or a crash inside the image library) while "
                f"building the cache in {Path(target[0]).parent}; build with workers=1 to find the file"
            ) from error
        finally:
            executor.shutdown(wait=True, cancel_futures=True)  # on an error: drop the chunks not started


def _consume(results, paths: list[str], failures: dict[int, str], on_bad_image: BadImagePolicy, bar: tqdm) -> None:
    for count, chunk_failures in results:
        for index, reason in chunk_failures:
            if on_bad_image == "fail":
                raise ImageDecodeError(paths[index], reason)
            failures[index] = reason
        bar.update(count)


# Per-process state of a decoding worker: the temporary cache file mapped writable, and the recipe.
_TARGET: np.memmap | None = None
_RECIPE: tuple = ()


def _open_target(temporary: str, recipe: tuple) -> None:
    global _TARGET, _RECIPE
    _TARGET = np.lib.format.open_memmap(temporary, mode="r+")
    _RECIPE = recipe


def _close_target() -> None:
    global _TARGET
    _TARGET = None  # unmaps the file in this process


def _decode_chunk(task: tuple[int, list[str]]) -> tuple[int, list[tuple[int, str]]]:
    """Decode a run of consecutive paths straight into their rows of the shared memmap."""
    start, chunk_paths = task
    height, width, resize, draft = _RECIPE
    failures = []
    for offset, path in enumerate(chunk_paths):
        try:
            _TARGET[start + offset] = decode_image(path, height, width, resize, draft)
        except ImageDecodeError as error:
            failures.append((start + offset, error.reason))
    return len(chunk_paths), failures


def _copy_rows(source: Path, destination: Path, rows: list[int]) -> None:
    """Write only `rows` of `source` to a new .npy file (drops the rows of excluded images)."""
    images = np.load(source, mmap_mode="r")
    kept = np.lib.format.open_memmap(destination, mode="w+", dtype=np.uint8, shape=(len(rows), *images.shape[1:]))
    for start in range(0, len(rows), 1024):
        kept[start : start + 1024] = images[rows[start : start + 1024]]
    kept.flush()
    del kept


def _fsync(path: Path) -> None:
    """Flush the decoders' writes to disk before the file is committed under its final name."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def to_float_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [0, 1], no normalisation (the default transform).

    The result is a CHW view of HWC memory; stacking it into a batch makes the batch contiguous.
    """
    return torch.from_numpy(image).float().div_(255).permute(2, 0, 1)


class CachedImageDataset(Dataset):
    """Items `(transform(images[rows[i]]), labels[i])` read from the decoded cache.

    Pickling (spawn/forkserver DataLoader workers) never copies the pixels of a cache memmap: only
    its file name travels, and each process maps the file read-only on first access.
    """

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        prepare: Callable[[np.ndarray, int, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        rows, labels = np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        if rows.shape != labels.shape or rows.ndim != 1:
            raise ValueError(f"rows and labels must be 1-d and of equal length, got {rows.shape} and {labels.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise ValueError(f"rows must index the {len(images)} cached images, got range {rows.min()}..{rows.max()}")
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        self._images: np.ndarray | None = images
        self._file = _whole_npy_file(images)
        self.rows, self.labels = rows, labels
        self.transform = transform if transform is not None else to_float_tensor
        # before the transform: prepare(image, cache row, the transform's random stream) -> image
        self.prepare = prepare

    @property
    def images(self) -> np.ndarray:
        if self._images is None:  # first access in a process that received us pickled
            self._images = np.load(self._file, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = np.array(self.images[self.rows[index]])  # a writable copy of one image for the transform
        if self.prepare is not None:
            image = self.prepare(image, int(self.rows[index]), self.transform.stream())
        return self.transform(image), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (DataLoader calls this when present): one gather from the memmap,
        and for the default transform one vectorised conversion instead of one per image."""
        if self.prepare is not None:
            return [self[index] for index in indices]
        images = self.images[self.rows[indices]]  # fancy indexing copies just these rows
        labels = self.labels[indices].tolist()
        if self.transform is not to_float_tensor:
            return [(self.transform(image), label) for image, label in zip(images, labels, strict=True)]
        # Items stay views in HWC memory order, as to_float_tensor's are: collate's stack into the batch
        # tensor does the transposing copy, instead of two more passes over the batch here.
        batch = torch.from_numpy(images).float().div_(255).permute(0, 3, 1, 2)
        return list(zip(batch.unbind(0), labels, strict=True))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._file is not None:
            state["_images"] = None  # reopened lazily from self._file: no pixels in the pickle
        return state


def _whole_npy_file(images: np.ndarray) -> str | None:
    """The .npy file when `images` is that whole file mapped (so it can be reopened), else None."""
    filename = getattr(images, "filename", None)
    if not isinstance(images, np.memmap) or filename is None or not images.flags.c_contiguous:
        return None
    try:
        on_disk = np.load(filename, mmap_mode="r")  # reads the header and maps, copies nothing
    except (OSError, ValueError):
        return None
    if on_disk.shape != images.shape or on_disk.dtype != images.dtype:
        return None  # a slice or a raw memmap: pickle it the ordinary way
    return filename


def _write_json(path: Path, content: dict) -> None:
    atomic_write_text(path, json.dumps(content))
