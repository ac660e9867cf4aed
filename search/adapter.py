"""Ray Tune's ``Searcher`` interface over prunetune's own searchers (``methods.searcher``).

Ray asks ``suggest(trial_id)`` and answers ``on_trial_complete``; our searchers ``ask()`` for a
``Proposal`` and are ``tell()``-ed its result. The adapter maps Ray trial ids to proposal ids and
saves the searcher's JSON state (with its RNG) where Ray saves searcher state, so ``prunetune
resume`` restores it and the search makes the same next moves.

A proposal's ``info["finetune_epochs"]`` and ``info["evaluate_test"]`` (a searcher's proxy trial,
``methods.proxy``) go into the trial config: the trial's own fine-tune length, and whether it is
evaluated on the test split. New rows of the searcher's ``search_path()`` go, once each, to
``path_sink`` (``search.search_path.SearchPathLogger``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ray.tune.search import Searcher as RaySearcher

from prunetune.methods.searcher import Searcher


class PolicySearcherAdapter(RaySearcher):
    """Runs one of our searchers under Ray Tune: proposals become trial configs ``{"policy": ...}``."""

    def __init__(self, searcher: Searcher, *, metric: str = "val_accuracy", mode: str = "max",
                 seed: int = 0, path_sink: Callable[[dict], None] | None = None):
        super().__init__(metric=metric, mode=mode)
        self.policy_searcher = searcher  # not ``searcher``: Ray treats that attribute as a wrapped Ray searcher
        self.seed = seed
        self.proposals: dict[str, str] = {}  # Ray trial id -> proposal id
        self.path_sink = path_sink
        self.path_logged = 0  # rows of the searcher's path already handed to path_sink

    def suggest(self, trial_id: str) -> dict | None:
        if self.policy_searcher.finished:
            return RaySearcher.FINISHED
        proposal = self.policy_searcher.ask()
        if proposal is None:
            return RaySearcher.FINISHED if self.policy_searcher.finished else None
        self.proposals[trial_id] = proposal.proposal_id
        config = {"policy": proposal.policy.to_json(), "proposal_id": proposal.proposal_id,
                  "role": str(proposal.info.get("role", "")), "seed": self.seed}
        if proposal.info.get("finetune_epochs") is not None:
            config["finetune_epochs"] = int(proposal.info["finetune_epochs"])
        if proposal.info.get("evaluate_test") is not None:
            config["evaluate_test"] = bool(proposal.info["evaluate_test"])
        return config

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
        self._hand_on_path()

    def _hand_on_path(self) -> None:
        rows = self.policy_searcher.search_path()
        if self.path_sink is not None:
            for row in rows[self.path_logged:]:
                self.path_sink(row)
        self.path_logged = len(rows)

    def save(self, checkpoint_path: str) -> None:
        state = {"searcher": self.policy_searcher.state_dict(), "proposals": self.proposals,
                 "path_logged": self.path_logged}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.policy_searcher.load_state_dict(state["searcher"])
        self.proposals = dict(state["proposals"])
        self.path_logged = int(state.get("path_logged", 0))


def _scores(result: dict) -> dict:
    """The numbers a searcher may learn from: never the test accuracy."""
    return {k: float(v) for k, v in result.items()
            if k in ("val_accuracy", "val_loss", "macs", "macs_ratio", "params", "latency_ms", "epoch")
            and isinstance(v, int | float)}
