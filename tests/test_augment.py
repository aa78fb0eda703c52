"""harness.augment: strength-scaled augmentation, determinism, and the preprocessors (crops, background removal)."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from harness.augment import (
    CENTER_BOX,
    NEUTRAL,
    PREPROCESSORS,
    UPSIDE_DOWN_TRANSFORMS,
    Transform,
    build_transform,
    center_box,
    crop_resize,
    grow_face,
    normalize,
    preprocess,
)

HEIGHT, WIDTH = 64, 48
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def reference_normalize(image: np.ndarray) -> np.ndarray:
    return ((image / 255.0 - MEAN) / STD).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """The astronaut photo cut to a 4:3 portrait around her face and shrunk to 64x48."""
    return cv2.resize(data.astronaut()[:400, 70:370], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)


def upright_image() -> np.ndarray:
    """Bright top half, dark bottom half: whatever an augmentation does, top stays brighter unless flipped."""
    image = np.full((HEIGHT, WIDTH, 3), 30, dtype=np.uint8)
    image[: HEIGHT // 2] = 220
    return image


# ---------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("strength, train", [(0.0, True), (0.7, False), (1.0, False)])
def test_without_augmentation_it_is_normalisation_only(portrait, strength, train):
    transform = build_transform(strength, HEIGHT, WIDTH, train=train)
    out = transform(portrait)
    assert out.dtype == torch.float32 and out.shape == (3, HEIGHT, WIDTH) and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), reference_normalize(portrait), rtol=0, atol=1e-6)
    assert transform.names() == []


def test_without_augmentation_other_sizes_are_resized_by_area(portrait):
    big = cv2.resize(portrait, (WIDTH * 2, HEIGHT * 2), interpolation=cv2.INTER_LINEAR)
    out = build_transform(0.0, HEIGHT, WIDTH, train=True)(big)
    expected = reference_normalize(cv2.resize(big, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


def test_full_strength_changes_the_image_but_not_its_shape(portrait):
    plain = build_transform(0.0, HEIGHT, WIDTH, train=True)(portrait)
    transform = build_transform(1.0, HEIGHT, WIDTH, train=True, seed=0)
    outs = [transform(portrait) for _ in range(8)]
    for out in outs:
        assert out.shape == (3, HEIGHT, WIDTH) and out.dtype == torch.float32
        assert not torch.equal(out, plain)
    assert not torch.equal(outs[0], outs[1])
    assert transform.names() == [
        "RandomResizedCrop",
        "HorizontalFlip",
        "Affine",
        "ColorJitter",
        "GaussNoise",
        "CoarseDropout",
    ]


def test_strength_scales_how_far_images_move(portrait):
    plain = build_transform(0.0, HEIGHT, WIDTH, train=True)(portrait)

    def mean_change(strength):
        transform = build_transform(strength, HEIGHT, WIDTH, train=True, seed=1)
        return np.mean([(transform(portrait) - plain).abs().mean().item() for _ in range(20)])

    assert mean_change(0.1) < mean_change(1.0)


@pytest.mark.parametrize("strength", np.linspace(0.0, 1.0, 6))
def test_no_pipeline_turns_a_face_upside_down(strength):
    for train in (True, False):
        transform = build_transform(float(strength), HEIGHT, WIDTH, train=train)
        assert not set(transform.names()) & set(UPSIDE_DOWN_TRANSFORMS)
    transform = build_transform(float(strength), HEIGHT, WIDTH, train=True, seed=2)
    for _ in range(30):
        out = transform(upright_image())
        assert out[:, : HEIGHT // 2].mean() > out[:, HEIGHT // 2 :].mean()


def test_same_seed_same_augmentations_and_reseed_restarts(portrait):
    first = build_transform(0.8, HEIGHT, WIDTH, train=True, seed=7)
    second = build_transform(0.8, HEIGHT, WIDTH, train=True, seed=7)
    other = build_transform(0.8, HEIGHT, WIDTH, train=True, seed=8)
    a = [first(portrait) for _ in range(5)]
    b = [second(portrait) for _ in range(5)]
    c = [other(portrait) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(a, c, strict=True))
    first.reseed(7)
    assert all(torch.equal(first(portrait), x) for x in a)


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, image: np.ndarray, transform: Transform, count: int = 8) -> None:
        self.image, self.transform, self.count = image, transform, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image)


def _epoch(portrait, loader_seed: int) -> torch.Tensor:
    dataset = _SameImage(portrait, build_transform(0.8, HEIGHT, WIDTH, train=True, seed=3))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(loader_seed)
    )
    return torch.cat(list(loader))


def test_dataloader_workers_are_reproducible_and_do_not_repeat_each_other(portrait):
    run = _epoch(portrait, loader_seed=11)
    assert torch.equal(run, _epoch(portrait, loader_seed=11))
    assert not torch.equal(run, _epoch(portrait, loader_seed=12))
    worker_0, worker_1 = run[:4], run[4:]  # batch 0 comes from worker 0, batch 1 from worker 1
    assert not any(torch.equal(a, b) for a in worker_0 for b in worker_1)


def test_strength_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 1.5"):
        build_transform(1.5, HEIGHT, WIDTH, train=True)


# ---------------------------------------------------------------------- preprocessing


def test_preprocessors_registry():
    assert PREPROCESSORS.names() == ["center_crop", "face_crop", "none", "remove_background"]
    with pytest.raises(KeyError, match="face_crop"):
        preprocess(np.zeros((1, 8, 8, 3), np.uint8), "segment")


def one_row(face, found: bool, mask: np.ndarray) -> SimpleNamespace:
    """A foreground of one image, shaped as harness.foreground.Foreground."""
    return SimpleNamespace(faces=np.array([face], np.float32), found=np.array([found]), masks=mask[None])


def test_face_crop_grows_the_face_to_a_head_at_the_images_aspect(portrait):
    face = (18.0, 14.0, 30.0, 30.0)  # x0, y0, x1, y1 of a face in the 48x64 portrait
    box = grow_face(face, HEIGHT, WIDTH)
    x0, y0, x1, y1 = box
    assert x0 <= 18 and y0 <= 14 and x1 >= 30 and y1 >= 30  # the face and more (hair, chin)
    assert abs((y1 - y0) / (x1 - x0) - HEIGHT / WIDTH) < 0.1 and 0 <= x0 and x1 <= WIDTH
    cropped = preprocess(portrait[None], "face_crop", one_row(face, True, np.ones((HEIGHT, WIDTH), np.uint8)))
    np.testing.assert_array_equal(cropped[0], crop_resize(portrait, box))
    assert cropped.shape == (1, HEIGHT, WIDTH, 3)


def test_face_crop_falls_back_to_the_centre_crop_without_a_face(portrait):
    nowhere = one_row((0, 0, 0, 0), False, np.ones((HEIGHT, WIDTH), np.uint8))
    np.testing.assert_array_equal(preprocess(portrait[None], "face_crop", nowhere),
                                  preprocess(portrait[None], "center_crop"))
    x0, y0, x1, y1 = CENTER_BOX
    np.testing.assert_array_equal(center_box(HEIGHT, WIDTH), [round(x0 * WIDTH), round(y0 * HEIGHT),
                                                              round(x1 * WIDTH), round(y1 * HEIGHT)])


def test_remove_background_keeps_the_person_alone(portrait):
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[10:40, 12:36] = 1
    out = preprocess(portrait[None], "remove_background", one_row((12, 10, 36, 40), True, mask))[0]
    np.testing.assert_array_equal(out[mask > 0], portrait[mask > 0])
    assert (out[mask == 0] == NEUTRAL).all()  # ImageNet's mean colour: zero after normalisation
    assert np.abs(normalize(out).numpy()[:, 0, 0]).max() < 0.01


def test_whole_images_are_not_copied_and_foreground_methods_need_a_foreground(portrait):
    images = np.stack([portrait, upright_image()])
    assert preprocess(images, "none") is images
    with pytest.raises(ValueError, match="'remove_background' needs the images' faces and person masks"):
        preprocess(images, "remove_background")


def test_crop_resize_cuts_and_resizes():
    cropped = crop_resize(upright_image(), [0, 0, 48, 32])
    assert cropped.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(cropped, 220)  # only the bright top half was kept
    with pytest.raises(ValueError, match=r"box \[0, 0, 49, 32\] is empty or outside the 48x64 image"):
        crop_resize(upright_image(), [0, 0, 49, 32])
