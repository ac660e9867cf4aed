"""Surgery: physical pruning through Torch-Pruning, its checks, and plain-data save/load."""

import random

import pytest
import torch

from prunetune.pruning.dependency import build_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.measure import count_params
from prunetune.pruning.models import create_model
from prunetune.pruning.policy import Policy
from prunetune.pruning.surgery import load_pruned, prune, realized_channels, save_pruned

MODELS = ["tiny_resnet", "tiny_mobilenet", "tiny_concat", "resnet20", "vgg11", "mobilenetv2"]


def setup(name, size=16):
    torch.manual_seed(0)
    model = create_model(name, 10, 3).eval()
    return model, build_space(model, name, (3, size, size)), torch.randn(4, 3, size, size)


@pytest.mark.parametrize("name", MODELS)
def test_keep_ratio_one_gives_identical_outputs(name):
    model, space, x = setup(name)
    pruned = prune(model, space, Policy.uniform(space, 1.0))
    assert torch.equal(pruned.eval()(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_realized_channels_equal_planned_and_shape_kept(name):
    model, space, x = setup(name)
    rng = random.Random(1)
    dropped = tuple(space.droppable_blocks[:1])
    policy = Policy({g.name: rng.uniform(0.1, 0.9) for g in space.groups}, dropped, space.space_id)
    pruned = prune(model, space, policy, "l2")
    planned = space.channels(policy)
    realized = realized_channels(pruned, space, policy)
    assert realized == {k: v for k, v in planned.items() if k in realized}
    assert pruned(x).shape == (4, 10)
    assert count_params(pruned) < count_params(model)


def test_original_model_is_untouched():
    model, space, x = setup("tiny_resnet")
    before = model(x)
    prune(model, space, Policy.uniform(space, 0.5), "l1")
    assert torch.equal(model(x), before)


def test_highest_scoring_channels_are_kept():
    model, space, _ = setup("small_cnn")
    keep = {3, 7, 11}

    def favour(model, groups, calib=None):
        scores = {}
        for name, group in groups.items():
            n = len(group.items[0].idxs)
            scores[name] = torch.tensor([10.0 if i in keep else float(i) / n for i in range(n)])
        return scores

    first = space.groups[0]
    ratios = {g.name: 1.0 for g in space.groups}
    ratios[first.name] = 3 / first.channels
    original = model.get_submodule(first.name).weight.detach().clone()
    pruned = prune(model, space, Policy(ratios, (), space.space_id), favour)
    assert torch.equal(pruned.get_submodule(first.name).weight, original[sorted(keep)])


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model, space, x = setup("resnet20")
    policy = Policy({**Policy.uniform(space, 0.6).keep_ratios, "conv1": 0.5},
                    (space.droppable_blocks[2],), space.space_id)
    pruned = prune(model, space, policy, "fpgm").eval()
    path = tmp_path / "pruned.pt"
    save_pruned(path, pruned, arch={"name": "resnet20", "num_classes": 10, "in_channels": 3},
                space=space, policy=policy, extra={"val_accuracy": 0.5})
    loaded, meta = load_pruned(path)
    assert torch.equal(loaded.eval()(x), pruned(x))
    assert meta["policy"] == policy and meta["extra"] == {"val_accuracy": 0.5}
    # plain data only: loads with weights_only
    assert isinstance(torch.load(path, weights_only=True)["state_dict"], dict)


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read pruned model"):
        load_pruned(bad)
    with pytest.raises(UserError, match="no pruned model"):
        load_pruned(tmp_path / "absent.pt")


def test_policy_for_another_model_is_refused():
    model, space, _ = setup("tiny_resnet")
    _, other, _ = setup("tiny_concat")
    with pytest.raises(UserError):
        prune(model, space, Policy.uniform(other, 0.5))
