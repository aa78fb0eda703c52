"""`harness export STUDY.yaml`: the promoted ensemble as one file that plain PyTorch loads, no harness needed.

    files = {"harness.json": ""}
    model = torch.export.load("runs/<study>/model.pt2", extra_files=files).module()
    info = json.loads(files["harness.json"])      # class_names, image_size, resize, tta, members
    probs = model(images)    # uint8 (N, H, W, 3) RGB at info["image_size"] -> (N, C) class probabilities

The file holds every member (each fold model of a promoted configuration, or each ensemble member) with
its weight, the normalisation and the test-time augmentation chosen at export, as one graph; the class
names and the rest ride in the archive's harness.json. Images go in already decoded and resized to
`image_size` with `resize` ("area": PIL's BOX filter, "bilinear"), as the harness's cache makes them, so
the file's outputs equal `harness predict`'s (a test holds them within 1e-5). The batch size is free.

Why torch.export and not TorchScript: both write one file plain PyTorch loads, and TorchScript would keep
the class names as attributes of the loaded module; but this torch (2.14) deprecates torch.jit.trace,
script, save and load with a warning on every call, and torch.export is the format PyTorch develops
(AOTInductor and ExecuTorch take it from here). The metadata then lives in an extra file of the archive.

Only members that saw the images whole (`preprocess: none`) can be exported: the crops need the
harness's face and person detection, which does not travel in the file.
"""

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from harness.augment import IMAGENET_MEAN, IMAGENET_STD
from harness.config import StudyConfig
from harness.folders import StudyFolder
from harness.predict import (
    PredictError,
    checked_tta,
    load_member_model,
    load_members,
    member_class_names,
    member_params,
)

METADATA_FILE = "harness.json"  # an extra file inside the archive: where the members came from


class _MemberProbabilities(nn.Module):
    """One member: normalised float images (N, 3, H, W) -> class probabilities, as the harness computes them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.model.class_log_probs(self.model(x).float()).exp()


class ExportedEnsemble(nn.Module):
    """uint8 (N, H, W, 3) RGB images at `image_size` -> (N, C) class probabilities of the weighted members."""

    def __init__(self, members: list[nn.Module], weights: list[float], image_size: tuple[int, int],
                 tta: str | None) -> None:
        super().__init__()
        self.members = nn.ModuleList(_MemberProbabilities(member) for member in members)
        self.member_weights = [weight / sum(weights) for weight in weights]
        self.image_size = image_size
        self.tta = tta
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN.tolist()).view(1, 3, 1, 1).clone())
        self.register_buffer("std", torch.tensor(IMAGENET_STD.tolist()).view(1, 3, 1, 1).clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255.0).sub(self.mean).div(self.std).contiguous()
        total = None
        for weight, member in zip(self.member_weights, self.members, strict=True):
            probs = member(x)
            if self.tta == "hflip":
                probs = (probs + member(torch.flip(x, dims=[3]))) / 2
            total = probs * weight if total is None else total + probs * weight
        return total


def export_model(cfg: StudyConfig, out: Path | None = None, tta: str | None = None, trial: int | None = None,
                 storage: str | None = None, source: str = "auto") -> Path:
    """Write the members `harness predict` would use (see `load_members`) as one torch.export file."""
    tta = checked_tta(tta)
    members, _ = load_members(cfg, trial, storage, source)
    params = {member.name: member_params(member.folder, cfg) for member in members}
    cropped = {name: p.preprocess for name, p in params.items() if p.preprocess != "none"}
    if cropped:
        raise PredictError(f"cannot export members trained on preprocessed images {cropped}: their crops need the "
                            "harness's face and person detection, which does not travel in the file; export a "
                            "study whose members use preprocess none (or predict with `harness predict --images`)")
    size = cfg.data.image_size
    models = [load_member_model(member.folder, params[member.name], cfg).cpu().eval() for member in members]
    ensemble = ExportedEnsemble(models, [float(m.weight) for m in members], (size.height, size.width), tta).eval()
    example = torch.zeros(2, size.height, size.width, 3, dtype=torch.uint8)
    with torch.no_grad():
        program = torch.export.export(ensemble, (example,), dynamic_shapes={"images": {0: torch.export.Dim.DYNAMIC}})
    names = member_class_names(cfg, members[0].folder, storage)
    metadata = {"study": cfg.name, "class_names": names, "image_size": [size.height, size.width],
                "resize": cfg.data.resize, "tta": tta or "none", "input": "uint8 (N, height, width, 3) RGB",
                "output": "(N, classes) probabilities", "torch": torch.__version__,
                "members": [{"name": m.name, "trial": m.trial, "fold": m.fold, "weight": m.weight,
                             **params[m.name].model_dump()} for m in members]}
    path = Path(out) if out is not None else StudyFolder.of(cfg).export
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with warnings.catch_warnings():
            # said of every channels_last weight; the weights load back exactly (tests compare the outputs)
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(program, temporary, extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    print(f"wrote {path}: {len(members)} member model(s), {len(names)} classes, input uint8 (N, {size.height}, "
          f"{size.width}, 3) resized with {cfg.data.resize!r}, tta {tta or 'none'}")
    return path
