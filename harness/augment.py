"""Augmentation and preprocessing of decoded uint8 images.

Augmentation: one scalar, strength s in [0, 1], scales every random step together, so a
study searches one number instead of a dozen (`build_transform`). s = 0 (or evaluation)
is resize + ImageNet normalisation only. Nothing ever flips an image upside down: the
photos are upright faces, and an upside-down face is not a sample of this task.

Preprocessing: a crop box per image (`PREPROCESSORS`: none, center_crop, face_crop),
computed once per decoded cache and stored next to it (`cached_crop_boxes`), not per
epoch, then applied with `apply_crops`. face_crop finds the face with OpenCV's bundled
Haar cascade (`detect_face`) and falls back to the centre crop where it finds none.
Cropping to the face keeps the model off the background, which similar people share and
which a model otherwise learns instead of the face.

Reproducibility: a transform draws every random number from one stream of its own,
started from its seed (`build_transform(..., seed=)`, `Transform.reseed(seed)`; the
train loop reseeds once per epoch). Albumentations 2 does not reseed DataLoader workers,
so the transform does: on its first image inside a worker it restarts its stream from
(seed, torch's worker seed). torch derives the worker seed from the loader's generator
(base_seed + worker_id), so a seeded generator reproduces an epoch exactly for a given
number of workers, and no two workers repeat each other's draws. Non-persistent workers
copy the transform at the start of every epoch, so they see each epoch's reseed;
persistent workers keep their own stream running from epoch to epoch. Seed None: fresh
entropy, not reproducible.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

# Before albumentations is imported: otherwise its import asks PyPI for a newer version,
# and the harness makes no network calls at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from harness.io import atomic_save_npy  # noqa: E402
from harness.registry import Registry  # noqa: E402

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Transforms that turn a face upside down or on its side; no pipeline may contain one.
UPSIDE_DOWN_TRANSFORMS = ("VerticalFlip", "Transpose", "RandomRotate90", "D4", "SquareSymmetry")


# ---------------------------------------------------------------------- augmentation


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float32 CHW tensor with ImageNet mean and std."""
    scaled = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def normalize_batch(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """`normalize` over a whole uint8 batch (B, H, W, 3) at once -> float32 (B, 3, H, W) on `device`.

    For images already at their size the eval transform is this normalisation alone, elementwise, so
    one vectorised pass gives the same values (a test holds them equal) at a fraction of the per-image
    cost; the uint8 batch moves to the device before it grows fourfold into floats.
    """
    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    mean = torch.as_tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return batch.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std).contiguous()


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """To (height, width); area averaging when shrinking (no aliasing), bilinear when growing."""
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] >= height and image.shape[1] >= width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class Transform:
    """Callable: uint8 HWC image -> float32 CHW tensor (ImageNet-normalised, height x width).

    `steps` is the albumentations pipeline of random steps, None when there are none.
    """

    def __init__(self, steps: A.Compose | None, height: int, width: int, seed: int | None = None) -> None:
        self.steps = steps
        self.height = height
        self.width = width
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream: the same seed gives the same augmentations in the same order
        (None: fresh entropy, not reproducible)."""
        self.seed = seed
        self._start_stream(worker_seed=None)

    def _start_stream(self, worker_seed: int | None) -> None:
        self._stream_owner = worker_seed
        if self.steps is None:
            return
        if self.seed is None:
            sequence = np.random.SeedSequence()
        else:
            sequence = np.random.SeedSequence([self.seed] if worker_seed is None else [self.seed, worker_seed])
        numpy_seed, python_seed = sequence.generate_state(2)
        # One shared stream for every step: albumentations' own `seed=` gives each step a
        # generator with the same seed, which would tie e.g. flip and noise decisions together.
        self.steps.set_random_state(np.random.default_rng(numpy_seed), random.Random(int(python_seed)))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.steps is None:
            return normalize(resize(image, self.height, self.width))
        worker = torch.utils.data.get_worker_info()
        worker_seed = worker.seed if worker is not None else None
        if worker_seed != self._stream_owner:  # first image in this worker: its own stream
            self._start_stream(worker_seed)
        return normalize(self.steps(image=image)["image"])

    def names(self) -> list[str]:
        """Class names of the random steps, in order (for logs and checks)."""
        return [type(step).__name__ for step in self.steps] if self.steps is not None else []

    def __repr__(self) -> str:
        return f"Transform({self.height}x{self.width}, steps={self.names()}, seed={self.seed})"


def build_transform(strength: float, height: int, width: int, train: bool, seed: int | None = None) -> Transform:
    """The transform for one strength s in [0, 1] (see `random_steps` for what s scales)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    if not train or strength == 0.0:
        return Transform(None, height, width, seed)
    return Transform(A.Compose(random_steps(strength, height, width)), height, width, seed)


def random_steps(strength: float, height: int, width: int) -> list[A.BasicTransform]:
    """The random steps at strength s: every magnitude (and the rarer steps' probability) grows with s."""
    s = strength
    aspect = width / height
    return [
        # keeps at least 1 - s/2 of the image, aspect within ~20% of the output's
        A.RandomResizedCrop(
            size=(height, width), scale=(1.0 - 0.5 * s, 1.0), ratio=(aspect * (1 - 0.2 * s), aspect / (1 - 0.2 * s))
        ),
        A.HorizontalFlip(p=0.5),  # faces are left-right symmetric; never a vertical flip
        A.Affine(
            translate_percent=(-0.1 * s, 0.1 * s),
            scale=(1.0 - 0.15 * s, 1.0 + 0.15 * s),
            rotate=(-15.0 * s, 15.0 * s),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.5,
        ),
        A.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s, hue=0.05 * s, p=0.8),
        A.GaussNoise(std_range=(0.02 * s, 0.1 * s), p=0.5 * s),
        A.CoarseDropout(
            num_holes_range=(1, max(1, round(4 * s))),
            hole_height_range=(0.05, 0.05 + 0.15 * s),
            hole_width_range=(0.05, 0.05 + 0.15 * s),
            fill=0,
            p=0.5 * s,
        ),
    ]


# ---------------------------------------------------------------------- preprocessing

BoxFinder = Callable[[np.ndarray, bool], np.ndarray]
PREPROCESSORS: Registry[BoxFinder] = Registry("preprocessor")

# The centre crop: 80% of the width, 80% of the height a little above the middle, where
# the face of a portrait photo is.
CENTER_BOX = (0.10, 0.05, 0.90, 0.85)  # x0, y0, x1, y1 as fractions of width and height
# A detected face box (eyes to mouth) grows by these fractions of its size to take in
# hair, ears and chin; then to the image's aspect ratio so the crop resizes undistorted.
FACE_MARGIN = {"left": 0.3, "right": 0.3, "top": 0.45, "bottom": 0.35}


@PREPROCESSORS.register("none")
def full_boxes(images: np.ndarray, progress: bool = False) -> np.ndarray:
    count, height, width = images.shape[:3]
    return np.tile(np.array([0, 0, width, height], dtype=np.int64), (count, 1))


@PREPROCESSORS.register("center_crop")
def center_boxes(images: np.ndarray, progress: bool = False) -> np.ndarray:
    count, height, width = images.shape[:3]
    return np.tile(_center_box(height, width), (count, 1))


@PREPROCESSORS.register("face_crop")
def face_crop_boxes(images: np.ndarray, progress: bool = False) -> np.ndarray:
    boxes, found = face_boxes(images, progress)
    if not found.all():
        log.info("face_crop: no face in %d of %d images; used the centre crop there", (~found).sum(), len(found))
    return boxes


def crop_boxes(images: np.ndarray, method: str, progress: bool = False) -> np.ndarray:
    """(N, 4) int64 boxes [x0, y0, x1, y1] (x1, y1 exclusive) for (N, H, W, 3) uint8 images."""
    _check_images(images)
    return PREPROCESSORS.get(method)(images, progress)


def face_boxes(images: np.ndarray, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the detected face (see `detect_face`) grown by FACE_MARGIN (the centre box where
    no face is found), and whether a face was found."""
    _check_images(images)
    height, width = images.shape[1:3]
    boxes = np.empty((len(images), 4), dtype=np.int64)
    found = np.zeros(len(images), dtype=bool)
    for row, image in enumerate(tqdm(images, desc="face boxes", disable=not progress)):
        face = detect_face(image)
        found[row] = face is not None
        boxes[row] = _grow_face(face, height, width) if face is not None else _center_box(height, width)
    return boxes, found


# Haar detection settings, tuned on scikit-image's lfw_subset faces / non-faces and the
# astronaut photo at 128x96 and 64x48. The cascade's smallest window is 24x24 pixels, more
# than a face in a 64x48 portrait (about 17), and faces a few windows wide are missed, so an
# image whose shorter side is under DETECT_SIDE is upscaled to it first and the boxes mapped back.
# Finding boxes is a one-off per cache: about 15 ms an image on one core at these sizes.
DETECT_SIDE = 160
HAAR_SCALE_FACTOR = 1.05  # window growth per pyramid level: finer finds more small faces
HAAR_MIN_NEIGHBORS = 5  # overlapping windows a face needs; fewer admits more false faces
HAAR_MIN_FACE = 0.2  # smallest face searched, as a fraction of the shorter side


def detect_face(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the frontal face in a uint8 RGB image, or None.

    OpenCV's bundled Haar cascade (haarcascade_frontalface_default.xml) on the grey,
    histogram-equalised image. Where it finds several, the face most windows agree on wins
    (not the largest: a large false face usually has few neighbours).
    """
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    height, width = gray.shape
    scale = max(1.0, DETECT_SIDE / min(height, width))
    if scale > 1.0:
        gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
    scale_y, scale_x = gray.shape[0] / height, gray.shape[1] / width
    smallest = max(24, round(HAAR_MIN_FACE * min(gray.shape)))
    faces, neighbours = _face_cascade().detectMultiScale2(
        gray, scaleFactor=HAAR_SCALE_FACTOR, minNeighbors=HAAR_MIN_NEIGHBORS, minSize=(smallest, smallest)
    )
    if len(faces) == 0:
        return None
    best = max(range(len(faces)), key=lambda i: (int(neighbours[i]), int(faces[i][2]) * int(faces[i][3])))
    x, y, w, h = (int(v) for v in faces[best])
    x0, y0 = round(x / scale_x), round(y / scale_y)
    x1, y1 = min(width, round((x + w) / scale_x)), min(height, round((y + h) / scale_y))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


@lru_cache(maxsize=1)
def _face_cascade() -> cv2.CascadeClassifier:
    """OpenCV's frontal-face Haar cascade, loaded on first use, once per process."""
    path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise RuntimeError(f"could not load OpenCV's Haar face cascade from {path} (opencv-python >= 4.9, < 5)")
    return cascade


def _center_box(height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = CENTER_BOX
    return np.array([round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)], dtype=np.int64)


def _grow_face(face: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    x, y, w, h = face
    x0, x1 = x - FACE_MARGIN["left"] * w, x + w + FACE_MARGIN["right"] * w
    y0, y1 = y - FACE_MARGIN["top"] * h, y + h + FACE_MARGIN["bottom"] * h
    box_w, box_h = x1 - x0, y1 - y0
    center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2
    # widen or heighten to the image's aspect ratio, then shrink to fit inside the image
    if box_h / box_w < height / width:
        box_h = box_w * height / width
    else:
        box_w = box_h * width / height
    fit = min(1.0, width / box_w, height / box_h)
    box_w, box_h = box_w * fit, box_h * fit
    left = min(max(center_x - box_w / 2, 0.0), width - box_w)  # slide inside rather than clip
    top = min(max(center_y - box_h / 2, 0.0), height - box_h)
    x0, y0 = int(round(left)), int(round(top))
    return np.array(
        [x0, y0, max(x0 + 1, min(width, int(round(left + box_w)))), max(y0 + 1, min(height, int(round(top + box_h))))],
        dtype=np.int64,
    )


def apply_crops(images: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, height, width, 3) uint8: each image cut to its box and resized."""
    _check_images(images)
    boxes = np.asarray(boxes)
    if boxes.shape != (len(images), 4):
        raise ValueError(f"boxes must have shape ({len(images)}, 4) for {len(images)} images, got {boxes.shape}")
    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    image_h, image_w = images.shape[1:3]
    for row, (image, box) in enumerate(zip(images, boxes, strict=True)):
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 <= image_w and 0 <= y0 < y1 <= image_h):
            raise ValueError(f"box {row} {[x0, y0, x1, y1]} is empty or outside the {image_w}x{image_h} image")
        out[row] = resize(image[y0:y1, x0:x1], height, width)
    return out


def cached_crop_boxes(images: np.ndarray, method: str, cache_path: str | Path, progress: bool = False) -> np.ndarray:
    """crop_boxes, computed once: loaded from cache_path (.npy) when it holds one box per image,
    otherwise computed and written there atomically. Name cache_path after the decoded
    cache's key and the method, so boxes never outlive the images they were found on."""
    cache_path = Path(cache_path)
    if cache_path.is_file():
        boxes = np.load(cache_path)
        if boxes.shape == (len(images), 4):
            return boxes
        log.warning("%s: holds %s boxes for %d images; finding them again", cache_path, boxes.shape, len(images))
    boxes = crop_boxes(images, method, progress)
    atomic_save_npy(cache_path, boxes)
    return boxes


def preprocessed_images(cache, method: str, cache_dir: str | Path, height: int, width: int) -> np.ndarray:
    """A decoded cache's images as preprocess `method` gives them to a model: the cache itself for "none",
    else each image cut to its box (found once per cache and method, see `cached_crop_boxes`) and resized."""
    if method == "none":
        return cache.images
    boxes = cached_crop_boxes(cache.images, method, Path(cache_dir) / f"{cache.key}.{method}.boxes.npy")
    return apply_crops(cache.images, boxes, height, width)


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
