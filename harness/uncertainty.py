"""How sure a score is: person-bootstrap intervals, and which trials cannot be told apart from the best.

Valid splits are small (24 persons in the default study), and a person's seven photos are not seven
independent samples, so the resampling unit is the person: a bootstrap sample draws persons with
replacement and weighs each image by how often its person was drawn. F1 is computed from weighted
confusion matrices for all resamples at once (one matrix product), for any number of candidates.

    f1_interval(pred, labels, persons, C)   95% interval of the macro F1 of one prediction
    f1_on_new_set(pred, ..., size)          the macro F1 to expect on a new set of `size` persons (stratified
                                            by label, as held-out splits are), and the 95% interval one such
                                            set's score falls in
    f1_on_held_out(held_out, ...)           the macro F1 to expect of predictions on one given set of unlabelled
                                            images, from their probabilities (the expected confusion matrix),
                                            with an interval from out-of-fold sets where the truth is known
    undiluted(members, weights)             an average of models' probabilities with their own confidence: what
                                            f1_on_held_out reads for a bag of models
    with_intervals(cfg, frame)              trials_frame + each trial's objective interval on valid and
                                            whether it can be told apart from the best trial (paired: the
                                            same resamples for every trial, the interval of the difference)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.metrics import OBJECTIVES, softmax_np
from harness.promotion.selection import blend

RESAMPLES = 1000
LEVEL = 0.95


def person_weights(persons: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, size: int | None = None,
                   strata: np.ndarray | None = None) -> np.ndarray:
    """(resamples, N): how often each image's person was drawn in each bootstrap sample of the persons (as
    many as there are, with replacement), or in each draw of `size` distinct persons where `size` is fewer.
    With `strata` (a label per image; a person's stratum is the label most of its images carry), a draw of
    `size` takes from each stratum its share of `size`, as a stratified held-out split does."""
    unique, owner = np.unique(np.asarray(persons), return_inverse=True)
    rng = np.random.default_rng(seed)
    if size is not None and size < len(unique):  # a smaller set of distinct persons, as a new set would be
        groups = _groups(owner, len(unique), strata)
        takes = _shares(groups, size)
        draws = np.stack([np.concatenate([rng.choice(members, take, replace=False)
                                          for members, take in zip(groups, takes, strict=True)])
                          for _ in range(resamples)])
    else:
        draws = rng.integers(0, len(unique), (resamples, size or len(unique)))
    counts = np.stack([np.bincount(row, minlength=len(unique)) for row in draws])
    return counts[:, owner].astype(np.float64)


def _groups(owner: np.ndarray, persons: int, strata: np.ndarray | None) -> list[np.ndarray]:
    """The persons of each stratum (one group of everyone without strata)."""
    if strata is None:
        return [np.arange(persons)]
    table = pd.crosstab(owner, np.asarray(strata))  # images of each person per label
    stratum = table.columns.to_numpy()[table.to_numpy().argmax(axis=1)]
    return [np.flatnonzero(stratum == value) for value in np.unique(stratum)]


def _shares(groups: list[np.ndarray], size: int) -> list[int]:
    """How many persons each group gives to a set of `size`: in proportion to its size, largest
    remainders first, every group at least one where the set has room for all."""
    sizes = np.array([len(g) for g in groups])
    exact = size * sizes / sizes.sum()
    take = np.floor(exact).astype(int)
    for g in np.argsort(-(exact - take), kind="stable")[: size - take.sum()]:
        take[g] += 1
    while size >= len(groups) and (take == 0).any():  # a rare stratum is in every stratified split
        take[np.argmax(take)] -= 1
        take[np.argmin(take)] += 1
    return take.tolist()


def weighted_f1(preds: np.ndarray, labels: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, B) macro F1 of each prediction row (K, N) under each weighting (B, N) of the images; a class with
    no weight in the truth nor the predictions scores 0, as sklearn's zero_division=0 does."""
    from scipy.sparse import csr_matrix

    preds, labels = np.atleast_2d(preds), np.asarray(labels)
    size, cells = num_classes * num_classes, labels[None, :] * num_classes + preds  # (K, N): (truth, prediction)
    rows = np.arange(preds.shape[1])
    counts = np.stack([csr_matrix((np.ones(len(rows)), (rows, row_cells)), shape=(len(rows), size)).T.dot(weights.T).T
                       for row_cells in cells]).reshape(len(preds), len(weights), num_classes, num_classes)
    true_positives = np.diagonal(counts, axis1=2, axis2=3)
    totals = counts.sum(axis=2) + counts.sum(axis=3)  # predicted + actual, per class
    f1 = np.divide(2 * true_positives, totals, out=np.zeros_like(true_positives), where=totals > 0)
    return f1.mean(axis=2)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    return float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))


def f1_interval(pred: np.ndarray, labels: np.ndarray, persons: np.ndarray, num_classes: int,
                seed: int = 0) -> tuple[float, float]:
    """The person-bootstrap 95% interval of the macro F1 of one prediction."""
    return interval(weighted_f1(pred, labels, person_weights(persons, seed=seed), num_classes)[0])


def f1_on_new_set(pred: np.ndarray, labels: np.ndarray, persons: np.ndarray, num_classes: int, size: int,
                  seed: int = 0, stratified: bool = True) -> tuple[float, tuple[float, float]]:
    """What predictions made like `pred` would score on a new set of `size` persons: the mean macro F1 over
    draws of `size` of these persons (distinct ones, where there are more) and a 95% interval.

    Macro F1 is not an average over images: on a small set a rare class met by one or two persons scores
    all or nothing. A held-out set is drawn `stratified` by default, as organisers and stratified splits
    draw one: each stratum (a person's most common label) gives its share of persons, so a rare class is
    never missing. Drawn at random instead, some sets miss it and the mean falls as the set shrinks (0.82
    over 120 persons, 0.78 over 48 in a measured run; 0.83 stratified, where the held-out set scored 0.83).
    The interval is a prediction interval for one set of that size: a new set's sampling noise (the draws of
    `size` persons) plus this estimate's own (the ordinary bootstrap of these persons, centred), so the
    held-out score is what it is meant to cover."""
    strata = labels if stratified else None
    new_set = weighted_f1(pred, labels, person_weights(persons, seed=seed, size=size, strata=strata), num_classes)[0]
    these = weighted_f1(pred, labels, person_weights(persons, seed=seed + 1), num_classes)[0]
    return float(new_set.mean()), interval(np.clip(new_set + these - these.mean(), 0.0, 1.0))


def expected_f1(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(B,) the macro F1 that the argmax of `probs` (N, C) is expected to score if each image's class were
    drawn from its row of `probs`, under each weighting (B, N) of the images (one, all weights 1, without).

    Per class: 2 E[TP] / (predicted + E[actual]), the expected confusion matrix's F1 (confidence-based
    performance estimation). It needs no label: it reads which classes the predictions miss on these
    images, so a set whose rare class the model never predicts is expected to score low on it."""
    probs = np.asarray(probs, dtype=np.float64)
    weights = np.ones((1, len(probs))) if weights is None else np.atleast_2d(weights)
    predicted = np.eye(probs.shape[1])[probs.argmax(axis=1)]  # (N, C) one-hot
    true_positives = weights @ (predicted * probs)
    totals = weights @ predicted + weights @ probs  # predicted + expected actual, per class
    f1 = np.divide(2 * true_positives, totals, out=np.zeros_like(true_positives), where=totals > 0)
    return f1.mean(axis=1)


def f1_on_held_out(held_out: np.ndarray, probs: np.ndarray, labels: np.ndarray, persons: np.ndarray, size: int,
                   seed: int = 0) -> tuple[float, tuple[float, float]]:
    """The macro F1 to expect of the argmax of `held_out` (the submitted model's probabilities on the held-out
    images, whose labels are unknown) and a 95% interval for it.

    The figure is `expected_f1(held_out)`. Its error is measured where the truth is known: out-of-fold
    `probs` with their `labels`, on stratified draws of `size` persons (`person_weights`), each draw's macro F1
    minus the expected one. The interval is the figure plus the spread of that error, centred (its mean is not
    added: docs/performance.md, "The estimate of the submission") and widened by the finite population
    correction: `size` of these persons at a time vary less than `size` new ones would."""
    estimate = float(expected_f1(held_out)[0])
    weights = person_weights(persons, seed=seed, size=size, strata=labels)
    error = weighted_f1(np.asarray(probs).argmax(axis=1), labels, weights, probs.shape[1])[0] - expected_f1(probs, weights)
    known = len(np.unique(persons))
    if size < known:  # draws of `size` of `known` persons vary less than independent sets do: the finite
        error = error / np.sqrt(1 - size / known)  # population correction, undone
    low, high = interval(error - error.mean())
    return estimate, (float(np.clip(estimate + low, 0, 1)), float(np.clip(estimate + high, 0, 1)))


def undiluted(members: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, dict]:
    """The weighted average of the members' class probabilities (M, N, C), sharpened by one temperature until
    its mean top probability is the members' own (their weighted mean); left as it is where it is already at
    least that. One temperature keeps every prediction of the average. Returns (N, C) and what it did.

    Averaging models that disagree spreads the average over the classes they disagree on: its confidence falls
    below each member's while it is right more often than they are (a measured bag of six fold models: mean
    top probability 0.76 against its members' 0.74-0.87, right on 0.84 of the images against their 0.71-0.80).
    The expected confusion matrix of the plain average therefore reads low. The members are what out-of-fold
    predictions check (one fold model per labelled image); the average is what no labelled image can check
    (all but one fold model trained on every labelled person), so its confidence is set to the members'. That
    is pool-then-calibrate with the members' confidence as the target in place of a held-out set the bag does
    not have, and conservative where bagging gains: the bag is right at least as often as its members."""
    members, weights = np.asarray(members, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    average = blend(members, weights)
    target = float(np.average(members.max(axis=2).mean(axis=1), weights=weights))
    before = float(average.max(axis=1).mean())
    temperature, reached = 1.0, True
    if before < target:
        from scipy.optimize import brentq

        log_average = np.log(np.clip(average, 1e-12, 1.0))

        def shortfall(t: float) -> float:
            return float(softmax_np(log_average / t, axis=1).max(axis=1).mean()) - target

        sharpest = 1e-3
        if shortfall(sharpest) < 0:  # exact ties among near-certain members: no temperature reaches the target
            temperature, reached = sharpest, False
        else:
            temperature = brentq(shortfall, sharpest, 1.0, xtol=1e-6)
        average = softmax_np(log_average / temperature, axis=1)
    return average, {"members_confidence": target, "average_confidence": before, "temperature": float(temperature),
                     "target_reached": reached}


def objective_samples(view_preds: dict[str, np.ndarray], labels: np.ndarray, weights: np.ndarray,
                      objective: str, num_classes: int) -> np.ndarray:
    """(K, B) the objective of K candidates' predictions on each valid view under each resample."""
    f1 = {view: weighted_f1(preds, labels, weights, num_classes) for view, preds in view_preds.items()}
    return np.asarray(OBJECTIVES.get(objective)(f1))


def with_intervals(cfg, frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """`frame` (trials_frame) plus objective_low / objective_high (a 95% person-bootstrap interval of each
    trial's objective at its best epoch, from its stored valid log-probabilities) and tied_with_best (its
    difference from the best trial's objective, on the same resamples, has an interval that holds 0)."""
    from harness.folders import TrialFolder
    from harness.store import find_trial_folder

    frame = frame.copy()
    frame["objective_low"], frame["objective_high"], frame["tied_with_best"] = np.nan, np.nan, pd.NA
    views = OBJECTIVES.get(cfg.search.objective).views
    rows, preds, index, reference = [], {view: [] for view in views}, None, None
    for position, row in frame.iterrows():
        if row["state"] not in ("complete", "pruned"):
            continue
        folder, _ = find_trial_folder(cfg, row.get("run_dir") or None, int(row["trial"]),
                                      TrialFolder.files_for(views))
        if folder is None:
            continue
        this_index = folder.valid_index()
        if index is None:
            index, reference = this_index, folder
        elif not this_index.equals(index):
            continue  # another split's trial (cannot be compared on the same resamples)
        rows.append(position)
        for view in views:
            preds[view].append(folder.view_log_probs(view).argmax(axis=1))
    if not rows:
        return _beside_objective(frame)
    labels, persons = index["label"].to_numpy(), index["person"].to_numpy()
    num_classes = reference.num_classes()
    samples = objective_samples({view: np.stack(found) for view, found in preds.items()}, labels,
                                person_weights(persons, seed=seed), cfg.search.objective, num_classes)
    best = int(np.argmax(frame.loc[rows, "objective"].to_numpy()))
    for k, position in enumerate(rows):
        frame.loc[position, ["objective_low", "objective_high"]] = interval(samples[k])
        frame.loc[position, "tied_with_best"] = bool(interval(samples[best] - samples[k])[0] <= 0)
    return _beside_objective(frame)


def _beside_objective(frame: pd.DataFrame) -> pd.DataFrame:
    added = ["objective_low", "objective_high", "tied_with_best"]
    columns = [c for c in frame.columns if c not in added]
    at = columns.index("objective") + 1 if "objective" in columns else len(columns)
    return frame[columns[:at] + added + columns[at:]]


def winner_certainty(frame: pd.DataFrame) -> str | None:
    """How sure a study is of its winner, in words, from `with_intervals`' frame: the winner's interval against
    the runner-up's, how many trials cannot be told apart from it, and how long ago it was found; None with
    fewer than two trials with an interval."""
    ranked = frame[frame["objective_low"].notna()].sort_values(["objective", "trial"], ascending=[False, True])
    if len(ranked) < 2:
        return None
    best, second = ranked.iloc[0], ranked.iloc[1]

    def shown(row) -> str:
        return f"trial {int(row['trial'])} at {row['objective']:.4f} [{row['objective_low']:.4f}, " \
               f"{row['objective_high']:.4f}]"

    tied = int(ranked["tied_with_best"].iloc[1:].fillna(False).astype(bool).sum())
    finished = frame[frame["state"].isin(["complete", "pruned"])]
    after = int((finished["trial"] > best["trial"]).sum())
    text = f"Winner: {shown(best)}; runner-up: {shown(second)}. "
    if tied:
        text += (f"{tied} trial(s) cannot be told apart from the winner on these valid persons (the paired "
                 "interval of the difference holds 0): another seed, more trials or more epochs could change it.")
    else:
        text += "No other trial is within the winner's noise: the valid persons separate it from the rest."
    return text + f" {after} of the {len(finished)} finished trials came after the winner and did not beat it."
