"""Ray Tune wiring: the searcher, the scheduler, resources, callbacks and the ``Tuner`` itself.

One ``Tuner`` per search: a trial per policy on ``{"cpu": c, "gpu": g}``, ASHA stopping weak
trials between epochs, failed trials retried from their last checkpoint, actors reused (each new
trial process would import torch again), and our callbacks instead of Ray's tables.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from search.trial import TrialSetup


def build_search_algorithm(cfg, space, *, base_model=None, calib=None):
    """Ray Tune search algorithm for ``cfg.method``: OptunaSearch, or one of our searchers adapted."""
    from methods.registry import get_method, make_searcher, start_policy_for
    from search.adapter import PolicySearcherAdapter
    from search.optuna_space import make_optuna_search

    spec = get_method(cfg.method)
    options = {**(asdict(cfg.method_options) if cfg.method_options is not None else {})}
    if spec.kind == "optuna":
        return make_optuna_search(space, macs_target=cfg.macs_target, objective=cfg.objective,
                                  sampler=options["sampler"], seed=cfg.seed,
                                  n_startup_trials=options["n_startup_trials"],
                                  min_keep_ratio=options["min_keep_ratio"], tolerance=cfg.macs_tolerance)
    options["tolerance"] = cfg.macs_tolerance
    start = None
    if spec.needs_start_policy:
        start = start_policy_for(cfg.method, base_model, space, macs_target=cfg.macs_target, calib=calib,
                                 options=options)
    searcher = make_searcher(cfg.method, space, macs_target=cfg.macs_target, seed=cfg.seed, budget=cfg.trials,
                             concurrency=cfg.concurrency, options=options, start_policy=start)
    return PolicySearcherAdapter(searcher, seed=cfg.seed)


def build_scheduler(cfg):
    """ASHA on validation accuracy, one rung per fine-tuning epoch, or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from search.config import resolved_scheduler

    if resolved_scheduler(cfg) != "asha":
        return FIFOScheduler()
    # training_iteration counts reports: one after BN recalibration, then one per epoch.
    return ASHAScheduler(time_attr="training_iteration", metric="val_accuracy", mode="max",
                         max_t=cfg.finetune.epochs + 1, grace_period=2, reduction_factor=2)


def trainable_with_resources(cfg, setup: TrialSetup):
    """The trial function bound to the shared setup (stored once in Ray's object store)."""
    from ray import tune

    from search.trainable import policy_trainable

    resources = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(policy_trainable, setup=setup), resources)


def trial_dirname(trial) -> str:
    """Short trial directory names (Ray's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


def run_config(cfg, *, name: str, storage: Path, callbacks: list):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    # Ray's automatic CSV and TensorBoard loggers are off (search.ray_session); result.json stays.
    return tune.RunConfig(
        name=name, storage_path=str(storage), callbacks=[JsonLoggerCallback(), *callbacks], verbose=0,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )


def build_tuner(cfg, setup: TrialSetup, *, name: str, storage: Path, callbacks: list, search_alg):
    from ray import tune

    tune_config = tune.TuneConfig(search_alg=search_alg, scheduler=build_scheduler(cfg),
                                  num_samples=cfg.trials, max_concurrent_trials=cfg.concurrency,
                                  reuse_actors=True, trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable_with_resources(cfg, setup), tune_config=tune_config,
                      run_config=run_config(cfg, name=name, storage=storage, callbacks=callbacks))


def restore_tuner(cfg, setup: TrialSetup, run_dir: Path):
    """The tuner of an interrupted search, with the trainable bound to a freshly prepared setup."""
    from ray import tune

    return tune.Tuner.restore(str(run_dir), trainable=trainable_with_resources(cfg, setup),
                              resume_unfinished=True, resume_errored=True, restart_errored=False)


def can_restore(run_dir: Path) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(str(run_dir))
