"""The global baseline: one importance threshold over every channel of every group (METHODS.md).

As in Torch-Pruning's global pruning, each group's channel scores are normalised within the group
(by Torch-Pruning's own normalizers: ``mean`` divides by the mean, its default; ``lamp`` is LAMP,
Lee et al. ICLR 2021, score_u / sum of the scores not below it, which keeps global ranking from
emptying a layer at high compression; ``max``, ``sum`` and ``gaussian`` as Torch-Pruning defines
them), so groups of different scale compete on one axis. A threshold tau keeps, in group l, the fraction of
its channels scoring above tau, but never less than ``floor`` (nor ``min_channels``):
``r_l(tau) = max(floor, |{c : s_lc / mean(s_l) > tau}| / C_l)``. MACs fall as tau rises, so
bisection over the observed scores finds the smallest tau whose estimated MACs ratio meets the
target. The policy is snapped to whole channels, so it is exactly what surgery will cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from prunetune.methods.fixed_policy import FixedPolicySearcher
from prunetune.methods.options import SearcherOptions, check_fraction
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.schema import FRACTION, option
from prunetune.pruning.space import SearchSpace, policy_from_channels

if TYPE_CHECKING:  # torch is imported where it is used, so listing the methods stays quick
    import torch
    from torch import nn

DEFAULT_FLOOR = 0.1
NORMALIZERS = ("mean", "lamp", "max", "sum", "gaussian")  # names of Torch-Pruning's Importance normalizers


@dataclass(frozen=True)
class GlobalOptions(SearcherOptions):
    """The global baseline's options (config section ``global``); ``criterion`` ranks the channels."""

    section: ClassVar[str] = "global"
    floor: float = option(DEFAULT_FLOOR, "lowest keep ratio a group is cut to", check=FRACTION)
    normalizer: str = option("mean", "how each group's scores are normalised before the global threshold "
                             "(Torch-Pruning's normalizers; lamp: LAMP)", choices=NORMALIZERS)
    criterion: str = option("l1", "importance criterion that ranks the channels", from_config="importance")


def group_scores(model: nn.Module, space: SearchSpace, criterion: Callable,
                 calib: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    """Channel scores of every group of ``space``, by ``criterion``, on the Torch-Pruning groups of ``model``."""
    from prunetune.pruning.dependency import tp_group, trace_graph, trace_groups
    from prunetune.pruning.models import classifier_layer

    graph = trace_graph(model, space.input_shape)
    traced = {g.name: g for g in trace_groups(model, graph, ignored=[classifier_layer(model)])}
    # every space group among the traced ones, with its channels (the space may leave traced groups out:
    # those its dry run found Torch-Pruning cuts wrongly, ``pruning.dependency.build_space``)
    if any(g.name not in traced or traced[g.name].channels != g.channels for g in space.groups):
        raise UserError(f"the model does not match the search space '{space.space_id}' (its groups differ); "
                        f"build the space from this model")
    scores = criterion(model, {g.name: tp_group(graph, traced[g.name].root) for g in space.groups}, calib)
    return {g.name: scores[g.name].detach().float().flatten().cpu() for g in space.groups}


def normalise_by_mean(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each group's scores divided by their mean (Torch-Pruning's ``normalizer="mean"``)."""
    return {name: s / s.mean().clamp_min(1e-12) for name, s in scores.items()}


def normalise(scores: Mapping[str, torch.Tensor], normalizer: str = "mean") -> dict[str, torch.Tensor]:
    """Each group's scores normalised by Torch-Pruning's ``normalizer`` (one of :data:`NORMALIZERS`)."""
    if normalizer == "mean":
        return normalise_by_mean(scores)  # guarded against an all-zero group, unlike Torch-Pruning's
    if normalizer not in NORMALIZERS:
        raise UserError(f"unknown normalizer '{normalizer}'; choose one of: {', '.join(NORMALIZERS)}")
    import torch_pruning as tp

    importance = tp.importance.GroupMagnitudeImportance(normalizer=normalizer)
    return {name: importance._normalize(s.clone().float(), normalizer) for name, s in scores.items()}


def threshold_policy(space: SearchSpace, normalised: Mapping[str, torch.Tensor], threshold: float,
                     floor: float) -> Policy:
    """r_l = max(floor, fraction of group l's channels scoring above ``threshold``), in whole channels."""
    kept = {}
    for g in space.groups:
        above = int((normalised[g.name] > threshold).sum())
        kept[g.name] = g.kept_channels(max(floor, above / g.channels))
    return policy_from_channels(space, kept)


def threshold_policy_for_target(space: SearchSpace, scores: Mapping[str, torch.Tensor], macs_target: float,
                                *, floor: float = DEFAULT_FLOOR, normalizer: str = "mean") -> Policy:
    """The global-threshold policy at the smallest threshold whose MACs ratio is <= ``macs_target``."""
    import torch

    target = check_fraction(macs_target, "macs_target")
    floor = check_fraction(floor, "floor")
    normalised = normalise(scores, normalizer)
    thresholds = [-float("inf"), *torch.unique(torch.cat(list(normalised.values()))).tolist()]

    def policy(index: int) -> Policy:
        return threshold_policy(space, normalised, thresholds[index], floor)

    highest = len(thresholds) - 1  # every group at its floor
    if space.macs_ratio(policy(highest)) > target:
        raise UserError(f"macs_target {target:g} is below {space.macs_ratio(policy(highest)):.4f}, what "
                        f"{space.model_name} keeps with every group at the floor {floor:g}; raise the "
                        f"target or lower the floor")
    low, high = 0, highest  # invariant: thresholds[high] fits; everything below low does not
    while low < high:
        middle = (low + high) // 2
        if space.macs_ratio(policy(middle)) <= target:
            high = middle
        else:
            low = middle + 1
    return policy(high)


def global_threshold_policy(model: nn.Module, space: SearchSpace, criterion: Callable,
                            calib: Sequence[tuple[torch.Tensor, torch.Tensor]] | None, macs_target: float,
                            *, floor: float = DEFAULT_FLOOR, normalizer: str = "mean") -> Policy:
    """Score ``model``'s channels with ``criterion`` and threshold them globally to meet ``macs_target``."""
    return threshold_policy_for_target(space, group_scores(model, space, criterion, calib), macs_target,
                                       floor=floor, normalizer=normalizer)


def global_start_policy(model: nn.Module, space: SearchSpace, calib, *, macs_target: float,
                        options: GlobalOptions) -> Policy:
    """The start policy of the ``global`` searcher, from its options (criterion, floor)."""
    from prunetune.pruning.importance import get_criterion

    return global_threshold_policy(model, space, get_criterion(options.criterion), calib, macs_target,
                                   floor=options.floor, normalizer=options.normalizer)


def make_global_searcher(space: SearchSpace, *, macs_target: float, seed: int, options: GlobalOptions,
                         start_policy: Policy | None = None) -> FixedPolicySearcher:
    """Proposes the precomputed ``start_policy`` (from ``global_start_policy``) once."""
    if start_policy is None:
        raise UserError("method 'global' needs its start policy; compute it with "
                        "methods.registry.start_policy_for('global', model, space, ...)")
    return FixedPolicySearcher("global", space, [start_policy], macs_target=macs_target,
                               tolerance=options.tolerance)
