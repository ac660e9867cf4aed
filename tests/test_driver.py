"""The driver's parts that need no Ray cluster: stop signals, failure causes, the all-failed ending,
the dispatch on the method's registry entry."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from prunetune.search.interrupt import Interrupted, StopSignals


def test_sigterm_before_the_trials_raises_interrupted_with_exit_143():
    with StopSignals() as stop, pytest.raises(Interrupted) as raised:
        os.kill(os.getpid(), signal.SIGTERM)
    assert raised.value.exit_status == 143 and stop.exit_status == 143 and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back on the way out


def test_during_fit_the_first_signal_is_handed_to_ray_tune_and_a_second_one_raises():
    handed = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: handed.append(signum))  # as Ray Tune does
    try:
        with StopSignals() as stop, stop.graceful():
            os.kill(os.getpid(), signal.SIGTERM)
            assert handed == [signal.SIGUSR1] and stop.stopped and stop.exit_status == 143
            with pytest.raises(Interrupted):
                os.kill(os.getpid(), signal.SIGINT)
        assert stop.exit_status == 143  # the first signal decides the status
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_root_cause_unwraps_ray_wrappers():
    from ray.exceptions import RaySystemError, RayTaskError

    from prunetune.search.failures import root_cause

    inner = RuntimeError("operator torchvision::nms does not exist\nmore detail")
    wrapped = RayTaskError("train", "Traceback ...", RaySystemError(inner, "tb"))
    assert root_cause(wrapped) == "RuntimeError: operator torchvision::nms does not exist"
    assert root_cause(None).startswith("unknown error")


def _record(trial_id: str, status: str) -> dict:
    metrics = {"val_accuracy": 0.5, "macs_ratio": 0.5, "macs": 100.0, "params": 10.0} if status == "finished" else {}
    return {"trial_id": trial_id, "trial_key": f"uid:{trial_id}", "status": status, "policy": None, "params": {},
            "metrics": metrics, "test_accuracy": 0.5 if status == "finished" else None, "history": []}


def _finish(tmp_path: Path, statuses: list[str], capsys, tracking_store, **config):
    """``finish_search`` over trials.jsonl records with ``statuses`` (each finished one at MACs ratio 0.5)
    and the config keys ``config`` (dotted); the failed ones raised ValueError."""
    from prunetune.search.config import load_config
    from prunetune.search.driver import Search, finish_search
    from prunetune.tracking.tracker import Tracker

    run_dir = tmp_path / "r"
    (run_dir / "trial_t1").mkdir(parents=True)
    (run_dir / "trial_t1" / "error.txt").write_text("Traceback ...")
    records = [_record(f"t{i}", status) for i, status in enumerate(statuses)]
    (run_dir / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trials = [SimpleNamespace(trial_id=r["trial_id"], status="ERROR" if r["status"] == "failed" else "TERMINATED",
                              get_pickled_error=lambda: ValueError("bad input in the trial"),
                              get_error=lambda: None, error_file=None, path=None) for r in records]
    results = SimpleNamespace(_experiment_analysis=SimpleNamespace(trials=trials))
    tracker = Tracker(f"sqlite:///{tracking_store(tmp_path) / 'mlflow.db'}", "e")
    parent = tracker.start_parent("uid", "r", {})
    for record in records:
        tracker.log_trial(parent, record)
    cfg = load_config(None, overrides={"model": "small_cnn", "dataset.name": "digits", "final.epochs": 0, **config})
    meta = {"name": "r", "run_uid": "uid", "parent_run_id": parent, "tracking_uri": tracker.tracking_uri}
    base = SimpleNamespace(metrics={"val_accuracy": 0.9, "test_accuracy": 0.9, "macs": 200.0, "params": 20.0})
    search = Search(cfg, run_dir, meta, tracker, base, setup=None, calib=[])
    lines = []
    status = finish_search(search, results, wall_s=1.0, log=lines.append)
    summary = json.loads((run_dir / "summary.json").read_text())
    return status, lines, summary, tracker.client.get_run(parent).info.status, capsys.readouterr().out


def test_a_search_whose_every_trial_failed_exits_1_with_one_line(tmp_path, capsys, tracking_store):
    status, lines, summary, parent_status, out = _finish(tmp_path, ["failed", "failed"], capsys, tracking_store)
    assert status == 1 and parent_status == "FAILED" and out == ""
    assert lines == [f"prunetune: error: all 2 trials failed; the first (trial t0) with ValueError: bad input in "
                     f"the trial; its full traceback is in {tmp_path / 'r' / 'trial_t0' / 'error.txt'}"]
    assert summary["trials"]["failed"] == 2 and summary["first_failure"]["trial_id"] == "t0"


def test_a_search_with_some_failures_names_the_first_in_its_summary(tmp_path, capsys, tracking_store):
    status, lines, summary, parent_status, out = _finish(tmp_path, ["finished", "failed"], capsys, tracking_store)
    assert lines == [] and status == 0 and parent_status == "FINISHED"
    assert summary["first_failure"] == {"trial_id": "t1", "cause": "ValueError: bad input in the trial",
                                        "log": str(tmp_path / "r" / "trial_t1" / "error.txt")}
    assert "1 finished, 0 stopped early, 1 failed" in out.splitlines()[0]
    assert out.splitlines()[1].startswith("first failure: trial t1 with ValueError: bad input in the trial")


def test_every_registry_kind_has_its_ray_tune_wiring():
    from prunetune.methods.registry import METHODS
    from prunetune.search.tuner import TUNE_KINDS, tune_kind

    assert {spec.kind for spec in METHODS.values()} <= set(TUNE_KINDS)
    assert all(callable(tune_kind(spec).search_algorithm) for spec in METHODS.values())


def test_ray_tunes_per_attempt_failure_logs_are_dropped_and_its_other_messages_kept():
    import logging

    from prunetune.search.ray_session import quiet_tune_logs

    quiet_tune_logs()
    quiet_tune_logs()  # idempotent: one filter
    logger = logging.getLogger("ray.tune.execution.tune_controller")
    assert len(logger.filters) == 1

    def record(msg):
        return logging.LogRecord(logger.name, logging.ERROR, __file__, 1, msg, (), None)

    assert not logger.filter(record("Trial task failed for trial policy_trainable_1"))
    assert logger.filter(record("No trial is running and no new trial has been started"))


def test_ray_tunes_restore_hint_and_metrics_fetch_noise_are_dropped():
    """They contradict prunetune's own `prunetune resume RUN_DIR` (issue 17, item 7)."""
    import logging

    from prunetune.search.ray_session import quiet_tune_logs

    quiet_tune_logs()
    for name, msg in (("ray.tune.tune", "Experiment has been interrupted, but the most recent state was saved.\n"
                                        "Resume experiment with: Tuner.restore(path=\"/r\", trainable=...)"),
                      ("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics for 1 trial(s):\n...")):
        logger = logging.getLogger(name)
        assert not logger.filter(logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (), None))


def test_an_autoscaler_is_told_from_the_monitor_every_ray_head_runs():
    from prunetune.search.ray_session import _configured_node_types

    plain = b'{"autoscaler_report": {"node_type_mapping": {"8a5c": "node_8a5c", "77f1": "node_77f1"}}}'
    scaling = b'{"autoscaler_report": {"node_type_mapping": {"8a5c": "ray.head.default", "77f1": "gpu_workers"}}}'
    assert not _configured_node_types(plain) and not _configured_node_types(b"{}")
    assert _configured_node_types(scaling)
