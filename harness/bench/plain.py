"""The reference a budget is measured against: a plain Optuna + timm script, as a team writes one in an afternoon.

It trains on the same data as the study, from the same ImageNet weights, and shares nothing else with the
harness: every image decoded from its file per item (PIL, resized in the loader), a random 20% of the images as
valid (no person grouping, no foreground, no probes), TPE over backbone, learning rate and weight decay,
Optuna's MedianPruner on valid macro F1 after each epoch, `TRIALS` trials of `EPOCHS` epochs, then the best
trial's model predicts the eval images (the model as its trial ended, not a copy of its best epoch: the script
keeps the model object, as a quick script does). Its wall time is the budget's yardstick (`bench budget`); its eval F1
is reported beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import optuna
import torch
from PIL import Image
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader, Dataset

TRIALS, EPOCHS = 12, 6
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


class Images(Dataset):
    def __init__(self, paths: list[Path], labels: np.ndarray, size: tuple[int, int], flip: bool) -> None:
        self.paths, self.labels, self.size, self.flip = paths, labels, size, flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        height, width = self.size
        pixels = np.asarray(Image.open(self.paths[index]).convert("RGB").resize((width, height)), dtype=np.float32)
        if self.flip and np.random.rand() < 0.5:
            pixels = pixels[:, ::-1]
        pixels = (pixels / 255.0 - MEAN) / STD
        return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32)), int(self.labels[index])


def predict(model, loader) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(x).argmax(1).numpy() for x, _ in loader])


def run_plain(root: Path, size: tuple[int, int], backbones: list[str], trials: int = TRIALS, epochs: int = EPOCHS,
              max_batches: int | None = None, seed: int = 0) -> dict:
    """Run the plain script on a competition-layout dataset at `root`; its wall time, trials and eval F1."""
    from harness.data.readers import read_competition_eval, read_competition_train
    from harness.model import build_model

    started = time.perf_counter()
    frame = read_competition_train(root).frame
    paths, labels = [Path(p) for p in frame["path"]], frame["label"].to_numpy()
    order = np.random.default_rng(seed).permutation(len(paths))
    cut = int(0.8 * len(paths))
    train, valid = order[:cut], order[cut:]

    def loader(rows, flip: bool, shuffle: bool) -> DataLoader:
        return DataLoader(Images([paths[i] for i in rows], labels[rows], size, flip), batch_size=32, shuffle=shuffle)

    models: dict[int, torch.nn.Module] = {}

    def objective(trial: optuna.Trial) -> float:
        backbone = trial.suggest_categorical("backbone", backbones)
        lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
        weight_decay = trial.suggest_float("weight_decay", 1e-5, 0.1, log=True)
        torch.manual_seed(seed)
        model = build_model(backbone, "multiclass", 18, pretrained=True, image_size=size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        best = 0.0
        for epoch in range(epochs):
            model.train()
            for step, (x, y) in enumerate(loader(train, flip=True, shuffle=True)):
                if max_batches is not None and step >= max_batches:
                    break
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            score = f1_score(labels[valid], predict(model, loader(valid, False, False)), average="macro",
                             labels=list(range(18)), zero_division=0)
            if score > best:
                best, models[trial.number] = score, model
            trial.report(score, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials)
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    evaluated = read_competition_eval(root).frame
    known = evaluated["label"].to_numpy() >= 0
    eval_f1 = None
    if known.any():
        eval_paths = [Path(p) for p in evaluated["path"]]
        eval_loader = DataLoader(Images(eval_paths, evaluated["label"].to_numpy(), size, False), batch_size=64)
        answers = predict(models[best.number], eval_loader)
        eval_f1 = float(f1_score(evaluated["label"].to_numpy()[known], answers[known], average="macro",
                                 labels=list(range(18)), zero_division=0))
    return {"seconds": round(time.perf_counter() - started, 1), "trials": len(study.trials),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
            "best_valid_f1": round(best.value, 4), "eval_f1": None if eval_f1 is None else round(eval_f1, 4),
            "epochs": sum(len(t.intermediate_values) for t in study.trials)}


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.bench.plain [STUDY.yaml] [--root DIR]`: the plain script on a study file's data (its root,
    or DIR holding a competition-layout dataset; its image size and backbones), the figures as JSON."""
    import argparse
    import json

    from harness.config import load_study
    from harness.data.prepare import ensure_dataset
    from harness.preflight import study_backbones

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("study", nargs="?", default="studies/default.yaml")
    parser.add_argument("--root", type=Path, help="a competition-layout dataset (default: the study file's data.root)")
    args = parser.parse_args(argv)
    cfg = load_study(args.study)
    if args.root is None:
        ensure_dataset(cfg.data)
    size = (cfg.data.image_size.height, cfg.data.image_size.width)
    result = run_plain(args.root or cfg.data.root, size, study_backbones(cfg), seed=cfg.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
