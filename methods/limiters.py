"""Wrappers that share behaviour between searchers: a trial budget and a concurrency limit.

After Ray Tune's ``ConcurrencyLimiter``: behaviour layered around any ``Searcher``, not a flag in
each. ``make_searcher`` builds ``ConcurrencyLimiter(TrialBudget(searcher, budget), concurrency)``.
Each wrapper keeps its own ids in flight and nests the inner searcher's state in its own. Loading
a state keeps the budget and concurrency given to the constructor, so a resumed search may be
given a larger budget.
"""

from __future__ import annotations

from collections.abc import Mapping

from prunetune.methods.searcher import Proposal, Searcher, check_state
from prunetune.pruning.errors import UserError


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a whole number of at least 1, got {value!r}")
    return value


class _Wrapper(Searcher):
    """Forwards to ``inner`` and tracks the proposals it let through that are not yet told."""

    kind = "wrapper"

    def __init__(self, inner: Searcher) -> None:
        self.inner = inner
        self._in_flight: list[str] = []

    def _let_through(self, proposal: Proposal | None) -> Proposal | None:
        if proposal is not None:
            self._in_flight.append(proposal.proposal_id)
        return proposal

    def tell(self, proposal_id: str, result: Mapping[str, float] | None) -> None:
        if proposal_id not in self._in_flight:
            raise KeyError(f"proposal '{proposal_id}' is not in flight (told twice, or never proposed)")
        self._in_flight.remove(proposal_id)
        self.inner.tell(proposal_id, result)

    def on_report(self, proposal_id: str, metrics: Mapping[str, float]) -> None:
        self.inner.on_report(proposal_id, metrics)

    def search_path(self) -> list[dict]:
        return self.inner.search_path()

    @property
    def in_flight(self) -> tuple[str, ...]:
        return tuple(self._in_flight)

    def _state(self, **extra) -> dict:
        return {"kind": self.kind, **extra, "in_flight": list(self._in_flight),
                "inner": self.inner.state_dict()}

    def _load(self, state: Mapping) -> None:
        check_state(state, self.kind)
        self.inner.load_state_dict(state["inner"])
        self._in_flight = [str(i) for i in state["in_flight"]]


class TrialBudget(_Wrapper):
    """At most ``budget`` proposals in all (failed trials count: each spent a trial)."""

    kind = "trial_budget"

    def __init__(self, inner: Searcher, budget: int) -> None:
        super().__init__(inner)
        self.budget = _positive_int(budget, "budget")
        self._proposed = 0

    def ask(self) -> Proposal | None:
        if self._proposed >= self.budget:
            return None
        proposal = self._let_through(self.inner.ask())
        self._proposed += proposal is not None
        return proposal

    @property
    def finished(self) -> bool:
        return self.inner.finished or (self._proposed >= self.budget and not self._in_flight)

    def state_dict(self) -> dict:
        return self._state(budget=self.budget, proposed=self._proposed)

    def load_state_dict(self, state: Mapping) -> None:
        self._load(state)
        self._proposed = int(state["proposed"])


class ConcurrencyLimiter(_Wrapper):
    """At most ``concurrency`` proposals in flight: ``ask`` returns None until a result comes back."""

    kind = "concurrency_limiter"

    def __init__(self, inner: Searcher, concurrency: int) -> None:
        super().__init__(inner)
        self.concurrency = _positive_int(concurrency, "concurrency")

    def ask(self) -> Proposal | None:
        if len(self._in_flight) >= self.concurrency:
            return None
        return self._let_through(self.inner.ask())

    @property
    def finished(self) -> bool:
        return self.inner.finished

    def state_dict(self) -> dict:
        return self._state(concurrency=self.concurrency)

    def load_state_dict(self, state: Mapping) -> None:
        self._load(state)
