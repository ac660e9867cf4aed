"""Whether a method can reach a MACs target at all, asked before Ray starts or anything trains.

The space bounds every method (every group at its minimum channels: ``SearchSpace.min_macs_ratio``,
checked by the driver first); a method's own options can bound it higher. A searcher's lowest keep
ratio (``optuna.min_keep_ratio``, ``random.floor``, ``global.floor``, ``arpruning.floor``: the keys
of ``FLOOR_KEYS``) puts every group at that ratio at its lowest, so no policy it proposes keeps
fewer MACs than that policy (with every droppable block dropped too where it searches depth). A
learner says itself (``Learner.check``). Either way a target below that bound is refused in one
line naming the option and the lowest target it allows, instead of a whole search none of whose
trials can meet it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunetune.methods.options import parse_options
from prunetune.methods.registry import NO_OPTIONS, get_method, make_learner
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace

FLOOR_KEYS = ("min_keep_ratio", "floor")  # a searcher's option: the lowest keep ratio of a group


def floor_key(options: Any) -> str | None:
    """The name of ``options``' lowest-keep-ratio field, or None when it has none (uniform)."""
    return next((key for key in FLOOR_KEYS if hasattr(options, key)), None)


def floor_macs_ratio(space: SearchSpace, floor: float, *, drop_blocks: bool = False) -> float:
    """The MACs ratio of every group at keep ratio ``floor`` (never under its minimum channels),
    with every droppable block dropped too when ``drop_blocks``."""
    return space.macs_ratio(Policy.uniform(space, floor, space.droppable_blocks if drop_blocks else ()))


def check_reach(method: str, space: SearchSpace, *, macs_target: float,
                options: Mapping[str, Any] | Any = NO_OPTIONS) -> None:
    """Refuse ``macs_target`` if ``method`` with ``options`` (its options instance or mapping)
    cannot reach it on ``space``: a UserError naming the option and the lowest target it allows."""
    spec = get_method(method)
    if spec.kind == "learner":
        make_learner(method, options).check(space, macs_target)
        return
    parsed = parse_options(spec.options, options, method)
    key = floor_key(parsed)
    if key is None:
        return
    floor, depth = getattr(parsed, key), bool(getattr(parsed, "search_depth", False))
    lowest = floor_macs_ratio(space, floor, drop_blocks=depth)
    if lowest > macs_target:
        dropped = " and every droppable block dropped" if depth else ""
        raise UserError(f"macs_target {macs_target:g} is below {lowest:.3f}, the lowest MACs ratio {method} reaches "
                        f"on {space.model_name} with {spec.section}.{key} {floor:g} (every group at that keep "
                        f"ratio{dropped}); raise --macs-target to at least {lowest:.3f}, or lower --set "
                        f"{spec.section}.{key}")
