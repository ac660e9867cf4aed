"""The one-shot heuristics every policy search is measured against, and starts from.

``uniform`` (every group the same keep ratio), ``global`` (one importance threshold over all
channels, the search's criterion, each group's scores over their mean: Torch-Pruning's global
pruning) and ``global-lamp`` (the same with LAMP normalisation), each meeting the MACs target.
A warm-started search evaluates them first (optuna through ``OptunaSearch``'s points to evaluate,
our searchers through :class:`WarmStart`), so its best can never fall below them at equal
evaluation, and the summary reports the best trial's margin over the best of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prunetune.methods.searcher import Proposal, Searcher, check_state, require_within_target
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace

HEURISTICS = ("uniform", "global", "global-lamp")
HEURISTIC_ROLE = "heuristic"  # a proposal's role: "heuristic:<name>"


def heuristic_role(name: str) -> str:
    """The role of heuristic ``name``'s proposal, and of its trial's config (``role``)."""
    return f"{HEURISTIC_ROLE}:{name}"


def is_heuristic_role(role) -> bool:
    """Whether a trial config's ``role`` is a warm-start heuristic's (its trial runs to its end)."""
    return isinstance(role, str) and role.startswith(f"{HEURISTIC_ROLE}:")


def heuristic_roles(heuristics: Mapping[str, Policy]) -> dict[str, str]:
    """Policy key -> the role of the (first) heuristic with that policy: how a searcher that cannot
    carry a proposal's role (Optuna's enqueued points) gives its heuristic trials theirs."""
    roles: dict[str, str] = {}
    for name, policy in heuristics.items():
        roles.setdefault(policy.key(), heuristic_role(name))
    return roles


def heuristic_policies(model, space: SearchSpace, calib: Sequence | None, *, macs_target: float,
                       criterion: str, floor: float = 0.1) -> dict[str, Policy]:
    """``{name: policy}`` of :data:`HEURISTICS` on the trained ``model`` (a policy equal to an
    earlier one is left out: it would be evaluated twice)."""
    from prunetune.methods.global_threshold import global_threshold_policy
    from prunetune.methods.uniform import uniform_policy_for_target
    from prunetune.pruning.importance import get_criterion

    scorer = get_criterion(criterion)
    found = {
        "uniform": uniform_policy_for_target(space, macs_target),
        "global": global_threshold_policy(model, space, scorer, calib, macs_target, floor=floor),
        "global-lamp": global_threshold_policy(model, space, scorer, calib, macs_target, floor=floor,
                                               normalizer="lamp"),
    }
    unique: dict[str, Policy] = {}
    for name, policy in found.items():
        if all(policy != other for other in unique.values()):
            unique[name] = policy
    return unique


class WarmStart(Searcher):
    """Proposes ``heuristics`` (name -> policy) first, then whatever ``inner`` proposes.

    A wrapper, like ``methods.limiters``: any searcher can be warm-started. The heuristics' results
    are not told to ``inner`` (it did not propose them). Proposal ids are ``heuristic-<name>``.
    """

    kind = "warm_start"

    def __init__(self, inner: Searcher, space: SearchSpace, heuristics: Mapping[str, Policy], *,
                 macs_target: float, tolerance: float) -> None:
        self.inner = inner
        self.space_id = space.space_id
        self._heuristics = tuple(heuristics.items())
        for name, policy in self._heuristics:
            require_within_target(space, policy, macs_target, tolerance, f"{name} heuristic policy")
        self._next = 0
        self._pending: list[str] = []

    def ask(self) -> Proposal | None:
        if self._next < len(self._heuristics):
            name, policy = self._heuristics[self._next]
            self._next += 1
            proposal = Proposal(f"heuristic-{name}", policy, {"role": heuristic_role(name)})
            self._pending.append(proposal.proposal_id)
            return proposal
        return self.inner.ask()

    def tell(self, proposal_id: str, result: Mapping[str, float] | None) -> None:
        if proposal_id in self._pending:
            self._pending.remove(proposal_id)
            return
        self.inner.tell(proposal_id, result)

    def on_report(self, proposal_id: str, metrics: Mapping[str, float]) -> None:
        if proposal_id not in self._pending:
            self.inner.on_report(proposal_id, metrics)

    @property
    def finished(self) -> bool:
        return self._next >= len(self._heuristics) and not self._pending and self.inner.finished

    def search_path(self) -> list[dict]:
        return self.inner.search_path()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "space_id": self.space_id, "next": self._next, "pending": list(self._pending),
                "heuristics": [[name, policy.to_json()] for name, policy in self._heuristics],
                "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        check_state(state, self.kind, self.space_id)
        self._heuristics = tuple((str(name), Policy.from_json(policy)) for name, policy in state["heuristics"])
        self._next = int(state["next"])
        self._pending = [str(i) for i in state["pending"]]
        self.inner.load_state_dict(state["inner"])


def optuna_points(heuristics: Mapping[str, Policy], space: SearchSpace, *, search_depth: bool = False,
                  parameterisation=None) -> list[dict[str, float | bool]]:
    """The heuristics as Optuna parameters for ``OptunaSearch(points_to_evaluate=...)``, which
    enqueues them as its first trials: ``keep.<group>`` (the names of ``search.optuna_space``), or
    the point of ``parameterisation`` giving the heuristic's policy, and with ``search_depth``
    ``drop.<block>`` false (a heuristic drops no block). A heuristic the parameterisation cannot
    express (``inexpressible_heuristics``) is left out: in ``stages`` the uniform one is every ratio
    equal, in ``affine`` the global one is alpha 1, kappa 0."""
    drops = {f"drop.{block}": False for block in space.droppable_blocks} if search_depth else {}
    if parameterisation is None:
        return [{**{f"keep.{group}": ratio for group, ratio in policy.keep_ratios.items()}, **drops}
                for policy in heuristics.values()]
    points = (parameterisation.values_of(policy) for policy in heuristics.values())
    return [{**point, **drops} for point in points if point is not None]


def inexpressible_heuristics(heuristics: Mapping[str, Policy], parameterisation) -> list[str]:
    """The names of the ``heuristics`` that no point of ``parameterisation`` gives (not enqueued)."""
    if parameterisation is None:
        return []
    return [name for name, policy in heuristics.items() if parameterisation.values_of(policy) is None]


def heuristic_summary(records: Sequence[Mapping], heuristics: Mapping[str, Policy],
                      best: Mapping | None) -> dict:
    """summary.json's ``heuristics``: each heuristic's recorded trial (found by its policy) with its
    validation and test accuracy and MACs ratio, and the best trial's margin over the best of them.
    Full-fidelity trials only: a two-stage search's proxy of a heuristic is not its score. A
    heuristic's ``status`` is ``finished``, else its trial's (``failed``, ``stopped``), else
    ``not run`` (its trial id and scores are then null)."""
    from prunetune.tracking.names import fidelity_of

    by_key, unfinished = {}, {}
    for record in records:
        if not record.get("policy") or fidelity_of(record.get("params") or {}) != "full":
            continue
        key = Policy.from_json(record["policy"]).key()
        if record.get("status") == "finished":
            by_key.setdefault(key, record)
        else:
            unfinished[key] = record.get("status") or "failed"
    rows = {}
    for name, policy in heuristics.items():
        record = by_key.get(policy.key())
        metrics = (record or {}).get("metrics") or {}
        status = "finished" if record else unfinished.get(policy.key(), "not run")
        rows[name] = {"trial_id": (record or {}).get("trial_id"), "status": status,
                      "val_accuracy": metrics.get("val_accuracy"),
                      "test_accuracy": (record or {}).get("test_accuracy"), "macs_ratio": metrics.get("macs_ratio"),
                      "policy": policy.to_json()}
    scored = [row for row in rows.values() if row["val_accuracy"] is not None]
    best_heuristic = max(scored, key=lambda row: row["val_accuracy"], default=None)
    margin = {}
    if best is not None and best_heuristic is not None:
        margin["val_accuracy"] = best["val_accuracy"] - best_heuristic["val_accuracy"]
        if best.get("test_accuracy") is not None and best_heuristic["test_accuracy"] is not None:
            margin["test_accuracy"] = best["test_accuracy"] - best_heuristic["test_accuracy"]
    return {"policies": rows, "best": best_heuristic["trial_id"] if best_heuristic else None,
            "best_margin": margin or None}
