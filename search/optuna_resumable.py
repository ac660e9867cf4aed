"""Ray Tune's ``OptunaSearch``, quiet about the epochs a resumed trial reports twice.

On ``prunetune resume`` a trial restored from its last checkpoint reports again the epochs that the
restored Optuna trial already holds. Optuna keeps the first value, which is the same result, and warns
each time ("The reported value is ignored because this step=N is already reported"): noise on every
resume, nothing lost. A module of its own, imported only where a search is built: it imports Optuna,
and the class must live at module level so the searcher still pickles for Tune's checkpoints.
"""

from __future__ import annotations

import warnings

from ray.tune.search.optuna import OptunaSearch

REPEATED_STEP = r"The reported value is ignored because this `step=\d+` is already reported"


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", REPEATED_STEP, UserWarning)
            super().on_trial_result(trial_id, result)
