"""The model registry: every network prunetune can search, built by one ``create_model(name)``.

Like timm, the real models (CIFAR ResNets, VGG, MobileNetV2, torchvision's ImageNet nets) are
registered beside tiny ones that exercise the same Torch-Pruning code paths (residual sums,
depthwise convolutions, ``torch.cat``) in milliseconds, so tests run real code.

Every model takes 1- or 3-channel input (any ``in_channels >= 1``); the CIFAR-style and tiny ones
accept any spatial size from 8x8 up, because they end in a global average pool and their
downsampling never shrinks a map below 1x1. Each one traces through Torch-Pruning's
``DependencyGraph``: no lambdas or zero-padding shortcuts (He et al.'s "option A"), only modules.

Depth pruning: ``residual_blocks`` lists every residual block with its stage and shortcut;
``drop_blocks`` replaces a block by its shortcut: ``nn.Identity()`` for a block computing
``x + f(x)`` with ``x``'s shape, its projection (1x1 conv + BatchNorm, then ReLU) for a downsampling
block. A block without a shortcut (MobileNetV2's stride-2 blocks) cannot be dropped.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunetune.pruning.errors import UserError
from prunetune.pruning.space import IDENTITY, NO_SHORTCUT, PROJECTION

# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
             groups: int = 1) -> list[nn.Module]:
    """A bias-free ``kernel_size`` convolution with 'same' padding and its BatchNorm."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=kernel_size // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_channels)]


class BasicBlock(nn.Module):
    """He et al. (2016) basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity when the shape is kept (stride 1, same channels); otherwise a
    1x1 convolution + BatchNorm ("option B"), which Torch-Pruning can trace and prune, unlike the
    zero-padding lambda of option A.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.conv2, self.bn2 = _conv_bn(out_channels, out_channels, 3)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018): 1x1 expansion, 3x3 depthwise, 1x1 linear projection.

    The expansion is left out when ``expand_ratio == 1`` (as in torchvision). The input is added
    to the output (``use_res_connect``) when stride is 1 and the channels are kept.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(in_channels, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, out_channels, 1)
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


def _init_weights(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal init for convolutions, BatchNorm at (1, 0); Linear keeps torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, sec. 4.2): 3x3 stem, stages of basic blocks, global pool, fc.

    ``blocks_per_stage[i]`` blocks of ``widths[i]`` channels; every stage after the first starts
    with a stride-2 block. ResNet-(6n+2) is ``blocks_per_stage=(n, n, n), widths=(16, 32, 64)``.
    """

    def __init__(self, blocks_per_stage: tuple[int, ...], widths: tuple[int, ...],
                 num_classes: int, in_channels: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, widths[0], 3)
        self.relu = nn.ReLU(inplace=True)
        channels = widths[0]
        for stage, (blocks, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            stride = 1 if stage == 0 else 2
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


VGG_CONFIGS = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm (Simonyan & Zisserman 2015, configs A=11 and D=16 layers), CIFAR style.

    Pools are ``MaxPool2d(2, ceil_mode=True)``, which keeps a 1x1 map at 1x1, so five pools work
    from 8x8 input up; a global average pool and a single Linear(512, classes) finish it.
    """

    def __init__(self, config: tuple, num_classes: int, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [*_conv_bn(channels, item, 3), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# (expand_ratio, out_channels, blocks, stride) per stage; the CIFAR variant of kuangliu/pytorch-cifar
# keeps stride 1 in the stem and the second stage, so 32x32 input ends at 4x4.
MOBILENETV2_CIFAR_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) for small images: stride-1 stem, inverted residual stages,
    a 1x1 convolution to ``last_channels``, global pool, Linear."""

    def __init__(self, stages: tuple, stem_channels: int, last_channels: int, num_classes: int,
                 in_channels: int):
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, stem_channels, 3), nn.ReLU6(inplace=True)]
        channels = stem_channels
        for expand_ratio, out_channels, blocks, stride in stages:
            for i in range(blocks):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expand_ratio))
                channels = out_channels
        layers += [*_conv_bn(channels, last_channels, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class PlainCNN(nn.Module):
    """A stack of conv-BN-ReLU layers, a global pool and a Linear: the model with no coupling."""

    def __init__(self, widths: tuple[int, ...], strides: tuple[int, ...], num_classes: int,
                 in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width, stride in zip(widths, strides, strict=True):
            layers += [*_conv_bn(channels, width, 3, stride), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class ConcatNet(nn.Module):
    """A stem feeding two branches whose outputs are joined by ``torch.cat`` along channels.

    Tests Torch-Pruning's index mapping through concatenation: pruning a branch must prune the
    matching input channels of the convolution after the join, at the branch's offset.
    """

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 8, 3), nn.ReLU(inplace=True))
        self.branch_a = nn.Sequential(*_conv_bn(8, 8, 3), nn.ReLU(inplace=True))
        self.branch_b = nn.Sequential(*_conv_bn(8, 12, 1), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(*_conv_bn(20, 16, 3, stride=2), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.classifier(torch.flatten(self.avgpool(self.fuse(x)), 1))


# --------------------------------------------------------------------------------------------
# torchvision models (ImageNet-size input; torchvision is imported only here)
# --------------------------------------------------------------------------------------------


def _torchvision_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """torchvision's classification model ``name`` with random weights (never downloads); a new
    first convolution of the same geometry takes ``in_channels`` when that is not 3."""
    from prunetune.pruning.torchvision_compat import import_torchvision

    tv = import_torchvision()
    known = tv.models.list_models(module=tv.models)
    if name not in known:
        raise UserError(f"torchvision has no classification model '{name}'; choose one of: {', '.join(known)}")
    try:
        model = tv.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise UserError(f"torchvision's {name} refused its arguments ({error}); fix --set model_args.KEY=VALUE") from None
    if in_channels != 3:
        path, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        parent_name, _, attr = path.rpartition(".")
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                        dilation=old.dilation, bias=old.bias is not None)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _cifar_resnet(depth: int) -> Callable[[int, int], nn.Module]:
    """Builder of ResNet-``depth`` for CIFAR: (depth - 2) / 6 basic blocks in each of 3 stages."""
    n = (depth - 2) // 6

    def build(num_classes: int, in_channels: int) -> nn.Module:
        return CifarResNet((n, n, n), (16, 32, 64), num_classes, in_channels)

    return build


def _vgg(config: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        return CifarVGG(VGG_CONFIGS[config], num_classes, in_channels)

    return build


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        return _torchvision_model(name, num_classes, in_channels)

    return build


def _mobilenetv2(num_classes: int, in_channels: int) -> nn.Module:
    return CifarMobileNetV2(MOBILENETV2_CIFAR_STAGES, 32, 1280, num_classes, in_channels)


def _small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return PlainCNN((16, 32, 32, 64), (1, 2, 1, 2), num_classes, in_channels)


def _tiny_resnet(num_classes: int, in_channels: int) -> nn.Module:
    """Stage 1: two identity blocks of 8 channels (droppable); stage 2: one stride-2 block of 16."""
    return CifarResNet((2, 1), (8, 16), num_classes, in_channels)


def _tiny_mobilenet(num_classes: int, in_channels: int) -> nn.Module:
    """An identity inverted residual (8->8), then a stride-2 one (8->16), then 1x1 to 32."""
    return CifarMobileNetV2(((2, 8, 1, 1), (2, 16, 1, 2)), 8, 32, num_classes, in_channels)


def _tiny_concat(num_classes: int, in_channels: int) -> nn.Module:
    return ConcatNet(num_classes, in_channels)


MODEL_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet56": _cifar_resnet(56),
    "resnet110": _cifar_resnet(110),
    "vgg11": _vgg("A"),
    "vgg16": _vgg("D"),
    "mobilenetv2": _mobilenetv2,
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "mobilenet_v2": _torchvision("mobilenet_v2"),
    "small_cnn": _small_cnn,
    "tiny_resnet": _tiny_resnet,
    "tiny_mobilenet": _tiny_mobilenet,
    "tiny_concat": _tiny_concat,
}


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODEL_BUILDERS)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, model_args=None) -> nn.Module:
    """A freshly initialised ``name`` for ``num_classes`` classes and ``in_channels`` input planes.

    ``name`` is a registry name or a reference to the user's own model (``pruning.user_models``:
    ``package.module:factory``, ``path/to/file.py:factory``, ``torchvision:NAME``), whose factory
    ``model_args`` go to.
    """
    from prunetune.pruning.user_models import build_reference, is_reference

    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2, got {num_classes}; set the dataset's class count")
    if in_channels < 1:
        raise UserError(f"in_channels must be at least 1, got {in_channels}; use 1 for grey, 3 for colour")
    if is_reference(name):
        return build_reference(name, num_classes, in_channels, model_args)
    if name not in MODEL_BUILDERS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(model_names())}, or name your own: "
                        f"package.module:factory, path/to/file.py:factory or torchvision:NAME")
    if model_args:
        raise UserError(f"model '{name}' takes no model_args (got {', '.join(sorted(model_args))}); remove them")
    return MODEL_BUILDERS[name](num_classes, in_channels)


def create_from_arch(arch: dict) -> nn.Module:
    """A fresh model from a saved ``arch``: ``{"name", "num_classes", "in_channels"[, "model_args"]}``."""
    return create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                        model_args=arch.get("model_args") or None)


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final Linear of ``model`` (the last one registered), which pruning must leave whole."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier; use a model from create_model")
    return linears[-1]


# --------------------------------------------------------------------------------------------
# Depth pruning
# --------------------------------------------------------------------------------------------

NO_SHORTCUT_REASON = ("it has no shortcut (it changes the shape: stride or channels), so nothing could "
                      "replace it")


@dataclass(frozen=True)
class ResidualBlock:
    """One block of a residual network as the model declares it (the space adds its groups).

    ``shortcut`` is ``identity``, ``projection`` (a 1x1 convolution + BatchNorm at
    ``shortcut_path``) or ``none``; ``why_not`` is empty when the block can be dropped.
    """

    name: str
    stage: str
    shortcut: str
    shortcut_path: str | None
    activation: bool  # the block ends with a ReLU after its sum (ResNets; not MobileNetV2)

    @property
    def why_not(self) -> str:
        return NO_SHORTCUT_REASON if self.shortcut == NO_SHORTCUT else ""


class ShortcutBlock(nn.Module):
    """A dropped projection block: ``relu(shortcut(x))``, the block with its residual branch removed.

    The shortcut keeps its attribute name (``shortcut`` or torchvision's ``downsample``), so its
    parameters keep their module paths (``layer2.0.shortcut.0``) in a pruned model's state_dict.
    """

    def __init__(self, attr: str, shortcut: nn.Module, activation: bool):
        super().__init__()
        self.attr = attr
        self.add_module(attr, shortcut)
        self.relu = nn.ReLU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self._modules[self.attr](x))


def _block_kind(name: str, module: nn.Module) -> tuple[str, str | None, bool] | None:
    """(shortcut kind, shortcut path, ends with a ReLU) of a residual block, ours or torchvision's;
    None for any other module. torchvision's classes are recognised by module path and name, so
    torchvision is never imported just to ask."""
    kind = type(module)
    ours = kind.__module__ == __name__
    tv = kind.__module__.startswith("torchvision.models.")
    if (ours and kind is BasicBlock) or (tv and kind.__name__ in ("BasicBlock", "Bottleneck")):
        attr = "shortcut" if ours else "downsample"
        shortcut = getattr(module, attr)
        if shortcut is None or isinstance(shortcut, nn.Identity):
            return IDENTITY, None, True
        return PROJECTION, f"{name}.{attr}", True
    # MobileNetV2's (ours, torchvision's); ShuffleNetV2's class of that name has no use_res_connect and no
    # shortcut to skip through, so it is no block here
    if (ours or tv) and kind.__name__ == "InvertedResidual" and hasattr(module, "use_res_connect"):
        return (IDENTITY if module.use_res_connect else NO_SHORTCUT), None, False
    return None


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """Every residual block of ``model`` in forward (``named_modules``) order, with its stage.

    A stage is a run of blocks in one container that starts with the container or with a block
    that changes the shape (no identity shortcut): ``layer1``..``layer3`` of a ResNet, the
    configured stages of MobileNetV2's ``features``. It is named after its container when that
    holds one stage (``layer2``), else after its first block (``features.4``).
    """
    found = [(name, _block_kind(name, module)) for name, module in model.named_modules() if name]
    found = [(name, kind) for name, kind in found if kind is not None]
    runs: list[list] = []
    for name, (shortcut, path, activation) in found:
        parent = name.rpartition(".")[0]
        if not runs or runs[-1][0] != parent or shortcut != IDENTITY:
            runs.append([parent, []])
        runs[-1][1].append((name, shortcut, path, activation))
    per_parent = {parent: sum(1 for p, _ in runs if p == parent) for parent, _ in runs}
    blocks = []
    for parent, members in runs:
        stage = parent if per_parent[parent] == 1 and parent else members[0][0]
        blocks += [ResidualBlock(name, stage, shortcut, path, act) for name, shortcut, path, act in members]
    return blocks


def droppable_blocks(model: nn.Module) -> list[str]:
    """Qualified names (``named_modules`` order) of the blocks ``drop_blocks`` may replace."""
    return [block.name for block in residual_blocks(model) if not block.why_not]


def drop_blocks(model: nn.Module, names: Iterable[str]) -> None:
    """Replace each named residual block of ``model`` by its shortcut, in place.

    An identity-shortcut block computes ``x + f(x)`` with ``x``'s shape and becomes
    ``nn.Identity()``. A downsampling block with a projection shortcut becomes that shortcut (its
    1x1 convolution + BatchNorm, then the block's ReLU: ``ShortcutBlock``), which has the block's
    output shape by construction, since the block adds the two. A block without a shortcut cannot
    be dropped.
    """
    names = list(dict.fromkeys(names))
    blocks = {block.name: block for block in residual_blocks(model)}
    droppable = [name for name, block in blocks.items() if not block.why_not]
    for name in names:
        if name not in droppable:
            reason = f"{blocks[name].why_not}" if name in blocks else "not a residual block of this model"
            raise UserError(f"cannot drop '{name}': {reason}; choose from: {', '.join(droppable) or '(none)'}")
    for name in names:
        block = blocks[name]
        parent_name, _, attr = name.rpartition(".")
        if block.shortcut == IDENTITY:
            replacement = nn.Identity()
        else:
            path = block.shortcut_path
            replacement = ShortcutBlock(path.rpartition(".")[2], model.get_submodule(path), block.activation)
        setattr(model.get_submodule(parent_name), attr, replacement)
