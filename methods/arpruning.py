"""ARPruning: attention-map channel ranking with a local neighbourhood search over keep ratios.

Yuan, Li, Liu, Tang, Liu. *Neural Networks* 174 (2024) 106220; specified in METHODS.md. The
intra-layer criterion is ``attention`` in ``pruning.importance``: trials rank channels with it
within each group. This module is the inter-layer search (our design; the paper names a local
neighbourhood search), as a searcher (``ask`` / ``tell`` / ``state_dict``):

1. Start (step 1): the policy a global attention threshold gives at the MACs target (the
   ``global`` baseline with the search's criterion, ``methods.global_threshold``), or the uniform
   one (``start: uniform``).
2. Neighbours (step 2, ``methods.neighbourhood``): keep ratio moved from one group to another,
   rescaled into the MACs band on the space's estimate before any trial is spent.
3. A round (step 3): K neighbours of the incumbent (K = ``neighbours``, by default the search's
   concurrency), drawn in a seeded random order among the pairs of groups, all proposed at once
   so K trials run in parallel. Each is scored cheaply: its trial fine-tunes for the proxy's
   epochs (``bn``: BatchNorm recalibration only; ``epochs:N``) and is evaluated on the validation
   split only. Round 0 scores the start with K - 1 neighbours of it.
4. When every result of the round is in (step 4): move to the best neighbour if it beats the
   incumbent's proxy score. Otherwise halve the step d, once the neighbourhood at d is exhausted
   (our reading of step 4: a round samples K of the L(L-1) moves, so a round without improvement
   says nothing of the others; the next round draws unscored ones at the same d, and d halves
   when none is left). Rounds are synchronous, so the moves do not depend on the order in which
   results arrive.
5. Stop when every group already moves one rounding unit (d below the rounding unit) and its
   neighbourhood is exhausted, or when only one trial of the budget is left. The incumbent is then
   proposed once more with ``role: final`` and no proxy: its trial gets the full fine-tune and
   the test evaluation, like any trial. The budget counts every trial, the final one included.

The whole state (incumbent, its score, d, the round's proposals and their results, every policy
scored so far, the search path, the RNG) is plain JSON, so a search resumed from ``state_dict``
makes the same next moves. ``search_path()`` gives one row per round (incumbent score and MACs
ratio, the step, whether it moved) for the driver to log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from prunetune.methods.global_threshold import GlobalOptions, global_start_policy
from prunetune.methods.neighbourhood import Channels, is_finest_step, macs_ratio_of, neighbour
from prunetune.methods.options import SearcherOptions, check_fraction
from prunetune.methods.proxy import proxy_epochs
from prunetune.methods.searcher import Proposal, Searcher, check_state, require_within_target
from prunetune.methods.uniform import uniform_policy_for_target
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.schema import AT_LEAST_ONE, FRACTION, Range, option
from prunetune.pruning.space import SearchSpace, policy_from_channels

KIND = "arpruning"
STARTS = ("global", "uniform")
SEARCH, FINAL, DONE = "search", "final", "done"


@dataclass(frozen=True)
class ArpruningOptions(SearcherOptions):
    """The search's options (config section ``arpruning``); ``criterion`` ranks channels for the global start."""

    section: ClassVar[str] = "arpruning"
    start: str = option("global", "start policy: global (an importance threshold over all groups) or uniform",
                        choices=STARTS)
    floor: float = option(0.1, "lowest keep ratio of a group, at the start and in every move", check=FRACTION)
    step: float = option(0.05, "keep ratio a move shifts from one group to another; halved when no neighbour "
                         "at it improves", check=Range(0, 0.5, low_open=True))
    neighbours: int | None = option(None, "neighbours scored per round, in parallel; null = concurrency",
                                    check=AT_LEAST_ONE)
    proxy: str = option("bn", "how neighbours are scored: bn (BatchNorm recalibration only) or epochs:N "
                        "(N fine-tuning epochs)")
    criterion: str = option("attention", "importance criterion of the global start", from_config="importance")

    def __post_init__(self) -> None:
        super().__post_init__()
        proxy_epochs(self.proxy, f"config key '{self.section}.proxy'")

    def check_search(self, cfg) -> None:
        """A ``bn`` proxy scores neighbours after BatchNorm recalibration, so it needs some."""
        if cfg.method == "arpruning" and self.proxy == "bn" and cfg.finetune.bn_recalibration_batches == 0:
            raise UserError(
                "config key 'arpruning.proxy' is bn but finetune.bn_recalibration_batches is 0, so neighbours "
                "would be scored on raw pruned models (near chance); set --set finetune.bn_recalibration_batches=20 "
                "or --set arpruning.proxy=epochs:1"
            )


def _score(result: Mapping[str, float] | None) -> float | None:
    """The proxy score of a result: its validation accuracy, None for a failed trial."""
    if result is None or not isinstance(result.get("val_accuracy"), int | float):
        return None
    value = float(result["val_accuracy"])
    return value if math.isfinite(value) else None


def _beats(score: float | None, incumbent: float | None) -> bool:
    return score is not None and (incumbent is None or score > incumbent)


class ArpruningSearcher(Searcher):
    """ARPruning's neighbourhood search over keep ratios; see the module doc for the steps."""

    def __init__(self, space: SearchSpace, *, macs_target: float, seed: int, options: ArpruningOptions,
                 start_policy: Policy, budget: int, concurrency: int) -> None:
        self.space = space
        self.macs_target = check_fraction(macs_target, "macs_target")
        self.options = options
        self.budget = budget
        self.neighbours = options.neighbours or concurrency
        self.proxy_epochs = proxy_epochs(options.proxy)
        require_within_target(space, start_policy, self.macs_target, options.tolerance, "arpruning start policy")
        self._rng = np.random.default_rng(seed)
        self._incumbent: Channels = space.channels(start_policy)
        self._score: float | None = None
        self._step = float(options.step)
        self._round = 0
        self._items: list[dict] = []  # this round's proposals (and the final one): see _item
        self._counter = 0
        self._scores: dict[str, float | None] = {}  # policy key -> proxy score of every policy scored
        self._phase = SEARCH
        self._path: list[dict] = []
        self._open_first_round()

    # -- the protocol --------------------------------------------------------------------------

    def ask(self) -> Proposal | None:
        if self._phase == FINAL and not self._items:
            self._items = [self._item(self._incumbent, "final")]
        for item in self._items:
            if not item["asked"]:
                item["asked"] = True
                return self._proposal(item)
        return None

    def tell(self, proposal_id: str, result: Mapping[str, float] | None) -> None:
        item = next((i for i in self._items if i["id"] == proposal_id and i["asked"] and not i["told"]), None)
        if item is None:
            raise KeyError(f"proposal '{proposal_id}' is not in flight (told twice, or never proposed)")
        item["told"], item["score"] = True, _score(result)
        if item["role"] == "final":
            self._phase = DONE
            return
        self._scores[self._key(item["channels"])] = item["score"]
        if all(i["told"] for i in self._items):
            self._close_round()

    @property
    def finished(self) -> bool:
        return self._phase == DONE

    def search_path(self) -> list[dict]:
        return [dict(row) for row in self._path]

    def state_dict(self) -> dict:
        return {"kind": KIND, "space_id": self.space.space_id, "rng": self._rng.bit_generator.state,
                "incumbent": dict(self._incumbent), "score": self._score, "step": self._step,
                "round": self._round, "items": [dict(i, channels=dict(i["channels"])) for i in self._items],
                "counter": self._counter, "scores": dict(self._scores), "phase": self._phase,
                "path": self.search_path()}

    def load_state_dict(self, state: Mapping) -> None:
        check_state(state, KIND, self.space.space_id)
        self._rng.bit_generator.state = dict(state["rng"])
        self._incumbent = {k: int(v) for k, v in state["incumbent"].items()}
        self._score = None if state["score"] is None else float(state["score"])
        self._step = float(state["step"])
        self._round = int(state["round"])
        self._items = [dict(i, channels={k: int(v) for k, v in i["channels"].items()}) for i in state["items"]]
        self._counter = int(state["counter"])
        self._scores = {str(k): (None if v is None else float(v)) for k, v in state["scores"].items()}
        self._phase = str(state["phase"])
        self._path = [dict(row) for row in state["path"]]

    # -- rounds --------------------------------------------------------------------------------

    def _open_first_round(self) -> None:
        """Round 0: the start policy and K - 1 of its neighbours (no search with under 3 trials)."""
        proxies = self.budget - 1  # one trial stays for the final full fine-tune
        if proxies < 2:
            self._phase = FINAL
            return
        start = self._item(self._incumbent, "start")
        found = self._draw_neighbours(min(self.neighbours, proxies) - 1)
        self._items = [start, *(self._item(channels, "neighbour", move) for channels, move in found)]

    def _open_round(self) -> None:
        """K unscored neighbours of the incumbent, halving d while none is left at d; or the final proposal."""
        proxies = self.budget - 1 - self._counter
        self._items = []
        while proxies > 0:
            found = self._draw_neighbours(min(self.neighbours, proxies))
            if found:
                self._items = [self._item(channels, "neighbour", move) for channels, move in found]
                return
            if is_finest_step(self.space, self._step):
                break
            self._step /= 2  # the neighbourhood at this step is exhausted: refine it
        self._phase = FINAL

    def _close_round(self) -> None:
        """METHODS.md step 4: move to the best improving neighbour, then open the next round."""
        start = next((i for i in self._items if i["role"] == "start"), None)
        if start is not None:
            self._score = start["score"]
        scored = [i for i in self._items if i["role"] == "neighbour" and i["score"] is not None]
        best = max(scored, key=lambda i: i["score"], default=None)  # ties: the first drawn
        moved = best is not None and _beats(best["score"], self._score)
        if moved:
            self._incumbent, self._score = dict(best["channels"]), best["score"]
        self._path.append({"round": self._round, "step": self._step, "moved": int(moved),
                           "incumbent_score": self._score, "trials": self._counter,
                           "incumbent_macs_ratio": round(macs_ratio_of(self.space, self._incumbent), 6)})
        self._round += 1
        self._open_round()

    def _draw_neighbours(self, count: int) -> list[tuple[Channels, str]]:
        """Up to ``count`` new neighbours of the incumbent at the current step, pairs in seeded order."""
        if count < 1:
            return []
        names = self.space.group_names()
        pairs = [(giver, taker) for giver in names for taker in names if giver != taker]
        seen = set(self._scores) | {self._key(self._incumbent)}
        found: list[tuple[Channels, str]] = []
        for index in self._rng.permutation(len(pairs)):
            giver, taker = pairs[int(index)]
            channels = neighbour(self.space, self._incumbent, giver, taker, self._step,
                                 macs_target=self.macs_target, tolerance=self.options.tolerance,
                                 floor=self.options.floor)
            if channels is None or self._key(channels) in seen:
                continue
            seen.add(self._key(channels))
            found.append((channels, f"{giver}>{taker}"))
            if len(found) == count:
                break
        return found

    # -- helpers -------------------------------------------------------------------------------

    def _item(self, channels: Channels, role: str, move: str = "") -> dict:
        item = {"id": f"{KIND}-{self._counter}", "channels": dict(channels), "role": role, "move": move,
                "round": self._round, "step": self._step, "asked": False, "told": False, "score": None}
        self._counter += 1
        return item

    def _key(self, channels: Mapping[str, int]) -> str:
        return policy_from_channels(self.space, channels).key()

    def _proposal(self, item: dict) -> Proposal:
        policy = policy_from_channels(self.space, item["channels"])
        info = {"role": item["role"], "round": item["round"],
                "macs_ratio": round(self.space.macs_ratio(policy), 6)}
        if item["role"] == "final":
            info["proxy_score"] = self._score
        else:
            info.update(step=item["step"], move=item["move"], finetune_epochs=self.proxy_epochs,
                        evaluate_test=False)
        return Proposal(item["id"], policy, info)


def arpruning_start_policy(model, space: SearchSpace, calib, *, macs_target: float,
                           options: ArpruningOptions) -> Policy:
    """METHODS.md step 1: the ``global`` baseline's policy with the search's criterion, or the uniform one."""
    if options.start == "uniform":
        return uniform_policy_for_target(space, macs_target)
    start = GlobalOptions(tolerance=options.tolerance, floor=options.floor, criterion=options.criterion)
    return global_start_policy(model, space, calib, macs_target=macs_target, options=start)


def make_arpruning_searcher(space: SearchSpace, *, macs_target: float, seed: int, options: ArpruningOptions,
                            start_policy: Policy | None = None, budget: int, concurrency: int) -> ArpruningSearcher:
    """The searcher from its start policy (``arpruning_start_policy``), the trial budget and concurrency."""
    if start_policy is None:
        raise UserError("method 'arpruning' needs its start policy; compute it with "
                        "methods.registry.start_policy_for('arpruning', model, space, ...)")
    return ArpruningSearcher(space, macs_target=macs_target, seed=seed, options=options,
                             start_policy=start_policy, budget=budget, concurrency=concurrency)
