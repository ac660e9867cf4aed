"""The random baseline: random policies that meet the MACs target (METHODS.md, Baselines).

Each proposal draws u_l ~ U[floor, 1] per group, then rescales by one common multiplier a,
``r_l = clip(a * u_l, floor, 1)``, with a found by bisection so that the estimated MACs ratio lands
in [t - tolerance, t] (MACs rise with a). The policy is snapped to whole channels; a draw that
cannot land in the band (the steps of MACs(a) jump over it) or repeats an earlier policy's
``key()`` is rejected and drawn again. After ``max_tries`` rejections in a row the space is deemed
exhausted: the searcher finishes early (or, before any proposal, raises a UserError).

Depth (config ``space.search_depth``): a draw first drops each droppable block with probability
``drop_probability``; the multiplier then rescales the remaining groups' ratios into the band,
against the estimate with those blocks dropped (groups inside them are left out of the policy).

Parameterisation (config ``space.parameterisation``, ``methods.parameterisation``): with ``stages``
the draws are one per stage parameter (u ~ U[floor, 1]), shared by its groups, and rescaled as
above (one common multiplier keeps them shared); with ``affine`` alpha is drawn log-uniformly and
kappa uniformly per group, and the affine threshold already meets the target, so a policy below
the band is rejected and drawn again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from prunetune.methods.options import SearcherOptions, check_fraction
from prunetune.methods.parameterisation import Groups, sample_point
from prunetune.methods.searcher import Proposal, Searcher, check_state
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.schema import AT_LEAST_ONE, FRACTION, Range, option
from prunetune.pruning.space import SearchSpace, policy_from_channels

BISECTION_STEPS = 40


@dataclass(frozen=True)
class RandomOptions(SearcherOptions):
    """Random search's options (config section ``random``)."""

    section: ClassVar[str] = "random"
    floor: float = option(0.1, "lowest keep ratio drawn for a group", check=FRACTION)
    max_tries: int = option(200, "rejected draws in a row before the space counts as exhausted",
                            check=AT_LEAST_ONE)
    drop_probability: float = option(0.3, "chance that a draw drops each droppable block (with "
                                     "space.search_depth on)", check=Range(0, 1))
    search_depth: bool = option(False, "propose dropped blocks too", from_config="space.search_depth")


def rescaled_policy(space: SearchSpace, draws: np.ndarray, macs_target: float, tolerance: float,
                    floor: float, dropped_blocks: tuple[str, ...] = ()) -> Policy | None:
    """Scale ``draws`` (one per group) by a common multiplier into [t - tolerance, t], with
    ``dropped_blocks`` dropped; None if impossible."""
    names = space.group_names()

    def snapped(multiplier: float) -> Policy:
        ratios = {n: float(min(1.0, max(floor, multiplier * u))) for n, u in zip(names, draws, strict=True)}
        policy = Policy(ratios, dropped_blocks, space.space_id)
        return policy_from_channels(space, space.channels(policy), dropped_blocks)

    # snapped(low) fits without drops (checked at construction), maybe not with only some dropped
    low, high = 0.0, 1.0 / float(draws.min())  # high keeps all
    best = snapped(low)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        candidate = snapped(middle)
        ratio = space.macs_ratio(candidate)
        if ratio <= macs_target:
            low, best = middle, candidate
            if ratio >= macs_target - tolerance:
                break
        else:
            high = middle
    return best if macs_target - tolerance <= space.macs_ratio(best) <= macs_target else None


class RandomSearcher(Searcher):
    """Proposes distinct random policies in the MACs band, forever (``TrialBudget`` bounds it)."""

    def __init__(self, space: SearchSpace, *, macs_target: float, seed: int, options: RandomOptions,
                 parameterisation=None) -> None:
        self.space = space
        self.macs_target = check_fraction(macs_target, "macs_target")
        self.options = options
        self.parameterisation = parameterisation or Groups(space, options.floor)
        self._droppable = space.droppable_blocks if options.search_depth else ()
        floor_ratio = space.macs_ratio(Policy.uniform(space, options.floor, self._droppable))
        if floor_ratio > self.macs_target:
            raise UserError(f"macs_target {self.macs_target:g} is below {floor_ratio:.4f}, what "
                            f"{space.model_name} keeps with every group at the floor {options.floor:g}"
                            f"{' and every droppable block dropped' if self._droppable else ''}; "
                            f"raise the target or lower the floor")
        self._rng = np.random.default_rng(seed)
        self._counter = 0
        self._seen: set[str] = set()
        self._pending: list[str] = []
        self._exhausted = False

    def ask(self) -> Proposal | None:
        if self._exhausted:
            return None
        for _ in range(self.options.max_tries):
            point = self._draw()
            drops = self._rng.random(len(self._droppable)) < self.options.drop_probability
            dropped = tuple(b for b, drop in zip(self._droppable, drops, strict=True) if drop)
            policy = self._policy(point, dropped)
            if policy is None or policy.key() in self._seen:
                continue
            self._seen.add(policy.key())
            proposal = Proposal(f"random-{self._counter}", policy,
                                {"role": "random", "macs_ratio": round(self.space.macs_ratio(policy), 6)})
            self._counter += 1
            self._pending.append(proposal.proposal_id)
            return proposal
        self._exhausted = True
        if self._counter == 0:
            raise UserError(f"no random policy of {self.space.model_name} lands within "
                            f"[{self.macs_target - self.options.tolerance:g}, {self.macs_target:g}] of the MACs "
                            f"in {self.options.max_tries} draws; raise the tolerance")
        return None

    def _draw(self) -> np.ndarray | dict[str, float]:
        """One point: a keep ratio per group (``groups``, the stream of earlier versions), else a point
        of the parameterisation."""
        if self.parameterisation.kind == "groups":
            return self._rng.uniform(self.options.floor, 1.0, size=len(self.space.groups))
        return sample_point(self.parameterisation, self._rng)

    def _policy(self, point, dropped: tuple[str, ...]) -> Policy | None:
        """The policy of ``point`` in the MACs band, or None."""
        if self.parameterisation.meets_target:
            policy = self.parameterisation.to_policy(point, dropped)
            band = self.macs_target - self.options.tolerance <= self.space.macs_ratio(policy) <= self.macs_target
            return policy if band else None
        if isinstance(point, dict):
            ratios = self.parameterisation.ratios(point)
            point = np.array([ratios[name] for name in self.space.group_names()])
        return rescaled_policy(self.space, point, self.macs_target, self.options.tolerance, self.options.floor,
                               dropped)

    def tell(self, proposal_id: str, result: Mapping[str, float] | None) -> None:
        if proposal_id not in self._pending:
            raise KeyError(f"proposal '{proposal_id}' is not in flight (told twice, or never proposed)")
        self._pending.remove(proposal_id)

    @property
    def finished(self) -> bool:
        return self._exhausted and not self._pending

    def state_dict(self) -> dict:
        return {"kind": "random", "space_id": self.space.space_id, "rng": self._rng.bit_generator.state,
                "counter": self._counter, "seen": sorted(self._seen), "pending": list(self._pending),
                "exhausted": self._exhausted, "parameterisation": self.parameterisation.kind}

    def load_state_dict(self, state: Mapping) -> None:
        check_state(state, "random", self.space.space_id)
        drawn_in = state.get("parameterisation", "groups")  # states saved before parameterisations: groups
        if drawn_in != self.parameterisation.kind:
            raise UserError(f"the random searcher's state was drawn in the {drawn_in} parameterisation, not "
                            f"{self.parameterisation.kind}; resume with space.parameterisation={drawn_in}")
        self._rng.bit_generator.state = dict(state["rng"])
        self._counter = int(state["counter"])
        self._seen = set(state["seen"])
        self._pending = [str(i) for i in state["pending"]]
        self._exhausted = bool(state["exhausted"])


def make_random_searcher(space: SearchSpace, *, macs_target: float, seed: int, options: RandomOptions,
                         start_policy: Policy | None = None, parameterisation=None) -> RandomSearcher:
    return RandomSearcher(space, macs_target=macs_target, seed=seed, options=options,
                          parameterisation=parameterisation)
