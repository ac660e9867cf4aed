"""Policy: validation against a space, keys, JSON round trips."""

import json

import pytest

from prunetune.pruning.dependency import build_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.models import create_model
from prunetune.pruning.policy import Policy


@pytest.fixture(scope="module")
def space():
    return build_space(create_model("tiny_resnet", 10, 3), "tiny_resnet", (3, 16, 16))


def test_uniform_policy_covers_every_group(space):
    policy = Policy.uniform(space, 0.5)
    assert set(policy.keep_ratios) == set(space.group_names())
    assert policy.space_id == space.space_id
    policy.validate(space)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan"), "half"])
def test_keep_ratio_outside_unit_interval_is_rejected(space, ratio):
    with pytest.raises(UserError, match="keep ratio"):
        Policy.uniform(space, ratio)


def test_key_is_stable_and_distinguishes_policies(space):
    a = Policy.uniform(space, 0.5)
    b = Policy(dict(reversed(list(a.keep_ratios.items()))), (), space.space_id)
    assert a.key() == b.key() and a == b and hash(a) == hash(b)
    assert a.key() != Policy.uniform(space, 0.6).key()
    assert a.key() != Policy(a.keep_ratios, (space.droppable_blocks[0],), space.space_id).key()


def test_json_round_trip(space, tmp_path):
    policy = Policy({**Policy.uniform(space, 0.7).keep_ratios, "conv1": 0.25},
                    (space.droppable_blocks[0],), space.space_id)
    path = tmp_path / "policy.json"
    policy.save(path)
    assert Policy.load(path) == policy
    assert Policy.from_json(json.loads(json.dumps(policy.to_json()))) == policy


def test_policy_is_immutable(space):
    policy = Policy.uniform(space, 0.5)
    with pytest.raises(TypeError):
        policy.keep_ratios["conv1"] = 0.1
    with pytest.raises(AttributeError):
        policy.space_id = "other"


def test_validation_names_the_problem(space):
    full = dict(Policy.uniform(space, 0.5).keep_ratios)
    with pytest.raises(UserError, match="unknown groups"):
        Policy({**full, "nope": 0.5}).validate(space)
    missing = dict(full)
    missing.pop("conv1")
    with pytest.raises(UserError, match="misses groups"):
        Policy(missing).validate(space)
    with pytest.raises(UserError, match="made for space"):
        Policy(full, (), "resnet20:0123456789").validate(space)
    with pytest.raises(UserError, match="cannot be dropped"):
        Policy(full, ("layer9.0",)).validate(space)
    mobile = build_space(create_model("tiny_mobilenet", 10, 3), "tiny_mobilenet", (3, 16, 16))
    with pytest.raises(UserError, match=r"cannot be dropped \(features.4: it has no shortcut"):
        Policy.uniform(mobile, 0.5, ("features.4",)).validate(mobile)


def test_a_policy_may_leave_out_only_the_groups_inside_its_dropped_blocks(space):
    full = dict(Policy.uniform(space, 0.5).keep_ratios)
    inner = space.block("layer1.1").groups
    assert inner == ("layer1.1.conv1",)
    without = {g: r for g, r in full.items() if g not in inner}
    Policy(without, ("layer1.1",), space.space_id).validate(space)
    assert space.channels(Policy(without, ("layer1.1",), space.space_id)).keys() == without.keys()
    with pytest.raises(UserError, match=r"misses groups \['layer1.1.conv1'\]"):
        Policy(without, ("layer1.0",), space.space_id).validate(space)  # layer1.1 is kept
    stream = {g: r for g, r in full.items() if g != "conv1"}
    with pytest.raises(UserError, match="misses groups"):
        Policy(stream, ("layer1.0", "layer1.1"), space.space_id).validate(space)  # the stream stays


def test_canonical_policies_share_a_key(space):
    full = Policy.uniform(space, 0.5)
    dropping = Policy(full.keep_ratios, ("layer1.1",), space.space_id)
    canonical = space.canonical(dropping)
    assert "layer1.1.conv1" not in canonical.keep_ratios
    assert canonical.key() == Policy.uniform(space, 0.5, ("layer1.1",)).key()
    assert canonical.key() == space.canonical(canonical).key()
    assert Policy.from_json(json.loads(json.dumps(canonical.to_json()))).key() == canonical.key()
    assert space.estimate_macs(canonical) == space.estimate_macs(dropping) < space.estimate_macs(full)


def test_unreadable_policy_files(tmp_path):
    with pytest.raises(UserError, match="cannot read policy file"):
        Policy.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Policy.load(bad)
    bad.write_text('{"ratios": {}}')
    with pytest.raises(UserError, match="keep_ratios"):
        Policy.load(bad)
