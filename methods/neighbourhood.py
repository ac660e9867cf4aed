"""ARPruning's neighbourhood: keep ratio moved from one group to another at a constant MACs budget.

METHODS.md, ARPruning, inter-layer search, step 2 (our design; the paper names a local
neighbourhood search). A neighbour of a policy moves a step d of keep ratio from a giver group i
to a taker group j:

- the giver loses ``move_channels(i, d)`` channels: d of its width in whole rounding units, at
  least one unit, never below its floor (``Group.kept_channels(floor)``);
- the taker's gain is then rescaled to the MACs the giver freed: it gains the most rounding units
  (at least one, at most its full width) that keep the estimated MACs ratio at or below the target
  t, and the neighbour must land in the band ``[t - tolerance, t]``.

A move that cannot land in the band (the taker is already full, the giver at its floor, one unit of
the taker costs more than the giver freed plus the slack below t) has no neighbour. Everything is
decided on the space's MACs estimate, before a trial is spent. Policies are handled as channel
counts per group (``{group: kept channels}``), exactly what surgery will keep.
"""

from __future__ import annotations

from collections.abc import Mapping

from prunetune.methods.uniform import largest_fitting
from prunetune.pruning.space import Group, SearchSpace, policy_from_channels

Channels = dict[str, int]


def move_channels(group: Group, step: float) -> int:
    """Channels a step of ``step`` keep ratio moves in ``group``: whole rounding units, at least one."""
    return group.round_to * max(1, round(step * group.channels / group.round_to))


def is_finest_step(space: SearchSpace, step: float) -> bool:
    """True when every group already moves one rounding unit at ``step``: halving cannot refine it.

    This is METHODS.md's stop rule "d is below the rounding unit": below it, a move is still one unit.
    """
    return all(move_channels(g, step) == g.round_to for g in space.groups)


def macs_ratio_of(space: SearchSpace, channels: Mapping[str, int]) -> float:
    """The estimated MACs ratio of the policy that keeps ``channels``."""
    return space.macs_ratio(policy_from_channels(space, channels))


def taker_counts(group: Group, kept: int) -> list[int]:
    """The taker's possible new channel counts, ascending: one more rounding unit each, up to its width."""
    counts, count = [], kept
    while count < group.channels:
        count = min(group.channels, count + group.round_to)
        counts.append(count)
    return counts


def neighbour(space: SearchSpace, channels: Mapping[str, int], giver: str, taker: str, step: float, *,
              macs_target: float, tolerance: float, floor: float) -> Channels | None:
    """``channels`` with ``step`` of keep ratio moved from ``giver`` to ``taker``, rescaled into the
    MACs band ``[macs_target - tolerance, macs_target]``; None when no such neighbour exists."""
    give, take = space.group(giver), space.group(taker)
    moved = dict(channels)
    moved[giver] = channels[giver] - move_channels(give, step)
    if giver == taker or moved[giver] < give.kept_channels(floor):
        return None
    counts = taker_counts(take, channels[taker])

    def fits(index: int) -> bool:
        return macs_ratio_of(space, {**moved, taker: counts[index]}) <= macs_target + 1e-12

    if not counts or not fits(0):
        return None
    moved[taker] = counts[largest_fitting(len(counts), fits)]  # MACs rise with the count
    return moved if macs_ratio_of(space, moved) >= macs_target - tolerance - 1e-12 else None
