"""SearchSpace: groups from the dependency graph, and the MACs estimate against measured MACs."""

import random

import pytest

from prunetune.pruning.dependency import build_space
from prunetune.pruning.measure import count_macs, count_params
from prunetune.pruning.models import create_model
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace, policy_from_channels
from prunetune.pruning.surgery import prune


def make_space(name, size=16):
    model = create_model(name, 10, 3).eval()
    return model, build_space(model, name, (3, size, size))


def test_residual_channels_share_one_group():
    _, space = make_space("resnet20")
    stage1 = space.group("conv1")
    assert stage1.channels == 16
    assert {"layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= set(stage1.members)
    # 3 residual streams + one inner group per basic block (9 blocks)
    assert len(space.groups) == 12
    assert len(space.droppable_blocks) == 9  # every block: 7 identity, 2 projection shortcuts


def test_depthwise_conv_is_coupled_with_its_expansion():
    _, space = make_space("tiny_mobilenet")
    expansion = space.group("features.3.conv.0")
    assert "features.3.conv.3" in expansion.members  # the depthwise conv


def test_concatenation_feeds_one_layer_from_two_groups():
    _, space = make_space("tiny_concat")
    fuse = next(layer for layer in space.layers if layer.name == "fuse.0")
    assert {g for g, _ in fuse.in_parts} == {"branch_a.0", "branch_b.0"}


def test_base_estimate_equals_measured_macs():
    model, space = make_space("resnet20")
    assert space.base_macs == count_macs(model, (3, 16, 16))
    assert space.base_params == count_params(model)
    assert space.estimate_macs(Policy.uniform(space, 1.0)) == space.base_macs


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "mobilenetv2", "tiny_concat"])
def test_estimate_equals_measured_pruned_macs(name):
    model, space = make_space(name, 16)
    rng = random.Random(7)
    for _ in range(4):
        dropped = tuple(b for b in space.droppable_blocks if rng.random() < 0.25)
        policy = Policy({g.name: rng.uniform(0.05, 1.0) for g in space.groups}, dropped, space.space_id)
        assert space.estimate_macs(policy) == count_macs(prune(model, space, policy, "l1"), (3, 16, 16))


def test_macs_never_grow_as_keep_ratios_shrink():
    _, space = make_space("mobilenetv2")
    rng = random.Random(3)
    policy = Policy({g.name: 1.0 for g in space.groups}, (), space.space_id)
    last = space.estimate_macs(policy)
    for _ in range(40):
        name = rng.choice(space.group_names())
        policy = policy.with_ratios({name: max(0.01, policy.keep_ratios[name] * rng.uniform(0.5, 1.0))})
        macs = space.estimate_macs(policy)
        assert macs <= last
        last = macs
    assert space.min_macs_ratio() <= last / space.base_macs


def test_kept_channels_round_up_and_respect_the_floor():
    model = create_model("tiny_resnet", 10, 3)
    space = build_space(model, "tiny_resnet", (3, 16, 16), round_to=4, min_channels=4)
    group = space.group("layer2.0.conv1")  # 16 channels
    assert group.kept_channels(0.5) == 8
    assert group.kept_channels(0.3) == 8  # 4.8 rounds up to 8
    assert group.kept_channels(0.01) == 4
    assert group.kept_channels(1.0) == 16


def test_json_round_trip_keeps_the_estimate(tmp_path):
    _, space = make_space("tiny_concat")
    space.save(tmp_path / "space.json")
    loaded = SearchSpace.load(tmp_path / "space.json")
    assert loaded == space and loaded.space_id == space.space_id
    policy = Policy.uniform(space, 0.4)
    assert loaded.estimate_macs(policy) == space.estimate_macs(policy)


def test_policy_from_channels_inverts_channels():
    _, space = make_space("resnet20")
    policy = Policy.uniform(space, 0.37)
    assert space.channels(policy_from_channels(space, space.channels(policy))) == space.channels(policy)
