"""`make bench` group "own_data": the template study on data of one's own, as a newcomer runs it.

  own_data_test_f1           studies/template.yaml on scikit-learn's digits written as an image folder
                             (data.sample: digits; image_size 64x64 instead of the template's 128: the
                             scans are 8x8), 20% of the images held out as the test set by the template's
                             own data.test.fraction: study, ensemble, promote, submit. harness = the
                             promoted ensemble's test macro F1; reference = an RBF SVM on the decoded grey
                             pixels of the same images, C by 5-fold CV, trained on every non-test image and
                             scored on the same test images; ratio = the harness's test F1, met at >= 0.985.
  predict_images_throughput  `harness predict --images` (predict_images: listing, decoding, the promoted
                             members) over 1,000 of the digits' PNG files, against a plain PyTorch loop over
                             the exported model (model.pt2: PIL decode and resize, batches of the same size);
                             harness = images/s of predict_images, reference = of the loop, ratio = harness /
                             reference, met at >= 0.8. Both decode from scratch (a fresh cache each time);
                             arms alternate, best of 3.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from harness.bench.common import Bench, row
from harness.config import StudyConfig, load_study
from harness.folders import StudyFolder

TEMPLATE = Path("studies/template.yaml")
TEST_F1_TARGET = 0.985
THROUGHPUT_TARGET = 0.8
IMAGES = 1000
REPEATS = 3


def template_on_digits(bench: Bench) -> StudyConfig:
    root = bench.out / "own_data"
    overrides = {"runs_dir": str(root / "runs"), "data.root": str(root / "digits"), "data.sample": "digits",
                 "data.cache_dir": str(root / "cache"), "tracking.mode": "disabled"}
    if not bench.quick:
        overrides["data.image_size"] = {"height": 64, "width": 64}
    return load_study(TEMPLATE, smoke=bench.quick, overrides=overrides)


def bench_own_data(bench: Bench) -> list[dict]:
    from harness.pipeline import make_study
    from harness.predict import predict_submission
    from harness.promotion.folds import promote

    cfg = template_on_digits(bench)
    shutil.rmtree(cfg.study_dir, ignore_errors=True)
    started = time.perf_counter()
    make_study(cfg, progress=False, log_to_wandb=False, report=False)
    single = predict_submission(cfg, log_to_wandb=False, source="ensemble")["eval_f1"]
    promote(cfg)
    promoted = predict_submission(cfg, log_to_wandb=False, source="promotion")["eval_f1"]
    seconds = time.perf_counter() - started
    svm, svm_seconds = svm_test_f1(cfg)
    quality = row("own_data_test_f1", promoted, svm, "test macro F1", TEST_F1_TARGET, ratio=promoted)
    quality.update(single_split_test_f1=round(single, 4), seconds={"harness": round(seconds, 1),
                                                                   "svm": round(svm_seconds, 1)},
                   size=f"digits at {cfg.data.image_size.height}x{cfg.data.image_size.width}, "
                        f"{cfg.search.trials} trials x {cfg.train.epochs} epochs, {cfg.promotion.folds} folds")
    return [quality, throughput(bench, cfg)]


def svm_test_f1(cfg: StudyConfig) -> tuple[float, float]:
    """An RBF SVM on the grey pixels of the study's decoded images: trained on every non-test image (C by
    5-fold CV), scored on the test images."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    from harness.data.prepare import prepare_data
    from harness.metrics import macro_f1
    from harness.predict import EvalImages

    started = time.perf_counter()
    data = prepare_data(cfg, progress=False)
    test = EvalImages(cfg)

    def grey(images: np.ndarray) -> np.ndarray:
        return np.asarray(images, dtype=np.float32).mean(axis=3).reshape(len(images), -1) / 255

    search = GridSearchCV(SVC(), {"C": [1, 3, 10, 30], "gamma": ["scale"]}, cv=5)
    search.fit(grey(data.cache.images), data.frame["label"].to_numpy())
    predicted = search.predict(grey(np.asarray(test.cache.images)[test.rows]))
    labels = test.frame["label"].to_numpy()
    return macro_f1(predicted, labels, data.num_classes), time.perf_counter() - started


def throughput(bench: Bench, cfg: StudyConfig) -> dict:
    from harness.export import export_model
    from harness.predict import predict_images

    folder = bench.out / "own_data" / "predict-images"
    shutil.rmtree(folder, ignore_errors=True)
    sources = sorted(Path(cfg.data.root).rglob("*.png"))
    count = min(IMAGES, len(sources))
    for index, source in enumerate(sources[:count]):
        target = folder / source.parent.name / f"{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    model_file = export_model(cfg, bench.out / "own_data" / StudyFolder.EXPORT)
    harness_s, plain_s = [], []
    for repeat in range(REPEATS):
        fresh = cfg.replace({"data.cache_dir": str(bench.out / "own_data" / f"predict-cache-{repeat}")})
        shutil.rmtree(fresh.data.cache_dir, ignore_errors=True)
        started = time.perf_counter()
        predict_images(fresh, folder, bench.out / "own_data" / StudyFolder.PREDICTIONS, progress=False)
        harness_s.append(time.perf_counter() - started)
        plain_s.append(plain_loop_seconds(model_file, folder))
        shutil.rmtree(fresh.data.cache_dir, ignore_errors=True)
    harness_rate, plain_rate = count / min(harness_s), count / min(plain_s)
    result = row("predict_images_throughput", harness_rate, plain_rate, "images/s", THROUGHPUT_TARGET)
    result.update(images=count, seconds={"harness": [round(s, 2) for s in harness_s],
                                         "plain_loop": [round(s, 2) for s in plain_s]})
    return result


def plain_loop_seconds(model_file: Path, folder: Path) -> float:
    """What a user writes around the exported file: PIL decode and resize, batches, the model."""
    import json

    import torch
    from PIL import Image

    from harness.export import METADATA_FILE
    from harness.train import EVAL_BATCH

    started = time.perf_counter()
    files = {METADATA_FILE: ""}
    model = torch.export.load(model_file, extra_files=files).module()
    info = json.loads(files[METADATA_FILE])
    height, width = info["image_size"]
    resample = Image.Resampling.BOX if info["resize"] == "area" else Image.Resampling.BILINEAR
    paths = sorted(folder.rglob("*.png"))
    outputs = []
    with torch.no_grad():
        for start in range(0, len(paths), EVAL_BATCH):
            batch = np.stack([np.array(Image.open(p).convert("RGB").resize((width, height), resample))
                              for p in paths[start:start + EVAL_BATCH]])
            outputs.append(model(torch.from_numpy(batch)))
    torch.cat(outputs)
    return time.perf_counter() - started
