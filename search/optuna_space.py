"""Optuna through Ray Tune's ``OptunaSearch``: one keep ratio per group, or the dimensions of the
config's ``space.parameterisation`` (and, with ``space.search_depth``, one drop flag per droppable
block), the MACs budget as a constraint;
or a learner's hyperparameters within its declared ranges (``make_learner_search``).

The define-by-run space samples a keep ratio per group, builds the policy, and sets its estimated
MACs excess over the target as the trial's ``macs`` constraint (``Trial.set_constraint``, Optuna
5's replacement for the deprecated ``constraints_func``; a feasible trial always beats an
infeasible one in TPE, GP and NSGA-II). Nothing is clipped. ``FeasibleOnly`` then answers over-budget proposals
at once, without spending a trial on them, so the sampler learns where the budget lies.

Everything here is a module-level function or a plain object: ``OptunaSearch`` pickles itself to
save state for resume, and a lambda anywhere in it would fail at the first save.
"""

from __future__ import annotations

import functools

from ray.tune.search import Searcher as RaySearcher

from prunetune.methods.learner import HParamRange
from prunetune.methods.parameterisation import Groups
from prunetune.pruning.space import SearchSpace
from prunetune.search.wrapper_checkpoint import restore_wrapped, save_wrapped

CONSTRAINT_KEY = "macs"
FEASIBLE_FORMAT = "prunetune.feasible_only"  # marks FeasibleOnly's checkpoint (the searcher's inside)
LEARNER_KEY = "learner"  # in a learner trial's config: the method that learns the policy


def define_policy_space(trial, *, space: SearchSpace, macs_target: float, min_keep_ratio: float,
                        constrained: bool = True, search_depth: bool = False, parameterisation=None,
                        roles: dict[str, str] | None = None) -> dict:
    """Sample the dimensions of ``parameterisation`` (``methods.parameterisation``; None: ``keep.<group>``
    for every group), and with ``search_depth`` a boolean ``drop.<block>`` for every droppable block;
    return the policy and record its MACs constraint. A policy whose key ``roles`` names (the warm
    start's heuristics, ``methods.heuristics.heuristic_roles``) carries that ``role``, as our
    searchers' proposals do: its trial runs to its end (``search.schedulers``).

    The space stays the same whatever is dropped (define-by-run, but static): a dropped block's
    groups are sampled too and left out of the policy, which prunes alike without them.
    """
    shape = parameterisation or Groups(space, min_keep_ratio)
    values = {d.name: trial.suggest_float(d.name, d.low, d.high, log=d.log) for d in shape.dimensions()}
    dropped = tuple(b for b in space.droppable_blocks
                    if search_depth and trial.suggest_categorical(f"drop.{b}", [False, True]))
    policy = shape.to_policy(values, dropped)
    macs_ratio = space.macs_ratio(policy)
    if constrained:
        trial.set_constraint(CONSTRAINT_KEY, macs_ratio - macs_target)
    role = (roles or {}).get(policy.key())
    return {"policy": policy.to_json(), "estimated_macs_ratio": macs_ratio, **({"role": role} if role else {})}


def make_sampler(name: str, *, seed: int, n_startup_trials: int):
    """The Optuna sampler ``name``; TPE, GP and NSGA-II read the trials' MACs constraint themselves.

    CMA-ES has no constraint handling: for it the budget is a penalty (see ``FeasibleOnly``).
    """
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup_trials)


def optuna_search(define, *, objective: str, sampler: str, seed: int, n_startup_trials: int,
                  points_to_evaluate: list[dict] | None = None):
    """Ray Tune's ``OptunaSearch`` over the define-by-run space ``define`` (a picklable function):
    validation accuracy up, or with ``objective`` pareto also the MACs ratio down. Optuna enqueues
    ``points_to_evaluate`` (partial parameters; the rest sampled) as its first trials and learns
    from their results like any other."""
    import optuna

    from prunetune.search.optuna_resumable import ResumableOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pareto = objective == "pareto"
    return ResumableOptunaSearch(
        space=define,
        metric=["val_accuracy", "macs_ratio"] if pareto else "val_accuracy",
        mode=["max", "min"] if pareto else "max",
        sampler=make_sampler(sampler, seed=seed, n_startup_trials=n_startup_trials),
        points_to_evaluate=list(points_to_evaluate or []) or None,
    )


def make_optuna_search(space: SearchSpace, *, macs_target: float, objective: str, sampler: str, seed: int,
                       n_startup_trials: int, min_keep_ratio: float, tolerance: float,
                       search_depth: bool = False, points_to_evaluate: list[dict] | None = None,
                       parameterisation=None, notes: tuple[str, ...] = (), roles: dict[str, str] | None = None):
    """Ray Tune's ``OptunaSearch`` over the keep ratios, or the dimensions of ``parameterisation``
    (and with ``search_depth`` the dropped blocks), wrapped so over-budget proposals cost no trial;
    ``points_to_evaluate`` (the warm start's heuristics, ``methods.heuristics.optuna_points``) come
    first, their configs with the ``role`` that ``roles`` gives their policies; ``notes`` are lines
    for the driver to print (``FeasibleOnly.notes``)."""
    define = functools.partial(define_policy_space, space=space, macs_target=macs_target,
                               min_keep_ratio=min_keep_ratio, constrained=sampler != "cmaes",
                               search_depth=search_depth, parameterisation=parameterisation,
                               roles=dict(roles or {}))
    search = optuna_search(define, objective=objective, sampler=sampler, seed=seed,
                           n_startup_trials=n_startup_trials, points_to_evaluate=points_to_evaluate)
    return FeasibleOnly(search, limit=macs_target + tolerance, pareto=objective == "pareto", notes=notes)


def define_learner_space(trial, *, ranges: tuple[HParamRange, ...], learner: str) -> dict:
    """Sample a learner's hyperparameters within its declared ranges (ints as ints, log where declared).

    The config names the learner (``learner``), so the trial knows to learn its policy first.
    """
    for r in ranges:
        if r.integer:
            trial.suggest_int(r.name, int(r.low), int(r.high), log=r.log)
        else:
            trial.suggest_float(r.name, r.low, r.high, log=r.log)
    return {LEARNER_KEY: learner}


def make_learner_search(ranges: tuple[HParamRange, ...], *, learner: str, objective: str, sampler: str,
                        seed: int, n_startup_trials: int):
    """Ray Tune's ``OptunaSearch`` over a learner's hyperparameters (DESIGN.md, concept 5).

    No MACs constraint: a learner's policy meets the target by construction.
    """
    define = functools.partial(define_learner_space, ranges=tuple(ranges), learner=learner)
    return optuna_search(define, objective=objective, sampler=sampler, seed=seed, n_startup_trials=n_startup_trials)


class FeasibleOnly(RaySearcher):
    """Wraps a Ray searcher whose configs carry ``estimated_macs_ratio``: rejects those over ``limit``.

    A rejected proposal is completed at once with accuracy 0 (and its MACs ratio), which together
    with the constraint attribute teaches the sampler the budget; after ``max_rejections`` in a
    row the proposal goes through anyway, so a search never stalls. Like Ray's
    ``ConcurrencyLimiter``, this is behaviour shared by a wrapper, not a flag. ``notes`` are lines
    the driver prints as the search starts (the heuristics its parameterisation cannot express).
    """

    def __init__(self, searcher: RaySearcher, *, limit: float, pareto: bool, max_rejections: int = 200,
                 notes: tuple[str, ...] = ()):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.notes = tuple(notes)
        self.searcher = searcher
        self.limit = limit
        self.pareto = pareto
        self.max_rejections = max_rejections
        self.rejected = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        for attempt in range(self.max_rejections):
            probe = f"{trial_id}~{attempt}"
            config = self.searcher.suggest(probe)
            if not isinstance(config, dict):
                return config
            within = config.get("estimated_macs_ratio", 0.0) <= self.limit
            if within or attempt == self.max_rejections - 1:
                trials = self.searcher._ot_trials  # OptunaSearch's map from Ray trial id to Optuna trial
                trials[trial_id] = trials.pop(probe)
                return config
            self.rejected += 1
            result = {"val_accuracy": 0.0, "macs_ratio": config["estimated_macs_ratio"]}
            self.searcher.on_trial_complete(probe, result=result)
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {"rejected": self.rejected}

    def set_state(self, state: dict) -> None:
        self.rejected = int(state.get("rejected", 0))

    def save(self, checkpoint_path: str) -> None:
        """The wrapped searcher's checkpoint and this wrapper's count in one file (Ray keeps one)."""
        save_wrapped(self.searcher, checkpoint_path, format_key=FEASIBLE_FORMAT, state=self.get_state())

    def restore(self, checkpoint_path: str) -> None:
        state = restore_wrapped(self.searcher, checkpoint_path, format_key=FEASIBLE_FORMAT)
        if state is not None:  # None: written before the count was kept
            self.set_state(state)
