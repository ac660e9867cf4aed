"""DCM's options: how it learns, and the ranges of the hyperparameters the search proposes.

No torch here: the search config builds the ``dcm`` section from this class before anything
starts. The fields are the section's keys (``dcm.<field>``), except ``criterion``, which comes
from the search's ``importance``. Each searched hyperparameter has a
``<name>_min`` and a ``<name>_max``; equal bounds fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunetune.methods.learner import HParamRange, LearnerOptions
from prunetune.pruning.errors import UserError
from prunetune.pruning.schema import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    TOLERANCE,
    option,
)

PENALTIES = ("squared", "one_sided")
SEARCHED = ("lambda", "k", "temperature_start", "temperature_end", "target_margin")


@dataclass(frozen=True)
class DcmOptions(LearnerOptions):
    """DCM's options (config section ``dcm``; METHODS.md, DCM; methods/dcm.py says what each does)."""

    section: ClassVar[str] = "dcm"
    searched: ClassVar[tuple[str, ...]] = SEARCHED
    epochs: int = option(1, "learning epochs of each trial (passes over the training split less its held-out part)",
                         check=AT_LEAST_ONE)
    criterion: str = option("bn_scale", "importance criterion that ranks each group's channels",
                            from_config="importance")
    rank_every: int = option(10, "weight steps between re-rankings of every group's channels", check=AT_LEAST_ONE)
    floor: float = option(0.1, "lowest keep ratio of a group (r_min)", check=OPEN_FRACTION)
    start_keep_ratio: float | None = option(
        None, "keep ratio every group starts at; null = the uniform ratio meeting the loss target",
        check=OPEN_FRACTION)
    penalty: str = option("squared", "MACs term: squared gap to the target, or one_sided (only the excess)",
                          choices=PENALTIES)
    held_out_fraction: float = option(0.1, "fraction of the training split the ratio steps train on",
                                      check=OPEN_FRACTION)
    ratio_lr: float = option(0.2, "learning rate of the ratio steps (SGD on theta)", check=POSITIVE)
    checkpoint_every: int = option(20, "weight steps between progress reports with a checkpoint",
                                   check=AT_LEAST_ONE)
    lambda_min: float = option(10.0, "searched range of lambda, the MACs term's weight: lowest", check=NON_NEGATIVE)
    lambda_max: float = option(1000.0, "searched range of lambda: highest (log scale)", check=NON_NEGATIVE)
    k_min: int = option(1, "searched range of k, weight steps per ratio step: lowest", check=AT_LEAST_ONE)
    k_max: int = option(4, "searched range of k: highest", check=AT_LEAST_ONE)
    temperature_start_min: float = option(0.5, "searched range of the mask temperature at the start: lowest",
                                          check=POSITIVE)
    temperature_start_max: float = option(4.0, "searched range of the start temperature: highest (log scale)",
                                          check=POSITIVE)
    temperature_end_min: float = option(0.02, "searched range of the mask temperature at the end: lowest",
                                        check=POSITIVE)
    temperature_end_max: float = option(0.2, "searched range of the end temperature: highest (log scale)",
                                        check=POSITIVE)
    target_margin_min: float = option(0.0, "searched range of the margin below macs_target the loss aims at: "
                                      "lowest", check=TOLERANCE)
    target_margin_max: float = option(0.05, "searched range of the target margin: highest", check=TOLERANCE)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_keep_ratio is not None and not self.floor < self.start_keep_ratio < 1:
            raise UserError(f"config key 'dcm.start_keep_ratio' must lie between dcm.floor ({self.floor:g}) and "
                            f"1, got {self.start_keep_ratio:g}; change it, or null to start at the target")
        if self.temperature_end_max > self.temperature_start_min:
            raise UserError(f"DCM anneals the mask temperature down: config key 'dcm.temperature_end_max' "
                            f"({self.temperature_end_max:g}) must be at most 'dcm.temperature_start_min' "
                            f"({self.temperature_start_min:g})")

    def hparam_ranges(self) -> tuple[HParamRange, ...]:
        """lambda and the temperatures on a log scale (lambda linear when its range starts at 0)."""
        return (
            HParamRange("lambda", self.lambda_min, self.lambda_max, log=self.lambda_min > 0),
            HParamRange("k", self.k_min, self.k_max, integer=True),
            HParamRange("temperature_start", self.temperature_start_min, self.temperature_start_max, log=True),
            HParamRange("temperature_end", self.temperature_end_min, self.temperature_end_max, log=True),
            HParamRange("target_margin", self.target_margin_min, self.target_margin_max),
        )
