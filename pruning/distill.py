"""Knowledge distillation from the unpruned base model (Hinton, Vinyals and Dean, 2015).

The loss of a student (the pruned model) on a batch, against the teacher's softened logits:

    L = (1 - w) * CE(z_s, y) + w * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

with temperature T and weight w in [0, 1]; the T^2 keeps the soft term's gradients on the scale
of the hard term's as T changes (Hinton et al., section 2). The teacher runs in eval mode with no
gradients; it never trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.pruning.errors import UserError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float, weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of the module doc for one batch (mean over the batch)."""
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard + weight * temperature**2 * soft


@dataclass(frozen=True)
class Distillation:
    """How a trainer distils from ``teacher``: ``loss(student, inputs, targets)`` per batch."""

    teacher: nn.Module
    temperature: float = 4.0
    weight: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 <= self.weight <= 1:
            raise UserError(f"distillation needs a temperature > 0 and a weight in [0, 1], got "
                            f"{self.temperature:g} and {self.weight:g}")
        self.teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)

    def loss(self, student_logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return distillation_loss(student_logits, teacher_logits, targets, temperature=self.temperature,
                                 weight=self.weight, label_smoothing=self.label_smoothing)

    def to(self, device: str | torch.device) -> Distillation:
        self.teacher.to(device)
        return self
