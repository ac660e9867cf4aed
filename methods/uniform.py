"""The uniform baseline: every group keeps the same fraction r of its channels (METHODS.md, Baselines).

r is the largest keep ratio whose estimated MACs ratio meets the target t. MACs(r) is a monotone
step function of r: it steps up only where some group l's kept channels change, at
r = k * round_to_l / C_l. Bisection over those breakpoints finds the largest feasible r exactly.
"""

from __future__ import annotations

from prunetune.methods.fixed_policy import FixedPolicySearcher
from prunetune.methods.options import SearcherOptions, check_fraction
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace


def uniform_breakpoints(space: SearchSpace) -> list[float]:
    """The keep ratios, ascending, at which some group's kept channel count changes (1.0 included)."""
    points = {1.0}
    for g in space.groups:
        points.update(min(1.0, k * g.round_to / g.channels) for k in range(1, -(-g.channels // g.round_to) + 1))
    return sorted(points)


def largest_fitting(count: int, fits) -> int:
    """The largest index in ``range(count)`` where ``fits`` holds, by bisection.

    ``fits(0)`` must hold and ``fits`` must be monotone (true up to some index, false after it), as
    "the MACs ratio meets the target" is along ascending keep ratios or channel counts.
    """
    low, high = 0, count - 1  # invariant: fits(low); nothing above high fits
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def uniform_policy_for_target(space: SearchSpace, macs_target: float) -> Policy:
    """The uniform policy with the largest keep ratio r such that ``space.macs_ratio`` <= ``macs_target``."""
    target = check_fraction(macs_target, "macs_target")
    candidates = uniform_breakpoints(space)

    def fits(index: int) -> bool:
        return space.macs_ratio(Policy.uniform(space, candidates[index])) <= target

    if not fits(0):
        smallest = space.macs_ratio(Policy.uniform(space, candidates[0]))
        raise UserError(f"macs_target {target:g} is below {smallest:.4f}, the smallest MACs ratio a uniform "
                        f"policy reaches on {space.model_name}; raise the target")
    return Policy.uniform(space, candidates[largest_fitting(len(candidates), fits)])


def make_uniform_searcher(space: SearchSpace, *, macs_target: float, seed: int, options: SearcherOptions,
                          start_policy: Policy | None = None) -> FixedPolicySearcher:
    """Proposes ``uniform_policy_for_target`` once; ``seed`` is unused (the policy is deterministic)."""
    policy = uniform_policy_for_target(space, macs_target)
    return FixedPolicySearcher("uniform", space, [policy], macs_target=macs_target,
                               tolerance=options.tolerance)
