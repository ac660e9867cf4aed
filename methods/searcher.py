"""The searcher protocol: a method that proposes whole policies and learns from their results.

After Optuna's ``BaseSampler`` and Ray Tune's ``Searcher`` (DESIGN.md, concept 5): a few required
methods and no-op hooks. The driver loop is::

    while not searcher.finished:
        proposal = searcher.ask()          # None: wait for a result in flight, then ask again
        ...run a trial on proposal.policy...
        searcher.tell(proposal.proposal_id, result)   # result None: the trial failed

``finished`` turns True once the searcher will never propose again and every proposal it made has
been told, so a driver that stops on ``finished`` never drops a result. ``state_dict`` is plain JSON
(with the RNG state), so a resumed search makes the same next proposals. Concurrency and trial
budgets are wrappers (``methods.limiters``), not flags of every searcher.

A searcher never proposes a policy whose estimated MACs ratio exceeds ``macs_target + tolerance``:
``require_within_target`` checks that against the space's estimate before a trial is spent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace

DEFAULT_TOLERANCE = 0.02


@dataclass(frozen=True)
class Proposal:
    """One policy to try: a unique, seed-deterministic id, the policy, and JSON-able notes on it."""

    proposal_id: str
    policy: Policy
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    def __reduce__(self):  # MappingProxyType does not pickle; Ray pickles the searcher adapter
        return (Proposal, (self.proposal_id, self.policy, dict(self.info)))

    def to_json(self) -> dict:
        return {"proposal_id": self.proposal_id, "policy": self.policy.to_json(), "info": dict(self.info)}

    @classmethod
    def from_json(cls, data: Mapping) -> Proposal:
        return cls(data["proposal_id"], Policy.from_json(data["policy"]), data.get("info") or {})


class Searcher(ABC):
    """Proposes policies (``ask``) and learns from their results (``tell``); see the module doc."""

    @abstractmethod
    def ask(self) -> Proposal | None:
        """The next policy to try, or None when nothing can be proposed until a result comes back."""

    @abstractmethod
    def tell(self, proposal_id: str, result: Mapping[str, float] | None) -> None:
        """The result of a proposal (at least ``val_accuracy`` and ``macs_ratio``), or None if it failed."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """True once no proposal will ever come again and every proposal made has been told."""

    @abstractmethod
    def state_dict(self) -> dict:
        """The whole state, RNG included, as JSON-able data (``json.dumps`` works on it)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping) -> None:
        """Restore a state from ``state_dict``: the next proposals are those the saver would have made."""

    def on_report(self, proposal_id: str, metrics: Mapping[str, float]) -> None:  # noqa: B027
        """Hook: an intermediate (per-epoch) report of a proposal in flight. Ignored by default."""

    def search_path(self) -> list[dict]:
        """Hook: the search's path so far, one row of numbers per step (with its ``round``), for the
        driver to log as metrics of the parent run. Empty by default."""
        return []


def macs_ratio_limit(macs_target: float, tolerance: float) -> float:
    """The largest estimated MACs ratio a searcher may propose at ``macs_target``."""
    return macs_target + tolerance


def require_within_target(space: SearchSpace, policy: Policy, macs_target: float, tolerance: float,
                          what: str = "policy") -> float:
    """Validate ``policy`` against ``space`` and return its estimated MACs ratio.

    Raises UserError if the ratio exceeds ``macs_target + tolerance``: a searcher fails loudly
    rather than propose an over-budget policy or clip it silently.
    """
    policy.validate(space)
    ratio = space.macs_ratio(policy)
    if ratio > macs_ratio_limit(macs_target, tolerance) + 1e-12:
        raise UserError(f"the {what} keeps {ratio:.4f} of the MACs, over the target {macs_target:g} "
                        f"+ tolerance {tolerance:g}; give a policy within the target or raise it")
    return ratio


def check_state(state: Mapping, kind: str, space_id: str | None = None) -> None:
    """Raise UserError unless ``state`` was saved by a searcher of ``kind`` (on ``space_id``)."""
    if not isinstance(state, Mapping) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
        raise UserError(f"the searcher state was saved by '{found}', not '{kind}'; resume with the "
                        f"method and options the search started with")
    if space_id is not None and state.get("space_id") != space_id:
        raise UserError(f"the searcher state is for space '{state.get('space_id')}', not '{space_id}'; "
                        f"resume with the model the search started with")
