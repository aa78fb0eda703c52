"""How candidates' valid probabilities are combined into an ensemble, and how that is scored honestly.

Pure numpy. A candidate set is `Views`: for each valid view the objective needs ("valid", and
"bgswap" for the background-robust objectives; see harness.metrics.OBJECTIVES), the candidates'
probabilities (M candidates, N rows, C classes) on the same N rows. Every method maximises the
study's objective of the blend; `harness.promotion.ensemble` decides which trials are candidates and writes
the result. The methods are a registry (`METHODS`):

    best_single     the candidate with the best objective
    average_top_k   the plain average of all candidates
    greedy          forward selection with replacement (Caruana et al., ICML 2004): each round adds
                    the candidate, repeats allowed, whose addition gives the best objective of the
                    averaged probabilities; rounds after the best score are dropped

`honest_scores` fits each method on one half of the persons and scores it on the other (`held_out_weights`,
which the promotion's honest predictions use too).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from harness.metrics import OBJECTIVES, Objective, macro_f1_batch
from harness.registry import Registry

Views = dict[str, np.ndarray]  # view -> (M, N, C) probabilities of the candidates
# (views on some rows, labels of those rows) -> weights (M,)
Strategy = Callable[[Views, np.ndarray], np.ndarray]
# (views on some rows, labels, weights (M,)) -> score
Scorer = Callable[[Views, np.ndarray, np.ndarray], float]

PLAIN = OBJECTIVES.get("val/f1")


def rows_of(views: Views, rows: np.ndarray) -> Views:
    return {view: probs[:, rows] for view, probs in views.items()}


def candidates_score(views: Views, labels: np.ndarray, objective: Objective) -> np.ndarray:
    """(M,) the objective of each candidate alone."""
    return np.asarray(objective({view: macro_f1_batch(probs.argmax(axis=2), labels, probs.shape[2])
                                 for view, probs in views.items()}))


@dataclass
class Selection:
    weights: np.ndarray  # (M,) int: how often each candidate was added
    trajectory: list[float]  # the objective of the ensemble after each round
    rounds_kept: int  # rounds up to the best score (the weights count only these)


def greedy_selection(views: Views, labels: np.ndarray, rounds: int, objective: Objective = PLAIN) -> Selection:
    """Caruana's forward selection with replacement over the candidates' views.

    A running sum replaces the average (the argmax is the same), and every candidate's
    addition is scored at once: (M, N, C) sums, one argmax, one batched bincount per view and round.
    Ties go to the lower index, i.e. the candidate ranked higher by the study.
    """
    num_candidates = len(next(iter(views.values())))
    running = {view: np.zeros(probs.shape[1:], dtype=probs.dtype) for view, probs in views.items()}
    picks, trajectory = [], []
    for _ in range(rounds):
        scores = candidates_score({view: running[view][None] + probs for view, probs in views.items()}, labels,
                                  objective)
        best = int(np.argmax(scores))
        for view, probs in views.items():
            running[view] += probs[best]
        picks.append(best)
        trajectory.append(float(scores[best]))
    kept = int(np.argmax(trajectory)) + 1  # forced additions after the best round only lose
    return Selection(np.bincount(picks[:kept], minlength=num_candidates), trajectory, kept)


def blend(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C) weighted average of the candidates' probabilities (M, N, C)."""
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights / weights.sum(), probs, axes=1)


def blend_score(views: Views, labels: np.ndarray, weights: np.ndarray, objective: Objective = PLAIN) -> float:
    """The objective of the weighted blend."""
    return float(candidates_score({view: blend(probs, weights)[None] for view, probs in views.items()}, labels,
                                  objective)[0])


def best_single_selection(views: Views, labels: np.ndarray, rounds: int, objective: Objective = PLAIN) -> Selection:
    scores = candidates_score(views, labels, objective)
    weights = np.zeros(len(scores), dtype=np.int64)
    weights[int(np.argmax(scores))] = 1
    return Selection(weights, [float(scores.max())], 1)


def average_selection(views: Views, labels: np.ndarray, rounds: int, objective: Objective = PLAIN) -> Selection:
    weights = np.ones(len(next(iter(views.values()))), dtype=np.int64)
    return Selection(weights, [blend_score(views, labels, weights, objective)], 1)


@dataclass(frozen=True)
class EnsembleMethod:
    """How candidates are combined: (views, labels (N,), rounds, objective) -> Selection."""

    label: str  # its name in tables ("{k}": the number of candidates)
    select: Callable[[Views, np.ndarray, int, Objective], Selection]


METHODS: Registry[EnsembleMethod] = Registry("ensemble method")
METHODS.register("best_single")(EnsembleMethod("best single", best_single_selection))
METHODS.register("average_top_k")(EnsembleMethod("average top-{k}", average_selection))
METHODS.register("greedy")(EnsembleMethod("greedy", greedy_selection))


def strategies(rounds: int, objective: Objective = PLAIN) -> dict[str, Strategy]:
    """Every registered method as weights-only strategies, in registration order (for honest scoring)."""
    return {name: (lambda views, labels, method=method: method.select(views, labels, rounds, objective).weights)
            for name, method in METHODS.items()}


# ----------------------------------------------------------------------- honest scoring


def person_halves(labels: np.ndarray, persons: np.ndarray, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(fit rows, held rows), (the same swapped)]: valid persons in two halves, stratified on labels.

    Empty when valid has fewer than two persons (no honest score is possible then).
    """
    if len(np.unique(persons)) < 2:
        return []
    rows = np.zeros(len(labels))
    try:
        with warnings.catch_warnings():  # "least populated class has 1 member": expected with rare classes
            warnings.simplefilter("ignore", UserWarning)
            splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
            folds = list(splitter.split(rows, labels, groups=persons))
    except ValueError:  # every class has a single image: nothing to stratify on
        folds = []
    if len(folds) != 2 or any(len(held) == 0 for _, held in folds):
        folds = list(GroupKFold(n_splits=2).split(rows, labels, groups=persons))
    return [(np.sort(fit), np.sort(held)) for fit, held in folds]


def held_out_weights(views: Views, labels: np.ndarray, halves: list[tuple[np.ndarray, np.ndarray]],
                     select: Strategy) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(fit rows, held rows, weights chosen on the fit rows only) for each half: the one way the ensemble's
    honest scores and the promotion's honest predictions keep a person's own rows out of its weights."""
    for fit, held in halves:
        yield fit, held, np.asarray(select(rows_of(views, fit), labels[fit]))


def honest_scores(views: Views, labels: np.ndarray, halves: list[tuple[np.ndarray, np.ndarray]],
                  methods: dict[str, Strategy], score: Scorer | None = None) -> dict:
    """Each method selects weights on a half's fit rows only and is scored on its held rows only
    (`score`: the plain val F1 of the blend unless given).

    Returns {method: mean held-out score (NaN without halves), "halves": [per-half details]}.
    """
    score = score or blend_score
    details = [{"fit_images": len(fit), "held_images": len(held)} for fit, held in halves]
    for name, select in methods.items():
        for detail, (_, held, weights) in zip(details, held_out_weights(views, labels, halves, select), strict=True):
            detail[name] = float(score(rows_of(views, held), labels[held], weights))
            detail[f"{name}_weights"] = weights.tolist()
    means = {name: float(np.mean([d[name] for d in details])) if details else math.nan for name in methods}
    return {**means, "halves": details}
