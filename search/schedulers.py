"""Trial schedulers that know a searcher's proxy trials and the warm start's heuristics.

A searcher may give some trials their own fine-tune length (``finetune_epochs`` in the trial
config: ARPruning's neighbours, scored after BatchNorm recalibration or a short fine-tune).
ASHA compares trials at equal reports, so such a trial would be cut against full-length trials
(its accuracy after a shorter schedule is not theirs), and its results would move the rungs the
full-length trials are cut against. ``FullLengthASHA`` runs ASHA over the full-length trials
only: a trial with its own length runs to its end and leaves the rungs alone.

The warm start's heuristics (a trial config's ``role`` ``heuristic:<name>``, ``methods.heuristics``)
are what the search's best is measured against and must never fall below, so ASHA never stops
them: they run every epoch to the end. Being full-length trials, their reports still enter the
rungs the other trials are cut against.
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from prunetune.methods.heuristics import is_heuristic_role

OWN_LENGTH_KEY = "finetune_epochs"


def has_own_length(trial) -> bool:
    """Whether the trial's config sets its own fine-tune length (a searcher's proxy trial)."""
    return (getattr(trial, "config", None) or {}).get(OWN_LENGTH_KEY) is not None


def runs_to_the_end(trial) -> bool:
    """Whether the trial is a warm-start heuristic's (its config's ``role``): never stopped early."""
    return is_heuristic_role((getattr(trial, "config", None) or {}).get("role"))


class FullLengthASHA(ASHAScheduler):
    """ASHA (Ray Tune's asynchronous successive halving) over the trials of the configured length,
    the heuristics' trials among its rungs but never stopped."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if has_own_length(trial):
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
        return TrialScheduler.CONTINUE if runs_to_the_end(trial) else action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if has_own_length(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)
