"""The promotion wing: from a study's trials to what is submitted.

    selection   how candidates' probabilities are combined (`METHODS`) and scored honestly on person
                halves (`held_out_weights`, `honest_scores`); pure numpy
    ensemble    the one choice of candidates (`top_trials`) and their stacked probabilities (`Stacked`);
                the single-split ensemble of the best trials (`run_ensemble`, `make ensemble`)
    folds       the cross-validated promotion (`promote`, `make promote`): the best configurations
                retrained on person folds, the out-of-fold ensemble, its honest score and the estimate
                of the submission
    audit       the label audit on the out-of-fold probabilities (cleanlab) and its corrections

The modules are imported by their full names (`harness.promotion.folds`); this package imports none
of them, so that the low `selection` can be used without the training stack.
"""
