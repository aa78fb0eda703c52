"""Preflight: before a study spends any compute, every backbone it can draw must be usable on this machine.

`check_study(cfg)` runs when a study opens (`run_study`, `run_workers`), before a single trial (`harness
train`) and in `harness check-data`. It refuses, with one message listing every problem:
  - a backbone name timm does not know;
  - a backbone without ImageNet weights here while the study trains pretrained backbones, unless the
    study file opts into training it from scratch (`train.missing_weights: from_scratch`);
  - a test set of its own (data.test.root) that cannot be read or names classes the data does not have;
  - a store for trial files (store.url) that cannot be written and read back.
Registered names (heads, losses, freeze policies, preprocessors) and heads the data format cannot use
are refused earlier, when the study file loads (harness.config).
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


def preflight_problems(cfg: StudyConfig) -> list[str]:
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
    return problems + test_set_problems(cfg)


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
