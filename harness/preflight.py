"""Preflight: before a study spends any compute, every backbone it can draw must be usable on this machine.

`check_study(cfg)` runs when a study opens (`run_study`, `run_search_workers`), before a single trial (`harness
train`) and in `harness check-data`. It refuses, with one message listing every problem:
  - a backbone name timm does not know;
  - a backbone without ImageNet weights here while the study trains pretrained backbones, unless the
    study file opts into training it from scratch (`train.missing_weights: from_scratch`);
  - a test set of its own (data.test.root) that cannot be read or names classes the data does not have;
  - a store for trial files (store.url) that cannot be written and read back;
  - a name the study file takes from a registry (head, loss, freeze policy, preprocessor, objective,
    ensemble method, sample dataset) that it does not have, and a head the data format cannot use:
    checked here, where the registries live, so that loading a study file imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from harness.config import ConfigError, StudyConfig
from harness.model import check_backbone_name
from harness.weights import WeightsSource, find_weights


class PreflightError(ConfigError):
    """A study that cannot run as written on this machine; the message lists each problem and its fix."""


def study_backbones(cfg: StudyConfig) -> list[str]:
    """Every backbone the study can train: the default (trial 0) and the searched choices, in that order."""
    names = [cfg.params.backbone]
    spec = cfg.search.space.get("backbone")
    if spec is not None and spec.type == "categorical":
        names += [name for name in spec.choices if name not in names]
    return names


def wants_pretrained(cfg: StudyConfig) -> bool:
    spec = cfg.search.space.get("pretrained")
    searched = spec is not None and spec.type == "categorical" and True in spec.choices
    return cfg.params.pretrained or searched


def weight_sources(cfg: StudyConfig) -> list[WeightsSource]:
    return [find_weights(name) for name in study_backbones(cfg)]


def axis_registries() -> dict:
    """The registry behind each param that names one of our own components: the one source of its allowed names."""
    from harness.augment import PREPROCESSORS
    from harness.heads import HEADS
    from harness.losses import LOSSES
    from harness.model import FREEZE_POLICIES

    return {"head": HEADS, "loss": LOSSES, "freeze": FREEZE_POLICIES, "preprocess": PREPROCESSORS}


def name_problems(cfg: StudyConfig) -> list[str]:
    """Every name the study file takes from a registry, looked up in it: each unknown one with its key path
    and the choices. Checked here, where the registries are imported, rather than when the file loads."""
    from harness.data.samples import SAMPLES
    from harness.metrics import OBJECTIVES
    from harness.promotion.selection import METHODS

    named = [("search.objective", OBJECTIVES, cfg.search.objective), ("ensemble.method", METHODS, cfg.ensemble.method)]
    if cfg.data.sample is not None:
        named.append(("data.sample", SAMPLES, cfg.data.sample))
    for axis, registry in axis_registries().items():
        named.append((f"params.{axis}", registry, getattr(cfg.params, axis)))
        spec = cfg.search.space.get(axis)
        if spec is not None and spec.type == "categorical":
            named += [(f"search.space.{axis}.choices", registry, choice) for choice in spec.choices]
        named += [(f"search.enqueue.{index}.{axis}", registry, recipe[axis])
                  for index, recipe in enumerate(cfg.search.enqueue) if axis in recipe]
    problems = []
    for key, registry, name in named:
        try:
            registry.get(name)
        except ValueError as error:
            problems.append(f"{key}: {error}")
    return problems or head_problems(cfg)


def head_problems(cfg: StudyConfig) -> list[str]:
    """A head that decodes the competition's tasks cannot train on data without them (image folder, CSV)."""
    from harness.heads import HEADS

    if cfg.data.format == "competition":
        return []
    usable = [name for name, head in HEADS.items() if not head.needs_tasks]
    space = cfg.search.space.get("head")
    searched = space.choices if space and space.type == "categorical" else []
    return [f"{key}: head {value!r} needs the competition's mask/gender/age tasks, but data.format is "
            f"{cfg.data.format!r}; choose one of {usable}"
            for key, values in (("params.head", [cfg.params.head]), ("search.space.head.choices", searched))
            for value in values if HEADS.get(value).needs_tasks]


def preflight_problems(cfg: StudyConfig) -> list[str]:
    return name_problems(cfg) + backbone_problems(cfg) + test_set_problems(cfg)


def backbone_problems(cfg: StudyConfig) -> list[str]:
    """Unknown backbones and missing ImageNet weights, with the fix for the weights once where any is missing."""
    problems = []
    known = []
    for name in study_backbones(cfg):
        try:
            check_backbone_name(name)
            known.append(name)
        except ValueError as error:
            problems.append(str(error))
    if wants_pretrained(cfg) and cfg.train.missing_weights == "refuse":
        for source in (find_weights(name) for name in known):
            if not source.found:
                problems.append(f"backbone {source.backbone!r}: no ImageNet weights on this machine "
                                f"({source.describe()})")
        if len(problems) > len(study_backbones(cfg)) - len(known):
            problems.append("to fix: `harness weights <study file> --download` fetches the missing weights once on an "
                            "online machine; or remove those backbones from params.backbone / "
                            "search.space.backbone.choices; or set `train.missing_weights: from_scratch` to train them "
                            "from random init on purpose")
    return problems


def test_set_problems(cfg: StudyConfig) -> list[str]:
    """What is wrong with a test folder or CSV of its own (data.test.root): found before any training, not
    when the finished study comes to score it."""
    from harness.data.readers import DataError, read_eval

    test = cfg.data.test
    if test is None or test.root is None or not Path(cfg.data.root).exists():
        return []
    try:
        index = read_eval(cfg.data)
    except DataError as error:
        return [f"data.test: {error}"]
    return [f"data.test: {problem}" for problem in index.errors]


def check_study(cfg: StudyConfig) -> None:
    """Raise PreflightError listing every problem; nothing has been written or computed when it does."""
    from harness.store import StoreError, check_store

    problems = preflight_problems(cfg)
    try:
        check_store(cfg)
    except StoreError as error:
        problems.append(str(error))
    if problems:
        listed = "\n".join(f"  {problem}" for problem in problems)
        raise PreflightError(f"study {cfg.name!r} cannot run as written on this machine:\n{listed}")
