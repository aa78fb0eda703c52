"""The decoded-image cache: real JPEG/PNG files in tmp_path, decoded once, reused, crash-safe."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from harness.bench.loader import run_loader_bench
from harness.data.cache import CachedImageDataset, ImageDecodeError, build_cache

SOURCE_WIDTH, SOURCE_HEIGHT = 96, 128
HEIGHT, WIDTH = 32, 24  # exactly 1/4: a JPEG draft decode lands on the target size
EXTENSIONS = [".jpg", ".jpeg", ".png"]
RESAMPLE = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


def reference_decode(path: str, height: int, width: int, resize: str = "area") -> np.ndarray:
    """What the cache must hold for draft=False: a plain full decode and one resize."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((width, height), RESAMPLE[resize]))


def smooth_picture(rng: np.random.Generator) -> Image.Image:
    noise = rng.integers(0, 256, size=(SOURCE_HEIGHT // 16, SOURCE_WIDTH // 16, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((SOURCE_WIDTH, SOURCE_HEIGHT), Image.Resampling.BICUBIC)


@pytest.fixture
def image_files(tmp_path: Path) -> list[str]:
    """24 real image files of 96x128 (W x H) with mixed extensions."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for index in range(24):
        path = folder / f"img{index:02d}{EXTENSIONS[index % 3]}"
        smooth_picture(rng).save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=92)
        paths.append(str(path))
    return paths


def write_bad_images(folder: Path, good_jpeg: str, good_png: str) -> dict[str, str]:
    """One file of each kind of damage, named by kind."""
    jpeg, png = Path(good_jpeg).read_bytes(), Path(good_png).read_bytes()
    contents = {
        "corrupt.jpg": b"\xff\xd8\xff\xe0 this is no jpeg" * 20,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "empty.jpg": b"",
    }
    bad = {}
    for name, content in contents.items():
        (folder / name).write_bytes(content)
        bad[name.split(".")[0] + Path(name).suffix] = str(folder / name)
    return bad


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(path.name for path in cache_dir.iterdir())


# ----------------------------------------------------------------------------- content


@pytest.mark.parametrize("resize", ["area", "bilinear"])
def test_full_decode_equals_a_direct_decode_and_resize(image_files, tmp_path, resize):
    cache = build_cache(
        image_files, HEIGHT, WIDTH, tmp_path / "cache", resize=resize, workers=2, draft=False, progress=False
    )
    assert cache.images.shape == (24, HEIGHT, WIDTH, 3) and cache.images.dtype == np.uint8
    assert not cache.images.flags.writeable
    assert cache.paths == image_files and len(cache) == 24 and cache.excluded == []
    for path in image_files:
        np.testing.assert_array_equal(cache.images[cache.row_of(path)], reference_decode(path, HEIGHT, WIDTH, resize))


# (32, 24): the 1/4 reduced decode is the whole resize; (20, 15): 1/2 reduced decode, then a resize;
# (40, 30): no reduction keeps twice the target, so a full decode.
@pytest.mark.parametrize("height, width", [(HEIGHT, WIDTH), (20, 15), (40, 30)])
def test_draft_decode_is_close_to_a_full_decode(image_files, tmp_path, height, width):
    cache = build_cache(image_files, height, width, tmp_path / "cache", workers=1, draft=True, progress=False)
    assert cache.images.shape == (24, height, width, 3)
    for path in image_files:
        reference = reference_decode(path, height, width).astype(np.int16)
        difference = np.abs(cache.images[cache.row_of(path)] - reference)
        if path.endswith(".png"):
            assert difference.max() == 0  # draft only changes how JPEGs are decoded
        else:
            assert difference.mean() < 3.0, f"{path}: draft differs by {difference.mean():.2f} grey levels"


# ----------------------------------------------------------------------------- reuse and keys


def test_a_second_call_reuses_the_cache_without_decoding(image_files, tmp_path):
    first = build_cache(image_files, HEIGHT, WIDTH, tmp_path / "cache", workers=1, progress=False)
    stats = {name: os.stat(tmp_path / "cache" / name) for name in (f"{first.key}.npy", f"{first.key}.json")}
    second = build_cache(image_files, HEIGHT, WIDTH, tmp_path / "cache", workers=1, progress=False)
    assert first.built and not second.built and second.key == first.key
    for name, before in stats.items():
        after = os.stat(tmp_path / "cache" / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was rewritten"
    np.testing.assert_array_equal(second.images, first.images)
    assert cache_files(tmp_path / "cache") == [f"{first.key}.json", f"{first.key}.npy"]


def test_touching_a_source_file_changes_the_key_and_rebuilds(image_files, tmp_path):
    first = build_cache(image_files, HEIGHT, WIDTH, tmp_path / "cache", workers=1, progress=False)
    stat = os.stat(image_files[5])
    os.utime(image_files[5], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = build_cache(image_files, HEIGHT, WIDTH, tmp_path / "cache", workers=1, progress=False)
    assert second.key != first.key and second.built
    assert (tmp_path / "cache" / f"{second.key}.json").exists()


def test_the_key_covers_size_resize_draft_and_order(image_files, tmp_path):
    def key(paths=image_files, height=HEIGHT, width=WIDTH, resize="area", draft=True):
        return build_cache(
            paths, height, width, tmp_path / "cache", resize=resize, workers=1, draft=draft, progress=False
        ).key

    keys = [
        key(),
        key(height=36),
        key(width=28),
        key(resize="bilinear"),
        key(draft=False),
        key(paths=image_files[::-1]),
    ]
    assert len(set(keys)) == len(keys)


# ----------------------------------------------------------------------------- crash safety


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_half_written_caches_are_never_used_and_stale_temporaries_are_removed(image_files, tmp_path):
    cache_dir = tmp_path / "cache"
    key = build_cache(image_files, HEIGHT, WIDTH, cache_dir, workers=1, progress=False).key
    (cache_dir / f"{key}.json").unlink()  # a crash after the .npy was moved in, before the commit marker
    np.lib.format.open_memmap(cache_dir / f"{key}.npy", mode="r+")[:] = 7  # garbage under the final name
    stale = cache_dir / f"{key}.npy.tmp-{dead_pid()}"
    stale.write_bytes(b"half a cache")
    live = cache_dir / "otherkey.npy.tmp-1"  # pid 1 is alive: someone else's build in progress
    live.write_bytes(b"being written")

    cache = build_cache(image_files, HEIGHT, WIDTH, cache_dir, workers=1, draft=False, progress=False)
    assert cache.built
    np.testing.assert_array_equal(cache.images[3], reference_decode(image_files[3], HEIGHT, WIDTH))
    assert not stale.exists() and live.exists()


def test_a_commit_marker_that_does_not_match_the_array_triggers_a_rebuild(image_files, tmp_path):
    cache_dir = tmp_path / "cache"
    first = build_cache(image_files, HEIGHT, WIDTH, cache_dir, workers=1, progress=False)
    expected = np.array(first.images)
    # A new file under the final name (np.save onto the mapped file would truncate it under `first`).
    np.save(cache_dir / "wrong.npy", np.zeros((3, HEIGHT, WIDTH, 3), np.uint8))
    os.replace(cache_dir / "wrong.npy", cache_dir / f"{first.key}.npy")
    second = build_cache(image_files, HEIGHT, WIDTH, cache_dir, workers=1, progress=False)
    assert second.built and second.images.shape == (24, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(second.images, expected)


# ----------------------------------------------------------------------------- bad images


@pytest.mark.parametrize("kind", ["corrupt.jpg", "truncated.jpg", "truncated.png", "empty.jpg"])
def test_a_bad_image_fails_naming_the_file_and_leaves_no_cache(image_files, tmp_path, kind):
    bad = write_bad_images(tmp_path / "images", image_files[0], image_files[2])[kind]
    cache_dir = tmp_path / "cache"
    with pytest.raises(ImageDecodeError) as raised:
        build_cache(image_files[:10] + [bad] + image_files[10:], HEIGHT, WIDTH, cache_dir, workers=2, progress=False)
    assert raised.value.path == bad and bad in str(raised.value) and raised.value.reason
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)
    assert cache_files(cache_dir) == []
    if kind == "empty.jpg":
        assert "0 bytes" in str(raised.value)


def test_bad_images_are_excluded_with_their_reason(image_files, tmp_path):
    bad = write_bad_images(tmp_path / "images", image_files[0], image_files[2])
    paths = image_files[:5] + list(bad.values()) + image_files[5:]
    cache = build_cache(
        paths, HEIGHT, WIDTH, tmp_path / "cache", workers=2, on_bad_image="exclude", draft=False, progress=False
    )
    assert cache.paths == image_files and cache.images.shape[0] == 24
    assert [path for path, _reason in cache.excluded] == list(bad.values())
    assert all(reason for _path, reason in cache.excluded)
    for path in image_files:
        np.testing.assert_array_equal(cache.images[cache.row_of(path)], reference_decode(path, HEIGHT, WIDTH))
    with pytest.raises(KeyError, match="excluded"):
        cache.row_of(bad["empty.jpg"])
    # The same files under "fail" still fail, from the committed cache without decoding again.
    with pytest.raises(ImageDecodeError, match="corrupt.jpg"):
        build_cache(paths, HEIGHT, WIDTH, tmp_path / "cache", workers=1, draft=False, progress=False)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="fault injected by inheritance via fork")
def test_a_decoding_process_that_dies_raises_instead_of_hanging(image_files, tmp_path, monkeypatch):
    import harness.data.cache as cache_module

    decode = cache_module.decode_image

    def die_on_the_seventh(path, *args):  # fault injection: a crash inside the image library
        if path == image_files[7]:
            os._exit(1)
        return decode(path, *args)

    monkeypatch.setattr(cache_module, "decode_image", die_on_the_seventh)  # forked workers inherit it
    with pytest.raises(RuntimeError, match="decoding process died"):
        build_cache(image_files, HEIGHT, WIDTH, tmp_path / "cache", workers=2, progress=False)
    assert cache_files(tmp_path / "cache") == []


# ----------------------------------------------------------------------------- the dataset


@pytest.fixture
def cache(image_files, tmp_path):
    return build_cache(image_files, HEIGHT, WIDTH, tmp_path / "cache", workers=1, draft=False, progress=False)


def test_dataset_items_are_float_chw_images_with_their_labels(cache, image_files):
    rows = np.array([cache.row_of(path) for path in image_files[::2]])
    labels = np.arange(len(rows)) % 18
    dataset = CachedImageDataset(cache.images, rows, labels)
    assert len(dataset) == 12
    image, label = dataset[4]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32 and label == 4
    expected = reference_decode(image_files[8], HEIGHT, WIDTH).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)


def test_a_custom_transform_gets_a_writable_uint8_hwc_image(cache):
    def flip(image: np.ndarray) -> torch.Tensor:
        assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3) and image.flags.writeable
        return torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1).float()

    dataset = CachedImageDataset(cache.images, np.arange(3), np.zeros(3), transform=flip)
    np.testing.assert_array_equal(dataset[1][0].numpy(), cache.images[1][:, ::-1].transpose(2, 0, 1))
    assert [item[1] for item in dataset.__getitems__([0, 2])] == [0, 0]


def test_batched_reads_equal_item_reads(cache):
    dataset = CachedImageDataset(cache.images, np.array([5, 0, 23, 5]), np.array([1, 2, 3, 4]))
    for (batched, batched_label), index in zip(dataset.__getitems__([3, 1, 2]), [3, 1, 2], strict=True):
        image, label = dataset[index]
        assert batched_label == label
        torch.testing.assert_close(batched, image, rtol=0, atol=0)


def test_pickling_the_dataset_does_not_copy_the_pixels(cache):
    dataset = CachedImageDataset(cache.images, np.arange(24), np.arange(24))
    pickled = pickle.dumps(dataset)
    assert len(pickled) < 4096 < cache.images.nbytes
    copy = pickle.loads(pickled)
    assert isinstance(copy.images, np.memmap) and copy.images.filename == cache.images.filename
    torch.testing.assert_close(copy[7][0], dataset[7][0], rtol=0, atol=0)


def test_dataloader_workers_read_the_same_data(cache):
    dataset = CachedImageDataset(cache.images, np.arange(24), np.arange(24) % 18)
    in_process = torch.stack([dataset[index][0] for index in range(24)])
    loader = DataLoader(dataset, batch_size=5, num_workers=2)
    batches = list(loader)
    torch.testing.assert_close(torch.cat([images for images, _ in batches]), in_process, rtol=0, atol=0)
    assert torch.cat([labels for _, labels in batches]).tolist() == (np.arange(24) % 18).tolist()


# ----------------------------------------------------------------------------- benchmark


def test_loader_bench_quick_writes_its_rows(tmp_path):
    result = run_loader_bench(tmp_path, quick=True)
    written = json.loads((tmp_path / "loader.json").read_text())
    assert written == result
    assert [row["name"] for row in result["rows"]] == ["loader_images_per_s", "loader_images_per_s_in_process",
                                                      "cache_build_seconds"]
    for row in result["rows"]:
        assert set(row) >= {"name", "harness", "reference", "ratio", "unit", "target"}
        assert row["harness"] > 0 and row["reference"] > 0 and row["ratio"] > 0
    assert result["draft_vs_full_mean_abs_diff"] < 3.0
