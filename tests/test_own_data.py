"""Your own data: the template study on an image folder, a held-out test set, predictions for any folder of
images, and the exported model that plain PyTorch runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, harness_env, write_image
from harness.cli import main
from harness.config import ConfigError, load_study
from harness.data.readers import DataError, read_eval, read_train
from harness.export import METADATA_FILE, export_model
from harness.folders import StudyFolder
from harness.pipeline import make_study
from harness.predict import EvalImages, PredictError, predict_images, predict_submission
from harness.preflight import PreflightError, check_study
from harness.runtime import load_existing_study
from harness.study import trials_frame
from harness.tracking import ensemble_run_id, read_offline_run, study_key

TEMPLATE = REPO / "studies" / "template.yaml"


def template(tmp: Path, **overrides):
    return load_study(TEMPLATE, smoke=True, overrides={
        "runs_dir": str(tmp / "runs"), "data.root": str(tmp / "digits"), "data.cache_dir": str(tmp / "cache"),
        **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The template's smoke variant on the digits, as a user runs it: study, eval scores, ensemble, submit."""
    tmp = tmp_path_factory.mktemp("own-data")
    cfg = template(tmp)
    outcome = make_study(cfg, progress=False)
    assert outcome.report is not None and outcome.ensemble is not None and outcome.eval_f1
    submitted = predict_submission(cfg)
    return cfg, submitted


def test_the_template_holds_out_whole_groups_that_nothing_trains_on(tmp_path):
    cfg = template(tmp_path)
    from harness.data.prepare import ensure_dataset

    ensure_dataset(cfg.data)
    train, test = read_train(cfg.data).frame, read_eval(cfg.data).frame
    assert len(train) + len(test) == 1797  # every digit, once
    assert set(train["path"]).isdisjoint(test["path"]) and set(train["person"]).isdisjoint(test["person"])
    assert abs(len(test) / 1797 - 0.2) < 0.01
    assert set(test["label"]) == set(range(10))  # stratified: every class is tested
    assert list(test.attrs["class_names"]) == [str(d) for d in range(10)]


def test_the_test_set_is_predicted_scored_and_shown_everywhere_but_chooses_nothing(finished, capsys):
    cfg, submitted = finished
    table = pd.read_csv(cfg.study_dir / "test_predictions.csv", dtype={"predicted": str, "label": str})
    test = read_eval(cfg.data).frame
    assert len(table) == len(test) == submitted["rows"]
    assert list(table.columns[:3]) == ["file", "predicted", "label"]
    assert [c for c in table.columns if c.startswith("p_")] == [f"p_{d}" for d in range(10)]
    assert np.allclose(table[[f"p_{d}" for d in range(10)]].sum(axis=1), 1.0, atol=1e-5)
    scores = json.loads((cfg.study_dir / "ensemble" / "eval_metrics.json").read_text())
    assert scores["n_scored"] == len(test) and scores["class_names"] == [str(d) for d in range(10)]
    assert np.asarray(scores["confusion"]).sum() == len(test)
    assert len(scores["per_class_f1"]) == 10
    # the same figure in W&B, per class too
    summary = read_offline_run(cfg.study_dir / "wandb", ensemble_run_id(study_key(cfg)))["summary"]
    assert summary["eval/f1"] == pytest.approx(scores["eval_f1"])
    assert summary["eval/f1_class_3"] == pytest.approx(scores["per_class_f1"][3])
    # each trial's test F1 beside its objective; the study's ranking is the objective's alone
    frame = trials_frame(load_existing_study(cfg))
    assert frame["eval_f1"].notna().all()
    assert list(frame["trial"]) == list(frame.sort_values("objective", ascending=False)["trial"])
    assert main(["status", str(TEMPLATE), "--smoke", "--set", f"runs_dir={cfg.runs_dir}",
                 "--set", f"data.root={cfg.data.root}", "--set", f"data.cache_dir={cfg.data.cache_dir}"]) == 0
    assert f"macro F1 {scores['eval_f1']:.4f}" in capsys.readouterr().out
    from harness.report import write_report

    page = write_report(cfg).read_text()
    assert "Held-out set" in page and "confusion on the held-out set" in page


def test_predict_images_reads_a_folder_recursively_and_skips_what_is_not_an_image(finished, tmp_path, capsys):
    cfg, _ = finished
    folder = tmp_path / "new"
    for index, digit_file in enumerate(sorted((Path(cfg.data.root) / "7").iterdir())[:5]):
        target = folder / ("deep/er" if index % 2 else "") / f"seven-{index}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(digit_file.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / ".DS_Store").write_bytes(b"junk")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(TEMPLATE), "--smoke", "--set", f"runs_dir={cfg.runs_dir}", "--set",
                 f"data.root={cfg.data.root}", "--set", f"data.cache_dir={cfg.data.cache_dir}",
                 "--images", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 file(s)" in printed and "notes.txt: not an image file" in printed and "broken.png" in printed
    table = pd.read_csv(out, dtype={"predicted": str})
    assert sorted(table["file"]) == sorted(["seven-0.png", "deep/er/seven-1.png", "seven-2.png",
                                            "deep/er/seven-3.png", "seven-4.png"])
    assert set(table["predicted"]) <= {str(d) for d in range(10)}
    probs = table[[f"p_{d}" for d in range(10)]].to_numpy()
    assert probs.shape == (5, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_predict_images_refuses_a_folder_without_images(finished, tmp_path, capsys):
    cfg, _ = finished
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"no image files found .*1 other file"):
        predict_images(cfg, tmp_path / "empty")
    with pytest.raises(DataError, match="not a folder"):
        predict_images(cfg, tmp_path / "missing")


def test_the_exported_model_runs_in_plain_pytorch_and_equals_predict(finished, tmp_path):
    cfg, submitted = finished
    path = export_model(cfg, tmp_path / "model.pt2", tta="hflip")
    images = EvalImages(cfg)
    pixels = np.asarray(images.cache.images)[images.rows]
    np.save(tmp_path / "pixels.npy", pixels)
    # a fresh interpreter that never imports the harness
    script = f"""
import json, sys
import numpy as np, torch
files = {{"{METADATA_FILE}": ""}}
model = torch.export.load({str(path)!r}, extra_files=files).module()
x = torch.from_numpy(np.load({str(tmp_path / 'pixels.npy')!r}))
with torch.no_grad():
    probs = torch.cat([model(x[i:i + 33]) for i in range(0, len(x), 33)])
np.save({str(tmp_path / 'exported.npy')!r}, probs.numpy())
assert not any(name.startswith("harness") for name in sys.modules), "the harness was imported"
print(json.loads(files["{METADATA_FILE}"])["tta"])
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300,
                          env=harness_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "hflip"
    expected = predict_submission(cfg, tta="hflip", log_to_wandb=False)["probs"]
    assert np.abs(np.load(tmp_path / "exported.npy") - expected).max() < 1e-5
    assert not np.allclose(expected, submitted["probs"])  # the flip was in the file, not a no-op


def test_the_readme_example_classifies_an_image_with_the_exported_model(finished, tmp_path):
    cfg, _ = finished
    model = export_model(cfg, tmp_path / "model.pt2")
    image = sorted((Path(cfg.data.root) / "4").iterdir())[0]
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- export-example.*?-->\n```python\n(.*?)```", readme, re.S).group(1)
    code = block.replace('"runs/mine/model.pt2", "new-photos/cat.jpg"', f"{str(model)!r}, {str(image)!r}")
    assert code != block, "the README example no longer names its model and image on one line"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300,
                          env=harness_env())
    assert done.returncode == 0, done.stderr[-2000:]
    name, confidence = done.stdout.split()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / image.name).write_bytes(image.read_bytes())
    predict_images(cfg, tmp_path / "one", tmp_path / "p.csv", progress=False)
    row = pd.read_csv(tmp_path / "p.csv", dtype={"predicted": str}).iloc[0]
    assert name == row["predicted"] and float(confidence) == pytest.approx(row[f"p_{name}"], abs=1e-4)


def test_members_trained_on_crops_are_not_exported(finished, tmp_path):
    cfg, _ = finished
    copy = tmp_path / "runs" / cfg.name / "trials" / "0"
    shutil.copytree(StudyFolder.of(cfg).trial(0).path, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["params"]["preprocess"] = "center_crop"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(cfg.study_dir / "study.db", tmp_path / "runs" / cfg.name / "study.db")
    moved = cfg.replace({"runs_dir": str(tmp_path / "runs")})
    with pytest.raises(PredictError, match=r"center_crop.*preprocess none"):
        export_model(moved, trial=0)


def write_test_folder(root: Path, classes: list[str], unlabelled: int = 0) -> None:
    for index, name in enumerate(classes):
        write_image(root / name / f"{index}.png", seed=index)
    for index in range(unlabelled):
        write_image(root / f"loose-{index}.png", seed=100 + index)


def test_a_test_folder_of_its_own_is_read_by_class_and_unknown_classes_are_refused_before_training(tmp_path):
    cfg = template(tmp_path)
    from harness.data.prepare import ensure_dataset

    ensure_dataset(cfg.data)
    write_test_folder(tmp_path / "test", ["3", "5", "5"], unlabelled=2)
    own = cfg.replace({"data.test": {"root": str(tmp_path / "test")}})
    frame = read_eval(own.data).frame
    assert sorted(frame["label"]) == [-1, -1, 3, 5, 5]  # three in class folders, two loose
    assert len(read_train(own.data).frame) == 1797  # nothing held out of the training data
    write_test_folder(tmp_path / "bad", ["3", "cat", "dog"])
    bad = cfg.replace({"data.test": {"root": str(tmp_path / "bad")}})
    with pytest.raises(PreflightError, match=r"test class\(es\) \['cat', 'dog'\] are not among the training"):
        check_study(bad)
    assert not bad.study_dir.exists()


def test_a_test_csv_may_leave_labels_out_and_names_unknown_ones(tmp_path):
    cfg = template(tmp_path)
    from harness.data.prepare import ensure_dataset

    ensure_dataset(cfg.data)
    write_image(tmp_path / "t" / "a.png", seed=1)
    write_image(tmp_path / "t" / "b.png", seed=2)
    (tmp_path / "t" / "test.csv").write_text("path,label\na.png,7\nb.png,\n")
    own = cfg.replace({"data.test": {"root": str(tmp_path / "t"), "csv": "test.csv"}})
    assert list(read_eval(own.data).frame["label"]) == [7, -1]
    (tmp_path / "t" / "test.csv").write_text("path,label\na.png,seven\n")
    with pytest.raises(DataError, match=r"test class\(es\) \['seven'\]"):
        read_eval(own.data)


def test_the_test_section_is_checked_when_the_study_file_loads(tmp_path):
    with pytest.raises(ConfigError, match="either `fraction`"):
        template(tmp_path, **{"data.test": {"fraction": 0.2, "root": "x"}})
    with pytest.raises(ConfigError, match="competition layout's test set is its eval/"):
        load_study(REPO / "studies" / "default.yaml", overrides={"data.test": {"fraction": 0.2}})


def test_predicting_without_a_held_out_set_says_where_one_comes_from(tmp_path):
    cfg = load_study(REPO / "studies" / "digits.yaml", smoke=True, overrides={"data.root": str(tmp_path / "d")})
    from harness.data.prepare import ensure_dataset

    ensure_dataset(cfg.data)
    with pytest.raises(PredictError, match=r"data.test.*--images DIR"):
        EvalImages(cfg)


def test_torch_loads_images_exactly_as_the_cache_decodes_them(tmp_path):
    """The README example resizes with PIL's BOX filter for `resize: area`: the cache's own decode."""
    from harness.data.cache import decode_image

    source = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(source)
    ours = decode_image(str(source), 32, 32, "area")
    theirs = np.asarray(Image.open(source).convert("RGB").resize((32, 32), Image.Resampling.BOX))
    assert np.array_equal(ours, theirs)
    assert torch.from_numpy(np.array(theirs))[None].shape == (1, 32, 32, 3)
