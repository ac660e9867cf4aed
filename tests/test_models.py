"""The model registry: shapes, errors, depth pruning, and Torch-Pruning tracing of every model."""

import pytest
import torch
import torch_pruning as tp
from torch import nn

from prunetune.pruning.errors import UserError
from prunetune.pruning.models import (
    classifier_layer,
    create_model,
    drop_blocks,
    droppable_blocks,
    model_names,
    residual_blocks,
)

SMALL_INPUT_MODELS = ["resnet20", "resnet32", "resnet56", "resnet110", "vgg11", "vgg16", "mobilenetv2",
                      "small_cnn", "tiny_resnet", "tiny_mobilenet", "tiny_concat"]
TORCHVISION_MODELS = ["resnet18", "resnet50", "mobilenet_v2"]


def input_side(name: str) -> int:
    """The smallest input side the tests use: 8 for CIFAR-style and tiny nets, 32 for ImageNet ones."""
    return 32 if name in TORCHVISION_MODELS else 8


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names_are_sorted_and_cover_every_family():
    names = model_names()
    assert names == sorted(names)
    assert set(names) == set(SMALL_INPUT_MODELS + TORCHVISION_MODELS)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", SMALL_INPUT_MODELS)
def test_small_input_models_give_one_logit_per_class_at_every_size(name, in_channels):
    model = create_model(name, num_classes=7, in_channels=in_channels)
    for side in (8, 16, 28, 32):
        assert run(model, torch.randn(2, in_channels, side, side)).shape == (2, 7)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_models_give_one_logit_per_class(name, in_channels):
    model = create_model(name, num_classes=5, in_channels=in_channels)
    assert run(model, torch.randn(2, in_channels, 32, 32)).shape == (2, 5)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels


@pytest.mark.parametrize(("name", "convs_3x3"), [("resnet20", 19), ("resnet110", 109), ("tiny_resnet", 7)])
def test_cifar_resnet_depth_counts_the_3x3_convolutions_and_the_fc(name, convs_3x3):
    model = create_model(name)
    kernels = [m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kernels.count((3, 3)) == convs_3x3
    assert all(k in ((3, 3), (1, 1)) for k in kernels)
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)  # option B: a 1x1 conv shortcut
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)


@pytest.mark.parametrize(("name", "convs"), [("vgg11", 8), ("vgg16", 13)])
def test_vgg_has_its_configs_convolutions_and_a_single_linear(name, convs):
    model = create_model(name)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    assert [m.in_features for m in model.modules() if isinstance(m, nn.Linear)] == [512]


def test_unknown_model_error_lists_every_valid_name():
    with pytest.raises(UserError, match="unknown model 'resnet21'; choose one of: ") as error:
        create_model("resnet21")
    assert all(name in str(error.value) for name in model_names())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("kwargs", "message"), [({"num_classes": 1}, "num_classes"), ({"in_channels": 0}, "in_channels")])
def test_bad_class_or_channel_counts_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        create_model("tiny_resnet", **kwargs)


def test_any_positive_channel_count_is_accepted():
    assert run(create_model("tiny_concat", in_channels=4), torch.randn(1, 4, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize(("name", "attribute"), [("resnet20", "fc"), ("vgg11", "classifier"), ("mobilenetv2", "classifier")])
def test_classifier_layer_is_the_final_linear(name, attribute):
    model = create_model(name, num_classes=6)
    assert classifier_layer(model) is getattr(model, attribute)
    assert classifier_layer(model).out_features == 6


def test_classifier_layer_of_torchvision_mobilenet_is_inside_its_classifier():
    model = create_model("mobilenet_v2", num_classes=6)
    assert classifier_layer(model) is model.classifier[1]


@pytest.mark.parametrize(
    ("name", "count"),
    [("resnet20", 9), ("resnet110", 54), ("tiny_resnet", 3), ("mobilenetv2", 10), ("tiny_mobilenet", 1),
     ("resnet18", 8), ("resnet50", 16), ("mobilenet_v2", 10), ("vgg11", 0), ("small_cnn", 0), ("tiny_concat", 0)],
)
def test_droppable_blocks_are_exactly_the_blocks_with_a_shortcut(name, count):
    assert len(droppable_blocks(create_model(name))) == count


def test_residual_blocks_of_resnet20_by_stage_with_their_shortcuts():
    blocks = residual_blocks(create_model("resnet20"))
    assert [b.name for b in blocks] == droppable_blocks(create_model("resnet20"))
    assert [b.stage for b in blocks] == ["layer1"] * 3 + ["layer2"] * 3 + ["layer3"] * 3
    assert [b.name for b in blocks if b.shortcut == "projection"] == ["layer2.0", "layer3.0"]
    assert blocks[3].shortcut_path == "layer2.0.shortcut" and all(not b.why_not for b in blocks)


def test_mobilenetv2_stages_start_at_each_block_without_a_shortcut():
    blocks = residual_blocks(create_model("mobilenetv2"))
    stages = {}
    for b in blocks:
        stages.setdefault(b.stage, []).append(b.name)
    assert [len(names) for names in stages.values()] == [1, 2, 3, 4, 3, 3, 1]  # MOBILENETV2_CIFAR_STAGES
    assert all(("shortcut" in b.why_not) == (b.shortcut == "none") for b in blocks)
    assert all(b.shortcut == "none" for b in blocks if b.name == b.stage)


@pytest.mark.parametrize("name", ["resnet20", "tiny_resnet", "tiny_mobilenet", "mobilenetv2", "resnet18", "mobilenet_v2"])
def test_drop_blocks_keeps_the_output_shape_and_removes_parameters(name):
    model = create_model(name, in_channels=1)
    droppable, before = droppable_blocks(model), parameter_count(model)
    drop_blocks(model, droppable[-2:] if len(droppable) > 1 else droppable)
    assert parameter_count(model) < before
    assert droppable_blocks(model) == (droppable[:-2] if len(droppable) > 1 else [])
    assert run(model, torch.randn(2, 1, input_side(name), input_side(name))).shape == (2, 10)


def test_drop_blocks_rejects_a_block_without_shortcut_and_changes_nothing():
    model = create_model("tiny_mobilenet")
    before = parameter_count(model)
    with pytest.raises(UserError, match=r"cannot drop 'features.4': it has no shortcut.*choose from: features.3$"):
        drop_blocks(model, ["features.3", "features.4"])
    assert parameter_count(model) == before


@pytest.mark.parametrize(("name", "attr"), [("tiny_resnet", "shortcut"), ("resnet18", "downsample")])
def test_a_dropped_downsampling_block_becomes_relu_of_its_shortcut(name, attr):
    model = create_model(name).eval()
    side = input_side(name)
    seen = []
    model.layer2.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    run(model, torch.randn(2, 3, side, side))
    shortcut = getattr(model.layer2[0], attr)
    drop_blocks(model, ["layer2.0"])
    assert getattr(model.layer2[0], attr) is shortcut  # same module, same path in the state_dict
    assert not any(n.startswith("layer2.0.conv") for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model.layer2[0](seen[0]), torch.relu(shortcut(seen[0])))
    assert run(model, torch.randn(2, 3, side, side)).shape == (2, 10)


def test_drop_blocks_rejects_an_unknown_name():
    with pytest.raises(UserError, match="cannot drop 'layer9.0'"):
        drop_blocks(create_model("resnet20"), ["layer9.0"])


def zero_pruned_channels(group) -> None:
    """Make the channels a group will remove output exact zeros (BatchNorm scale and shift 0), so
    pruning them must not change the network's output: a check that every coupled layer is cut at
    the right indices."""
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight[idxs] = 0.0
                module.bias[idxs] = 0.0


def prune_two_channels_of_every_group(model: nn.Module, x: torch.Tensor) -> int:
    """Trace ``model``, then prune the first and last channel of each group, checking each cut."""
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = list(graph.get_all_groups(ignored_layers=[classifier_layer(model)],
                                       root_module_types=[nn.Conv2d, nn.Linear]))
    roots = [(group[0].dep.target.module, group[0].dep.handler) for group in groups]
    for root, handler in roots:
        channels = root.out_channels
        group = graph.get_pruning_group(root, handler, [0, channels - 1])
        zero_pruned_channels(group)
        expected = run(model, x)
        group.prune()
        assert root.out_channels == channels - 2
        actual = run(model, x)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5
    return len(roots)


@pytest.mark.parametrize(
    "name",
    ["tiny_resnet", "tiny_mobilenet", "tiny_concat", "small_cnn", "resnet20", "vgg11", "mobilenetv2",
     "resnet18", "resnet50", "mobilenet_v2"],
)
def test_torch_pruning_traces_and_prunes_every_group_exactly(name):
    model = create_model(name, in_channels=1)
    side = input_side(name)
    before = parameter_count(model)
    assert prune_two_channels_of_every_group(model, torch.randn(2, 1, side, side)) > 0
    assert parameter_count(model) < before


def test_torch_pruning_couples_each_residual_stage_into_one_group():
    model = create_model("tiny_resnet")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [0])
    coupled = {dep.target.module for dep, _ in group}
    assert {model.layer1[0].conv2, model.layer1[1].conv2, model.layer2[0].conv1} <= coupled


def test_a_model_with_dropped_blocks_still_prunes():
    model = create_model("tiny_resnet")
    drop_blocks(model, ["layer1.1"])
    assert prune_two_channels_of_every_group(model, torch.randn(1, 3, 8, 8)) == 4
