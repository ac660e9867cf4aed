"""A searcher that proposes policies computed up front, each once: the one-shot baselines.

``uniform`` and ``global`` (METHODS.md, Baselines) each compute a single policy meeting the MACs
target; as searchers they propose it, wait for its result, and are finished. Results teach them
nothing. Proposal ids are ``f"{method}-{n}"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prunetune.methods.searcher import Proposal, Searcher, check_state, require_within_target
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace


class FixedPolicySearcher(Searcher):
    """Proposes ``policies`` in order, each checked against the MACs target before it is accepted."""

    def __init__(self, method: str, space: SearchSpace, policies: Sequence[Policy], *, macs_target: float,
                 tolerance: float) -> None:
        self.method = method
        self.space_id = space.space_id
        self._policies = tuple(policies)
        self._ratios = tuple(require_within_target(space, p, macs_target, tolerance, f"{method} policy")
                             for p in self._policies)
        self._next = 0
        self._pending: list[str] = []

    def ask(self) -> Proposal | None:
        if self._next >= len(self._policies):
            return None
        index = self._next
        self._next += 1
        proposal = Proposal(f"{self.method}-{index}", self._policies[index],
                            {"role": self.method, "macs_ratio": round(self._ratios[index], 6)})
        self._pending.append(proposal.proposal_id)
        return proposal

    def tell(self, proposal_id: str, result: Mapping[str, float] | None) -> None:
        if proposal_id not in self._pending:
            raise KeyError(f"proposal '{proposal_id}' is not in flight (told twice, or never proposed)")
        self._pending.remove(proposal_id)

    @property
    def finished(self) -> bool:
        return self._next >= len(self._policies) and not self._pending

    @property
    def policies(self) -> tuple[Policy, ...]:
        """Every policy it will propose: a search runs this many trials, whatever its budget."""
        return self._policies

    def state_dict(self) -> dict:
        return {"kind": self.method, "space_id": self.space_id, "next": self._next,
                "pending": list(self._pending)}

    def load_state_dict(self, state: Mapping) -> None:
        check_state(state, self.method, self.space_id)
        self._next = int(state["next"])
        self._pending = [str(i) for i in state["pending"]]
