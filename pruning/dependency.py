"""Torch-Pruning's dependency graph, read into prunetune's terms.

``trace_groups`` runs Torch-Pruning's ``DependencyGraph`` on a model and returns one
``TracedGroup`` per set of coupled channels: the layers whose output channels it owns, and the
layers whose input channels it feeds (with how many). ``build_space`` turns that into a
``SearchSpace``; ``pruning.surgery`` uses the same groups to cut channels.

A group is named after its first member in the model's module order (e.g. ``conv1`` for the
residual stream of a CIFAR ResNet's first stage), traced on the whole model. A model with blocks
dropped can trace a group under another first member (a dropped downsampling block's stream
group starts at its shortcut), so ``space_group_names`` maps traced groups to the space's names
by their members, whose module paths dropping keeps (``models.drop_blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunetune.pruning.errors import UserError
from prunetune.pruning.space import Block, Group, LayerCost, SearchSpace

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class TracedGroup:
    """One Torch-Pruning group in module names: its root layer and its channel users."""

    name: str
    root: nn.Module
    channels: int
    out_members: tuple[str, ...]
    in_users: tuple[tuple[str, int], ...]  # (layer name, how many of its input channels)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def trace_graph(model: nn.Module, input_shape: tuple[int, ...]):
    """Build Torch-Pruning's dependency graph of ``model`` on one example input (eval mode)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)


def tp_group(graph, root: nn.Module, idxs: list[int] | None = None):
    """The Torch-Pruning group rooted at ``root``'s output channels ``idxs`` (all of them by default)."""
    pruner = graph.get_pruner_of_module(root)
    if idxs is None:
        idxs = list(range(pruner.get_out_channels(root)))
    return graph.get_pruning_group(root, pruner.prune_out_channels, idxs)


def trace_groups(model: nn.Module, graph, ignored: list[nn.Module]) -> list[TracedGroup]:
    """The groups of coupled output channels of ``model``, in module order."""
    names = {module: name for name, module in model.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES):
        out_members, in_users = [], {}
        for item in tp_group.items:
            module = item.dep.target.module
            name = names.get(module)
            if name is None:
                continue
            handler = item.dep.handler
            if graph.is_out_channel_pruning_fn(handler):
                out_members.append(name)
            elif graph.is_in_channel_pruning_fn(handler) and isinstance(module, PRUNABLE_TYPES):
                in_users[name] = in_users.get(name, 0) + len(item.idxs)
        root = tp_group.items[0].dep.target.module
        out_members = sorted(set(out_members) | {names[root]}, key=order.__getitem__)
        layer_members = [n for n in out_members if isinstance(model.get_submodule(n), PRUNABLE_TYPES)]
        groups.append(TracedGroup(
            name=layer_members[0], root=root, channels=len(tp_group.items[0].idxs),
            out_members=tuple(out_members), in_users=tuple(sorted(in_users.items(), key=lambda kv: order[kv[0]])),
        ))
    return sorted(groups, key=lambda g: order[g.name])


def build_space(model: nn.Module, model_name: str, input_shape: tuple[int, int, int], *,
                round_to: int = 1, min_channels: int = 1) -> SearchSpace:
    """Trace ``model`` and describe its prunable groups, droppable blocks and per-layer MACs.

    The final classifier keeps its outputs (they are the classes). ``min_channels`` is the fewest
    channels a group may keep; ``round_to`` rounds kept channels up to a multiple (e.g. 8 for GPUs).
    """
    from prunetune.pruning.measure import count_params, layer_macs
    from prunetune.pruning.models import classifier_layer, residual_blocks

    if round_to < 1 or min_channels < 1:
        raise UserError("round_to and min_channels must be at least 1")
    graph = trace_graph(model, input_shape)
    traced = trace_groups(model, graph, ignored=[classifier_layer(model)])
    macs = layer_macs(model, input_shape)
    found = residual_blocks(model)

    out_group, in_parts = {}, {}
    for tg in traced:
        for member in tg.out_members:
            out_group[member] = tg.name
        for user, count in tg.in_users:
            in_parts.setdefault(user, []).append((tg.name, count))

    layers = []
    for name, layer_cost in macs.items():
        module = model.get_submodule(name)
        in_total = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        parts = in_parts.get(name, [])
        fixed = in_total - sum(c for _, c in parts)
        all_parts = tuple(parts) + (((None, fixed),) if fixed > 0 else ())
        block = next((b.name for b in found if not b.why_not and _in_branch(name, b)), None)
        layers.append(LayerCost(name, int(layer_cost), out_group.get(name), _out_channels(module),
                                all_parts, is_depthwise(module), block))

    base_macs = sum(layer.macs for layer in layers)
    groups = []
    for tg in traced:
        touched = sum(layer.macs for layer in layers
                      if layer.out_group == tg.name or any(g == tg.name for g, _ in layer.in_parts))
        groups.append(Group(tg.name, tg.channels, min(min_channels, tg.channels), round_to,
                            round(touched / base_macs, 6), tg.out_members))
    blocks = tuple(Block(b.name, b.stage, b.shortcut, not b.why_not, b.why_not,
                         tuple(g.name for g in groups if all(_in_branch(m, b) for m in g.members)))
                   for b in found)
    return SearchSpace(model_name, tuple(input_shape), tuple(groups), tuple(layers), blocks,
                       int(base_macs), count_params(model))


def _in_branch(module_name: str, block) -> bool:
    """Whether ``module_name`` lies in ``block``'s residual branch: inside it, not in its shortcut."""
    inside = module_name.startswith(block.name + ".")
    return inside and not (block.shortcut_path and module_name.startswith(block.shortcut_path + "."))


def space_group_names(traced: list[TracedGroup], space: SearchSpace) -> dict[str, TracedGroup]:
    """The groups traced on a (possibly depth-pruned) copy of the space's model, by space group name.

    Each traced group is the space group that owns its first member; dropping blocks keeps the
    module paths of everything it keeps, so every traced group has one.
    """
    owner = {member: g.name for g in space.groups for member in g.members}
    return {owner[tg.out_members[0]]: tg for tg in traced if tg.out_members[0] in owner}


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
