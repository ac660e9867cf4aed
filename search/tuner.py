"""Ray Tune wiring: the searcher, the scheduler, resources, callbacks and the ``Tuner`` itself.

One ``Tuner`` per search: a trial per policy on ``{"cpu": c, "gpu": g}``, ASHA stopping weak
trials between epochs, failed trials retried from their last checkpoint, actors reused (each new
trial process would import torch again), and our callbacks instead of Ray's tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prunetune.search.trial import TrialSetup


@dataclass(frozen=True)
class TuneKind:
    """How Ray Tune runs the methods of one registry kind (``MethodSpec.kind``): the search algorithm
    that proposes trial configs, and the trial function with its setup bound."""

    search_algorithm: Callable  # (cfg, spec, space, base_model, calib, path_sink, heuristics) -> a Ray search alg
    trainable: Callable  # (cfg, setup) -> the function trainable


def tune_kind(spec) -> TuneKind:
    """The Ray Tune wiring of a method's registry entry (the one place that reads its kind)."""
    return TUNE_KINDS[spec.kind]


def build_search_algorithm(cfg, space, *, base_model=None, calib=None, path_sink=None, heuristics=None):
    """Ray Tune search algorithm for ``cfg.method``: OptunaSearch, or one of our searchers adapted.

    ``cfg.method_options`` carries the search's tolerance and criterion; ``path_sink`` receives the
    searcher's path rows (``search.search_path``); ``heuristics`` (name -> policy, from
    :func:`search_heuristics`) are evaluated first where the method is warm-started.
    """
    from prunetune.methods.registry import get_method
    from prunetune.search.two_stage import two_stage_search

    spec = get_method(cfg.method)
    search_alg = tune_kind(spec).search_algorithm(cfg, spec, space, base_model, calib, path_sink, heuristics or {})
    return two_stage_search(search_alg, cfg, heuristics or {})  # itself unless fidelity.promote > 0


def search_heuristics(cfg, space, base_model, calib) -> dict:
    """The heuristic policies a warm-started search evaluates first (``methods.heuristics``): for a
    method whose registry entry says so, when ``warm_start`` is on; else none."""
    from prunetune.methods.heuristics import heuristic_policies
    from prunetune.methods.registry import get_method
    from prunetune.search.config import resolved_importance

    if not (cfg.warm_start and get_method(cfg.method).warm_start):
        return {}
    return heuristic_policies(base_model, space, calib, macs_target=cfg.macs_target,
                              criterion=resolved_importance(cfg))


def search_parameterisation(cfg, space, base_model, calib, *, floor: float):
    """The config's ``space.parameterisation`` of ``space`` (``methods.parameterisation``), or None for
    ``groups``; ``affine`` scores the base model's channels once, here on the driver, by the search's
    criterion (each group's scores over their mean, as the ``global`` heuristic ranks them)."""
    from prunetune.methods.parameterisation import make_parameterisation, normalised_importance
    from prunetune.search.config import resolved_importance

    kind = cfg.space.parameterisation
    if kind == "groups":
        return None
    scores = normalised_importance(base_model, space, resolved_importance(cfg), calib) if kind == "affine" else None
    return make_parameterisation(kind, space, floor=floor, macs_target=cfg.macs_target, scores=scores)


def _optuna_search(cfg, spec, space, base_model, calib, path_sink, heuristics):
    """Ray Tune's OptunaSearch over one keep ratio per group, or the config's parameterisation (and,
    if asked, the droppable blocks); the heuristics it can express are enqueued first."""
    from prunetune.methods.heuristics import heuristic_roles, inexpressible_heuristics, optuna_points
    from prunetune.search.optuna_space import make_optuna_search

    options = asdict(cfg.method_options)
    shape = search_parameterisation(cfg, space, base_model, calib, floor=options["min_keep_ratio"])
    left_out = inexpressible_heuristics(heuristics, shape)
    notes = (f"warm start: optuna enqueues only the heuristics the {cfg.space.parameterisation} parameterisation "
             f"expresses; {', '.join(left_out)} not evaluated (no point of it gives their policies)",) if left_out else ()
    return make_optuna_search(space, macs_target=cfg.macs_target, objective=cfg.objective,
                              sampler=options["sampler"], seed=cfg.seed,
                              n_startup_trials=options["n_startup_trials"],
                              min_keep_ratio=options["min_keep_ratio"], tolerance=cfg.macs_tolerance,
                              search_depth=options["search_depth"], parameterisation=shape, notes=notes,
                              roles=heuristic_roles(heuristics),
                              points_to_evaluate=optuna_points(heuristics, space, parameterisation=shape,
                                                               search_depth=options["search_depth"]))


def search_notes(search_alg) -> tuple[str, ...]:
    """The lines a search algorithm, or one it wraps (Ray's ``searcher`` chain), has for the driver to
    print as the search starts (``FeasibleOnly.notes``)."""
    while search_alg is not None:
        if getattr(search_alg, "notes", ()):
            return tuple(search_alg.notes)
        search_alg = getattr(search_alg, "searcher", None)
    return ()


def _policy_searcher(cfg, spec, space, base_model, calib, path_sink, heuristics):
    """One of our searchers (from its start policy where it has one), adapted to Ray Tune."""
    from prunetune.methods.registry import make_searcher, start_policy_for
    from prunetune.search.adapter import PolicySearcherAdapter

    options = asdict(cfg.method_options)  # tolerance and criterion filled from the config
    start = None
    if spec.needs_start_policy:
        start = start_policy_for(cfg.method, base_model, space, macs_target=cfg.macs_target, calib=calib,
                                 options=options)
    shape = (search_parameterisation(cfg, space, base_model, calib, floor=options["floor"])
             if spec.parameterised else None)
    searcher = make_searcher(cfg.method, space, macs_target=cfg.macs_target, seed=cfg.seed, budget=cfg.trials,
                             concurrency=cfg.concurrency, options=options, start_policy=start,
                             heuristics=heuristics, parameterisation=shape)
    return PolicySearcherAdapter(searcher, seed=cfg.seed, path_sink=path_sink)


def _learner_search(cfg, spec, space, base_model, calib, path_sink, heuristics):
    return build_learner_search(cfg, space)


def planned_trials(cfg, search_alg, log) -> int:
    """How many trials the search will run: ``cfg.trials``, or fewer for a method that proposes a
    fixed set of policies (``uniform`` and ``global`` propose one), or for a two-stage search
    (``search.two_stage``) the proxies, the promoted and the heuristics; ``log`` says it once."""
    from prunetune.methods.fixed_policy import FixedPolicySearcher
    from prunetune.methods.limiters import ConcurrencyLimiter, TrialBudget
    from prunetune.search.two_stage import TwoStage, describe_plan

    if isinstance(search_alg, TwoStage):
        log(describe_plan(search_alg))
        return search_alg.total_trials
    searcher = getattr(search_alg, "policy_searcher", None)
    while isinstance(searcher, ConcurrencyLimiter | TrialBudget):  # limits only: what they wrap proposes
        searcher = searcher.inner
    if not isinstance(searcher, FixedPolicySearcher) or len(searcher.policies) >= cfg.trials:
        return cfg.trials
    count = len(searcher.policies)
    log(f"note: {cfg.method} proposes {count} polic{'y' if count == 1 else 'ies'}, so {count} "
        f"trial{'' if count == 1 else 's'} will run, not the {cfg.trials} of --trials")
    return count


def learner_job(cfg):
    """The learner, its options (the config's section, criterion from ``importance``) and the target."""
    from prunetune.search.learner_trial import LearnerJob

    return LearnerJob(cfg.method, asdict(cfg.method_options), cfg.macs_target)


def build_learner_search(cfg, space):
    """OptunaSearch over the learner's hyperparameter ranges, with the ``optuna`` section's sampler."""
    from prunetune.search.optuna_space import make_learner_search

    learner = learner_job(cfg).learner()
    learner.check(space, cfg.macs_target)  # before any trial: can it meet the target at all?
    optuna = cfg.methods["optuna"]
    return make_learner_search(learner.hparam_ranges(), learner=cfg.method, objective=cfg.objective,
                               sampler=optuna.sampler, seed=cfg.seed, n_startup_trials=optuna.n_startup_trials)


def build_scheduler(cfg):
    """ASHA on validation accuracy, one rung per fine-tuning epoch (searchers' proxy trials exempt), or FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    from prunetune.search.config import resolved_scheduler
    from prunetune.search.schedulers import FullLengthASHA

    if resolved_scheduler(cfg) != "asha":
        return FIFOScheduler()
    # One rung per fine-tuning epoch: ``epoch`` is 0 after BN recalibration, then 1, 2, ... (a
    # learner's learning reports carry no epoch, so ASHA leaves them alone and its rungs stay put).
    return FullLengthASHA(time_attr="epoch", metric="val_accuracy", mode="max",
                          max_t=cfg.finetune.epochs, grace_period=1, reduction_factor=2)


def trainable_with_resources(cfg, setup: TrialSetup):
    """The trial function bound to the shared setup (stored once in Ray's object store)."""
    from ray import tune

    from prunetune.methods.registry import get_method

    resources = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
    return tune.with_resources(tune_kind(get_method(cfg.method)).trainable(cfg, setup), resources)


def _policy_trainable(cfg, setup: TrialSetup):
    from ray import tune

    from prunetune.search.trainable import policy_trainable

    return tune.with_parameters(policy_trainable, setup=setup)


def _learner_trainable(cfg, setup: TrialSetup):
    """Learn the policy first (``search.learner_trial``), then the trial as for a given policy."""
    from ray import tune

    from prunetune.search.trainable import learner_trainable

    return tune.with_parameters(learner_trainable, setup=setup, job=learner_job(cfg))


TUNE_KINDS = {
    "searcher": TuneKind(_policy_searcher, _policy_trainable),
    "optuna": TuneKind(_optuna_search, _policy_trainable),
    "learner": TuneKind(_learner_search, _learner_trainable),
}


def trial_dirname(trial) -> str:
    """Short trial directory names (Ray's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


def run_config(cfg, *, name: str, storage: Path | str, callbacks: list):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    # Ray's automatic CSV and TensorBoard loggers are off (search.ray_session); result.json stays.
    return tune.RunConfig(
        name=name, storage_path=str(storage), callbacks=[JsonLoggerCallback(), *callbacks], verbose=0,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )


def build_tuner(cfg, setup: TrialSetup, *, name: str, storage: Path | str, callbacks: list, search_alg):
    from ray import tune

    from prunetune.search.two_stage import TwoStage

    samples = search_alg.total_trials if isinstance(search_alg, TwoStage) else cfg.trials
    tune_config = tune.TuneConfig(search_alg=search_alg, scheduler=build_scheduler(cfg),
                                  num_samples=samples, max_concurrent_trials=cfg.concurrency,
                                  reuse_actors=True, trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable_with_resources(cfg, setup), tune_config=tune_config,
                      run_config=run_config(cfg, name=name, storage=storage, callbacks=callbacks))


def restore_tuner(cfg, setup: TrialSetup, location: str):
    """The tuner of an interrupted search (its experiment at ``location``, ``search.ray_storage``),
    with the trainable bound to a freshly prepared setup."""
    from ray import tune

    return tune.Tuner.restore(location, trainable=trainable_with_resources(cfg, setup),
                              resume_unfinished=True, resume_errored=True, restart_errored=False)


def can_restore(location: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(location)
