"""harness.augment: strength-scaled augmentation, determinism, face / centre crops, cached boxes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from harness import augment
from harness.augment import (
    CENTER_BOX,
    PREPROCESSORS,
    UPSIDE_DOWN_TRANSFORMS,
    Transform,
    _face_cascade,
    apply_crops,
    build_transform,
    cached_crop_boxes,
    crop_boxes,
    detect_face,
    face_boxes,
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
    assert PREPROCESSORS.names() == ["center_crop", "face_crop", "none"]
    with pytest.raises(KeyError, match="face_crop"):
        crop_boxes(np.zeros((1, 8, 8, 3), np.uint8), "segment")


def test_face_crop_finds_the_astronauts_face():
    image = cv2.resize(data.astronaut(), (192, 256), interpolation=cv2.INTER_AREA)  # 256 high, 192 wide
    boxes, found = face_boxes(image[None])
    x0, y0, x1, y1 = boxes[0]
    assert found[0]
    face_x, face_y = 220 * 192 / 512, 118 * 256 / 512  # centre of her face in the 512x512 original
    assert x0 < face_x < x1 and y0 < face_y < y1
    assert (x1 - x0) * (y1 - y0) < 0.5 * 192 * 256  # a crop, not the whole photo
    assert abs((y1 - y0) / (x1 - x0) - 256 / 192) < 0.05  # the image's aspect ratio


@pytest.mark.parametrize("height, width", [(128, 96), (64, 48)])  # the studies' training sizes
def test_face_crop_finds_the_face_in_a_small_portrait(height, width):
    image = cv2.resize(data.astronaut()[:400, 70:370], (width, height), interpolation=cv2.INTER_AREA)
    face = detect_face(image)
    assert face is not None
    x, y, w, h = face
    face_x, face_y = 150 * width / 300, 118 * height / 400  # centre of her face in the 300x400 cut
    assert x < face_x < x + w and y < face_y < y + h
    assert 0.2 * width < w < 0.6 * width  # her face, not the whole picture
    boxes, found = face_boxes(image[None])
    x0, y0, x1, y1 = boxes[0]
    assert found[0] and x0 <= x and y0 <= y and x + w <= x1 and y + h <= y1


def test_face_crop_finds_real_faces_and_rarely_non_faces():
    lfw = (data.lfw_subset() * 255).astype(np.uint8)  # 100 faces then 100 non-faces, 25x25 grey
    images = np.stack([np.repeat(cv2.resize(x, (64, 64), interpolation=cv2.INTER_CUBIC)[..., None], 3, 2) for x in lfw])
    _, found = face_boxes(images)
    assert found[:100].mean() >= 0.85  # measured 0.93 with OpenCV 4.14's Haar cascade
    assert found[100:].mean() <= 0.08  # measured 0.03


def test_face_detector_is_opencvs_haar_cascade_loaded_once():
    cascade = _face_cascade()
    assert isinstance(cascade, cv2.CascadeClassifier) and not cascade.empty()
    assert _face_cascade() is cascade


def test_face_crop_falls_back_to_the_centre_crop_on_a_blank_image():
    blank = np.full((2, HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    boxes, found = face_boxes(blank)
    assert not found.any()
    np.testing.assert_array_equal(crop_boxes(blank, "face_crop"), crop_boxes(blank, "center_crop"))
    x0, y0, x1, y1 = CENTER_BOX
    np.testing.assert_array_equal(
        boxes[0], [round(x0 * WIDTH), round(y0 * HEIGHT), round(x1 * WIDTH), round(y1 * HEIGHT)]
    )


def test_apply_crops_cuts_and_resizes(portrait):
    images = np.stack([portrait, upright_image()])
    same = apply_crops(images, crop_boxes(images, "none"), HEIGHT, WIDTH)
    np.testing.assert_array_equal(same, images)
    cropped = apply_crops(images, np.array([[0, 0, 24, 32], [0, 0, 48, 32]]), HEIGHT, WIDTH)
    assert cropped.shape == (2, HEIGHT, WIDTH, 3) and cropped.dtype == np.uint8
    np.testing.assert_array_equal(cropped[1], 220)  # only the bright top half was kept
    with pytest.raises(ValueError, match=r"box 0 \[0, 0, 49, 32\] is empty or outside the 48x64 image"):
        apply_crops(images[:1], np.array([[0, 0, 49, 32]]), HEIGHT, WIDTH)


def test_cached_boxes_are_written_once_and_reused(tmp_path, monkeypatch, portrait):
    images = np.stack([portrait, np.zeros_like(portrait)])
    path = tmp_path / "cachekey.face_crop.npy"
    boxes = cached_crop_boxes(images, "face_crop", path)
    np.testing.assert_array_equal(np.load(path), boxes)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    np.testing.assert_array_equal(boxes[1], crop_boxes(images[1:], "center_crop")[0])  # black: no face
    assert not np.array_equal(boxes[0], boxes[1])  # her face was found

    planted = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    np.save(path, planted)  # a reused file is read, not recomputed: the detector never runs
    with monkeypatch.context() as patch:
        patch.setattr(augment, "detect_face", _no_detection)
        np.testing.assert_array_equal(cached_crop_boxes(images, "face_crop", path), planted)

    np.save(path, planted[:1])  # one box for two images: stale, found again
    np.testing.assert_array_equal(cached_crop_boxes(images, "face_crop", path), boxes)
    np.testing.assert_array_equal(np.load(path), boxes)


def _no_detection(image: np.ndarray) -> None:
    raise AssertionError("face detection ran although the cached boxes were valid")
