"""Distillation from the base model (pruning/distill.py): the loss, and training with it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prunetune.pruning.data import load_dataset
from prunetune.pruning.distill import Distillation, distillation_loss
from prunetune.pruning.errors import UserError
from prunetune.pruning.models import create_model
from prunetune.pruning.train import Trainer, TrainRecipe, train


def test_the_loss_is_cross_entropy_at_weight_zero_and_kl_vanishes_on_the_teachers_logits():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    targets = torch.randint(0, 10, (8,), generator=generator)
    assert torch.allclose(distillation_loss(student, teacher, targets, temperature=4.0, weight=0.0),
                          F.cross_entropy(student, targets))
    assert distillation_loss(teacher, teacher, targets, temperature=4.0, weight=1.0).abs() < 1e-6
    soft = distillation_loss(student, teacher, targets, temperature=2.0, weight=1.0)
    kl = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean")
    assert torch.allclose(soft, 4.0 * kl)  # T^2 times the KL of the softened distributions


def test_training_against_the_teacher_lowers_the_distillation_loss_and_learns():
    splits = load_dataset("digits", image_size=8, seed=0)
    info = splits.info
    torch.manual_seed(0)
    teacher = create_model("small_cnn", num_classes=info.num_classes, in_channels=info.in_channels)
    train(teacher, splits, TrainRecipe(epochs=8), seed=0)
    torch.manual_seed(1)
    student = create_model("small_cnn", num_classes=info.num_classes, in_channels=info.in_channels)
    distillation = Distillation(copy.deepcopy(teacher), temperature=4.0, weight=0.7)
    inputs = torch.stack([splits.val[i][0] for i in range(128)])
    targets = torch.tensor([int(splits.val[i][1]) for i in range(128)])

    def loss_and_agreement() -> tuple[float, float]:
        student.eval()
        with torch.no_grad():
            logits = student(inputs)
            agreement = (logits.argmax(1) == distillation.teacher(inputs).argmax(1)).float().mean()
            return float(distillation.loss(logits, inputs, targets)), float(agreement)

    before, agreed_before = loss_and_agreement()
    trainer = Trainer(student, splits, TrainRecipe(epochs=3, batch_size=64), seed=0, distillation=distillation)
    for _ in trainer.remaining_epochs():
        pass
    after, agreed_after = loss_and_agreement()
    assert torch.isfinite(torch.tensor([before, after])).all() and after < 0.8 * before
    assert agreed_after > agreed_before + 0.2  # the student learnt the teacher's answers
    assert not any(p.requires_grad for p in distillation.teacher.parameters())  # the teacher never trains


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"weight": 1.5}])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(UserError, match="temperature > 0 and a weight in"):
        Distillation(torch.nn.Linear(2, 2), **bad)
