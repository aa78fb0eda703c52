"""How candidates' valid probabilities are combined into an ensemble, and how that is scored honestly.

Pure numpy over (M candidates, N rows, C classes) probabilities; `harness.ensemble` decides which
trials are candidates and writes the result. The methods are a registry (`METHODS`):

    best_single     the candidate with the best macro F1
    average_top_k   the plain average of all candidates
    greedy          forward selection with replacement (Caruana et al., ICML 2004): each round adds
                    the candidate, repeats allowed, whose addition gives the best macro F1 of the
                    averaged probabilities; rounds after the best score are dropped

`honest_scores` fits each method on one half of the persons and scores it on the other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from harness.metrics import macro_f1_batch
from harness.registry import Registry

# (probabilities (M, n, C) of the candidates on some rows, labels (n,)) -> weights (M,)
Strategy = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (probabilities (M, n, C), labels (n,), weights (M,)) -> score
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


@dataclass
class Selection:
    weights: np.ndarray  # (M,) int: how often each candidate was added
    trajectory: list[float]  # macro F1 of the ensemble after each round
    rounds_kept: int  # rounds up to the best score (the weights count only these)


def greedy_selection(probs: np.ndarray, labels: np.ndarray, rounds: int) -> Selection:
    """Caruana's forward selection with replacement over candidates' probabilities (M, N, C).

    A running sum replaces the average (the argmax is the same), and every candidate's
    addition is scored at once: (M, N, C) sums, one argmax, one batched bincount per round.
    Ties go to the lower index, i.e. the candidate with the better val F1.
    """
    num_candidates, _, num_classes = probs.shape
    running = np.zeros(probs.shape[1:], dtype=probs.dtype)
    picks, trajectory = [], []
    for _ in range(rounds):
        scores = macro_f1_batch((running[None] + probs).argmax(axis=2), labels, num_classes)
        best = int(np.argmax(scores))
        running += probs[best]
        picks.append(best)
        trajectory.append(float(scores[best]))
    kept = int(np.argmax(trajectory)) + 1  # forced additions after the best round only lose
    return Selection(np.bincount(picks[:kept], minlength=num_candidates), trajectory, kept)


def blend(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C) weighted average of the candidates' probabilities (M, N, C)."""
    weights = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights / weights.sum(), probs, axes=1)


def blend_f1(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    return float(macro_f1_batch(blend(probs, weights).argmax(axis=1)[None], labels, probs.shape[2])[0])


def best_single_selection(probs: np.ndarray, labels: np.ndarray, rounds: int) -> Selection:
    scores = macro_f1_batch(probs.argmax(axis=2), labels, probs.shape[2])
    weights = np.zeros(len(probs), dtype=np.int64)
    weights[int(np.argmax(scores))] = 1
    return Selection(weights, [float(scores.max())], 1)


def average_selection(probs: np.ndarray, labels: np.ndarray, rounds: int) -> Selection:
    weights = np.ones(len(probs), dtype=np.int64)
    return Selection(weights, [blend_f1(probs, labels, weights)], 1)


@dataclass(frozen=True)
class EnsembleMethod:
    """How candidates are combined: (probs (M, N, C), labels (N,), rounds) -> Selection."""

    label: str  # its name in tables ("{k}": the number of candidates)
    select: Callable[[np.ndarray, np.ndarray, int], Selection]


METHODS: Registry[EnsembleMethod] = Registry("ensemble method")
METHODS.register("best_single")(EnsembleMethod("best single", best_single_selection))
METHODS.register("average_top_k")(EnsembleMethod("average top-{k}", average_selection))
METHODS.register("greedy")(EnsembleMethod("greedy", greedy_selection))


def strategies(rounds: int) -> dict[str, Strategy]:
    """Every registered method as weights-only strategies, in registration order (for honest scoring)."""
    return {name: (lambda probs, labels, method=method: method.select(probs, labels, rounds).weights)
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


def honest_scores(probs: np.ndarray, labels: np.ndarray, halves: list[tuple[np.ndarray, np.ndarray]],
                  methods: dict[str, Strategy], score: Scorer = blend_f1) -> dict:
    """Each method selects weights on a half's fit rows only and is scored on its held rows only.

    Returns {method: mean held-out score (NaN without halves), "halves": [per-half details]}.
    """
    details = []
    for fit, held in halves:
        detail: dict = {"fit_images": len(fit), "held_images": len(held)}
        for name, select in methods.items():
            weights = np.asarray(select(probs[:, fit], labels[fit]))
            detail[name] = float(score(probs[:, held], labels[held], weights))
            detail[f"{name}_weights"] = weights.tolist()
        details.append(detail)
    means = {name: float(np.mean([d[name] for d in details])) if details else math.nan for name in methods}
    return {**means, "halves": details}
