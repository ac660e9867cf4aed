"""DCP-A's options: how it learns, and the ranges of the hyperparameters the search proposes.

No torch here: the search config builds the ``dcpa`` section from this class before anything
starts. The fields are the section's keys (``dcpa.<field>``), except ``criterion``, which comes
from the search's ``importance``. Each searched hyperparameter has a ``<name>_min`` and a
``<name>_max``; equal bounds fix it. The width choices are
``rho in {width_min, width_min + width_step, ..., 1}`` (METHODS.md, DCP-A: Choices).

Where the defaults come from: tau_min 0.1 and a tau_max range around 5 are METHODS.md's; the
rest was measured on resnet20, digits at 8x8, target 0.5, 3 fine-tuning epochs, seeds 0-2 (against
uniform: validation 0.928, test 0.932 on average). Width steps of 0.125 left each group's
distribution split between the two widths around the target (argmax 0.42 of the MACs on small_cnn),
0.0625 does not. lambda 1 and 3 gave unsteady policies (validation 0.896 to 0.938); from 6 to 20
every seed learned the same one (widths 0.81, the last block of every stage dropped, MACs 0.43):
validation 0.935, test 0.951 on average, hence lambda in [3, 30]. Uniform fine-tuned 6 epochs
instead of 3 (about DCP-A's learning time) reached 0.949 / 0.956: DCP-A is level with uniform at
equal fine-tuning, not at equal total training. The stage lengths mattered little there (at lambda
10, 1 + 2 epochs learned the policy 2 + 4 did on every seed); their ranges keep stage 2 at least two
epochs so the temperature has steps to anneal over.

full_depth_logit 3 and fill_to_target come from the search-quality benchmark (benchmarks/quality.py:
Fashion-MNIST 28x28, resnet20, 2% of the training split, so 4 batches of 128 per epoch of the weight
half; 4 trials, 1 fine-tuning epoch, a 10-epoch final), target 0.5, seed 0, chosen by the final's
validation accuracy. With depth choices equally likely at the start, every trial's argmax dropped
the last block of every stage (widths 0.81-0.88, MACs 0.457): validation 0.750 (test 0.746), below
uniform's 0.762 (0.749). Learning in that setting does not move the argmax from where it starts:
with widths only, every trial ended at the start's uniform width 0.69 (MACs 0.473; validation
0.772, test 0.763: the policy of the uniform baseline, pruned in bn_scale order instead of l1);
starting at full depth (full_depth_logit 3) and filled to the target (MACs 0.494), 0.773 / 0.764.
Stages of 20-step epochs (min_epoch_steps 20: 100 steps instead of 20, 624 s of learning instead
of 90) and arch_lr 0.5 gave that same policy in every trial that finished, so min_epoch_steps
stays 1. Over seeds 0-2 the final's test accuracy was 75.64 (uniform 74.93) at target 0.5 and
73.96 (uniform 72.04, global l1 72.24) at 0.25; BENCHMARKS.md has the table. Most of that edge is
the bn_scale channel order (uniform prunes in l1 order), not learning: the chosen policy was the
start's, filled, for seed 0 at both targets and seed 2 at 0.5; widths moved for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from prunetune.methods.learner import HParamRange, LearnerOptions
from prunetune.pruning.errors import UserError
from prunetune.pruning.schema import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    TOLERANCE,
    option,
)

SEARCHED = ("lambda", "target_margin", "tau_max", "warmup_epochs", "search_epochs")


@dataclass(frozen=True)
class DcpaOptions(LearnerOptions):
    """DCP-A's options (config section ``dcpa``; METHODS.md, DCP-A; methods/dcpa.py says what each does)."""

    section: ClassVar[str] = "dcpa"
    searched: ClassVar[tuple[str, ...]] = SEARCHED
    criterion: str = option("bn_scale", "importance criterion that orders each group's channels",
                            from_config="importance")
    width_min: float = option(0.25, "smallest width choice rho of a group (keeps ceil(rho * C) channels)",
                              check=FRACTION)
    width_step: float = option(0.0625, "step between a group's width choices, from width_min up to 1",
                               check=FRACTION)
    depth: bool = option(True, "also learn each residual stage's depth (blocks past it skipped via their shortcut)")
    start_at_target: bool = option(True, "start the width logits peaked around the uniform width meeting the "
                                   "loss target (false: every choice equally likely)")
    full_depth_logit: float = option(3.0, "the depth logits start at -full_depth_logit per block a choice drops "
                                     "(0: every depth equally likely)", check=NON_NEGATIVE)
    min_epoch_steps: int = option(1, "the stages count epochs of at least this many batches of the weight "
                                  "half (a small training split repeats its batches)", check=AT_LEAST_ONE)
    fill_to_target: bool = option(True, "widen an argmax policy under macs_target: every group towards full "
                                  "width by the largest common fraction that meets the target")
    hard: bool = option(True, "straight-through hard Gumbel-softmax samples (one choice forward, soft gradient)")
    tolerance: float = option(0.03, "the MACs loss is 0 between loss target - tolerance and the loss target",
                              check=TOLERANCE)
    tau_min: float = option(0.1, "Gumbel-softmax temperature at the end of stage 2", check=POSITIVE)
    arch_lr: float = option(0.05, "Adam learning rate of the attention and the logits", check=POSITIVE)
    attention_lr_scale: float = option(0.1, "the attention's learning rate as a fraction of arch_lr (the free "
                                       "logits take arch_lr): its weights are shared by all layers, and Adam "
                                       "moves each by the same step, so at arch_lr they drive every layer alike",
                                       check=POSITIVE)
    attention_dim: int = option(16, "width of the attention over the layer descriptors", check=AT_LEAST_ONE)
    attention_heads: int = option(2, "heads of that attention (must divide attention_dim)", check=AT_LEAST_ONE)
    checkpoint_every: int = option(20, "learning steps between progress reports with a checkpoint",
                                   check=AT_LEAST_ONE)
    record_every: int = option(5, "stage-2 steps between rows of the logged choice-probability trajectory",
                               check=AT_LEAST_ONE)
    lambda_min: float = option(3.0, "searched range of lambda, the MACs loss weight: lowest", check=NON_NEGATIVE)
    lambda_max: float = option(30.0, "searched range of lambda: highest (log scale)", check=NON_NEGATIVE)
    target_margin_min: float = option(0.0, "searched range of the margin below macs_target the loss aims at: "
                                      "lowest", check=TOLERANCE)
    target_margin_max: float = option(0.03, "searched range of the target margin: highest", check=TOLERANCE)
    tau_max_min: float = option(2.0, "searched range of tau_max, the temperature at the start of stage 2: lowest",
                                check=POSITIVE)
    tau_max_max: float = option(8.0, "searched range of tau_max: highest (log scale)", check=POSITIVE)
    warmup_epochs_min: int = option(1, "searched range of stage 1's epochs (weights, uniform widths): lowest",
                                    check=NON_NEGATIVE)
    warmup_epochs_max: int = option(2, "searched range of stage 1's epochs: highest", check=NON_NEGATIVE)
    search_epochs_min: int = option(2, "searched range of stage 2's epochs (alternating steps): lowest",
                                    check=AT_LEAST_ONE)
    search_epochs_max: int = option(4, "searched range of stage 2's epochs: highest", check=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_dim % self.attention_heads:
            raise UserError(f"config key 'dcpa.attention_dim' ({self.attention_dim}) must be a multiple of "
                            f"'dcpa.attention_heads' ({self.attention_heads})")
        if self.tau_max_min < self.tau_min:
            raise UserError(f"DCP-A anneals the temperature down: config key 'dcpa.tau_max_min' "
                            f"({self.tau_max_min:g}) must be at least 'dcpa.tau_min' ({self.tau_min:g})")

    def width_ratios(self) -> tuple[float, ...]:
        """rho_k: from ``width_min`` by ``width_step`` up to 1 (1 always included), ascending."""
        count = math.floor((1 - self.width_min) / self.width_step + 1e-9)
        ratios = [round(self.width_min + k * self.width_step, 9) for k in range(count + 1)]
        return tuple(sorted({*ratios, 1.0}))

    def hparam_ranges(self) -> tuple[HParamRange, ...]:
        """lambda and tau_max on a log scale (lambda linear when its range starts at 0), stage lengths in epochs."""
        return (
            HParamRange("lambda", self.lambda_min, self.lambda_max, log=self.lambda_min > 0),
            HParamRange("target_margin", self.target_margin_min, self.target_margin_max),
            HParamRange("tau_max", self.tau_max_min, self.tau_max_max, log=True),
            HParamRange("warmup_epochs", self.warmup_epochs_min, self.warmup_epochs_max, integer=True),
            HParamRange("search_epochs", self.search_epochs_min, self.search_epochs_max, integer=True),
        )
