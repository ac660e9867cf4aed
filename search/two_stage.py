"""Two-stage (multi-fidelity) search: many policies scored cheaply, the promising ones at full budget.

Successive halving's idea (Jamieson and Talwalkar, AISTATS 2016; ASHA is its asynchronous form,
which the tuner keeps for full trials) taken to two fixed fidelities, beside ASHA rather than in
it: a policy's *proxy* score is its validation accuracy after ``fidelity.proxy_epochs``
fine-tuning epochs on ``fidelity.proxy_data_fraction`` of the training split (0 epochs =
BatchNorm recalibration only), far cheaper than the full fine-tune.

:class:`TwoStage` wraps the method's Ray search algorithm (``OptunaSearch`` in ``FeasibleOnly``,
or one of our searchers in ``PolicySearcherAdapter``):

1. **Stage 1.** It hands out ``proxies`` of the inner searcher's configs marked as proxies
   (``finetune_epochs``, ``data_fraction``, ``evaluate_test: False``, ``stage: 1``); the inner
   searcher learns from their results. The warm start's heuristics are the inner searcher's first
   points, so they are scored as proxies too.
2. **Stage 2.** When every stage-1 trial has ended, it promotes the ``promote`` searched proxies
   with the highest validation accuracy whose measured MACs ratio is within ``limit`` (the target
   plus its tolerance), and every heuristic, and hands them out again at full fidelity (the config
   without the proxy keys, with ``stage: 2`` and ``promoted_from: <proxy trial id>``). The
   inner searcher is not told of them: it proposed none of them as such.

So a search runs ``proxies + promote + len(heuristics)`` trials at most (fewer when fewer
proxies are feasible); the heuristics are measured at the same fidelity as the promoted policies,
and the summary's margin over them compares like with like. :func:`promotion_summary` rates the
proxy: Kendall's tau between each promoted trial's proxy and full validation accuracy.

The wrapper's state (stage, proxy scores, the promoted list and how far it is handed out) is
plain data: Ray saves it with the experiment (``get_state``; its ``searcher`` chain is walked as
for ``ConcurrencyLimiter``), so a resumed search continues where it was and never promotes twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ray.tune.search import Searcher as RaySearcher

from prunetune.pruning.policy import Policy
from prunetune.search.wrapper_checkpoint import restore_wrapped, save_wrapped

PROXY_KEYS = ("finetune_epochs", "data_fraction", "evaluate_test")  # what makes a config a proxy's
STAGE_KEY = "stage"  # 1: a proxy, 2: a promoted policy at full fidelity
PROMOTED_KEY = "promoted_from"  # a stage-2 config's proxy trial id (None: a heuristic with no proxy score)
TWO_STAGE_FORMAT = "prunetune.two_stage"  # marks TwoStage's checkpoint (the searcher's inside)


def _policy_key(config: Mapping) -> str | None:
    policy = config.get("policy")
    return Policy.from_json(policy).key() if isinstance(policy, Mapping) else None


class TwoStage(RaySearcher):
    """Stage 1: ``proxies`` of ``searcher``'s configs as proxies; stage 2: the top ``promote`` of
    them within ``limit`` and every heuristic (name -> policy JSON), at full fidelity."""

    def __init__(self, searcher: RaySearcher, *, proxies: int, promote: int, proxy_epochs: int,
                 data_fraction: float, limit: float, heuristics: Mapping[str, Mapping] | None = None):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher  # Ray walks ``searcher`` to save the inner one (like its ConcurrencyLimiter)
        self.proxies = int(proxies)
        self.promote = int(promote)
        self.proxy_epochs = int(proxy_epochs)
        self.data_fraction = float(data_fraction)
        self.limit = float(limit)
        self.heuristics = {str(name): dict(policy) for name, policy in (heuristics or {}).items()}
        self.stage = 1
        self.handed = 0  # stage-1 configs handed out
        self.inner_finished = False  # the inner searcher has no more to propose
        self.scores: dict[str, dict] = {}  # proxy trial id -> {"order", "config", "val_accuracy", "macs_ratio"}
        self.running: list[str] = []  # trials handed out and not yet ended (both stages)
        self.queue: list[dict] = []  # stage 2's configs, in the order they are handed out
        self.next = 0  # stage-2 configs handed out

    @property
    def total_trials(self) -> int:
        """The most trials the search runs: the proxies, the promoted, the heuristics."""
        return self.proxies + self.promote + len(self.heuristics)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.stage == 1:
            if self.handed < self.proxies and not self.inner_finished:
                config = self.searcher.suggest(trial_id)
                if config == RaySearcher.FINISHED:
                    self.inner_finished = True
                elif not isinstance(config, dict):
                    return config  # None: the inner searcher waits for a result
                else:
                    return self._hand_proxy(trial_id, config)
            if self.running:
                return None  # stage 2 waits for every proxy's score
            self._promote()
        if self.next < len(self.queue):
            config = dict(self.queue[self.next])
            self.next += 1
            self.running.append(trial_id)
            return config
        return RaySearcher.FINISHED

    def _hand_proxy(self, trial_id: str, config: dict) -> dict:
        proxy = {**config, "finetune_epochs": self.proxy_epochs, "data_fraction": self.data_fraction,
                 "evaluate_test": False, STAGE_KEY: 1}
        self.scores[trial_id] = {"order": self.handed, "config": dict(config), "val_accuracy": None,
                                 "macs_ratio": None}
        self.handed += 1
        self.running.append(trial_id)
        return proxy

    def promoted(self) -> list[str]:
        """The proxy trial ids that stage 1 promoted by score (the top ``promote``, best first), heuristics not included."""
        heuristic_keys = {Policy.from_json(policy).key() for policy in self.heuristics.values()}
        ranked = sorted(
            ((trial_id, score) for trial_id, score in self.scores.items()
             if score["val_accuracy"] is not None and score["macs_ratio"] is not None
             and score["macs_ratio"] <= self.limit + 1e-9),
            key=lambda item: (-item[1]["val_accuracy"], item[1]["macs_ratio"], item[1]["order"]))
        chosen, seen = [], set(heuristic_keys)
        for trial_id, score in ranked:
            key = _policy_key(score["config"])
            if key in seen:  # a heuristic (promoted anyway) or a policy already chosen
                continue
            seen.add(key)
            chosen.append(trial_id)
            if len(chosen) == self.promote:
                break
        return chosen

    def _promote(self) -> None:
        """Stage 1 is over: queue the heuristics and the top ``promote`` proxies at full fidelity (once)."""
        from prunetune.methods.heuristics import heuristic_role

        by_key = {}
        for trial_id, score in sorted(self.scores.items(), key=lambda item: item[1]["order"]):
            if score["val_accuracy"] is not None:
                by_key.setdefault(_policy_key(score["config"]), trial_id)
        queue = []
        for name, policy in self.heuristics.items():
            trial_id = by_key.get(Policy.from_json(policy).key())
            config = dict(self.scores[trial_id]["config"]) if trial_id else {"policy": dict(policy)}
            queue.append({**config, "role": heuristic_role(name), STAGE_KEY: 2, PROMOTED_KEY: trial_id})
        for trial_id in self.promoted():
            queue.append({**self.scores[trial_id]["config"], STAGE_KEY: 2, PROMOTED_KEY: trial_id})
        self.queue = [{k: v for k, v in config.items() if k not in PROXY_KEYS} for config in queue]
        self.stage = 2

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.scores and trial_id in self.running:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.running:
            return
        self.running.remove(trial_id)
        if trial_id not in self.scores:  # a stage-2 trial: the inner searcher never proposed it
            return
        if not error and result:
            for key in ("val_accuracy", "macs_ratio"):
                value = result.get(key)
                self.scores[trial_id][key] = float(value) if isinstance(value, int | float) else None
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {"stage": self.stage, "handed": self.handed, "inner_finished": self.inner_finished,
                "scores": {k: dict(v) for k, v in self.scores.items()}, "running": list(self.running),
                "queue": [dict(c) for c in self.queue], "next": self.next}

    def set_state(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self.handed = int(state["handed"])
        self.inner_finished = bool(state["inner_finished"])
        self.scores = {str(k): dict(v) for k, v in state["scores"].items()}
        self.running = [str(i) for i in state["running"]]
        self.queue = [dict(c) for c in state["queue"]]
        self.next = int(state["next"])

    def save(self, checkpoint_path: str) -> None:
        """The inner searcher's checkpoint and this wrapper's state in one file (as ``FeasibleOnly``)."""
        save_wrapped(self.searcher, checkpoint_path, format_key=TWO_STAGE_FORMAT, state=self.get_state())

    def restore(self, checkpoint_path: str) -> None:
        state = restore_wrapped(self.searcher, checkpoint_path, format_key=TWO_STAGE_FORMAT)
        if state is not None:
            self.set_state(state)


def two_stage_search(search_alg: RaySearcher, cfg, heuristics: Mapping[str, Policy]) -> RaySearcher:
    """``search_alg`` as a two-stage search when ``cfg.fidelity.promote`` > 0; else itself."""
    fidelity = cfg.fidelity
    if not fidelity.promote:
        return search_alg
    return TwoStage(search_alg, proxies=cfg.trials, promote=fidelity.promote, proxy_epochs=fidelity.proxy_epochs,
                    data_fraction=fidelity.proxy_data_fraction, limit=cfg.macs_target + cfg.macs_tolerance,
                    heuristics={name: policy.to_json() for name, policy in heuristics.items()})


def describe_plan(search_alg: TwoStage) -> str:
    """The log's one line on how a two-stage search counts its trials."""
    heuristics = len(search_alg.heuristics)
    proxy = ("BatchNorm recalibration only" if search_alg.proxy_epochs == 0
             else f"{search_alg.proxy_epochs} fine-tuning epoch{'s' * (search_alg.proxy_epochs != 1)}")
    return (f"two-stage search: {search_alg.proxies} proxy trials ({proxy} on {search_alg.data_fraction:g} of the "
            f"training split), then the best {search_alg.promote}"
            f"{f' and the {heuristics} heuristics' if heuristics else ''} at full fidelity: at most "
            f"{search_alg.total_trials} trials")


def promotion_summary(records: Sequence[Mapping]) -> dict:
    """summary.json's two-stage fields from ``trials.jsonl``: how many finished trials were promoted,
    and Kendall's tau (tau-b, ``scipy.stats.kendalltau``) between their proxy's validation accuracy
    and their own, over the pairs where both finished; null, with ``tau_note`` saying why, for
    fewer than 2 pairs or scores without a rank order."""
    from scipy.stats import kendalltau

    by_id = {r.get("trial_id"): r for r in records}
    promoted = [r for r in records if r.get("status") == "finished"
                and (r.get("params") or {}).get(PROMOTED_KEY) not in (None, "", "None")]
    pairs = []
    for record in promoted:
        proxy = by_id.get(record["params"][PROMOTED_KEY]) or {}
        low = (proxy.get("metrics") or {}).get("val_accuracy")
        high = (record.get("metrics") or {}).get("val_accuracy")
        if proxy.get("status") == "finished" and low is not None and high is not None:
            pairs.append((float(low), float(high)))
    tau, note = None, None
    if len(pairs) < 2:
        note = f"{len(pairs)} promoted trial{'s' * (len(pairs) != 1)} with a proxy score; tau needs 2"
    else:
        statistic = kendalltau([p for p, _ in pairs], [f for _, f in pairs]).statistic
        if statistic != statistic:  # NaN: every proxy (or every full) score is the same
            note = "the proxy or the full scores are all equal: no rank order to compare"
        else:
            tau = float(statistic)
    return {"promoted": len(promoted), "kendall_tau": tau, "tau_pairs": len(pairs), "tau_note": note}
