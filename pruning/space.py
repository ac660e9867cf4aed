"""The search space: the prunable channel groups of a model, found once by tracing it.

Torch-Pruning's dependency graph finds coupled channels: every convolution that feeds one residual
sum (or a depthwise convolution and the layer before it) lands in one group, which shares one keep
ratio. For each group the space records its channel count, the minimum it may keep, the rounding
unit, and its share of the base MACs.

Depth is part of the space too: every residual block is listed (``blocks``, in forward order), by
stage (``stages``), with its shortcut and whether it can be dropped (replaced by its identity or
projection shortcut) or why not. A policy that drops a block may leave out the groups whose
channels live only inside it (``Block.groups``).

The space also estimates the MACs of any policy without building the pruned model. A Conv2d or
Linear layer costs ``MACs_0 * (n_out / C_out) * (n_in / C_in)``, where the kept output channels
come from the group that owns them and the kept input channels from the groups that feed them
(a concatenation feeds one layer from several groups). A depthwise convolution has one factor only,
and the layers of a dropped block's residual branch cost nothing (its projection shortcut, if it
has one, stays and is counted). The estimate is exact for conv and linear layers,
so a searcher can reject a policy over budget before a trial is spent on it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy, check_keep_ratio

SPACE_FORMAT = 2  # 2: ``blocks`` (every residual block, its stage, shortcut, groups); 1 is still read
IDENTITY, PROJECTION, NO_SHORTCUT = "identity", "projection", "none"  # a block's shortcut (Block.shortcut)


@dataclass(frozen=True)
class Group:
    """A set of coupled channels pruned together: ``channels`` wide, keeping at least ``min_channels``.

    ``members`` are the layers whose output channels belong to the group (convs, BatchNorms,
    linears); the first is its root. ``macs_share`` is the fraction of the base MACs spent in
    layers whose input or output channels belong to the group.
    """

    name: str
    channels: int
    min_channels: int
    round_to: int
    macs_share: float
    members: tuple[str, ...]

    def kept_channels(self, keep_ratio: float) -> int:
        """Channels kept at ``keep_ratio``: ceil to the rounding unit, within [min_channels, channels]."""
        units = math.ceil(keep_ratio * self.channels / self.round_to - 1e-9)
        return max(self.min_channels, min(self.channels, units * self.round_to))


@dataclass(frozen=True)
class LayerCost:
    """The base MACs of one Conv2d or Linear and the groups its channels belong to.

    ``in_parts`` lists (group name or None for fixed inputs such as image channels, input
    channel count); ``block`` is the droppable block whose drop removes the layer (a layer of its
    residual branch; not its projection shortcut, which stays), if any.
    """

    name: str
    macs: int
    out_group: str | None
    out_channels: int
    in_parts: tuple[tuple[str | None, int], ...]
    depthwise: bool
    block: str | None


@dataclass(frozen=True)
class Block:
    """One residual block, in forward order: ``name`` is its module path (``layer2.0``).

    ``shortcut`` is ``identity``, ``projection`` (a 1x1 convolution + BatchNorm: a downsampling
    block) or ``none``. A droppable block is replaced by its shortcut when a policy drops it;
    ``why_not`` says why a block cannot be dropped ("" when it can). ``groups`` are the groups
    whose channels live only inside the block's residual branch: they vanish with it, so a policy
    dropping the block may leave out their keep ratios.
    """

    name: str
    stage: str
    shortcut: str
    droppable: bool
    why_not: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """A residual stage: its blocks' names in forward order (``layer2``: ``layer2.0`` ... )."""

    name: str
    blocks: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The prunable groups of one model at one input shape, and the MACs model built on them."""

    model_name: str
    input_shape: tuple[int, int, int]
    groups: tuple[Group, ...]
    layers: tuple[LayerCost, ...]
    blocks: tuple[Block, ...]
    base_macs: int
    base_params: int

    @property
    def droppable_blocks(self) -> tuple[str, ...]:
        """The names of the blocks a policy may drop, in forward order."""
        return tuple(b.name for b in self.blocks if b.droppable)

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The residual stages in forward order, each with its blocks in order."""
        order: dict[str, list[str]] = {}
        for b in self.blocks:
            order.setdefault(b.stage, []).append(b.name)
        return tuple(Stage(name, tuple(names)) for name, names in order.items())

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise UserError(f"unknown block '{name}'; blocks are {[b.name for b in self.blocks]}")

    def omittable_groups(self, dropped_blocks: Iterable[str]) -> set[str]:
        """The groups that vanish with ``dropped_blocks``: a policy dropping them may omit these."""
        return {g for name in dropped_blocks for g in self.block(name).groups}

    def canonical(self, policy: Policy) -> Policy:
        """``policy`` without the keep ratios of groups inside its dropped blocks (they prune nothing),
        so that two policies that prune alike share one ``key()``."""
        gone = self.omittable_groups(policy.dropped_blocks)
        ratios = {g: r for g, r in policy.keep_ratios.items() if g not in gone}
        return Policy(ratios, policy.dropped_blocks, policy.space_id)

    @property
    def space_id(self) -> str:
        """The model name plus a fingerprint of its groups: a policy is valid only for this id."""
        shape = [(g.name, g.channels) for g in self.groups] + [list(self.input_shape)]
        digest = hashlib.sha1(json.dumps(shape).encode()).hexdigest()[:10]
        return f"{self.model_name}:{digest}"

    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise UserError(f"unknown group '{name}'; groups are {self.group_names()}")

    def channels(self, policy: Policy) -> dict[str, int]:
        """Kept channels per group under ``policy`` (validated against this space); groups that
        vanish with a dropped block and have no keep ratio in the policy are left out."""
        policy.validate(self)
        return {g.name: g.kept_channels(policy.keep_ratios[g.name]) for g in self.groups
                if g.name in policy.keep_ratios}

    def estimate_macs(self, policy: Policy) -> int:
        """MACs (conv and linear, one sample) of the model pruned by ``policy``; see the module doc."""
        kept = self.channels(policy)
        widths = {g.name: g.channels for g in self.groups}
        dropped = set(policy.dropped_blocks)
        total = 0.0
        for layer in self.layers:
            if layer.block is not None and layer.block in dropped:
                continue
            out_fraction = 1.0 if layer.out_group is None else kept[layer.out_group] / widths[layer.out_group]
            if layer.depthwise:
                total += layer.macs * out_fraction
                continue
            in_total = sum(count for _, count in layer.in_parts)
            in_kept = sum(count if g is None else count * kept[g] / widths[g] for g, count in layer.in_parts)
            total += layer.macs * out_fraction * (in_kept / in_total if in_total else 1.0)
        return int(round(total))

    def macs_ratio(self, policy: Policy) -> float:
        """Estimated MACs of ``policy`` as a fraction of the base model's MACs."""
        return self.estimate_macs(policy) / self.base_macs

    def min_macs_ratio(self, *, drop_blocks: bool = False) -> float:
        """The smallest MACs ratio a policy reaches: every group at its minimum channels, and with
        ``drop_blocks`` (a search over depth) every droppable block dropped too."""
        floor = Policy({g.name: max(g.min_channels / g.channels, 1e-6) for g in self.groups},
                       self.droppable_blocks if drop_blocks else (), self.space_id)
        return self.macs_ratio(floor)

    def uniform_policy(self, keep_ratio: float) -> Policy:
        return Policy.uniform(self, keep_ratio)

    def to_json(self) -> dict:
        return {
            "format": SPACE_FORMAT, "space_id": self.space_id, "model_name": self.model_name,
            "input_shape": list(self.input_shape), "base_macs": self.base_macs,
            "base_params": self.base_params, "droppable_blocks": list(self.droppable_blocks),
            "blocks": [asdict(b) for b in self.blocks],
            "groups": [asdict(g) for g in self.groups],
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> SearchSpace:
        try:
            groups = tuple(Group(**{**g, "members": tuple(g["members"])}) for g in data["groups"])
            layers = tuple(LayerCost(**{**lc, "in_parts": tuple((p[0], p[1]) for p in lc["in_parts"])})
                           for lc in data["layers"])
            if data.get("format", 1) == 1:
                blocks = _format1_blocks(data["droppable_blocks"], groups)
            else:
                blocks = tuple(Block(**{**b, "groups": tuple(b["groups"])}) for b in data["blocks"])
            space = cls(data["model_name"], tuple(data["input_shape"]), groups, layers, blocks,
                        int(data["base_macs"]), int(data["base_params"]))
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a prunetune search space (missing or bad field {exc}); "
                            f"write one with `prunetune space --json`") from None
        if data.get("space_id") not in (None, space.space_id):
            raise UserError("the search space file was edited: its space_id does not match its groups; "
                            "write it again with `prunetune space --json`")
        return space

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read search space {path} ({exc}); write it with "
                            f"`prunetune space --json`") from None


def _format1_blocks(droppable: Iterable[str], groups: tuple[Group, ...]) -> tuple[Block, ...]:
    """The blocks of a format-1 space, which listed only its droppable (identity-shortcut) blocks:
    each is its own container's block (stage = the container) and owns the groups inside it."""
    return tuple(Block(name, name.rpartition(".")[0], IDENTITY, True, "",
                       tuple(g.name for g in groups if all(m.startswith(name + ".") for m in g.members)))
                 for name in droppable)


def policy_from_channels(space: SearchSpace, channels: Mapping[str, int],
                         dropped_blocks: Iterable[str] = ()) -> Policy:
    """The policy whose kept channels are exactly ``channels`` (per group); groups inside
    ``dropped_blocks`` are left out of it (canonical, see ``SearchSpace.canonical``)."""
    dropped_blocks = tuple(dropped_blocks)
    gone = space.omittable_groups(dropped_blocks)
    ratios = {}
    for g in space.groups:
        if g.name in gone:
            continue
        n = int(channels[g.name])
        if not g.min_channels <= n <= g.channels:
            raise UserError(f"group '{g.name}' cannot keep {n} channels; it keeps "
                            f"{g.min_channels}..{g.channels}")
        ratios[g.name] = check_keep_ratio(n / g.channels)
    return Policy(ratios, tuple(dropped_blocks), space.space_id)
