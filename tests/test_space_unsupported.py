"""Models whose channels Torch-Pruning handles only in part: grouped convolutions (pruned alike in
each of their groups), groups it traces wrongly (left out of the space after a dry run, their layers
whole), and models it cannot trace at all (a UserError)."""

import pytest
import torch
from torch import nn

import prunetune
from prunetune.pruning.dependency import build_space, explain_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.measure import count_macs
from prunetune.pruning.policy import Policy
from prunetune.pruning.surgery import prune

SHAPE = (1, 16, 16)


def block(c_in: int, c_out: int, kernel: int = 3, groups: int = 1, norm=nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False),
                         norm(c_out), nn.ReLU())


class GroupedNet(nn.Module):
    """Stem, depthwise, pointwise, then a convolution with groups=4 (neither plain nor depthwise)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = block(1, 16)
        self.dw = block(16, 16, groups=16)
        self.pw = block(16, 32, kernel=1)
        self.grouped = block(32, 16, groups=4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.grouped(self.pw(self.dw(self.stem(x)))))


class ConcatFlattenNet(nn.Module):
    """A stem, two branches concatenated on channels, a 4x4 pool flattened into the Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = block(1, 8)
        self.b1 = block(8, 16)
        self.b2 = block(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(32 * 16, classes)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.flatten(self.pool(torch.cat([self.b1(x), self.b2(x)], 1)), 1))


class GroupNormNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(block(1, 16, norm=lambda c: nn.GroupNorm(4, c)), block(16, 24))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, classes))

    def forward(self, x):
        return self.head(self.features(x))


class SizedFor16(nn.Module):
    """A flatten head sized for a 16x16 input: any other size fails in its forward pass."""

    def __init__(self):
        super().__init__()
        self.conv = block(1, 4)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def run(model: nn.Module, shape=SHAPE) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("keep", [0.3, 0.5])
def test_grouped_convolution_prunes_in_whole_groups(keep):
    model = GroupedNet()
    pruned = prunetune.prune(model, keep, input_shape=SHAPE)
    assert run(pruned).shape == (2, 10)
    conv = pruned.grouped[0]
    assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.in_channels < 32 and conv.out_channels < 16  # both its sides were pruned
    assert pruned.pw[0].out_channels == conv.in_channels


def test_grouped_convolution_groups_round_to_its_groups_and_estimate_exactly():
    model = GroupedNet()
    space = build_space(model, "grouped", SHAPE, min_channels=2)
    into, out_of = space.group("pw.0"), space.group("grouped.0")
    assert (into.channels, into.round_to, into.min_channels) == (32, 4, 4)
    assert (out_of.channels, out_of.round_to, out_of.min_channels) == (16, 4, 4)
    assert space.group("stem.0").round_to == 1  # the depthwise stream is cut channel by channel
    for keep in (0.1, 0.3, 0.55, 0.8):
        policy = Policy.uniform(space, keep)
        assert all(n % 4 == 0 for g, n in space.channels(policy).items() if g != "stem.0")
        assert space.estimate_macs(policy) == count_macs(prune(model, space, policy, "l1"), SHAPE)


def test_grouped_convolution_cuts_the_same_positions_in_each_group():
    """Channels the next layer ignores carry nothing: cutting them leaves the outputs as they were.
    They sit at the same positions in each of the 4 groups, but one of them outranks a live channel
    (bn_scale): only a cut ranked by position (the mean over the groups) finds them all."""
    torch.manual_seed(0)
    model = GroupedNet().eval()
    grouped = model.grouped[0]
    with torch.no_grad():
        for norm, width, dead_at, live_low in ((model.pw[1], 8, (1, 5), 8 + 3), (model.grouped[1], 4, (2,), 8 + 0)):
            norm.weight.copy_(torch.rand(norm.num_features) + 1.0)
            dead = [k * width + p for k in range(4) for p in dead_at]
            norm.weight[dead] = 0.0
            norm.weight[dead[0]] = 3.0  # a dead channel that outranks ...
            norm.weight[live_low] = 0.01  # ... a live one
        for k in range(4):  # the grouped conv ignores input positions 1 and 5 of each of its groups
            grouped.weight[4 * k:4 * k + 4, [1, 5]] = 0.0
        model.head[2].weight[:, [2, 6, 10, 14]] = 0.0  # the classifier ignores its position 2s
    space = build_space(model, "grouped", SHAPE)
    policy = Policy({"stem.0": 1.0, "pw.0": 0.75, "grouped.0": 0.75}, (), space.space_id)
    pruned = prune(model, space, policy, "bn_scale")
    assert (pruned.grouped[0].in_channels, pruned.grouped[0].out_channels) == (24, 12)
    torch.testing.assert_close(run(pruned), run(model))


def test_groupnorm_prunes_in_whole_groups():
    model = GroupNormNet()
    space = build_space(model, "gn", SHAPE)
    assert space.group("features.0.0").round_to == 4
    pruned = prunetune.prune(model, 0.5, input_shape=SHAPE)
    assert pruned.features[0][1].num_channels == 8 and pruned.features[0][1].num_groups == 4
    assert run(pruned).shape == (2, 10)


def test_concatenation_flattened_into_a_linear_is_left_whole():
    model = ConcatFlattenNet()
    space, left_out = explain_space(model, "concat_flatten", SHAPE)
    assert space.group_names() == ["stem.0"]
    assert set(left_out) == {"b1.0", "b2.0"}
    assert all("Torch-Pruning cuts it wrongly" in why for why in left_out.values())
    fc = next(layer for layer in space.layers if layer.name == "fc")
    assert fc.in_parts == ((None, 512),)
    for keep in (0.3, 0.5):
        pruned = prunetune.prune(model, keep, input_shape=SHAPE)
        assert run(pruned).shape == (2, 10)
        assert (pruned.b1[0].out_channels, pruned.b2[0].out_channels, pruned.fc.in_features) == (16, 16, 512)
        assert pruned.stem[0].out_channels < 8
        assert space.estimate_macs(space.uniform_policy(keep)) == count_macs(pruned, SHAPE)


def test_a_group_fed_into_part_of_a_grouped_convolution_is_left_whole():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = block(1, 8), block(1, 8)
            self.fuse = block(16, 16, groups=4)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x):
            return self.head(self.fuse(torch.cat([self.a(x), self.b(x)], 1)))

    space, left_out = explain_space(Fused(), "fused", SHAPE)
    assert set(left_out) == {"a.0", "b.0"}
    assert "grouped convolution fuse.0, groups=4" in left_out["a.0"]
    assert space.group_names() == ["fuse.0"]
    assert run(prunetune.prune(Fused(), 0.5, input_shape=SHAPE)).shape == (2, 10)


def test_a_model_whose_forward_fails_on_the_input_size_is_a_user_error():
    build_space(SizedFor16(), "sized16", SHAPE)  # its own size is fine
    with pytest.raises(UserError, match=r"^model sized16 does not run on a 1x8x8 input \(RuntimeError: mat1"):
        build_space(SizedFor16(), "sized16", (1, 8, 8))


def test_a_model_torch_pruning_cannot_trace_is_a_user_error():
    from prunetune.pruning.torchvision_compat import import_torchvision

    import_torchvision()
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    model = ShuffleNetV2([4, 8, 4], [8, 16, 32, 64, 64], num_classes=10)  # a tiny shufflenet_v2
    with pytest.raises(UserError, match=r"^Torch-Pruning cannot trace the channels of model shuffle "
                                        r"\(ZeroDivisionError: .*\), so it cannot be pruned") as caught:
        build_space(model, "shuffle", (3, 16, 16))
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_torchvision_regnet_and_resnext_prune():
    """Small members of the two torchvision families whose grouped convolutions used to crash."""
    from prunetune.pruning.torchvision_compat import import_torchvision

    import_torchvision()
    from torchvision.models.regnet import BlockParams, RegNet
    from torchvision.models.resnet import Bottleneck, ResNet

    shape = (3, 16, 16)
    regnet = RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8), num_classes=10)
    resnext = ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10)
    for model in (regnet, resnext):
        space, left_out = explain_space(model, type(model).__name__, shape)
        assert not left_out and any(g.round_to > 1 for g in space.groups)
        policy = space.uniform_policy(0.5)
        pruned = prune(model, space, policy, "l1")
        assert run(pruned, shape).shape == (2, 10)
        assert space.estimate_macs(policy) == count_macs(pruned, shape)


def test_the_global_heuristic_ranks_a_space_that_left_groups_out():
    """The concat's branches are traced but left out of the space: the global threshold still ranks
    the space's own groups (it had refused the model as not matching its space)."""
    from prunetune.methods.global_threshold import global_threshold_policy
    from prunetune.pruning.importance import get_criterion

    model = ConcatFlattenNet().eval()
    space = build_space(model, "catflat", (1, 16, 16))
    policy = global_threshold_policy(model, space, get_criterion("l1"), None, macs_target=0.6)
    assert set(policy.keep_ratios) == {g.name for g in space.groups}
    assert prune(model, space, policy, importance="l1")(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_prunetune_space_says_why_a_traced_layer_was_left_whole():
    from prunetune.search.commands.space_cmd import format_space

    space, why = explain_space(ConcatFlattenNet().eval(), "catflat", (1, 16, 16))
    text = format_space(space, "digits", why)
    left = next(line for line in text.splitlines() if line.startswith("left whole"))
    assert "b1.0 (Torch-Pruning cuts it wrongly: a pruned copy fails (RuntimeError: mat1 and mat2" in left


def test_shufflenets_inverted_residual_is_no_residual_block():
    """torchvision's ShuffleNetV2 names its unit InvertedResidual too, without MobileNetV2's
    use_res_connect: it was read as one and raised AttributeError."""
    from prunetune.pruning.models import create_model, residual_blocks

    assert residual_blocks(create_model("torchvision:shufflenet_v2_x0_5", num_classes=10, in_channels=3)) == []
    assert len(residual_blocks(create_model("torchvision:mobilenet_v2", num_classes=10, in_channels=3))) == 17


class TupleOutputNet(nn.Module):
    """Returns (logits, features), as some research models do."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = block(1, 8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        features = self.body(x).mean((2, 3))
        return self.fc(features), features


class ThreeDimensionalOutputNet(nn.Module):
    """Logits of shape (N, classes, 1): not what a classifier's output is checked to be."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = block(1, 8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3))).unsqueeze(-1)


def test_a_model_with_a_tuple_output_still_gets_its_space():
    space = build_space(TupleOutputNet().eval(), "tuple", (1, 16, 16))
    assert [g.name for g in space.groups] == ["body.0"]


def test_a_model_whose_own_output_is_wrong_is_refused_before_any_group_is_blamed():
    """Each group had been left out in turn, blamed on Torch-Pruning, for what the unpruned model does."""
    with pytest.raises(UserError, match=r"model odd fails on a 1x16x16 input before any pruning \(its output "
                                        r"has shape \(2, 10, 1\), not \(2, 10\)\)"):
        build_space(ThreeDimensionalOutputNet().eval(), "odd", (1, 16, 16))

