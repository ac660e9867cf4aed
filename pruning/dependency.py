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

A grouped convolution (``1 < groups``, not depthwise) splits the channels it takes and gives into
``groups`` equal slices (a GroupNorm too), and every slice must keep as many as the others: a group
feeding or leaving one is cut at the same positions in each slice (``TracedGroup.channel_groups``),
so it keeps a multiple of ``groups`` channels (its ``round_to`` and ``min_channels``).

``build_space`` checks its space by pruning a copy of the model one rounding step in every group
and running it once: a group Torch-Pruning traces wrongly (a concatenation flattened into a
Linear, say) is left out, and its layers keep their width (``explain_space`` says which and why).
A model it cannot trace at all is a ``UserError``.
"""

from __future__ import annotations

import copy
import math
import traceback
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
    channel_groups: int = 1  # equal slices cut alike (the groups of its grouped convolutions, GroupNorms)
    why_not: str = ""  # why the group cannot be pruned ("" when it can)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def is_grouped(module: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (one input and one output channel per group)."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and not module.groups == module.in_channels == module.out_channels)


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
        channels = len(tp_group.items[0].idxs)
        split, why_not = _channel_split(tp_group, graph, names, channels)
        groups.append(TracedGroup(
            name=layer_members[0], root=root, channels=channels, out_members=tuple(out_members),
            in_users=tuple(sorted(in_users.items(), key=lambda kv: order[kv[0]])),
            channel_groups=split, why_not=why_not,
        ))
    return sorted(groups, key=lambda g: order[g.name])


def _channel_split(tp_group, graph, names: dict, channels: int) -> tuple[int, str]:
    """The equal slices a group's channels fall into (the lcm of the groups of the grouped
    convolutions and GroupNorms they enter or leave) and why the group cannot be pruned ("" when it can).

    Cutting the same positions in each slice is right only where the group holds all of such a
    layer's channels, each at its own position; one channel per slice leaves nothing to cut.
    """
    split, why = 1, ""
    for item in tp_group.items:
        module, handler = item.dep.target.module, item.dep.handler
        is_out = graph.is_out_channel_pruning_fn(handler)
        slices = _slices(module, is_out)
        if slices is None or not (is_out or graph.is_in_channel_pruning_fn(handler)):
            continue
        groups, width, kind = slices
        why = f"{kind} {names.get(module)}, groups={groups}"
        whole = list(range(width))
        if channels != width or list(item.idxs) != whole or list(item.root_idxs) != whole:
            return split, why + ": the group holds its channels only in part or out of order"
        split = math.lcm(split, groups)
    return split, (why + ": one channel per group" if 1 < split >= channels else "")


def _slices(module: nn.Module, is_out: bool) -> tuple[int, int, str] | None:
    """(groups, channels, kind) of a layer whose channels on that side split into equal groups, or None."""
    if is_grouped(module):
        return module.groups, module.out_channels if is_out else module.in_channels, "grouped convolution"
    if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
        return module.num_groups, module.num_channels, "GroupNorm"
    return None


def build_space(model: nn.Module, model_name: str, input_shape: tuple[int, int, int], *,
                round_to: int = 1, min_channels: int = 1) -> SearchSpace:
    """Trace ``model`` and describe its prunable groups, droppable blocks and per-layer MACs.

    The final classifier keeps its outputs (they are the classes). ``min_channels`` is the fewest
    channels a group may keep; ``round_to`` rounds kept channels up to a multiple (e.g. 8 for GPUs).
    Groups that cannot be pruned are left out (``explain_space`` says which and why).
    """
    return explain_space(model, model_name, input_shape, round_to=round_to, min_channels=min_channels)[0]


def explain_space(model: nn.Module, model_name: str, input_shape: tuple[int, int, int], *,
                  round_to: int = 1, min_channels: int = 1) -> tuple[SearchSpace, dict[str, str]]:
    """``build_space``'s space, and the layers of the traced groups it leaves out: ``{layer: why}``."""
    from prunetune.pruning.measure import count_params, layer_macs
    from prunetune.pruning.models import residual_blocks

    if round_to < 1 or min_channels < 1:
        raise UserError("round_to and min_channels must be at least 1")
    traced, excluded = _prunable_groups(model, model_name, input_shape, round_to, min_channels)
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
        step, floor = _rounding(tg, round_to, min_channels)
        groups.append(Group(tg.name, tg.channels, floor, step, round(touched / base_macs, 6), tg.out_members))
    blocks = tuple(Block(b.name, b.stage, b.shortcut, not b.why_not, b.why_not,
                         tuple(g.name for g in groups if all(_in_branch(m, b) for m in g.members)))
                   for b in found)
    space = SearchSpace(model_name, tuple(input_shape), tuple(groups), tuple(layers), blocks,
                        int(base_macs), count_params(model))
    return space, {member: why for tg, why in excluded for member in tg.out_members if member in macs}


def _rounding(group: TracedGroup, round_to: int, min_channels: int) -> tuple[int, int]:
    """A group's rounding unit and fewest kept channels, both multiples of its ``channel_groups``."""
    split = group.channel_groups
    return math.lcm(round_to, split), min(group.channels, -(-min_channels // split) * split)


def _copy(model: nn.Module, model_name: str) -> nn.Module:
    """A deep copy of ``model``: pruning cuts a copy, so a model that cannot be copied is a UserError."""
    from prunetune.pruning.user_models import described

    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise UserError(f"model {model_name} cannot be copied ({described(error)}), and prunetune prunes a "
                        f"copy; make it copyable with copy.deepcopy") from None


def _trace(work: nn.Module, model: nn.Module, model_name: str, input_shape) -> tuple[object, list[TracedGroup]]:
    """Torch-Pruning's graph and groups of ``work`` (a copy of ``model``); a model it cannot trace is a
    UserError that says whether the model itself fails on the input or the tracing does."""
    from prunetune.pruning.models import classifier_layer
    from prunetune.pruning.user_models import described

    try:
        graph = trace_graph(work, input_shape)
        return graph, trace_groups(work, graph, ignored=[classifier_layer(work)])
    except UserError:
        raise
    except Exception as error:
        shape = "x".join(str(size) for size in input_shape)
        forward_error = _forward_error(model, input_shape)
        if forward_error is not None:
            raise UserError(f"model {model_name} does not run on a {shape} input ({forward_error}); "
                            f"give the image size it was built for (--image-size) or build it for this one") from None
        where = traceback.extract_tb(error.__traceback__)[-1]
        raise UserError(f"Torch-Pruning cannot trace the channels of model {model_name} ({described(error)}, in "
                        f"{where.filename.rpartition('/')[2]}), so it cannot be pruned: choose another model, or "
                        f"replace the operation it cannot follow (a channel shuffle, say)") from None


def _forward_error(model: nn.Module, input_shape, classes: int | None = None) -> str | None:
    """What goes wrong in one forward pass of ``model`` (eval mode, a batch of 2 zeros), or None;
    with ``classes``, an output that is not ``(2, classes)`` is wrong too."""
    from prunetune.pruning.user_models import described

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=next(model.parameters()).device))
    except Exception as error:
        return described(error)
    finally:
        model.train(was_training)
    if classes is not None:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if shape is None:  # a (logits, features) tuple, a dict: the shape check does not apply
            return None
        if shape != (2, classes):
            return f"its output has shape {shape}, not (2, {classes})"
    return None


def _prunable_groups(model, model_name, input_shape, round_to, min_channels):
    """The traced groups of ``model`` that can be pruned, and each other one with why it cannot.

    A copy of the model is pruned one rounding step in every group (the project's own surgery, the
    first channels kept) and run once. Only where that fails is each group tried again, one at a
    time on a fresh copy with the groups accepted before it, and left out if it breaks the model.
    """
    from prunetune.pruning.models import classifier_layer

    work = _copy(model, model_name)
    graph, traced = _trace(work, model, model_name, input_shape)
    unpruned = _forward_error(work, input_shape, classifier_layer(work).out_features)
    if unpruned is not None:  # the model itself, before any cut: no group is to blame
        shape = "x".join(str(size) for size in input_shape)
        raise UserError(f"model {model_name} fails on a {shape} input before any pruning ({unpruned}); "
                        f"build it for the dataset's image size and class count")
    excluded = [(tg, tg.why_not) for tg in traced if tg.why_not]
    candidates = [tg for tg in traced if not tg.why_not]
    if _one_step_failure(work, graph, candidates, input_shape, round_to, min_channels) is None:
        return candidates, excluded
    accepted = []
    for tg in candidates:
        work = _copy(model, model_name)
        graph, traced = _trace(work, model, model_name, input_shape)
        by_name = {g.name: g for g in traced}
        trying = [by_name[g.name] for g in [*accepted, tg]]
        failure = _one_step_failure(work, graph, trying, input_shape, round_to, min_channels)
        if failure is None:
            accepted.append(tg)
        else:
            excluded.append((tg, f"Torch-Pruning cuts it wrongly: a pruned copy fails ({failure})"))
    return accepted, excluded


def _one_step_failure(work, graph, groups: list[TracedGroup], input_shape, round_to, min_channels) -> str | None:
    """Cut every group of ``work`` (in place) one rounding step, run it: what went wrong, or None."""
    from prunetune.pruning.models import classifier_layer
    from prunetune.pruning.surgery import cut_groups
    from prunetune.pruning.user_models import described

    keep = {}
    for tg in groups:
        step, floor = _rounding(tg, round_to, min_channels)
        if tg.channels > floor:
            keep[tg.name] = max(floor, tg.channels - step)
    by_name = {tg.name: tg for tg in groups if tg.name in keep}
    try:
        cut_groups(graph, by_name, keep, {name: -torch.arange(float(g.channels)) for name, g in by_name.items()})
    except Exception as error:
        return described(error)
    wrong = [name for name in keep if _out_channels(work.get_submodule(name)) != keep[name]]
    if wrong:
        return f"{wrong[0]} kept {_out_channels(work.get_submodule(wrong[0]))} channels, not {keep[wrong[0]]}"
    return _forward_error(work, input_shape, classifier_layer(work).out_features)


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
