"""Torch-Pruning's strong global variants as baselines: ``global.normalizer`` (mean, LAMP, ...)."""

from __future__ import annotations

import pytest
import torch

from prunetune.methods.global_threshold import (
    NORMALIZERS,
    GlobalOptions,
    global_threshold_policy,
    group_scores,
    normalise,
)
from prunetune.pruning.dependency import build_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.importance import get_criterion
from prunetune.pruning.models import create_model


def resnet20():
    torch.manual_seed(0)
    model = create_model("resnet20")
    return model, build_space(model, "resnet20", (3, 32, 32))


def test_lamp_is_each_score_over_the_sum_of_those_not_below_it():
    """LAMP (Lee et al., ICLR 2021): s_u / sum_{v >= u} s_v, scores taken in ascending order."""
    scores = {"g": torch.tensor([3.0, 1.0, 4.0, 2.0])}
    assert torch.allclose(normalise(scores, "lamp")["g"], torch.tensor([3 / 7, 1 / 10, 4 / 4, 2 / 9]))
    assert torch.allclose(normalise(scores, "mean")["g"], scores["g"] / 2.5)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_every_normalizer_meets_the_target(normalizer, target):
    model, space = resnet20()
    policy = global_threshold_policy(model, space, get_criterion("l1"), None, target, floor=0.05,
                                     normalizer=normalizer)
    assert target - 0.1 < space.macs_ratio(policy) <= target


def test_lamp_and_mean_rank_the_channels_differently():
    model, space = resnet20()
    scores = group_scores(model, space, get_criterion("l1"), None)
    lamp, mean = normalise(scores, "lamp"), normalise(scores, "mean")
    policies = {name: global_threshold_policy(model, space, get_criterion("l1"), None, 0.25, floor=0.05,
                                              normalizer=name) for name in ("lamp", "mean")}
    assert policies["lamp"] != policies["mean"]
    assert all(torch.equal(lamp[g].argsort(), scores[g].argsort()) for g in scores)  # order kept in a group
    assert not all(torch.allclose(lamp[g], mean[g]) for g in scores)


def test_an_unknown_normalizer_is_a_one_line_error_naming_the_choices():
    with pytest.raises(UserError, match="global.normalizer' must be one of: mean, lamp"):
        GlobalOptions(normalizer="lamb")


def test_the_config_passes_the_normalizer_to_the_method():
    from prunetune.search.config import config_from_dict

    cfg = config_from_dict({"method": "global", "global": {"normalizer": "lamp"}}, names=False)
    assert cfg.method_options.normalizer == "lamp" and cfg.method_options.criterion == "l1"
