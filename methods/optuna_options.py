"""Optuna's options (config section ``optuna``): the sampler and the policy space it samples.

The method itself lives in ``prunetune.search.optuna_space`` (Ray Tune's ``OptunaSearch``); its
options live here, beside the other methods', so that the config and the registry read them
without importing Ray. Learners use this section's sampler for their hyperparameter search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunetune.pruning.errors import UserError
from prunetune.pruning.schema import FRACTION, NON_NEGATIVE, Section, option

SAMPLERS = ("tpe", "cmaes", "gp", "nsga2")
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes", "gp")  # refuse objective: pareto
PARETO_ONLY_SAMPLERS = ("nsga2",)  # need objective: pareto


@dataclass(frozen=True)
class OptunaOptions(Section):
    """Optuna through Ray Tune's OptunaSearch: the sampler and the policy space it samples."""

    section: ClassVar[str] = "optuna"
    sampler: str = option("tpe", "Optuna sampler; nsga2 needs objective pareto, cmaes/gp need constrained",
                          choices=SAMPLERS)
    n_startup_trials: int = option(4, "random trials before the sampler models the results", check=NON_NEGATIVE)
    min_keep_ratio: float = option(0.1, "lowest keep ratio sampled for a group", check=FRACTION)
    search_depth: bool = option(False, "sample a drop flag per droppable block too",
                                from_config="space.search_depth")

    def check_search(self, cfg) -> None:
        """The sampler must fit the objective: nsga2 is multi-objective, cmaes and gp single-objective."""
        if self.sampler in PARETO_ONLY_SAMPLERS and cfg.objective != "pareto":
            raise UserError(
                f"config key 'optuna.sampler' is {self.sampler}, a multi-objective sampler, but objective is "
                f"{cfg.objective}; set --set objective=pareto or --set optuna.sampler=tpe"
            )
        if self.sampler in SINGLE_OBJECTIVE_SAMPLERS and cfg.objective == "pareto":
            raise UserError(
                f"config key 'optuna.sampler' is {self.sampler}, a single-objective sampler, but objective is "
                "pareto; set --set optuna.sampler=tpe (or nsga2), or --set objective=constrained"
            )
