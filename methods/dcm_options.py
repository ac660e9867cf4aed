"""DCM's options: how it learns, and the ranges of the hyperparameters the search proposes.

No torch here: ``search.config`` builds a ``DcmOptions`` from the ``dcm`` section to check it
before anything starts. The fields are the section's keys (``dcm.<field>``), except
``criterion``, which comes from the search's ``importance``. Each searched hyperparameter has a
``<name>_min`` and a ``<name>_max``; equal bounds fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunetune.methods.learner import HParamRange
from prunetune.pruning.errors import UserError

PENALTIES = ("squared", "one_sided")
SEARCHED = ("lambda", "k", "temperature_start", "temperature_end", "target_margin")


@dataclass(frozen=True)
class DcmOptions:
    """DCM's options (METHODS.md, DCM; methods/dcm.py says what each does)."""

    epochs: int = 1
    criterion: str = "bn_scale"
    rank_every: int = 10
    floor: float = 0.1
    start_keep_ratio: float | None = None
    penalty: str = "squared"
    held_out_fraction: float = 0.1
    ratio_lr: float = 0.2
    checkpoint_every: int = 20
    lambda_min: float = 10.0
    lambda_max: float = 1000.0
    k_min: int = 1
    k_max: int = 4
    temperature_start_min: float = 0.5
    temperature_start_max: float = 4.0
    temperature_end_min: float = 0.02
    temperature_end_max: float = 0.2
    target_margin_min: float = 0.0
    target_margin_max: float = 0.05

    def __post_init__(self) -> None:
        for name in ("epochs", "rank_every", "checkpoint_every", "k_min"):
            if getattr(self, name) < 1:
                raise UserError(f"config key 'dcm.{name}' must be at least 1, got {getattr(self, name)}")
        if self.penalty not in PENALTIES:
            raise UserError(f"config key 'dcm.penalty' must be one of: {', '.join(PENALTIES)}; got {self.penalty!r}")
        if not 0 < self.floor < 1 or not 0 < self.held_out_fraction < 1 or self.ratio_lr <= 0:
            raise UserError("config keys 'dcm.floor' and 'dcm.held_out_fraction' must be in (0, 1) and "
                            "'dcm.ratio_lr' above 0; change them in the config file or with --set")
        if self.start_keep_ratio is not None and not self.floor < self.start_keep_ratio < 1:
            raise UserError(f"config key 'dcm.start_keep_ratio' must lie between dcm.floor ({self.floor:g}) and "
                            f"1, got {self.start_keep_ratio:g}; change it, or null to start at the target")
        for name in SEARCHED:
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if low > high:
                raise UserError(f"config key 'dcm.{name}_min' ({low:g}) is above 'dcm.{name}_max' ({high:g}); "
                                f"give a range with min <= max (equal values fix {name})")
        if self.lambda_min < 0 or self.target_margin_min < 0:
            raise UserError("config keys 'dcm.lambda_min' and 'dcm.target_margin_min' must be at least 0")
        if self.temperature_start_min <= 0 or self.temperature_end_min <= 0:
            raise UserError("config keys 'dcm.temperature_start_min' and 'dcm.temperature_end_min' must be above 0")
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
