"""Augmentation and preprocessing of decoded uint8 images.

Augmentation: one scalar, strength s in [0, 1], scales every random step together, so a
study searches one number instead of a dozen (`build_transform`). s = 0 (or evaluation)
is resize + ImageNet normalisation only. Nothing ever flips an image upside down: the
photos are upright faces, and an upside-down face is not a sample of this task.

Preprocessing (`PREPROCESSORS`: none, center_crop, face_crop, remove_background): how a model is
shown an image before augmentation, from where its face and person are (harness.foreground,
computed once per decoded cache). face_crop and remove_background keep the model off the
background, which similar people share and which a model otherwise learns instead of the person.

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
from abc import ABC, abstractmethod

# Before albumentations is imported: otherwise its import asks PyPI for a newer version,
# and the harness makes no network calls at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

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
        if self.seed is None:
            sequence = np.random.SeedSequence()
        else:
            sequence = np.random.SeedSequence([self.seed] if worker_seed is None else [self.seed, worker_seed])
        numpy_seed, python_seed = sequence.generate_state(2)
        self._rng = np.random.default_rng(numpy_seed)
        if self.steps is not None:
            # One shared stream for every step: albumentations' own `seed=` gives each step a
            # generator with the same seed, which would tie e.g. flip and noise decisions together.
            self.steps.set_random_state(self._rng, random.Random(int(python_seed)))

    def stream(self) -> np.random.Generator:
        """The random stream of this process (its own in each DataLoader worker, restarted there from
        (seed, worker seed) on first use). Steps before the transform (a background swap) draw from it too."""
        worker = torch.utils.data.get_worker_info()
        worker_seed = worker.seed if worker is not None else None
        if worker_seed != self._stream_owner:  # first image in this worker: its own stream
            self._start_stream(worker_seed)
        return self._rng

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.steps is None:
            return normalize(resize(image, self.height, self.width))
        self.stream()
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


class Preprocessor(ABC):
    """How a model is shown an image before any augmentation: the whole image, a crop, or the person alone.

    Called per image with where its face and person are (harness.foreground: the face box, whether a
    detector found it, the person mask); returns an image of the same size. `uses_foreground`: it reads
    them (the rest ignore the arguments, which may then be None).
    """

    uses_foreground = False

    @abstractmethod
    def __call__(self, image: np.ndarray, face: np.ndarray | None, found: bool, mask: np.ndarray | None) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (H, W, 3)."""


PREPROCESSORS: Registry[Preprocessor] = Registry("preprocessor")

# The centre crop: 80% of the width, 80% of the height a little above the middle, where
# the face of a portrait photo is.
CENTER_BOX = (0.10, 0.05, 0.90, 0.85)  # x0, y0, x1, y1 as fractions of width and height
# A detected face box (eyes to mouth) grows by these fractions of its size to take in
# hair, ears and chin; then to the image's aspect ratio so the crop resizes undistorted.
FACE_MARGIN = {"left": 0.3, "right": 0.3, "top": 0.45, "bottom": 0.35}
# What replaces the background: ImageNet's mean colour, which normalisation maps to zero.
NEUTRAL = np.round(IMAGENET_MEAN * 255).astype(np.uint8)


class Whole(Preprocessor):
    def __call__(self, image, face, found, mask):
        return image


class CenterCrop(Preprocessor):
    """The centre of the photo (CENTER_BOX), resized back to the image size: a crop with no detector."""

    def __call__(self, image, face, found, mask):
        return crop_resize(image, center_box(*image.shape[:2]))


class FaceCrop(Preprocessor):
    """The detected face grown to a head (FACE_MARGIN) at the image's aspect ratio; the centre crop where
    no face was found (the fallback is counted, see harness.foreground)."""

    uses_foreground = True

    def __call__(self, image, face, found, mask):
        height, width = image.shape[:2]
        return crop_resize(image, grow_face(face, height, width) if found else center_box(height, width))


class RemoveBackground(Preprocessor):
    """The person alone: every pixel outside the person mask becomes NEUTRAL (segmentation)."""

    uses_foreground = True

    def __call__(self, image, face, found, mask):
        return np.where(mask[..., None] > 0, image, NEUTRAL).astype(np.uint8)


PREPROCESSORS.register("none")(Whole())
PREPROCESSORS.register("center_crop")(CenterCrop())
PREPROCESSORS.register("face_crop")(FaceCrop())
PREPROCESSORS.register("remove_background")(RemoveBackground())


def center_box(height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = CENTER_BOX
    return np.array([round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)], dtype=np.int64)


def grow_face(face, height: int, width: int) -> np.ndarray:
    """[x0, y0, x1, y1] int box: a face box (x0, y0, x1, y1) grown by FACE_MARGIN to the image's aspect
    ratio, slid (not clipped) to lie inside the image."""
    x0, y0, x1, y1 = (float(v) for v in face)
    w, h = max(1.0, x1 - x0), max(1.0, y1 - y0)
    x0, x1 = x0 - FACE_MARGIN["left"] * w, x1 + FACE_MARGIN["right"] * w
    y0, y1 = y0 - FACE_MARGIN["top"] * h, y1 + FACE_MARGIN["bottom"] * h
    box_w, box_h = x1 - x0, y1 - y0
    center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2
    if box_h / box_w < height / width:  # widen or heighten to the image's aspect ratio
        box_h = box_w * height / width
    else:
        box_w = box_h * width / height
    fit = min(1.0, width / box_w, height / box_h)  # then shrink to fit inside the image
    box_w, box_h = box_w * fit, box_h * fit
    left = min(max(center_x - box_w / 2, 0.0), width - box_w)
    top = min(max(center_y - box_h / 2, 0.0), height - box_h)
    x0, y0 = int(round(left)), int(round(top))
    return np.array([x0, y0, max(x0 + 1, min(width, int(round(left + box_w)))),
                     max(y0 + 1, min(height, int(round(top + box_h))))], dtype=np.int64)


def crop_resize(image: np.ndarray, box) -> np.ndarray:
    """The image cut to box [x0, y0, x1, y1] (x1, y1 exclusive) and resized back to the image's size."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {[x0, y0, x1, y1]} is empty or outside the {width}x{height} image")
    return resize(image[y0:y1, x0:x1], height, width)


def preprocess(images: np.ndarray, method: str, foreground=None, rows: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8: `images` as preprocessor `method` shows them; `rows` are their rows in `foreground`
    (default: 0..N-1). The images themselves (no copy) for "none"."""
    _check_images(images)
    preprocessor = PREPROCESSORS.get(method)
    if isinstance(preprocessor, Whole):
        return images
    if preprocessor.uses_foreground and foreground is None:
        raise ValueError(f"preprocessor {method!r} needs the images' faces and person masks (harness.foreground)")
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out = np.empty(images.shape, dtype=np.uint8)
    for index, (image, row) in enumerate(zip(images, rows, strict=True)):
        out[index] = preprocessor(np.asarray(image), *foreground_of(foreground, row))
    return out


def foreground_of(foreground, row: int) -> tuple:
    """(face, found, mask) of one row of a harness.foreground.Foreground, or Nones without one."""
    if foreground is None:
        return None, False, None
    return foreground.faces[row], bool(foreground.found[row]), foreground.masks[row]


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
