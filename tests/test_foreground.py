"""harness.foreground: faces, person masks and background plates, measured against the synthetic truth;
fallbacks, the cache beside the decoded images, and swapping backgrounds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from harness import foreground as fg_module
from harness.data.cache import build_cache
from harness.data.synthetic import make_synthetic, read_truth
from harness.foreground import (
    BackgroundSwap,
    box_iou,
    compute_foreground,
    detect_face,
    foreground,
    haar_face,
    mask_iou,
    partner_rows,
    person_mask,
    portrait_face,
    swapped_backgrounds,
)

HEIGHT, WIDTH = 112, 84  # the default study's training size


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic dataset decoded at the default study's size, its foreground and its truth."""
    root = tmp_path_factory.mktemp("fg") / "data"
    make_synthetic(root, people=16, seed=3)
    paths = sorted(str(p) for p in (root / "train" / "images").rglob("*") if p.is_file() and not p.name.startswith("."))
    cache = build_cache(paths, HEIGHT, WIDTH, root.parent / "cache", progress=False)
    found = foreground(cache, root.parent / "cache")
    return root, cache, found, read_truth(root, cache.paths, HEIGHT, WIDTH)


# --------------------------------------------------------------------------------- faces


def test_blazeface_finds_the_astronaut_in_a_small_portrait():
    image = cv2.resize(data.astronaut()[:400, 70:370], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    face, detector = detect_face(image)
    assert detector.startswith("blazeface")  # the wheel's models are installed (make install)
    x0, y0, x1, y1 = face
    face_x, face_y = 150 * WIDTH / 300, 118 * HEIGHT / 400  # the centre of her face in the 300x400 cut
    assert x0 < face_x < x1 and y0 < face_y < y1 and (x1 - x0) < 0.7 * WIDTH


def test_real_faces_are_found_and_non_faces_rarely():
    lfw = (data.lfw_subset() * 255).astype(np.uint8)  # 100 faces then 100 non-faces, 25x25 grey
    images = [np.repeat(cv2.resize(x, (64, 64), interpolation=cv2.INTER_CUBIC)[..., None], 3, 2) for x in lfw]
    found = np.array([detect_face(image)[0] is not None for image in images])
    assert found[:100].mean() >= 0.9  # measured 0.98
    assert found[100:].mean() <= 0.08  # measured 0.01


def test_faces_on_the_synthetic_data_beat_the_haar_cascade(synthetic):
    _, cache, found, (true_boxes, _) = synthetic
    hits = (box_iou(found.faces, true_boxes) >= 0.4) & found.found
    haar = [haar_face(np.asarray(image)) for image in cache.images]
    haar_boxes = np.array([[x, y, x + w, y + h] if face else [0, 0, 0, 0]
                           for face in haar for x, y, w, h in [face or (0, 0, 0, 0)]], float)
    haar_hits = box_iou(haar_boxes, true_boxes) >= 0.4
    assert hits.mean() >= 0.9 and hits.mean() > haar_hits.mean() + 0.1  # measured 0.98 against 0.72 (120 people)


# --------------------------------------------------------------------------------- masks


def test_person_masks_match_the_synthetic_truth(synthetic):
    _, _, found, (_, true_masks) = synthetic
    iou = mask_iou(found.masks, true_masks)
    assert iou.mean() >= 0.88 and np.percentile(iou, 10) >= 0.7  # measured 0.94 and 0.82 (120 people)


def test_a_blank_image_falls_back_in_a_stated_way():
    blank = np.full((3, HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    found = compute_foreground(blank, threads=1)
    assert not found.found.any() and found.stats["no_face"] == 3
    np.testing.assert_allclose(found.faces[0], portrait_face(HEIGHT, WIDTH))  # where a portrait's face usually is
    assert found.counts([0, 2])["images"] == 2 and found.counts([0, 2])["no_face"] == 2
    assert found.masks.any(axis=(1, 2)).all()  # GrabCut from the portrait template, never an empty mask


def test_a_failed_grabcut_never_fails_the_caller_and_is_counted(monkeypatch):
    def broken(*args):
        raise cv2.error("GrabCut exploded")

    monkeypatch.setattr(fg_module, "_grabcut", broken)
    image = cv2.resize(data.astronaut()[:400, 70:370], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    mask, fell_back = person_mask(image, portrait_face(HEIGHT, WIDTH))
    assert fell_back and 0.1 < mask.mean() < 0.9  # the head-and-shoulders template itself
    found = compute_foreground(np.stack([image, image]), threads=1)
    assert found.stats["mask_fallback"] == 2 and found.counts([1]) == {"images": 1, "no_face": 0, "mask_fallback": 1}


# --------------------------------------------------------------------------------- cache


def test_the_foreground_is_kept_beside_the_cache_and_reused(synthetic, monkeypatch):
    root, cache, found, _ = synthetic
    files = sorted(p.name for p in (root.parent / "cache").glob(f"{cache.key}.fg*"))
    assert files == [f"{cache.key}.fg{fg_module.FOREGROUND_VERSION}.{n}" for n in
                     ("faces.npy", "json", "masks.npy", "plates.npy")]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the foreground was computed again although its files were there")

    monkeypatch.setattr(fg_module, "compute_foreground", must_not_run)
    again = foreground(cache, root.parent / "cache")
    np.testing.assert_array_equal(again.masks, found.masks)
    np.testing.assert_array_equal(again.faces, found.faces)


def test_another_method_or_other_images_never_reuse_a_foreground(synthetic, monkeypatch, tmp_path):
    root, cache, _, _ = synthetic
    calls = []
    real = fg_module.compute_foreground

    def counted(images, threads=0):
        calls.append(len(images))
        return real(images, threads)

    monkeypatch.setattr(fg_module, "compute_foreground", counted)
    monkeypatch.setattr(fg_module, "FOREGROUND_VERSION", fg_module.FOREGROUND_VERSION + 1)  # another method
    foreground(cache, root.parent / "cache")
    other = build_cache(cache.paths[:5], HEIGHT, WIDTH, tmp_path, progress=False)  # other images: another key
    foreground(other, root.parent / "cache")
    assert calls == [len(cache.paths), 5]


# ----------------------------------------------------------------------- swapped backgrounds


def test_each_image_gets_the_background_of_another_person():
    persons = np.repeat(np.array(["a", "b", "c", "d"]), [3, 2, 4, 1])
    rows = np.arange(len(persons))
    partners = partner_rows(rows, persons, seed=0)
    assert (persons[partners] != persons[rows]).all()
    assert np.array_equal(partners, partner_rows(rows, persons, seed=0))  # a fixed pairing
    by_person = {p: set(persons[partners[persons == p]]) for p in "abcd"}
    assert all(len(partner) == 1 for partner in by_person.values())  # one partner per person
    with pytest.raises(ValueError, match="at least two persons"):
        partner_rows(rows[:3], persons, seed=0)


def test_swapped_backgrounds_keep_the_person_and_change_the_rest(synthetic):
    root, cache, found, _ = synthetic
    persons = np.array([path.split("/")[-2] for path in cache.paths])
    rows = np.arange(14)  # two persons of seven photos
    swapped = swapped_backgrounds(cache.images, found, rows, persons, seed=1)
    person = found.masks[rows] > 0
    np.testing.assert_array_equal(swapped[person], np.asarray(cache.images[rows])[person])
    partners = partner_rows(rows, persons, seed=1)
    np.testing.assert_array_equal(swapped[~person], np.asarray(found.plates[partners])[~person])


def test_the_swap_augmentation_draws_only_when_asked_and_reproduces(synthetic):
    _, cache, found, _ = synthetic
    persons = np.array([path.split("/")[-2] for path in cache.paths])
    rows = np.arange(len(persons))
    image = np.asarray(cache.images[0])
    never = BackgroundSwap(found, rows, persons, p=0.0)
    stream = np.random.default_rng(5)
    assert never(image, 0, stream) is image
    always = BackgroundSwap(found, rows, persons, p=1.0)
    first = [always(image, 0, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])  # the same stream, the same swap
    assert not np.array_equal(first[0], image)
    person = found.masks[0] > 0
    np.testing.assert_array_equal(first[0][person], image[person])
