"""`harness study STUDY.yaml --warm-start OTHER.yaml`: start a study from what another one found.

The other study's best complete configurations (by its objective) are enqueued in this study, once,
right after trial 0 and the study file's own recipes (`search.enqueue`): they are trained here, on
this study's data and split, so every figure of theirs in this study is this study's own, and the
sampler learns from them as from any trial. Trials are re-run rather than copied (Optuna's
`add_trials`) because a copied trial has no folder here: no model, no valid log-probabilities for
the ensemble, nothing measured on this data.

Refused, before any data is prepared, when the two search spaces differ: a configuration of another
space may not be a point of this one, and the sampler would learn from values it cannot propose.
"""

from __future__ import annotations

import json

import optuna
from optuna.trial import TrialState

from harness.config import ConfigError, StudyConfig

ATTR = "warm_started_from"


class WarmStartError(ConfigError):
    """Another study that cannot seed this one; the message says why and what to do."""


def _space(cfg: StudyConfig) -> dict:
    return {name: spec.model_dump(mode="json") for name, spec in cfg.search.space.items()}


def check_same_space(cfg: StudyConfig, other: StudyConfig) -> None:
    """Refuse another study whose search space is not this one's (before anything is loaded or prepared)."""
    mine, theirs = _space(cfg), _space(other)
    if mine != theirs:
        differ = sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))
        raise WarmStartError(f"--warm-start {other.name!r}: its search space differs from study {cfg.name!r}'s "
                             f"in {differ}; warm-start only from a study of the same search.space")


def best_params(other: str, study: optuna.Study, top: int) -> list[dict]:
    """The params of the `top` best complete trials of study `other` (by its objective)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not complete:
        raise WarmStartError(f"--warm-start {other!r}: that study has no complete trial yet")
    best = sorted(complete, key=lambda t: (-t.value, t.number))[:top]
    return [dict(t.params) for t in best]


def enqueue_warm_start(study: optuna.Study, other: str, params: list[dict]) -> int:
    """Enqueue `params` once per study (a resumed study keeps what it was seeded with); returns how many."""
    if ATTR in study.user_attrs:
        return 0
    for rank, values in enumerate(params):
        study.enqueue_trial(values, user_attrs={"warm_start": f"{other}#{rank}"})
    study.set_user_attr(ATTR, json.dumps({"study": other, "configurations": len(params)}))
    return len(params)
