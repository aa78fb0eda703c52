"""One trial end to end on the default study's smoke variant (synthetic data, CPU-seconds)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from harness.data.prepare import prepare_data
from harness.io import load_checkpoint
from harness.losses import LOSSES
from harness.model import FREEZE_POLICIES, build_model
from harness.train import probe_rows, run_trial, seed_everything

METRIC_COLUMNS = ["epoch", "train/loss", "val/loss", "val/f1", "val/f1_mask", "val/f1_gender", "val/f1_age",
                  "val/acc", "train/f1_probe", "gap/f1", "val/f1_bgswap", "gap/bgswap", "objective", "lr",
                  "epoch_time", "images_per_s"]


@pytest.fixture
def cfg(smoke_study):
    return smoke_study()


@pytest.fixture
def data(cfg):
    return prepare_data(cfg, progress=False)


def test_trial_writes_everything_a_reviewer_needs(cfg, data, tmp_path):
    result = run_trial(cfg, data=data, run_dir=tmp_path / "t")
    assert result.state == "complete", result.reason
    assert result.epochs_run == cfg.train.epochs
    metrics = pd.read_csv(tmp_path / "t" / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(cfg.train.epochs))
    assert set(METRIC_COLUMNS) <= set(metrics.columns)
    assert np.allclose(metrics["gap/f1"], metrics["train/f1_probe"] - metrics["val/f1"])
    assert np.allclose(metrics["gap/bgswap"], metrics["val/f1"] - metrics["val/f1_bgswap"])
    assert np.allclose(metrics["objective"], np.minimum(metrics["val/f1"], metrics["val/f1_bgswap"]))  # robust/f1
    best = metrics["objective"].idxmax()  # the best epoch is the best objective's
    assert result.objective == pytest.approx(metrics["objective"].max()) and result.best_epoch == best
    assert result.best["val/f1"] == pytest.approx(metrics.loc[best, "val/f1"])
    n_valid = len(data.split.valid)
    assert np.load(tmp_path / "t" / "valid_logits.npy").shape == (n_valid, 18)
    assert np.load(tmp_path / "t" / "bgswap_logits.npy").shape == (n_valid, 18)
    assert result.foreground["images"] == len(data.frame) and result.weights == "random init"
    index = pd.read_csv(tmp_path / "t" / "valid_index.csv")
    assert index["image_id"].tolist() == data.frame["image_id"].iloc[data.split.valid].tolist()
    assert np.load(tmp_path / "t" / "confusion.npy").sum() == n_valid
    saved = json.loads((tmp_path / "t" / "result.json").read_text())
    assert saved["state"] == "complete" and saved["best_epoch"] == result.best_epoch
    assert (tmp_path / "t" / "config.yaml").read_text().startswith("study:")
    assert load_checkpoint(tmp_path / "t" / "last.pt")["next_epoch"] == cfg.train.epochs
    assert "model" in load_checkpoint(tmp_path / "t" / "best.pt")


def test_resume_gives_the_same_metrics_as_training_straight(cfg, data, tmp_path):
    cfg = cfg.replace({"train.epochs": 4})
    straight = run_trial(cfg, data=data, run_dir=tmp_path / "straight")
    first = run_trial(cfg, data=data, run_dir=tmp_path / "resumed", stop_after_epochs=2)
    assert first.state == "interrupted" and first.epochs_run == 2
    resumed = run_trial(cfg, data=data, run_dir=tmp_path / "resumed")
    assert resumed.state == "complete"
    a = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    b = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert list(b["epoch"]) == [0, 1, 2, 3]
    for column in ["train/loss", "val/loss", "val/f1", "train/f1_probe", "val/f1_bgswap", "objective", "lr"]:
        assert a[column].tolist() == b[column].tolist(), column
    assert straight.best["val/f1"] == resumed.best["val/f1"]


def test_a_row_written_after_the_last_checkpoint_is_redone_not_repeated(cfg, data, tmp_path):
    run_trial(cfg, data=data, run_dir=tmp_path / "t", stop_after_epochs=1)
    metrics = pd.read_csv(tmp_path / "t" / "metrics.csv")
    extra = metrics.assign(epoch=1)  # as if killed after writing epoch 1's row but before last.pt
    pd.concat([metrics, extra]).to_csv(tmp_path / "t" / "metrics.csv", index=False)
    run_trial(cfg, data=data, run_dir=tmp_path / "t")
    assert pd.read_csv(tmp_path / "t" / "metrics.csv")["epoch"].tolist() == list(range(cfg.train.epochs))


@pytest.mark.parametrize("policy", FREEZE_POLICIES.names())
def test_every_freeze_policy_runs_a_trial(cfg, data, tmp_path, policy):
    result = run_trial(cfg, {"freeze": policy, "freeze_k": 1}, data=data, run_dir=tmp_path / policy)
    assert result.state == "complete", result.reason


def test_head_only_keeps_the_backbone_bit_identical(cfg, data, tmp_path):
    params = cfg.params.replace(freeze="head_only")
    seed_everything(cfg.seed)
    initial = build_model(params.backbone, params.head, 18, pretrained=False,
                          image_size=(cfg.data.image_size.height, cfg.data.image_size.width)).state_dict()
    result = run_trial(cfg, params, data=data, run_dir=tmp_path / "t")
    assert result.state == "complete", result.reason
    final = load_checkpoint(tmp_path / "t" / "last.pt")["model"]
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    for key in backbone:
        assert torch.equal(initial[key], final[key]), key
    assert any(not torch.equal(initial[k], final[k]) for k in initial if k.startswith("head."))


@pytest.mark.parametrize("head", ["multiclass", "multihead"])
@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_loss_on_every_head_trains(cfg, data, tmp_path, head, loss):
    cfg = cfg.replace({"train.epochs": 1, "train.max_train_batches": 2})
    result = run_trial(cfg, {"head": head, "loss": loss}, data=data, run_dir=tmp_path / "t")
    assert result.state == "complete", result.reason
    assert np.isfinite(pd.read_csv(tmp_path / "t" / "metrics.csv")["train/loss"]).all()


@LOSSES.register("test_nan")
def _nan_loss(num_classes, focal_gamma, label_smoothing):
    return lambda logits, target: logits.sum() * float("nan")


def test_nan_loss_fails_the_trial_with_its_reason(cfg, data, tmp_path):
    result = run_trial(cfg, {"loss": "test_nan"}, data=data, run_dir=tmp_path / "t")
    assert result.state == "failed"
    assert "non-finite loss" in result.reason
    assert json.loads((tmp_path / "t" / "result.json").read_text())["state"] == "failed"


def test_unknown_backbone_fails_the_trial_not_the_process(cfg, data, tmp_path):
    result = run_trial(cfg, {"backbone": "resnet_does_not_exist"}, data=data, run_dir=tmp_path / "t")
    assert result.state == "failed"
    assert "resnet_does_not_exist" in result.reason


def test_probe_takes_whole_train_persons_the_size_of_valid(data):
    train, valid = data.rows("train"), data.rows("valid")
    probe = probe_rows(data.frame, train, len(valid), seed=0)
    persons = data.frame["person"].to_numpy()
    assert set(probe) <= set(train)
    assert not set(persons[probe]) & set(persons[valid])
    assert len(valid) <= len(probe) < len(valid) + 7
    chosen = set(persons[probe])
    assert all((persons[train][np.isin(persons[train], list(chosen))].size == len(probe)) for _ in [0])
    assert (probe_rows(data.frame, train, len(valid), seed=0) == probe).all()


@pytest.mark.parametrize("params", [{"preprocess": "face_crop"}, {"preprocess": "remove_background"},
                                    {"bgswap_p": 0.5}, {"preprocess": "center_crop", "bgswap_p": 1.0}],
                         ids=["face-crop", "remove-background", "bgswap-augmentation", "crop-and-swap"])
def test_every_remedy_trains_and_resumes_to_the_same_figures(cfg, data, tmp_path, params):
    cfg = cfg.replace({"train.epochs": 2, "train.max_train_batches": 3})
    straight = run_trial(cfg, params, data=data, run_dir=tmp_path / "straight")
    assert straight.state == "complete", straight.reason
    run_trial(cfg, params, data=data, run_dir=tmp_path / "resumed", stop_after_epochs=1)
    run_trial(cfg, params, data=data, run_dir=tmp_path / "resumed")
    a, b = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("straight", "resumed"))
    assert a["train/loss"].tolist() == b["train/loss"].tolist()  # the same swaps and crops after a resume


def test_the_bgswap_probe_sees_what_the_background_was_worth(cfg, data, tmp_path):
    """With the background removed, swapping it changes nothing the model sees: val F1 = swapped val F1."""
    result = run_trial(cfg, {"preprocess": "remove_background"}, data=data, run_dir=tmp_path / "t")
    metrics = pd.read_csv(tmp_path / "t" / "metrics.csv")
    assert result.state == "complete"
    assert (metrics["gap/bgswap"].abs() < 1e-12).all()


def test_a_tiny_model_overfits_a_tiny_batch(data):
    """The real model, loss and optimizer learn: on 16 fixed images the loss falls and accuracy rises.

    (Macro F1 over 18 classes cannot pass the share of classes present in 16 images, so the
    check on F1 is that it reaches that ceiling.)"""
    from harness.augment import build_transform
    from harness.heads import build_loss
    from harness.metrics import classification_metrics

    rows = data.rows("train")[:16]
    transform = build_transform(0.0, *data.cache.images.shape[1:3], train=False)
    x = torch.stack([transform(np.array(data.cache.images[r])) for r in rows])
    y = torch.as_tensor(data.frame["label"].to_numpy()[rows])
    seed_everything(0)
    model = build_model("resnet10t", "multiclass", 18, image_size=tuple(x.shape[2:]))
    loss_fn = build_loss("ce", "multiclass")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def evaluate():
        model.eval()
        with torch.no_grad():
            logits = model(x)
        metrics = classification_metrics(logits.numpy(), y.numpy(), tasks=True)
        return loss_fn(logits, y).item(), metrics["acc"], metrics["f1"]

    loss_before, acc_before, _ = evaluate()
    model.train()
    for _ in range(40):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    loss_after, acc_after, f1_after = evaluate()
    assert loss_after < loss_before / 4
    assert acc_after > max(0.9, acc_before + 0.5)
    assert f1_after == pytest.approx(len(set(y.tolist())) / 18, abs=0.06)
