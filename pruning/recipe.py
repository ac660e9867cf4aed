"""A training recipe: SGD with a learning-rate schedule, declared once.

:class:`TrainRecipe` is both what ``prunetune.pruning.train`` trains with and, subclassed, the
search config's ``pretrain`` and ``finetune`` sections (``prunetune.search.config``): its fields
carry their meaning and rule (``prunetune.pruning.schema``), so the config, its reference and
Python callers share one declaration. No torch here.

``cosine`` anneals the rate from ``lr`` towards 0 over the whole run, batch by batch; ``step``
multiplies it by 0.1 from 50% of the epochs and by 0.01 from 75%.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields

from prunetune.pruning.errors import UserError
from prunetune.pruning.schema import (
    AT_LEAST_ONE,
    MOMENTUM,
    NON_NEGATIVE,
    POSITIVE,
    Section,
    option,
    section_dict,
)

SCHEDULES = ("cosine", "step")
# resources.amp: the autocast dtype of forward passes (pruning/train.py); not part of a recipe's key
AMP_MODES = ("none", "bf16")
# The defaults that both the search config (pretrain, finetune) and the single-model commands
# (``prunetune prune``, every command's --pretrain-epochs) use: declared here, where the CLI can
# read them without importing the config.
PRETRAIN_EPOCHS = 15  # the base model's training epochs
FINETUNE_LR = 0.01  # initial learning rate of a pruned model's recovery fine-tune
BN_RECALIBRATION_BATCHES = 20  # training batches that re-estimate BatchNorm statistics after pruning


@dataclass(frozen=True)
class TrainRecipe(Section):
    """How to train: SGD hyperparameters and the learning-rate schedule (see the module doc)."""

    epochs: int = option(10, "training epochs", check=NON_NEGATIVE)
    lr: float = option(0.05, "initial learning rate", check=POSITIVE)
    momentum: float = option(0.9, "SGD momentum", check=MOMENTUM)
    weight_decay: float = option(0.0005, "L2 weight decay", check=NON_NEGATIVE)
    batch_size: int = option(128, "training batch size", check=AT_LEAST_ONE)
    schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    nesterov: bool = option(True, "Nesterov momentum (needs momentum > 0)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", check=MOMENTUM)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nesterov and self.momentum == 0:
            where = f"{self.section}." if self.section else ""
            raise UserError(
                f"config key '{where}nesterov' is true but {where}momentum is 0 (nesterov needs momentum > 0); "
                f"set a momentum > 0 or --set {where}nesterov=false"
            )

    def recipe(self) -> TrainRecipe:
        """This recipe as a plain :class:`TrainRecipe` (a config section's extra keys left out)."""
        return TrainRecipe(**{spec.name: getattr(self, spec.name) for spec in fields(TrainRecipe)})

    def key(self) -> str:
        """A short hash of every field, stable across processes: names caches of what it trained."""
        text = json.dumps(section_dict(self.recipe()), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def learning_rate(self, epoch: int, progress: float) -> float:
        """The rate at ``progress`` in [0, 1) of the way through 0-based ``epoch``."""
        if self.schedule == "cosine":
            position = (epoch + progress) / max(self.epochs, 1)
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * position))
        fraction = epoch / max(self.epochs, 1)
        return self.lr * (0.1 ** ((fraction >= 0.5) + (fraction >= 0.75)))
