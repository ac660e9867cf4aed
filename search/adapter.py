"""Ray Tune's ``Searcher`` interface over prunetune's own searchers (``methods.searcher``).

Ray asks ``suggest(trial_id)`` and answers ``on_trial_complete``; our searchers ``ask()`` for a
``Proposal`` and are ``tell()``-ed its result. The adapter maps Ray trial ids to proposal ids and
saves the searcher's JSON state (with its RNG) where Ray saves searcher state, so ``prunetune
resume`` restores it and the search makes the same next moves.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.search import Searcher as RaySearcher

from methods.searcher import Searcher


class PolicySearcherAdapter(RaySearcher):
    """Runs one of our searchers under Ray Tune: proposals become trial configs ``{"policy": ...}``."""

    def __init__(self, searcher: Searcher, *, metric: str = "val_accuracy", mode: str = "max",
                 seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self.policy_searcher = searcher  # not ``searcher``: Ray treats that attribute as a wrapped Ray searcher
        self.seed = seed
        self.proposals: dict[str, str] = {}  # Ray trial id -> proposal id

    def suggest(self, trial_id: str) -> dict | None:
        if self.policy_searcher.finished:
            return RaySearcher.FINISHED
        proposal = self.policy_searcher.ask()
        if proposal is None:
            return RaySearcher.FINISHED if self.policy_searcher.finished else None
        self.proposals[trial_id] = proposal.proposal_id
        return {"policy": proposal.policy.to_json(), "proposal_id": proposal.proposal_id,
                "role": str(proposal.info.get("role", "")), "seed": self.seed}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        proposal_id = self.proposals.get(trial_id)
        if proposal_id is not None:
            self.policy_searcher.on_report(proposal_id, _scores(result))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        proposal_id = self.proposals.pop(trial_id, None)
        if proposal_id is None:
            return
        ok = not error and result is not None and result.get(self.metric) is not None
        self.policy_searcher.tell(proposal_id, _scores(result) if ok else None)

    def save(self, checkpoint_path: str) -> None:
        state = {"searcher": self.policy_searcher.state_dict(), "proposals": self.proposals}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.policy_searcher.load_state_dict(state["searcher"])
        self.proposals = dict(state["proposals"])


def _scores(result: dict) -> dict:
    """The numbers a searcher may learn from: never the test accuracy."""
    return {k: float(v) for k, v in result.items()
            if k in ("val_accuracy", "val_loss", "macs", "macs_ratio", "params", "latency_ms", "epoch")
            and isinstance(v, int | float)}
