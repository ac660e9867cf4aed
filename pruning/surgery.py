"""Physical pruning: cut a model down to a policy, then check the result.

``prune`` copies the model, drops the policy's residual blocks (each replaced by its identity or
projection shortcut, ``models.drop_blocks``), ranks every group's channels with an importance criterion, and removes the lowest-ranked
ones through Torch-Pruning's dependency graph, so that coupled layers (a residual sum, a depthwise
convolution, a concatenation) lose the same channels. It then checks that every group kept exactly
the planned channels and that the output shape is unchanged. Groups inside dropped blocks vanish
with them; the policy may leave them out.

A pruned model is saved as (architecture, space, policy, state_dict): no pickled modules. Loading
rebuilds the architecture, applies the policy keeping the first channels of every group (which
channels does not matter: the state_dict overwrites them) and loads the weights.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from prunetune.pruning.dependency import TracedGroup, space_group_names, tp_group, trace_graph, trace_groups
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace

PRUNED_FORMAT = 1


class PruningCheckError(RuntimeError):
    """The pruned model does not match the policy: a bug, never a user's mistake."""


def prune(model: nn.Module, space: SearchSpace, policy: Policy, importance="l1",
          calib: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """A physically smaller copy of ``model`` pruned to ``policy``; ``model`` is left untouched.

    ``importance`` is a criterion name (see ``pruning.importance``) or a criterion callable;
    ``calib`` holds the calibration batches that activation- and gradient-based criteria need.
    """
    from prunetune.pruning.importance import get_criterion
    from prunetune.pruning.models import classifier_layer, drop_blocks

    planned = space.channels(policy)
    criterion = get_criterion(importance) if isinstance(importance, str) else importance
    pruned = copy.deepcopy(model)
    drop_blocks(pruned, policy.dropped_blocks)
    graph = trace_graph(pruned, space.input_shape)
    traced = space_group_names(trace_groups(pruned, graph, ignored=[classifier_layer(pruned)]), space)
    to_cut = {name: g for name, g in traced.items() if name in planned and planned[name] < g.channels}
    if to_cut:
        tp_groups = {name: tp_group(graph, g.root) for name, g in to_cut.items()}
        cut_groups(graph, to_cut, planned, criterion(pruned, tp_groups, calib))
    check_pruned(pruned, space, policy)
    return pruned


def cut_groups(graph, groups: Mapping[str, TracedGroup], keep: Mapping[str, int],
               scores: Mapping[str, torch.Tensor]) -> None:
    """Cut every group of ``graph``'s model in place down to ``keep[name]`` channels, the best-scoring."""
    for name, group in groups.items():
        tp_group(graph, group.root, drop_indices(scores[name], keep[name], group.channel_groups)).prune()


def drop_indices(scores: torch.Tensor, keep: int, channel_groups: int = 1) -> list[int]:
    """The channels to cut so that the ``keep`` best-scoring stay.

    Channels split into ``channel_groups`` equal slices (a grouped convolution's, a GroupNorm's) lose the
    same positions in every slice: a position scores the mean of its channels' scores.
    """
    if keep % channel_groups:
        raise PruningCheckError(f"{keep} channels do not split into {channel_groups} equal groups")
    scores = scores.detach().float().cpu()  # a user's criterion may score on the GPU
    width = len(scores) // channel_groups
    order = torch.argsort(scores.reshape(channel_groups, width).mean(0), descending=True, stable=True)
    dropped = order[keep // channel_groups:]
    return sorted((dropped + width * torch.arange(channel_groups)[:, None]).flatten().tolist())


def realized_channels(model: nn.Module, space: SearchSpace, policy: Policy) -> dict[str, int]:
    """The output channels of each group in ``model``, read off its first surviving conv or linear
    member (groups that vanished with a dropped block are skipped)."""
    modules = dict(model.named_modules())
    result = {}
    for group in space.groups:
        layer = next((modules[m] for m in group.members if isinstance(modules.get(m), nn.Conv2d | nn.Linear)), None)
        if layer is not None:
            result[group.name] = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    return result


def check_pruned(model: nn.Module, space: SearchSpace, policy: Policy) -> None:
    """Raise PruningCheckError unless every group has its planned channels and outputs keep their shape."""
    planned = space.channels(policy)
    realized = realized_channels(model, space, policy)
    gone = space.omittable_groups(policy.dropped_blocks)
    lost = sorted(set(space.group_names()) - set(realized) - gone)
    if lost:
        raise PruningCheckError(f"groups outside the dropped blocks vanished from the pruned model: {lost}")
    wrong = {name: (n, planned[name]) for name, n in realized.items() if name in planned and n != planned[name]}
    if wrong:
        raise PruningCheckError(f"groups with the wrong channel count (realized, planned): {wrong}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *space.input_shape, device=device))
    model.train(was_training)
    from prunetune.pruning.models import classifier_layer

    classes = classifier_layer(model).out_features
    if tuple(out.shape) != (2, classes):
        raise PruningCheckError(f"the pruned model's output shape {tuple(out.shape)} is not (2, {classes})")


def first_channels(model: nn.Module, groups, calib=None) -> dict[str, torch.Tensor]:
    """A criterion that keeps the first channels of every group: used to rebuild a saved model."""
    return {name: -torch.arange(len(group.items[0].idxs), dtype=torch.float) for name, group in groups.items()}


def save_pruned(path: str | Path, model: nn.Module, *, arch: dict, space: SearchSpace, policy: Policy,
                extra: dict | None = None) -> None:
    """Write a pruned model as plain data (loadable with ``torch.load(weights_only=True)``), atomically.

    ``arch`` holds ``create_model``'s arguments: ``{"name", "num_classes", "in_channels"}`` and, for
    a user's model, ``"model_args"``; ``name`` is then its reference (a file by absolute path), so
    another machine that has the same module or file rebuilds it.
    """
    path = Path(path)
    payload = {
        "format": PRUNED_FORMAT, "arch": dict(arch), "space": json.dumps(space.to_json()),
        "policy": json.dumps(policy.to_json()), "extra": json.dumps(extra or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_pruned(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model saved by ``save_pruned``; returns it and ``{"arch", "space", "policy", "extra"}``."""
    from prunetune.pruning.models import create_from_arch

    try:
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        arch, state = payload["arch"], payload["state_dict"]
        space = SearchSpace.from_json(json.loads(payload["space"]))
        policy = Policy.from_json(json.loads(payload["policy"]))
        extra = json.loads(payload.get("extra", "{}"))
    except FileNotFoundError:
        raise UserError(f"no pruned model at {path}; check the path") from None
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"cannot read pruned model {path} ({type(exc).__name__}); it is not a prunetune "
                        f"checkpoint or it is damaged: export it again") from None
    base = create_from_arch(arch)
    model = prune(base, space, policy, importance=first_channels)
    model.load_state_dict(state)
    return model, {"arch": arch, "space": space, "policy": policy, "extra": extra}
