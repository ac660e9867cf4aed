"""A resumed trial's repeated epochs: Optuna keeps the first report, and our searcher keeps the warning quiet."""

from __future__ import annotations

import pickle
import warnings

import optuna

from prunetune.search.optuna_resumable import ResumableOptunaSearch


def define(trial) -> None:  # module level: the searcher pickles
    trial.suggest_float("keep", 0.1, 1.0)


def test_a_step_reported_again_warns_nothing_and_keeps_the_first_value():
    searcher = ResumableOptunaSearch(space=define, metric="val_accuracy", mode="max",
                                     sampler=optuna.samplers.RandomSampler(seed=0))
    assert searcher.suggest("t1") is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searcher.on_trial_result("t1", {"val_accuracy": 0.5, "training_iteration": 1})
        searcher.on_trial_result("t1", {"val_accuracy": 0.7, "training_iteration": 1})  # as after a restore
        searcher.on_trial_result("t1", {"val_accuracy": 0.8, "training_iteration": 2})
    assert [str(w.message) for w in caught if "already reported" in str(w.message)] == []
    study_trial = searcher._ot_study.trials[0]
    assert study_trial.intermediate_values == {1: 0.5, 2: 0.8}
    again = pickle.loads(pickle.dumps(searcher))
    assert isinstance(again, ResumableOptunaSearch)


def test_plain_optuna_does_warn_so_the_filter_is_needed():
    study = optuna.create_study()
    trial = study.ask()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trial.report(0.5, 1)
        trial.report(0.7, 1)
    assert any("already reported" in str(w.message) for w in caught)
