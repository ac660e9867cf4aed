"""CDP + DTC's options: how it learns, and the ranges of the hyperparameters the search proposes.

No torch here: the search config builds the ``cdp_dtc`` section from this class before anything
starts. The fields are the section's keys (``cdp_dtc.<field>``), except ``criterion``, which comes
from the search's ``importance`` (the trial prunes the base model with it; the learning itself
reads only its skeletons). Each searched hyperparameter has a ``<name>_min`` and a ``<name>_max``;
equal bounds fix it, and a penalty weight's range may start at (or be) 0, which switches that term
off (METHODS.md: "any weight may be 0").

How far the skeletons shrink grows with ``skeleton_lr * weight * steps`` (the shrinking terms are
the group, Frobenius and adaptive ones; the similarity terms turn filters, they do not shrink
them), which is why the learning is counted in steps, not in passes over a split of whatever size.
Measured on resnet20 (Fashion-MNIST at 28x28, BENCHMARKS.md, issue 12): nothing dies until the
skeletons have shrunk most of the way (about step 55 with these defaults), then the MACs ratio
falls by about 0.15 every 10 steps, and a higher delta starts the fall earlier (by about 17 steps
per factor e of delta): after 100 steps delta 0.1 kept 0.74 and delta 0.6 kept 0.35; with these
defaults (110 steps) delta 0.05 kept 0.785 and delta 0.9 kept 0.095. With the
shrinking terms' weights searched over wide ranges, when the fall starts, not delta, decided the
MACs (trials pruned nothing or nearly everything). So the defaults fix those three weights (equal
bounds) and search delta, and the similarity weights, in a range that spans the MACs ratios.
Widen a range with ``<name>_min`` / ``<name>_max``; for another model, check its reach first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunetune.methods.learner import HParamRange, LearnerOptions
from prunetune.pruning.errors import UserError
from prunetune.pruning.schema import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, option

# The searched hyperparameters: DTC's delta and the five CDP penalty weights (methods/cdp_dtc.py).
SEARCHED = ("delta", "similarity", "similarity_skeleton", "group", "frobenius", "adaptive")
PENALTY_WEIGHTS = SEARCHED[1:]


@dataclass(frozen=True)
class CdpDtcOptions(LearnerOptions):
    """CDP + DTC's options (config section ``cdp_dtc``; METHODS.md, CDP + DTC; methods/cdp_dtc.py)."""

    section: ClassVar[str] = "cdp_dtc"
    searched: ClassVar[tuple[str, ...]] = SEARCHED
    steps: int = option(110, "learning steps of each trial (batches of finetune.batch_size; the training split "
                             "is passed over as often as needed)", check=AT_LEAST_ONE)
    criterion: str = option("texture", "importance criterion the trial prunes the base model with",
                            from_config="importance")
    skeleton_lr: float = option(0.02, "learning rate of the filter skeletons (SGD, the recipe's momentum)",
                                check=POSITIVE)
    adaptive_spread: float = option(0.5, "how far the adaptive term's group and L1 weights move apart: "
                                         "adaptive * (1 +- spread)", check=Range(0, 1))
    threshold: str = option("relative", "unit of DTC's tau_n: the layer's mean skeleton entry (relative: widths "
                                        "only), every layer's (model: layers may empty, blocks drop) or none "
                                        "(absolute; whole layers tend to die at once)",
                            choices=("relative", "model", "absolute"))
    checkpoint_every: int = option(50, "learning steps between progress reports with a checkpoint (each "
                                       "scores the skeleton model on the validation split)",
                                   check=AT_LEAST_ONE)
    delta_min: float = option(0.05, "searched range of delta, DTC's threshold factor: lowest", check=POSITIVE)
    delta_max: float = option(0.9, "searched range of delta: highest (log scale; from 1 on, a layer may empty "
                                   "with threshold relative)", check=POSITIVE)
    similarity_min: float = option(0.0, "searched range of the weights' angular-similarity weight: lowest",
                                   check=NON_NEGATIVE)
    similarity_max: float = option(0.05, "searched range of the weights' similarity weight: highest",
                                   check=NON_NEGATIVE)
    similarity_skeleton_min: float = option(0.0, "searched range of the skeletons' angular-similarity weight: "
                                                 "lowest", check=NON_NEGATIVE)
    similarity_skeleton_max: float = option(0.05, "searched range of the skeletons' similarity weight: highest",
                                            check=NON_NEGATIVE)
    group_min: float = option(0.1, "searched range of the group term's weight, sqrt(sum_n ||FS_n||_1^2): lowest",
                              check=NON_NEGATIVE)
    group_max: float = option(0.1, "searched range of the group term's weight: highest (fixed by default: see "
                                   "methods/cdp_dtc_options.py)", check=NON_NEGATIVE)
    frobenius_min: float = option(0.1, "searched range of the Frobenius term's weight, ||FS||_F: lowest",
                                  check=NON_NEGATIVE)
    frobenius_max: float = option(0.1, "searched range of the Frobenius term's weight: highest (fixed by default)",
                                  check=NON_NEGATIVE)
    adaptive_min: float = option(0.05, "searched range of the adaptive group + L1 term's weight: lowest "
                                        "(log scale when above 0)", check=NON_NEGATIVE)
    adaptive_max: float = option(0.05, "searched range of the adaptive term's weight: highest (fixed by default)",
                                 check=NON_NEGATIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not any(getattr(self, f"{name}_max") > 0 for name in PENALTY_WEIGHTS):
            raise UserError("every CDP penalty weight is fixed at 0, so no skeleton entry shrinks and nothing is "
                            "pruned; give one of cdp_dtc.<weight>_max above 0 "
                            f"({', '.join(PENALTY_WEIGHTS)})")

    def hparam_ranges(self) -> tuple[HParamRange, ...]:
        """delta on a log scale; each penalty weight on a log scale unless its range starts at 0."""
        return tuple(HParamRange(name, getattr(self, f"{name}_min"), getattr(self, f"{name}_max"),
                                 log=getattr(self, f"{name}_min") > 0)
                     for name in SEARCHED)
