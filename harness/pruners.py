"""A pruner that stops a trial only when the evidence says it is worse.

Successive halving, hyperband and the median rule compare one epoch's objective, a point estimate
on a valid split of a few dozen persons, with other trials'. Two epochs of the same configuration
differ by more than many configurations do, so a good configuration is often stopped after one
unlucky epoch and the study's answer depends on which configuration happened to be proposed when.

`EvidencePruner(wrapped, keep_share)` asks the wrapped pruner first; where it says stop, the trial is
stopped only if the upper end of its objective's 95% person-bootstrap interval at that epoch
(train.evaluate writes it; `report_to_pruner` keeps it as the user attribute "objective_high:<step>")
is below the value it needed to go on: the value of the k-th best of the n trials that reported that
step, k = max(1, floor(n * keep_share)) (successive halving's own count with keep_share =
1/reduction_factor; keep_share 0.5 for the median rule). A trial without an interval is left to the
wrapped pruner.

Why not Optuna's own: `PatientPruner` waits for `patience` epochs without improvement, which measures
the trial's own trend, not how sure the comparison with the others is; `WilcoxonPruner` compares
per-instance scores at one fixed step across instances (an evaluation over problem instances), while
here a step is an epoch and the instances (valid persons) are the same at every step.
"""

from __future__ import annotations

import math

import optuna

HIGH_ATTR = "objective_high:{step}"


KNOWN_ATTRS = ("reference", "recipe", "warm_start")  # user attributes of the trials enqueued as known recipes


class SparingKnown(optuna.pruners.BasePruner):
    """Never stops a known recipe (trial 0's defaults, a `search.enqueue` recipe, a warm start: the user attributes
    KNOWN_ATTRS, which a retry copies); asks the wrapped pruner about the rest, sampled trials continued after a
    Ctrl-C or a stale heartbeat included (Optuna enqueues those with fixed params too: not a mark of a recipe).

    A known recipe is in the study because it did well before; one unlucky early epoch is weaker evidence
    than that. Measured on the default study (make bench, pruning_precision): the evidence pruner stopped
    the background-removal recipe after 2 epochs, and continued to 6 it had the best objective of all."""

    def __init__(self, wrapped: optuna.pruners.BasePruner) -> None:
        self.wrapped = wrapped

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if any(key in trial.user_attrs for key in KNOWN_ATTRS):
            return False
        return self.wrapped.prune(study, trial)


class EvidencePruner(optuna.pruners.BasePruner):
    def __init__(self, wrapped: optuna.pruners.BasePruner, keep_share: float) -> None:
        self.wrapped, self.keep_share = wrapped, keep_share

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if not self.wrapped.prune(study, trial):
            return False
        step = trial.last_step
        high = trial.user_attrs.get(HIGH_ATTR.format(step=step))
        if high is None or step is None:
            return True
        return high < self.cutoff(study, step)

    def cutoff(self, study: optuna.Study, step: int) -> float:
        """The value a trial at `step` needs to be among the top `keep_share` of the trials that reached it."""
        values = sorted((t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                         if step in t.intermediate_values and math.isfinite(t.intermediate_values[step])),
                        reverse=True)
        if not values:
            return -math.inf
        return values[max(1, int(len(values) * self.keep_share)) - 1]  # as successive halving counts its top k
