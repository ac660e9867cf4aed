"""Policy parameterisations: the coordinates a sampler searches in (config ``space.parameterisation``).

A policy is one keep ratio per group, but a sampler that must learn in tens of trials does better
in fewer coordinates. Each parameterisation here names its dimensions (Optuna parameter names and
bounds) for a :class:`~prunetune.pruning.space.SearchSpace` and maps a point to a policy:

- ``groups``: one keep ratio per group, ``keep.<group>`` in [floor, 1] (the space as it is).
- ``stages``: one keep ratio per residual stage for the groups living inside its blocks
  (``keep.<stage>.in``: the blocks' inner convolutions) and one for the groups outside every block
  that belong to the stage (``keep.<stage>.out``: its residual stream, the convolutions feeding its
  residual sums and its projection shortcut). An out-of-block group belongs to the stage where
  most of its member layers lie; a group none of whose layers lie in a block (a stem, the layer
  feeding the classifier) shares the ``out`` ratio of the stage of the nearest group in forward
  order. A plain model (no residual blocks: small_cnn, vgg; or none holding a group's layer) is cut
  by depth into consecutive thirds of its groups in forward order, ``keep.third1`` .. ``keep.third3`` (fewer with fewer
  than three groups; the first thirds take the remainder).
- ``affine``: LeGR (Chin et al., "Towards Efficient Model Compression via Learned Global Ranking",
  CVPR 2020). LeGR transforms every filter's norm by its layer's learned affine map,
  ``I_hat_i = alpha_l(i) * ||Theta_i||_2^2 + kappa_l(i)``, then prunes the lowest ``I_hat`` over the
  whole network until the budget is met. Here ``I`` is the search's criterion, each group's
  scores over their mean (the ``global`` heuristic's normalisation), computed once on the driver
  and passed in as plain numbers; per group ``alpha.<group>`` in [0.5, 2] (log scale, start 1)
  and ``kappa.<group>`` in [-1, 1] (in normalised-importance units, start 0). One global threshold
  found by bisection keeps, per group, the channels scoring above it (never fewer than the floor),
  the smallest threshold whose estimated MACs ratio is at most the target: affine policies meet
  the target by construction, and at alpha = 1, kappa = 0 the policy is the ``global`` heuristic's.
  LeGR learns alpha and kappa by a regularised evolutionary search; here the search's own sampler
  (TPE, random, ...) samples them.

This module imports no torch (``normalised_importance`` imports it when called): the config and
``prunetune space`` read the dimensions before anything heavy is imported. The parameterisations
are frozen values that pickle (Ray Tune's ``OptunaSearch`` pickles the space function holding one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace, policy_from_channels

if TYPE_CHECKING:
    from torch import nn

PARAMETERISATIONS = ("groups", "stages", "affine")
ALPHA_RANGE = (0.5, 2.0)  # LeGR's scale per group, sampled on a log scale; 1 keeps the ranking
KAPPA_RANGE = (-1.0, 1.0)  # its shift, in units of a group's mean normalised importance (1)
PLAIN_PARTS = 3  # a model without residual stages is cut into this many consecutive parts by depth


@dataclass(frozen=True)
class Dimension:
    """One coordinate of a parameterisation: its Optuna parameter name, bounds and scale."""

    name: str
    low: float
    high: float
    log: bool = False


def _same_channels(space: SearchSpace, policy: Policy, other: Policy) -> bool:
    return (policy.dropped_blocks == other.dropped_blocks
            and space.channels(space.canonical(policy)) == space.channels(space.canonical(other)))


@dataclass(frozen=True)
class Groups:
    """One keep ratio per group: ``keep.<group>`` in [floor, 1]."""

    kind: ClassVar[str] = "groups"
    meets_target: ClassVar[bool] = False  # a sampled point may miss the MACs target
    space: SearchSpace
    floor: float

    def dimensions(self) -> tuple[Dimension, ...]:
        return tuple(Dimension(f"keep.{g.name}", self.floor, 1.0) for g in self.space.groups)

    def ratios(self, values: Mapping[str, float]) -> dict[str, float]:
        """The keep ratio of every group at the point ``values``."""
        return {g.name: float(values[f"keep.{g.name}"]) for g in self.space.groups}

    def to_policy(self, values: Mapping[str, float], dropped_blocks: Sequence[str] = ()) -> Policy:
        return self.space.canonical(Policy(self.ratios(values), tuple(dropped_blocks), self.space.space_id))

    def values_of(self, policy: Policy) -> dict[str, float] | None:
        """``policy`` as a point: its keep ratios (the groups it leaves out are left to the sampler)."""
        return {f"keep.{group}": ratio for group, ratio in policy.keep_ratios.items()}


def _thirds(space: SearchSpace) -> dict[str, str]:
    names = space.group_names()
    parts = np.array_split(np.arange(len(names)), min(PLAIN_PARTS, len(names)))
    return {names[i]: f"keep.third{part + 1}" for part, indices in enumerate(parts) for i in indices}


def stage_assignment(space: SearchSpace) -> dict[str, str]:
    """Group name -> its ``stages`` parameter name (see the module doc for the rule)."""
    if not space.blocks:
        return _thirds(space)
    stage_of_block = {b.name: b.stage for b in space.blocks}
    assigned: dict[str, str | None] = {}
    for group in space.groups:
        inner = next((b.stage for b in space.blocks if group.name in b.groups), None)
        if inner is not None:
            assigned[group.name] = f"keep.{inner}.in"
            continue
        counts: dict[str, int] = {}
        for member in group.members:
            block = next((name for name in stage_of_block if member.startswith(name + ".")), None)
            if block is not None:
                counts[stage_of_block[block]] = counts.get(stage_of_block[block], 0) + 1
        assigned[group.name] = f"keep.{max(counts, key=counts.get)}.out" if counts else None
    if all(param is None for param in assigned.values()):  # blocks, but no group has a layer in one
        return _thirds(space)
    order = space.group_names()
    for index, name in enumerate(order):
        if assigned[name] is None:  # no layer in a block: the stage of the nearest group that has one
            nearest = min((abs(j - index), -j, other) for j, other in enumerate(order)
                          if assigned[other] is not None)[2]
            assigned[name] = assigned[nearest].rpartition(".")[0] + ".out"
    return {name: str(param) for name, param in assigned.items()}


@dataclass(frozen=True)
class Stages:
    """One keep ratio per residual stage and in-block / out-of-block pair (or per third of a plain model)."""

    kind: ClassVar[str] = "stages"
    meets_target: ClassVar[bool] = False
    space: SearchSpace
    floor: float
    assignment: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "assignment", stage_assignment(self.space))

    def __reduce__(self):  # rebuilt from its fields (the assignment follows from the space)
        return (Stages, (self.space, self.floor))

    def dimensions(self) -> tuple[Dimension, ...]:
        names = list(dict.fromkeys(self.assignment[g] for g in self.space.group_names()))
        return tuple(Dimension(name, self.floor, 1.0) for name in names)

    def ratios(self, values: Mapping[str, float]) -> dict[str, float]:
        return {g: float(values[param]) for g, param in self.assignment.items()}

    def to_policy(self, values: Mapping[str, float], dropped_blocks: Sequence[str] = ()) -> Policy:
        return self.space.canonical(Policy(self.ratios(values), tuple(dropped_blocks), self.space.space_id))

    def values_of(self, policy: Policy) -> dict[str, float] | None:
        """``policy`` as a point, or None unless every parameter's groups keep alike under it."""
        values: dict[str, float] = {}
        for group, param in self.assignment.items():
            if group in policy.keep_ratios:
                values.setdefault(param, policy.keep_ratios[group])
        values = {d.name: values.get(d.name, 1.0) for d in self.dimensions()}
        return values if _same_channels(self.space, self.to_policy(values, policy.dropped_blocks), policy) else None


@dataclass(frozen=True)
class Affine:
    """LeGR's per-group affine transform of the global ranking, thresholded to meet ``macs_target``.

    ``scores`` are each group's channel scores, normalised by their mean (``normalised_importance``).
    """

    kind: ClassVar[str] = "affine"
    meets_target: ClassVar[bool] = True
    space: SearchSpace
    floor: float
    macs_target: float
    scores: tuple[tuple[str, tuple[float, ...]], ...]

    def __post_init__(self) -> None:
        scores = tuple((str(name), tuple(float(s) for s in values))
                       for name, values in dict(self.scores).items())
        widths = {name: len(values) for name, values in scores}
        if widths != {g.name: g.channels for g in self.space.groups}:
            raise UserError(f"the importance scores do not match the search space '{self.space.space_id}' "
                            f"(one score per channel of every group); compute them on this model")
        object.__setattr__(self, "scores", scores)

    def dimensions(self) -> tuple[Dimension, ...]:
        return affine_dimensions(self.space)

    def start(self) -> dict[str, float]:
        """alpha = 1, kappa = 0 for every group: plain global ranking (the ``global`` heuristic)."""
        return {**{f"alpha.{g.name}": 1.0 for g in self.space.groups},
                **{f"kappa.{g.name}": 0.0 for g in self.space.groups}}

    def to_policy(self, values: Mapping[str, float], dropped_blocks: Sequence[str] = ()) -> Policy:
        """The threshold policy on ``alpha_g * I + kappa_g`` at the smallest threshold meeting the
        target; every group at its floor if even that misses it (the caller's MACs check says so)."""
        dropped = tuple(dropped_blocks)
        gone = self.space.omittable_groups(dropped)
        live = [g for g in self.space.groups if g.name not in gone]
        scores = dict(self.scores)
        transformed = {g.name: float(values[f"alpha.{g.name}"]) * np.asarray(scores[g.name])
                       + float(values[f"kappa.{g.name}"]) for g in live}
        thresholds = [-math.inf, *np.unique(np.concatenate(list(transformed.values()))).tolist()]

        def policy(index: int) -> Policy:
            kept = {g.name: g.kept_channels(max(self.floor, int((transformed[g.name] > thresholds[index]).sum())
                                                / g.channels)) for g in live}
            return policy_from_channels(self.space, kept, dropped)

        low, high = 0, len(thresholds) - 1  # invariant: thresholds[high] fits (or is the last)
        while low < high:
            middle = (low + high) // 2
            if self.space.macs_ratio(policy(middle)) <= self.macs_target:
                high = middle
            else:
                low = middle + 1
        return policy(high)

    def values_of(self, policy: Policy) -> dict[str, float] | None:
        """The start (alpha 1, kappa 0) if it gives ``policy``, else None: only the global ranking's
        own policy is known to lie in this space."""
        start = self.start()
        return start if _same_channels(self.space, self.to_policy(start, policy.dropped_blocks), policy) else None


def affine_dimensions(space: SearchSpace) -> tuple[Dimension, ...]:
    return (tuple(Dimension(f"alpha.{g.name}", *ALPHA_RANGE, log=True) for g in space.groups)
            + tuple(Dimension(f"kappa.{g.name}", *KAPPA_RANGE) for g in space.groups))


def dimension_count(kind: str, space: SearchSpace) -> int:
    """How many coordinates parameterisation ``kind`` has on ``space`` (no importance scores needed)."""
    if kind == "groups":
        return len(space.groups)
    if kind == "stages":
        return len(set(stage_assignment(space).values()))
    if kind == "affine":
        return len(affine_dimensions(space))
    raise UserError(f"unknown parameterisation '{kind}'; choose one of: {', '.join(PARAMETERISATIONS)}")


def make_parameterisation(kind: str, space: SearchSpace, *, floor: float, macs_target: float | None = None,
                          scores: Mapping[str, Sequence[float]] | None = None):
    """The parameterisation ``kind`` of ``space``; ``affine`` needs ``macs_target`` and ``scores``."""
    if kind == "groups":
        return Groups(space, floor)
    if kind == "stages":
        return Stages(space, floor)
    if kind == "affine":
        if scores is None or macs_target is None:
            raise UserError("the affine parameterisation needs the MACs target and the base model's "
                            "importance scores (normalised_importance)")
        return Affine(space, floor, macs_target, tuple(scores.items()))
    raise UserError(f"unknown parameterisation '{kind}'; choose one of: {', '.join(PARAMETERISATIONS)}")


def sample_point(parameterisation, rng: np.random.Generator) -> dict[str, float]:
    """A point drawn uniformly within every dimension's bounds (log-uniformly where it is log-scaled)."""
    dims = parameterisation.dimensions()
    lows = np.array([math.log(d.low) if d.log else d.low for d in dims])
    highs = np.array([math.log(d.high) if d.log else d.high for d in dims])
    drawn = rng.uniform(lows, highs)
    return {d.name: float(math.exp(x) if d.log else x) for d, x in zip(dims, drawn, strict=True)}


def normalised_importance(model: nn.Module, space: SearchSpace, criterion: str, calib,
                          normalizer: str = "mean") -> dict[str, tuple[float, ...]]:
    """Each group's channel scores by ``criterion`` on ``model``, normalised within the group as the
    ``global`` heuristic normalises them, as plain numbers (computed once, on the driver)."""
    from prunetune.methods.global_threshold import group_scores, normalise
    from prunetune.pruning.importance import get_criterion

    normalised = normalise(group_scores(model, space, get_criterion(criterion), calib), normalizer)
    return {name: tuple(values.tolist()) for name, values in normalised.items()}


def dimension_table(spaces: Sequence[SearchSpace]) -> str:
    """A markdown table: for every space, its dimension in each parameterisation (and its drop flags)."""
    lines = ["| model | groups | stages | affine | drop flags (`space.search_depth`) |",
             "|---|---|---|---|---|"]
    for space in spaces:
        counts = " | ".join(str(dimension_count(kind, space)) for kind in PARAMETERISATIONS)
        lines.append(f"| `{space.model_name}` | {counts} | {len(space.droppable_blocks)} |")
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- parameterisation-dimensions:start -->", "<!-- parameterisation-dimensions:end -->"
TABLE_INPUT = (3, 32, 32)  # every registered model built for 10 classes at this input, as on cifar10


def shipped_spaces() -> list[SearchSpace]:
    """The search space of every registered model (sorted by name), untrained, at :data:`TABLE_INPUT`."""
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.models import create_model, model_names

    return [build_space(create_model(name, num_classes=10, in_channels=TABLE_INPUT[0]), name, TABLE_INPUT)
            for name in model_names()]


def with_dimension_table(text: str, table: str) -> str:
    """``text`` (README) with the table between its markers replaced by ``table``."""
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[:start] + "\n" + table + "\n" + text[end:]


if __name__ == "__main__":  # python -m prunetune.methods.parameterisation README.md: rewrite its table
    import sys
    from pathlib import Path

    readme = Path(sys.argv[1])
    readme.write_text(with_dimension_table(readme.read_text(encoding="utf-8"), dimension_table(shipped_spaces())),
                      encoding="utf-8")
