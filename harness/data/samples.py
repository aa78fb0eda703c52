"""Small real image datasets that ship inside installed packages, written out as an image folder.

    data:
      format: imagefolder
      root: data/digits
      sample: digits          # written at root on first use, like data.synthetic

They are real photographs or scans, not drawings of ours: a check that the harness holds its own on
real pixels against a classical baseline (`make bench`, group "real"). Nothing is downloaded.

    digits   scikit-learn's handwritten digits: 1,797 scans of 8x8 grey levels, 10 classes
    faces    scikit-image's LFW subset: 100 face and 100 non-face crops of 25x25 grey levels, 2 classes
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from harness.io import writer_gone
from harness.registry import Registry

# name -> () -> (images (N, H, W) floats in 0..1, labels (N,), class names)
SAMPLES: Registry[Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = Registry("sample dataset")


@SAMPLES.register("digits")
def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images / 16.0, data.target, [str(d) for d in range(10)]


@SAMPLES.register("faces")
def faces() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from skimage.data import lfw_subset

    images = lfw_subset()  # the first 100 are faces, the last 100 are not
    return images, np.repeat([1, 0], 100), ["non_face", "face"]


def write_sample(name: str, root: Path) -> int:
    """Write sample `name` at root as <root>/<class>/<index>.png (grey as RGB); returns the image count.

    Written beside root and renamed into place, so an interrupted run never leaves half a dataset.
    """
    images, labels, classes = SAMPLES.get(name)()
    root = Path(root)
    for left in root.parent.glob(f"{root.name}.partial-*"):  # left by killed runs
        if writer_gone(left.name.rsplit("-", 1)[1]):
            shutil.rmtree(left, ignore_errors=True)
    partial = root.parent / f"{root.name}.partial-{os.getpid()}"
    try:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = partial / classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            grey = np.clip(np.round(np.asarray(image) * 255), 0, 255).astype(np.uint8)
            Image.fromarray(grey).convert("RGB").save(folder / f"{index:05d}.png")
        os.replace(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return len(images)
