"""One search, end to end (DESIGN.md): check, prepare, run the trials on Ray, summarise.

``start_search`` checks everything it can before it creates anything (names, target, tracking
store, Ray address), trains or loads the base model, writes the run directory, and runs the
tuner. ``resume_search`` picks an interrupted search up from its run directory: Ray restores the
trials and the searcher, finished trials are not run again, and MLflow runs are found, not
duplicated. Both end in ``finish_search``: summary.json, the Pareto plot, the parent run closed.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from prunetune.pruning.errors import UserError
from prunetune.search.prepare import Log, log_to_stderr
from prunetune.search.ray_storage import check_ray_storage, experiment_location

INTERRUPTED = 130


@dataclass(frozen=True)
class Prepared:
    """Everything a search needs before Ray starts."""

    run_dir: Path
    name: str
    tracking_uri: str
    base: object  # search.prepare.BaseModel
    setup: object  # search.trial.TrialSetup
    calib: list


def storage_dir(cfg) -> Path:
    if "://" in cfg.storage:
        raise UserError(f"storage {cfg.storage} is a URI, but it holds the run directory, on a file system: pass "
                        f"a directory, and give the URI as --ray-storage for Ray's experiment state and checkpoints")
    storage = Path(cfg.storage).expanduser().resolve()
    if storage.exists() and not storage.is_dir():
        raise UserError(f"storage {cfg.storage} is a file; pass a folder to hold the run directories "
                        f"(--storage DIR; it is created if missing)")
    return storage


def check_target(cfg, space) -> None:
    """Refuse a MACs target the space cannot reach, saying the reachable range (with
    ``space.search_depth``, dropping every droppable block too)."""
    depth = cfg.space.search_depth
    floor = space.min_macs_ratio(drop_blocks=depth)
    if cfg.macs_target < floor:
        raise UserError(f"macs_target {cfg.macs_target:g} is below what {cfg.model} can reach: MACs ratios "
                        f"from {floor:.3f} to 1 (every group at its minimum channels"
                        f"{', every droppable block dropped' if depth else ''}); raise --macs-target")


def prepare(cfg, *, run_dir: Path, cache_dir: Path, log: Log, space=None):
    """Load the data, build the space, train or load the base model, and make the trial setup."""
    from prunetune.pruning.data import load_dataset
    from prunetune.pruning.train import TrainRecipe, dataset_cache_key
    from prunetune.search.config import resolved_importance
    from prunetune.search.prepare import (
        model_space,
        prepare_base_model,
        resolve_device,
        trial_device,
    )
    from prunetune.search.trial import TrialSetup, calibration_batches

    d = cfg.dataset
    splits = load_dataset(d.name, root=d.root, seed=cfg.seed, val_fraction=d.val_fraction,
                          data_fraction=d.data_fraction, image_size=d.image_size, download=d.download)
    if space is None:
        space = model_space(cfg.model, splits.info, round_to=cfg.space.round_to,
                            min_channels=cfg.space.min_channels)
    check_target(cfg, space)
    device = resolve_device(cfg.resources.device, gpus=cfg.resources.gpus_per_trial)
    key = dataset_cache_key(d.name, splits.info.image_size, d.data_fraction, d.val_fraction, d.root)
    base = prepare_base_model(cfg.model, splits, TrainRecipe(**cfg.pretrain.recipe_kwargs()), seed=cfg.seed,
                              cache_dir=cache_dir, data_key=key, device="cpu" if device == "cpu" else device,
                              space=space, log=log, latency_threads=max(1, int(cfg.resources.cpus_per_trial)))
    setup = TrialSetup(
        arch=base.arch, base_state={k: v.cpu() for k, v in base.model.state_dict().items()},
        base_metrics=base.metrics, space=space, splits=splits,
        finetune=TrainRecipe(**cfg.finetune.recipe_kwargs()), importance=resolved_importance(cfg),
        calibration_batches=cfg.calibration_batches,
        bn_recalibration_batches=cfg.finetune.bn_recalibration_batches, seed=cfg.seed,
        device=trial_device(cfg.resources.device, gpus=cfg.resources.gpus_per_trial),
        threads=max(1, int(cfg.resources.cpus_per_trial)),
    )
    return base, setup, calibration_batches(replace(setup, device=device))  # used here, on the driver


def start_search(cfg, *, cache_dir: Path, log: Log = log_to_stderr) -> int:
    """``prunetune run``: a new search from a validated config; returns the exit status."""
    from functools import partial

    from prunetune.search.config import config_to_dict, default_run_name, dump_config
    from prunetune.search.prepare import model_space
    from prunetune.tracking.rundir import (
        check_new_run_dir,
        create_run_dir,
        new_meta,
        remove_unstarted_run_dir,
        write_meta,
    )
    from prunetune.tracking.uri import check_tracking_uri, default_tracking_uri

    storage = storage_dir(cfg)
    name = cfg.name or default_run_name(cfg, datetime.now())
    cfg = replace(cfg, name=name)
    run_dir = storage / name
    check_new_run_dir(run_dir)
    from prunetune.pruning.data import load_dataset

    d = cfg.dataset
    info = load_dataset(d.name, root=d.root, seed=cfg.seed, val_fraction=d.val_fraction,
                        data_fraction=d.data_fraction, image_size=d.image_size).info
    space = model_space(cfg.model, info, round_to=cfg.space.round_to, min_channels=cfg.space.min_channels)
    check_target(cfg, space)
    check_ray_storage(cfg.ray_storage)  # before the tracking check, which creates a default sqlite store
    tracking_uri = cfg.tracking_uri or default_tracking_uri(storage)
    check_tracking_uri(tracking_uri)
    if cfg.address:
        from prunetune.search.ray_session import start_ray

        start_ray(address=cfg.address, temp_dir=None)
    create_run_dir(run_dir, write_config=partial(dump_config, cfg), space=space.to_json())
    try:
        base, setup, calib = prepare(cfg, run_dir=run_dir, cache_dir=cache_dir, log=log, space=space)
        meta = new_meta(name=name, method=cfg.method, tracking_uri=tracking_uri, experiment=cfg.experiment)
        meta["parent_run_id"] = _start_parent(meta, config_to_dict(cfg), space.to_json(), base.metrics, log)
        write_meta(run_dir, meta)
    except BaseException:
        remove_unstarted_run_dir(run_dir)
        raise
    log(f"run directory: {run_dir}")
    return _run_tuner(cfg, run_dir, meta, base, setup, calib, log=log, restore=False)


def resume_search(run_dir: Path, *, cache_dir: Path, log: Log = log_to_stderr) -> int:
    """``prunetune resume``: continue an interrupted search from its run directory."""
    from prunetune.search.config import load_config
    from prunetune.search.ray_session import kill_leftover_ray
    from prunetune.tracking.rundir import CONFIG_FILE, SUMMARY_FILE, driver_alive, read_meta
    from prunetune.tracking.uri import check_tracking_uri

    run_dir = Path(run_dir).expanduser().resolve()
    meta = read_meta(run_dir)
    if driver_alive(run_dir):
        raise UserError(f"the search in {run_dir} is still running; wait for it or stop it (Ctrl-C) first")
    if (run_dir / SUMMARY_FILE).exists():
        log(f"the search in {run_dir} has already finished; see summary.json or `prunetune status {run_dir}`")
        return 0
    cfg = load_config(run_dir / CONFIG_FILE)
    check_tracking_uri(meta["tracking_uri"])
    check_ray_storage(cfg.ray_storage)
    killed = kill_leftover_ray(meta.get("ray_temp_dirs") or [])
    if killed:
        log(f"stopped {len(killed)} leftover Ray processes of the interrupted search (PIDs {killed[:8]}...)")
    base, setup, calib = prepare(cfg, run_dir=run_dir, cache_dir=cache_dir, log=log)
    setup = replace(setup, recorded=_recorded_results(run_dir))  # ended trials are not trained again
    meta["parent_run_id"] = _start_parent(meta, _config_dict(cfg), base.space.to_json(), base.metrics, log)
    from prunetune.tracking.rundir import write_meta

    write_meta(run_dir, meta)
    _log_recorded_trials(run_dir, log)
    log(f"resuming {run_dir}")
    return _run_tuner(cfg, run_dir, meta, base, setup, calib, log=log, restore=True)


def _recorded_results(run_dir: Path) -> dict:
    from prunetune.search.callbacks import reusable_results
    from prunetune.tracking.rundir import TRIALS_FILE, read_trials

    return reusable_results(read_trials(run_dir / TRIALS_FILE))


def _log_recorded_trials(run_dir: Path, log: Log) -> None:
    """Log to MLflow the trials a killed driver wrote to trials.jsonl but did not live to log.

    The recorder appends a trial to trials.jsonl before it logs it, and Ray does not report an
    ended trial again on resume, so without this such a trial would be missing from MLflow.
    """
    from prunetune.tracking.sync import sync_run_dir

    try:
        report = sync_run_dir(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run directory holds everything; sync repairs MLflow
        log(f"prunetune: warning: could not bring MLflow up to date ({type(exc).__name__}); "
            f"run `prunetune sync {run_dir}` when the tracking store is back")
        return
    if report.trials_logged:
        log(f"logged {report.trials_logged} recorded trials that the interrupted driver had not logged to MLflow")


def _config_dict(cfg) -> dict:
    from prunetune.search.config import config_to_dict

    return config_to_dict(cfg)


def _start_parent(meta: dict, config: dict, space: dict, base_metrics: dict, log: Log) -> str:
    from prunetune.tracking.tracker import Tracker

    tracker = Tracker(meta["tracking_uri"], meta["experiment"])
    parent = tracker.start_parent(meta["run_uid"], meta["name"], config,
                                  tags={"prunetune.method": meta["method"]})
    tracker.log_space(parent, space, base_metrics)
    return parent


def _run_tuner(cfg, run_dir: Path, meta: dict, base, setup, calib, *, log: Log, restore: bool) -> int:
    from prunetune.search.callbacks import ProgressLine, TrialRecorder, resume_progress
    from prunetune.search.config import resolved_importance
    from prunetune.search.interrupt import CtrlC
    from prunetune.search.ray_session import new_temp_dir, start_ray, stop_ray
    from prunetune.search.search_path import SearchPathLogger
    from prunetune.search.tuner import (
        build_search_algorithm,
        build_tuner,
        can_restore,
        planned_trials,
        restore_tuner,
    )
    from prunetune.tracking.rundir import clear_driver, mark_driver, update_meta

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server must not stall trials
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    started_ray = False
    mark_driver(run_dir)
    started = time.monotonic()
    try:
        if not cfg.address:
            temp_dir = new_temp_dir()
            update_meta(run_dir, ray_temp_dirs=[*meta.get("ray_temp_dirs", []), temp_dir])
            start_ray(address=None, temp_dir=temp_dir)
            started_ray = True
        else:
            start_ray(address=cfg.address, temp_dir=None)  # a resumed search joins its cluster again
        location = experiment_location(cfg.ray_storage, run_dir)
        if restore and can_restore(location):
            tuner = restore_tuner(cfg, setup, location)
            resume_progress(tuner, run_dir)  # the count, best and estimate start from trials.jsonl
        else:
            recorder = TrialRecorder(run_dir, meta["run_uid"], tracking_uri=meta["tracking_uri"],
                                     experiment=meta["experiment"], parent_run_id=meta["parent_run_id"],
                                     params={"method": cfg.method, "importance": resolved_importance(cfg),
                                             "seed": cfg.seed})
            path_sink = SearchPathLogger(tracking_uri=meta["tracking_uri"], experiment=meta["experiment"],
                                         parent_run_id=meta["parent_run_id"])
            search_alg = build_search_algorithm(cfg, base.space, base_model=base.model, calib=calib,
                                                path_sink=path_sink)
            tuner = build_tuner(cfg, setup, name=run_dir.name, storage=cfg.ray_storage or run_dir.parent,
                                callbacks=[recorder, ProgressLine(planned_trials(cfg, search_alg, log))],
                                search_alg=search_alg)
        with CtrlC() as ctrl_c:
            results = tuner.fit()
        if ctrl_c.pressed or _interrupted(results):
            return _interrupted_exit(run_dir, meta, log)
        return finish_search(cfg, run_dir, meta, base.metrics, wall_s=time.monotonic() - started, log=log)
    except KeyboardInterrupt:
        return _interrupted_exit(run_dir, meta, log)
    finally:
        clear_driver(run_dir)
        if started_ray:
            stop_ray()


def _interrupted(results) -> bool:
    """Whether Ray stopped before every trial ended (Ctrl-C): some trial is neither done nor errored."""
    grid = getattr(results, "_experiment_analysis", None)
    trials = getattr(grid, "trials", None) or []
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _interrupted_exit(run_dir: Path, meta: dict, log: Log) -> int:
    from prunetune.tracking.tracker import Tracker

    with contextlib.suppress(Exception):  # the message below matters more than the MLflow status
        Tracker(meta["tracking_uri"], meta["experiment"]).set_status(meta["parent_run_id"], "KILLED")
    log(f"interrupted: finished trials are kept in {run_dir}; continue with `prunetune resume {run_dir}`")
    return INTERRUPTED


def finish_search(cfg, run_dir: Path, meta: dict, baseline: dict, *, wall_s: float, log: Log) -> int:
    """Write summary.json and the Pareto plot, close the parent MLflow run, print the front."""
    from prunetune.search.summary import build_summary, format_summary
    from prunetune.tracking.plots import plot_search
    from prunetune.tracking.rundir import PARETO_PNG, TRIALS_FILE, read_trials, write_summary

    records = read_trials(run_dir / TRIALS_FILE)
    summary = build_summary(name=meta["name"], method=cfg.method, baseline=baseline, records=records,
                            macs_target=cfg.macs_target, macs_tolerance=cfg.macs_tolerance, wall_s=wall_s)
    png = plot_search(records, summary, run_dir / PARETO_PNG)  # proxies apart, the target, the best ringed
    write_summary(run_dir, summary)
    try:
        from prunetune.tracking.tracker import Tracker

        tracker = Tracker(meta["tracking_uri"], meta["experiment"])
        for point in summary["pareto"]:
            if point.get("test_accuracy") is not None:
                tracker.log_test_accuracy(meta["parent_run_id"], point["trial_key"], point["test_accuracy"])
        tracker.finish_parent(meta["parent_run_id"], summary, pareto_png=png)
    except Exception as exc:  # noqa: BLE001 - the run directory holds everything; sync repairs MLflow
        log(f"prunetune: warning: could not finish the MLflow view ({type(exc).__name__}); "
            f"run `prunetune sync {run_dir}` when the tracking store is back")
    print(format_summary(summary), flush=True)
    uri = meta["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    print(f"\nnext: {ui}   |   prunetune status {run_dir}   |   "
          f"prunetune export {run_dir} --trial best --out pruned.pt", flush=True)
    return 0
