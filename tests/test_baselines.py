"""The baselines of METHODS.md: uniform bisection, global threshold, random policies in the MACs band."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch

from prunetune.methods.global_threshold import (
    global_threshold_policy,
    group_scores,
    normalise_by_mean,
    threshold_policy,
    threshold_policy_for_target,
)
from prunetune.methods.random_search import RandomOptions, RandomSearcher
from prunetune.methods.registry import make_searcher
from prunetune.methods.uniform import uniform_breakpoints, uniform_policy_for_target
from prunetune.pruning.dependency import build_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.importance import get_criterion
from prunetune.pruning.models import create_model
from prunetune.pruning.policy import Policy

SPACES = [("tiny_resnet", 1, 1), ("resnet20", 1, 1), ("resnet20", 4, 1), ("resnet20", 1, 4)]


@cache
def space_of(model_name: str, round_to: int = 1, min_channels: int = 1):
    return build_space(create_model(model_name), model_name, (3, 32, 32), round_to=round_to,
                       min_channels=min_channels)


def seeded_tiny_resnet():
    torch.manual_seed(0)
    return create_model("tiny_resnet")


# uniform


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("spec", SPACES, ids=[f"{m}-round{r}-min{n}" for m, r, n in SPACES])
def test_uniform_meets_the_target_and_is_maximal(spec, target):
    space = space_of(*spec)
    policy = uniform_policy_for_target(space, target)
    (r,) = set(policy.keep_ratios.values())
    assert space.macs_ratio(policy) <= target
    growing = [g for g in space.groups if g.kept_channels(r) < g.channels]
    next_step = min((g.kept_channels(r) + g.round_to) / g.channels for g in growing)
    assert space.macs_ratio(Policy.uniform(space, min(1.0, next_step))) > target


def test_uniform_keep_ratio_is_a_breakpoint():
    space = space_of("resnet20", 4)
    (r,) = set(uniform_policy_for_target(space, 0.5).keep_ratios.values())
    assert r in uniform_breakpoints(space)
    assert any(math.isclose(g.kept_channels(r), r * g.channels) for g in space.groups)


def test_uniform_target_of_one_keeps_everything():
    space = space_of("tiny_resnet")
    assert set(uniform_policy_for_target(space, 1.0).keep_ratios.values()) == {1.0}


def test_uniform_target_below_reach_is_a_user_error():
    space = space_of("tiny_resnet")
    with pytest.raises(UserError, match="raise the target"):
        uniform_policy_for_target(space, space.min_macs_ratio() / 2)


# global


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_global_l1_meets_the_target_and_respects_the_floor(target):
    space = space_of("tiny_resnet")
    policy = global_threshold_policy(seeded_tiny_resnet(), space, get_criterion("l1"), None, target, floor=0.3)
    assert space.macs_ratio(policy) <= target
    kept = space.channels(policy)
    assert all(kept[g.name] >= math.ceil(0.3 * g.channels) for g in space.groups)


def test_global_floor_binds_at_a_low_target():
    space = space_of("tiny_resnet")
    policy = global_threshold_policy(seeded_tiny_resnet(), space, get_criterion("l1"), None, 0.2, floor=0.3)
    kept = space.channels(policy)
    assert space.macs_ratio(policy) <= 0.2
    assert any(kept[g.name] == math.ceil(0.3 * g.channels) for g in space.groups)


def test_global_respects_min_channels():
    space = space_of("resnet20", 1, 4)
    policy = global_threshold_policy(create_model("resnet20"), space, get_criterion("l1"), None, 0.1, floor=0.01)
    assert min(space.channels(policy).values()) >= 4


def test_global_picks_the_smallest_threshold_that_fits():
    """Bisection agrees with a linear scan over every candidate threshold."""
    model, space = seeded_tiny_resnet(), space_of("tiny_resnet")
    scores = group_scores(model, space, get_criterion("l1"), None)
    chosen = threshold_policy_for_target(space, scores, 0.5, floor=0.1)
    normalised = normalise_by_mean(scores)
    candidates = [-math.inf, *torch.unique(torch.cat(list(normalised.values()))).tolist()]
    fitting = [t for t in candidates if space.macs_ratio(threshold_policy(space, normalised, t, 0.1)) <= 0.5]
    assert chosen == threshold_policy(space, normalised, fitting[0], 0.1)
    assert fitting[0] > -math.inf


def test_global_keeps_more_of_a_group_whose_weights_were_scaled_up():
    """Scaling 14 of 16 filters of layer2.0.conv1 by 100 lifts those 14 well above every threshold."""
    space, group = space_of("tiny_resnet"), "layer2.0.conv1"
    l1 = get_criterion("l1")
    model = seeded_tiny_resnet()
    before = space.channels(global_threshold_policy(model, space, l1, None, 0.5))[group]
    with torch.no_grad():
        model.get_submodule(group).weight[:14] *= 100
    after = space.channels(global_threshold_policy(model, space, l1, None, 0.5))[group]
    assert after == 14 > before


def test_global_is_blind_to_scaling_a_whole_group():
    """Scores are normalised by their group mean (Torch-Pruning's global pruning), so scale cancels."""
    model, space = seeded_tiny_resnet(), space_of("tiny_resnet")
    l1 = get_criterion("l1")

    def louder(model, groups, calib):
        scores = l1(model, groups, calib)
        return {**scores, "conv1": scores["conv1"] * 1000}

    assert global_threshold_policy(model, space, louder, None, 0.5) == \
        global_threshold_policy(model, space, l1, None, 0.5)


def test_global_target_below_the_floor_is_a_user_error():
    with pytest.raises(UserError, match="lower the floor"):
        global_threshold_policy(seeded_tiny_resnet(), space_of("tiny_resnet"), get_criterion("l1"), None,
                                0.05, floor=0.5)


def test_global_refuses_a_model_that_is_not_the_space():
    with pytest.raises(UserError, match="does not match"):
        global_threshold_policy(create_model("resnet20"), space_of("tiny_resnet"), get_criterion("l1"), None, 0.5)


# random


@pytest.mark.parametrize("target,tolerance", [(0.3, 0.02), (0.5, 0.02), (0.7, 0.05)])
def test_random_policies_land_in_the_band(target, tolerance):
    space = space_of("resnet20")
    searcher = RandomSearcher(space, macs_target=target, seed=0, options=RandomOptions(tolerance=tolerance))
    policies = [searcher.ask().policy for _ in range(8)]
    for policy in policies:
        assert target - tolerance <= space.macs_ratio(policy) <= target
        assert min(policy.keep_ratios.values()) >= 0.1
    assert len({p.key() for p in policies}) == len(policies)
    assert len({tuple(p.keep_ratios.values()) for p in policies}) > 1


def test_random_finishes_early_once_the_band_is_exhausted():
    space = space_of("tiny_resnet")
    searcher = make_searcher("random", space, macs_target=0.95, seed=0, budget=50, concurrency=50,
                             options={"floor": 0.85, "max_tries": 50})
    proposals = list(iter(searcher.ask, None))
    assert 1 <= len(proposals) < 50
    assert len({p.policy.key() for p in proposals}) == len(proposals)
    assert not searcher.finished
    for proposal in proposals:
        searcher.tell(proposal.proposal_id, None)
    assert searcher.finished


def test_random_target_below_the_floor_is_a_user_error():
    with pytest.raises(UserError, match="lower the floor"):
        RandomSearcher(space_of("tiny_resnet"), macs_target=0.05, seed=0, options=RandomOptions(floor=0.5))


@pytest.mark.parametrize("bad", [{"floor": 0.0}, {"floor": 1.5}, {"tolerance": -0.1}, {"max_tries": 0}])
def test_random_bad_options_are_user_errors(bad):
    with pytest.raises(UserError):
        RandomOptions(**bad)


def test_random_with_search_depth_drops_blocks_and_stays_in_the_band():
    space = space_of("resnet20")
    options = RandomOptions(tolerance=0.03, search_depth=True, drop_probability=0.3)
    searcher = RandomSearcher(space, macs_target=0.5, seed=0, options=options)
    policies = [searcher.ask().policy for _ in range(8)]
    assert sum(bool(p.dropped_blocks) for p in policies) >= 4
    assert any(b in ("layer2.0", "layer3.0") for p in policies for b in p.dropped_blocks)  # projections too
    for policy in policies:
        policy.validate(space)
        assert 0.47 <= space.macs_ratio(policy) <= 0.5
        assert space.canonical(policy) == policy  # the groups inside dropped blocks are left out
    state = searcher.state_dict()
    again = RandomSearcher(space, macs_target=0.5, seed=0, options=options)
    again.load_state_dict(state)
    assert again.ask().policy == searcher.ask().policy


def test_random_without_search_depth_drops_nothing_whatever_the_probability():
    space = space_of("tiny_resnet")
    searcher = RandomSearcher(space, macs_target=0.5, seed=0, options=RandomOptions(drop_probability=1.0))
    assert all(not searcher.ask().policy.dropped_blocks for _ in range(4))
