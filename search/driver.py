"""One search, end to end (DESIGN.md): check, prepare, run the trials on Ray, summarise.

A straight line, each step once: check everything that can be checked without creating anything
(names, storage, the data and the space with the MACs target, the device, the stores, the Ray
address and its authentication); refuse trials no node could hold; join the cluster, then train or
load the base model, or train or load it, then start the local Ray (one start or join either way);
only then create the run directory, the tracking store and the parent run (one ``Tracker`` per
search); run the tuner; summarise. Ray's local temp dir is removed when the
driver ends, Ctrl-C and SIGTERM included (``search.interrupt``: both stop cleanly, finished trials
kept, exit 130 or 143).

``resume_search`` picks an interrupted search up from its run directory: Ray restores the trials
and the searcher, finished trials are not run again, and MLflow runs are found, not duplicated.
Both end in ``finish_search``: summary.json, the Pareto plot, the parent run closed; a search
whose every trial failed says why in one line and exits 1 (``search.failures``), and so does one
(objective constrained) none of whose ended trials met the MACs target.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from prunetune.pruning.errors import UserError
from prunetune.search.interrupt import Interrupted, StopSignals
from prunetune.search.prepare import Log, log_to_stderr
from prunetune.search.ray_session import RaySession, user_code_runtime_env
from prunetune.search.ray_storage import check_ray_storage, experiment_location


@dataclass(frozen=True)
class Search:
    """A search ready for its trials: config, run directory, identity, tracker, base model, setup."""

    cfg: object  # search.config.SearchConfig
    run_dir: Path
    meta: dict
    tracker: object  # tracking.tracker.Tracker
    base: object  # search.prepare.BaseModel
    setup: object  # search.trial.TrialSetup
    calib: list


def storage_dir(cfg) -> Path:
    """The folder of run directories: a local path whose nearest existing folder is writable."""
    from prunetune.tracking.uri import nearest_existing, writable_folder

    if "://" in cfg.storage:
        raise UserError(f"storage {cfg.storage} is a URI, but it holds the run directory, on a file system: pass "
                        f"a directory, and give the URI as --ray-storage for Ray's experiment state and checkpoints")
    storage = Path(cfg.storage).expanduser().resolve()
    if storage.exists() and not storage.is_dir():
        raise UserError(f"storage {cfg.storage} is a file; pass a folder to hold the run directories "
                        f"(--storage DIR; it is created if missing)")
    existing = nearest_existing(storage)
    if not writable_folder(existing):
        raise UserError(f"storage {cfg.storage} cannot be written ({existing} is read-only or not a folder); "
                        f"pass a writable folder as --storage")
    return storage


def check_target(cfg, space) -> None:
    """Refuse a MACs target the space cannot reach, saying the reachable range (with
    ``space.search_depth``, or for a method that drops blocks by itself, dropping every droppable
    block too); then one the method cannot reach with its options (its lowest keep ratio, a
    learner's own check: ``methods.reach``), before Ray starts or the base model trains."""
    from prunetune.methods.reach import check_reach
    from prunetune.methods.registry import get_method

    depth = cfg.space.search_depth or get_method(cfg.method).drops_blocks
    floor = space.min_macs_ratio(drop_blocks=depth)
    if cfg.macs_target < floor:
        raise UserError(f"macs_target {cfg.macs_target:g} is below what {cfg.model} can reach: MACs ratios "
                        f"from {floor:.3f} to 1 (every group at its minimum channels"
                        f"{', every droppable block dropped' if depth else ''}); raise --macs-target")
    check_reach(cfg.method, space, macs_target=cfg.macs_target, options=cfg.method_options)


def load_inputs(cfg):
    """The dataset's splits, the model's space (target checked against it) and the driver's device."""
    from prunetune.pruning.data import load_dataset
    from prunetune.search.config import resolved_importance
    from prunetune.search.prepare import model_space, resolve_device

    d = cfg.dataset
    splits = load_dataset(d.name, root=d.root, seed=cfg.seed, val_fraction=d.val_fraction,
                          data_fraction=d.data_fraction, image_size=d.image_size, download=d.download)
    space = model_space(cfg.model, splits.info, round_to=cfg.space.round_to, min_channels=cfg.space.min_channels,
                        model_args=cfg.model_args, weights=cfg.weights, importance=resolved_importance(cfg))
    check_target(cfg, space)
    return splits, space, resolve_device(cfg.resources.device, gpus=cfg.resources.gpus_per_trial)


def prepare(cfg, *, cache_dir: Path, log: Log, run_dir: Path | None = None, inputs=None):
    """Train or load the base model and make the trial setup; ``inputs``: ``load_inputs(cfg)`` if done.

    Returns (base model, trial setup, calibration batches on the driver's device).
    """
    from prunetune.pruning.train import dataset_cache_key
    from prunetune.search.config import resolved_importance
    from prunetune.search.prepare import prepare_base_model, trial_device
    from prunetune.search.trial import TrialSetup, calibration_batches

    splits, space, device = inputs or load_inputs(cfg)
    d = cfg.dataset
    key = dataset_cache_key(d.name, splits.info.image_size, d.data_fraction, d.val_fraction, d.root)
    base = prepare_base_model(cfg.model, splits, cfg.pretrain.recipe(), seed=cfg.seed, cache_dir=cache_dir,
                              data_key=key, device=device, space=space, log=log,
                              latency_threads=max(1, int(cfg.resources.cpus_per_trial)),
                              model_args=cfg.model_args, weights=cfg.weights)
    setup = TrialSetup(
        arch=base.arch, base_state={k: v.cpu() for k, v in base.model.state_dict().items()},
        base_metrics=base.metrics, space=space, splits=splits,
        finetune=cfg.finetune.recipe(), importance=resolved_importance(cfg),
        calibration_batches=cfg.calibration_batches,
        bn_recalibration_batches=cfg.finetune.bn_recalibration_batches, seed=cfg.seed,
        device=trial_device(cfg.resources.device, gpus=cfg.resources.gpus_per_trial),
        threads=max(1, int(cfg.resources.cpus_per_trial)),
        amp=cfg.resources.amp, channels_last=cfg.resources.channels_last,
        val_subset=cfg.val_subset, evaluate_test=cfg.test_eval == "all", cache_key=uuid.uuid4().hex,
        checkpoint_min_s=cfg.checkpoint_min_s,
    )
    return base, setup, calibration_batches(replace(setup, device=device))  # used here, on the driver


def start_search(cfg, *, cache_dir: Path, log: Log = log_to_stderr) -> int:
    """``prunetune run``: a new search from a validated config; returns the exit status. It holds the run
    directory's lock (``tracking.run_lock``) from before its checks to its end, so a second ``run`` of the
    same name is refused at once rather than after training."""
    from prunetune.search.config import default_run_name
    from prunetune.tracking.run_lock import run_lock
    from prunetune.tracking.rundir import check_new_run_dir

    storage = storage_dir(cfg)
    cfg = replace(cfg, name=cfg.name or default_run_name(cfg, datetime.now()))
    run_dir = storage / cfg.name
    with run_lock(run_dir, "run"):
        check_new_run_dir(run_dir)
        with StopSignals() as stop, RaySession(cfg.address, runtime_env=user_code_runtime_env(cfg)) as ray:
            return _start(cfg, run_dir, storage, stop, ray, cache_dir=cache_dir, log=log)


def _start(cfg, run_dir: Path, storage: Path, stop: StopSignals, ray: RaySession, *, cache_dir: Path,
           log: Log) -> int:
    from functools import partial

    from prunetune.search.config import config_to_dict, dump_config
    from prunetune.tracking.rundir import create_run_dir, new_meta, remove_unstarted_run_dir, write_meta
    from prunetune.tracking.uri import check_tracking_uri, default_tracking_uri

    try:
        inputs = load_inputs(cfg)
        check_ray_storage(cfg.ray_storage)
        tracking_uri = cfg.tracking_uri or default_tracking_uri(storage)
        check_tracking_uri(tracking_uri, folder_may_be_missing=cfg.tracking_uri is None)
        base, setup, calib = _ray_and_base_model(ray, stop, cfg, cache_dir=cache_dir, log=log, inputs=inputs)
    except Interrupted as stopped:
        log(f"prunetune: interrupted ({stopped}) before the search started; nothing was created")
        return stopped.exit_status
    try:
        create_run_dir(run_dir, write_config=partial(dump_config, cfg), space=base.space.to_json())
        meta = new_meta(name=cfg.name, method=cfg.method, tracking_uri=tracking_uri, experiment=cfg.experiment)
        meta["ray_temp_dirs"] = ray.temp_dirs
        tracker = _tracker(meta)
        meta["parent_run_id"] = _start_parent(tracker, meta, config_to_dict(cfg), base)
        write_meta(run_dir, meta)
    except BaseException as error:
        remove_unstarted_run_dir(run_dir)
        if isinstance(error, Interrupted):
            log(f"prunetune: interrupted ({error}) before the search started; nothing was kept")
            return error.exit_status
        raise
    log(f"run directory: {run_dir}")
    return _run_tuner(Search(cfg, run_dir, meta, tracker, base, setup, calib), stop, log=log, restore=False)


def resume_search(run_dir: Path, *, cache_dir: Path, log: Log = log_to_stderr) -> int:
    """``prunetune resume``: continue an interrupted search from its run directory, holding its lock
    (``tracking.run_lock``): a second resume, or any other writer of the run, is refused at once."""
    from prunetune.tracking.run_lock import run_lock
    from prunetune.tracking.rundir import read_meta

    run_dir = Path(run_dir).expanduser().resolve()
    read_meta(run_dir)  # a one-line error for a folder that is not a run, before a lock is made beside it
    with run_lock(run_dir, "resume"):
        return _resume(run_dir, cache_dir=cache_dir, log=log)


def _resume(run_dir: Path, *, cache_dir: Path, log: Log) -> int:
    from prunetune.search.config import config_to_dict, load_config
    from prunetune.search.ray_session import kill_leftover_ray, remove_temp_dirs
    from prunetune.tracking.rundir import CONFIG_FILE, SUMMARY_FILE, driver_alive, read_meta, write_meta
    from prunetune.tracking.uri import check_tracking_uri

    meta = read_meta(run_dir)
    if driver_alive(run_dir):
        raise UserError(f"the search in {run_dir} is still running; wait for it or stop it (Ctrl-C) first")
    cfg = load_config(run_dir / CONFIG_FILE, saved=True)
    if (run_dir / SUMMARY_FILE).exists():
        if _final_left(run_dir, cfg):
            log(f"the search in {run_dir} has finished, but not its final fine-tune: continuing it")
            _run_finals(run_dir, cfg.final, cache_dir=cache_dir, log=log)
            return 0
        log(f"the search in {run_dir} has already finished; see summary.json or `prunetune status {run_dir}`")
        return 0
    check_tracking_uri(meta["tracking_uri"])
    check_ray_storage(cfg.ray_storage)
    with StopSignals() as stop, RaySession(cfg.address, runtime_env=user_code_runtime_env(cfg)) as ray:
        try:
            inputs = load_inputs(cfg)
            old_dirs = meta.get("ray_temp_dirs") or []
            killed = kill_leftover_ray(old_dirs)
            if killed:
                log(f"stopped {len(killed)} leftover Ray processes of the interrupted search (PIDs {killed[:8]}...)")
            remove_temp_dirs(old_dirs)
            base, setup, calib = _ray_and_base_model(ray, stop, cfg, cache_dir=cache_dir, log=log, inputs=inputs)
        except Interrupted as stopped:
            log(f"prunetune: interrupted ({stopped}); nothing changed in {run_dir}")
            return stopped.exit_status
        try:
            setup = replace(setup, recorded=_recorded_results(run_dir))  # ended trials are not trained again
            tracker = _tracker(meta)
            meta["parent_run_id"] = _start_parent(tracker, meta, config_to_dict(cfg), base)
            meta["ray_temp_dirs"] = ray.temp_dirs
            write_meta(run_dir, meta)
            _log_recorded_trials(run_dir, log)
        except Interrupted as stopped:  # before the trials continued: what was recorded is as it was
            with contextlib.suppress(Exception):
                _tracker(meta).set_status(meta["parent_run_id"], "KILLED")
            log(_interrupted_line(str(stopped), run_dir))
            return stopped.exit_status
        log(f"resuming {run_dir}")
        return _run_tuner(Search(cfg, run_dir, meta, tracker, base, setup, calib), stop, log=log, restore=True)


def _ray_and_base_model(ray: RaySession, stop: StopSignals, cfg, *, cache_dir: Path, log: Log, inputs):
    """Ray (one start or join) and the base model, in the order that refuses soonest.

    A cluster is joined first, so that its refusals (authentication, trials bigger than every node)
    come before minutes of training; a local Ray's resources are known without starting it, so it
    starts after the base model, and a damaged cached model is refused without it. Each start takes
    SIGINT and SIGTERM back from ``ray.init``.
    """
    from prunetune.search.ray_session import check_trial_resources

    def trials_fit() -> None:
        check_trial_resources(cpus=cfg.resources.cpus_per_trial, gpus=cfg.resources.gpus_per_trial,
                              address=cfg.address)

    if cfg.address:
        ray.start()
        stop.install()
        trials_fit()
        return prepare(cfg, cache_dir=cache_dir, log=log, inputs=inputs)
    trials_fit()
    prepared = prepare(cfg, cache_dir=cache_dir, log=log, inputs=inputs)
    ray.start()
    stop.install()
    return prepared


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


def _tracker(meta: dict):
    from prunetune.tracking.tracker import Tracker

    return Tracker(meta["tracking_uri"], meta["experiment"])


def _start_parent(tracker, meta: dict, config: dict, base) -> str:
    parent = tracker.start_parent(meta["run_uid"], meta["name"], config, tags={"prunetune.method": meta["method"]})
    tracker.log_space(parent, base.space.to_json(), base.metrics)
    return parent


def _run_tuner(search: Search, stop: StopSignals, *, log: Log, restore: bool) -> int:
    from prunetune.search.callbacks import flush_recorders
    from prunetune.search.tuner import can_restore
    from prunetune.tracking.rundir import clear_driver, mark_driver

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server must not stall trials
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mark_driver(search.run_dir)
    started = time.monotonic()
    try:
        location = experiment_location(search.cfg.ray_storage, search.run_dir)
        tuner = _restored_tuner(search, location) if restore and can_restore(location) else _new_tuner(search, log)
        with stop.graceful():
            try:
                results = tuner.fit()
            finally:  # every recorded trial in MLflow before the summary (or the interrupted exit)
                flush_recorders(tuner)
        if stop.stopped or _interrupted(results):
            return _interrupted_exit(search, stop, log)
        return finish_search(search, results, wall_s=time.monotonic() - started, log=log)
    except KeyboardInterrupt:  # a second signal, or one before Ray Tune listened
        return _interrupted_exit(search, stop, log)
    finally:
        clear_driver(search.run_dir)


def _new_tuner(search: Search, log: Log):
    from prunetune.search.callbacks import ProgressLine, TrialRecorder
    from prunetune.search.config import resolved_importance
    from prunetune.search.search_path import SearchPathLogger
    from prunetune.search.tuner import (
        build_search_algorithm,
        build_tuner,
        planned_trials,
        search_heuristics,
        search_notes,
    )
    from prunetune.tracking.rundir import write_heuristics

    cfg, meta, run_dir = search.cfg, search.meta, search.run_dir
    recorder = TrialRecorder(run_dir, meta["run_uid"], tracking_uri=meta["tracking_uri"],
                             experiment=meta["experiment"], parent_run_id=meta["parent_run_id"],
                             params={"method": cfg.method, "importance": resolved_importance(cfg), "seed": cfg.seed})
    path_sink = SearchPathLogger(tracking_uri=meta["tracking_uri"], experiment=meta["experiment"],
                                 parent_run_id=meta["parent_run_id"], run_dir=str(run_dir))
    heuristics = search_heuristics(cfg, search.base.space, search.base.model, search.calib)
    if heuristics:
        write_heuristics(run_dir, {name: policy.to_json() for name, policy in heuristics.items()})
        log(f"warm start: the heuristics {', '.join(heuristics)} are evaluated first")
    search_alg = build_search_algorithm(cfg, search.base.space, base_model=search.base.model, calib=search.calib,
                                        path_sink=path_sink, heuristics=heuristics)
    for note in search_notes(search_alg):
        log(note)
    return build_tuner(cfg, search.setup, name=run_dir.name, storage=cfg.ray_storage or run_dir.parent,
                       callbacks=[recorder, ProgressLine(planned_trials(cfg, search_alg, log),
                                                             macs_limit=cfg.macs_target + cfg.macs_tolerance)],
                       search_alg=search_alg)


def _final_fine_tune(search: Search, log: Log) -> None:
    """The ``final`` section's long fine-tune of the best policy, or of its best candidates
    (``search.final.run_finals``), printed after the summary; interrupted, it continues with
    ``prunetune finetune RUN_DIR`` (same settings)."""
    final = search.cfg.final
    several = final.candidates > 1 or final.heuristics
    which = "the best policy" if final.candidates == 1 else f"the {final.candidates} best policies"
    log(f"final fine-tune of {which}{' and the heuristics' if final.heuristics else ''} ({final.epochs} epochs"
        f"{', the best final validation accuracy kept' if several else ''}); if interrupted, continue "
        f"with `prunetune finetune {search.run_dir}`")
    _run_finals(search.run_dir, final, cache_dir=None, log=log, setup=search.setup)


def _final_left(run_dir: Path, cfg) -> bool:
    """Whether a finished search's configured final fine-tune has not ended (it was interrupted)."""
    from prunetune.tracking.rundir import SUMMARY_FILE

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    return cfg.final.epochs > 0 and summary.get("best") is not None and summary.get("final") is None


def _run_finals(run_dir: Path, final, *, cache_dir: Path | None, log: Log, setup=None) -> None:
    """The final fine-tune(s) of ``final`` (``search.final.run_finals``: each continues from its checkpoint),
    recorded in summary.json and MLflow and printed; the search's ``setup`` when at hand, else from the cache."""
    from prunetune.search.final import format_final, record_final, run_finals

    result = run_finals(run_dir, final=final, cache_dir=cache_dir, log=log, setup=setup)
    record_final(run_dir, result, log)
    print(format_final(result), flush=True)


def _restored_tuner(search: Search, location: str):
    from prunetune.search.callbacks import resume_progress
    from prunetune.search.tuner import restore_tuner

    tuner = restore_tuner(search.cfg, search.setup, location)
    resume_progress(tuner, search.run_dir)  # the count, best and estimate start from trials.jsonl
    return tuner


def _interrupted(results) -> bool:
    """Whether Ray stopped before every trial ended (Ctrl-C): some trial is neither done nor errored."""
    grid = getattr(results, "_experiment_analysis", None)
    trials = getattr(grid, "trials", None) or []
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _interrupted_exit(search: Search, stop: StopSignals, log: Log) -> int:
    from prunetune.tracking.rundir import SUMMARY_FILE

    if (search.run_dir / SUMMARY_FILE).exists():  # the search ended; the final fine-tune after it did not
        log(f"interrupted ({stop.name}) during the final fine-tune: the search's results are in {search.run_dir}; "
            f"continue the final with `prunetune resume {search.run_dir}` (or `prunetune finetune`)")
        return stop.exit_status
    with contextlib.suppress(Exception):  # the message below matters more than the MLflow status
        search.tracker.set_status(search.meta["parent_run_id"], "KILLED")
    log(_interrupted_line(stop.name, search.run_dir))
    return stop.exit_status


def _interrupted_line(signal_name: str, run_dir: Path) -> str:
    return f"interrupted ({signal_name}): finished trials are kept in {run_dir}; continue with " \
           f"`prunetune resume {run_dir}`"


def finish_search(search: Search, results, *, wall_s: float, log: Log) -> int:
    """Write summary.json and the Pareto plot, close the parent MLflow run, print the front.

    A search whose every trial failed prints one line instead (how many, the first one's cause,
    its traceback's file), marks the parent run FAILED, and returns 1. One whose trials ended but
    none within the MACs target (``best`` null) prints the front, then one line (the closest trial,
    the fix); with objective ``constrained`` it did not do its job: parent run FAILED, returns 1.
    """
    from prunetune.search.failures import (
        EXIT_ALL_FAILED,
        EXIT_NO_BEST,
        all_failed_message,
        first_failure,
        next_steps,
        no_best_message,
    )
    from prunetune.search.summary import build_summary, format_summary
    from prunetune.search.test_eval import evaluated_on, score_reportable
    from prunetune.tracking.plots import plot_search
    from prunetune.tracking.rundir import PARETO_PNG, TRIALS_FILE, read_heuristics, read_trials, write_summary

    cfg, meta, run_dir, baseline = search.cfg, search.meta, search.run_dir, search.base.metrics
    records = read_trials(run_dir / TRIALS_FILE)
    if cfg.test_eval == "reportable" and score_reportable(run_dir, records, search.setup, log=log,
                                                          macs_limit=cfg.macs_target + cfg.macs_tolerance):
        records = read_trials(run_dir / TRIALS_FILE)  # with the front's and the best's test accuracy
    failure = first_failure(results, run_dir)
    summary = build_summary(name=meta["name"], method=cfg.method, baseline=baseline, records=records,
                            macs_target=cfg.macs_target, macs_tolerance=cfg.macs_tolerance, wall_s=wall_s,
                            first_failure=failure.to_json() if failure else None,
                            two_stage=asdict(cfg.fidelity) if cfg.fidelity.promote else None)
    summary["evaluated_on"] = evaluated_on(cfg, search.setup.splits if search.setup is not None else None)
    heuristics = read_heuristics(run_dir)
    if heuristics:
        from prunetune.methods.heuristics import heuristic_summary
        from prunetune.pruning.policy import Policy

        summary["heuristics"] = heuristic_summary(
            records, {name: Policy.from_json(policy) for name, policy in heuristics.items()}, summary["best"])
    counts = summary["trials"]
    all_failed = counts["failed"] > 0 and counts["finished"] == 0 and counts["stopped"] == 0
    no_best = not all_failed and summary["best"] is None and cfg.objective == "constrained"
    png = plot_search(records, summary, run_dir / PARETO_PNG)  # proxies apart, the target, the best ringed
    write_summary(run_dir, summary)
    try:
        for point in summary["pareto"]:
            if point.get("test_accuracy") is not None:
                search.tracker.log_test_accuracy(meta["parent_run_id"], point["trial_key"], point["test_accuracy"])
        search.tracker.finish_parent(meta["parent_run_id"], summary, pareto_png=png,
                                     status="FAILED" if all_failed or no_best else "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the run directory holds everything; sync repairs MLflow
        log(f"prunetune: warning: could not finish the MLflow view ({type(exc).__name__}); "
            f"run `prunetune sync {run_dir}` when the tracking store is back")
    if all_failed:
        from prunetune.search.failures import TrialFailure

        failure = failure or TrialFailure("?", "an unknown error", str(run_dir))
        log(f"prunetune: error: {all_failed_message(counts['failed'], failure)}")
        return EXIT_ALL_FAILED
    print(format_summary(summary), flush=True)
    if summary["best"] is None:  # pareto: the front is the result, the target only a mark on it
        log(f"prunetune: {'error' if no_best else 'warning'}: {no_best_message(records, cfg)}")
        if no_best:
            return EXIT_NO_BEST
    final = cfg.final.epochs > 0 and summary["best"] is not None
    if final:
        _final_fine_tune(search, log)
    print(f"\n{next_steps(summary, run_dir, meta['tracking_uri'], final=final, experiment_id=search.tracker.experiment_id)}",
          flush=True)
    return 0
