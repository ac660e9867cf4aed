"""Ray Tune callbacks on the driver: the run directory's trial log, MLflow, and the progress line.

``TrialRecorder`` appends each finished trial to ``trials.jsonl`` (once, whatever Ray replays on
resume; through ``tracking.rundir``, which owns the format) and logs it as an MLflow child run. The run directory is the source of truth: if MLflow
is unreachable mid-search the trial is still recorded, a warning says so, and ``prunetune sync``
fills MLflow in later. MLflow is logged on a thread of the recorder's, so a trial's logging never
holds up the next trial's start; the driver waits for it before the summary. Both callbacks pickle
as plain data (the thread and its queue are left out), so Ray can pickle them with the tuner and
``prunetune resume`` gets them back.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from pathlib import Path

from ray.tune import Callback

from prunetune.search.timing import driver_timing
from prunetune.search.trainable import config_key
from prunetune.search.trial import CHECKPOINT_MODEL, COMPLETE_KEY, REUSED_KEY
from prunetune.tracking.names import fidelity_of
from prunetune.tracking.rundir import (
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_STOPPED,
    TRIALS_FILE,
    append_trial,
    file_sha256,
    local_checkpoint,
    read_trials,
    relative_checkpoint,
)

RECORDED_METRICS = ("val_accuracy", "val_loss", "train_loss", "macs", "params", "latency_ms",
                    "latency_median_ms", "latency_iqr_ms", "latency_repeats", "latency_load_avg", "latency_cpus",
                    "macs_ratio", "params_ratio", "latency_ratio", "epoch")
SEARCHER_KEYS = ("policy", "proposal_id", "estimated_macs_ratio")


def trial_record(run_uid: str, trial, status: str, *, params: dict) -> dict:
    """One line of ``trials.jsonl`` for a Ray trial: identity, policy, metrics, history, node, device, time."""
    result = trial.last_result or {}
    config = trial.config or {}
    metrics = {k: float(result[k]) for k in RECORDED_METRICS if isinstance(result.get(k), int | float)}
    trial_params = {k: v for k, v in config.items() if k not in SEARCHER_KEYS and _scalar(v)}
    return {
        "trial_id": trial.trial_id,
        "trial_key": f"{run_uid}:{trial.trial_id}",
        "status": status,
        "policy": config.get("policy") or result.get("policy"),  # a learner's trial reports its learned policy
        "params": {**params, **trial_params},
        "fidelity": fidelity_of(trial_params),  # full, or proxy (a searcher's or a two-stage search's short score)
        "metrics": metrics,
        "test_accuracy": result.get("test_accuracy") if status == STATUS_FINISHED else None,
        "history": result.get("history") or [],
        "node": result.get("node", ""),
        "device": result.get("device", ""),
        "seconds": float(result.get("trial_seconds") or result.get("time_total_s") or 0.0),
        "config_key": config_key(config),
        "checkpoint": relative_checkpoint(trial.checkpoint.path) if getattr(trial, "checkpoint", None) else None,
        **({"learning": result["learning"]} if result.get("learning") else {}),  # a learner's trajectory
        **({"timing": result["timing"]} if result.get("timing") else {}),  # seconds per phase (search.timing)
    }


def ended_status(trial) -> str:
    """``finished`` for a trial that ran to its end (its last report says so), else ``stopped`` (by ASHA)."""
    return STATUS_FINISHED if (trial.last_result or {}).get(COMPLETE_KEY) else STATUS_STOPPED


def reusable_results(records) -> dict:
    """The results of ended (finished or stopped) trials, for ``TrialSetup.recorded`` on resume.

    ``{"by_id": {trial_id: result}, "by_config": {config_key: result}}``: a trial Ray restores with
    its id, or one the restored searcher proposes again with the same config, reports this result
    instead of training again (``search.trainable``).
    """
    by_id, by_config = {}, {}
    for r in records:
        if r.get("status") not in (STATUS_FINISHED, STATUS_STOPPED) or not r.get("metrics"):
            continue
        result = {**r["metrics"], "test_accuracy": r.get("test_accuracy"), "history": r.get("history") or [],
                  "policy": r.get("policy"), COMPLETE_KEY: r["status"] == STATUS_FINISHED,
                  "trial_seconds": r.get("seconds", 0.0), REUSED_KEY: r["trial_id"],
                  **({"learning": r["learning"]} if r.get("learning") else {})}
        by_id[r["trial_id"]] = result
        if r.get("config_key"):
            by_config[r["config_key"]] = result
    return {"by_id": by_id, "by_config": by_config}


def _scalar(value) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


class TrialRecorder(Callback):
    """Appends finished, stopped and failed trials to ``trials.jsonl`` and logs them to MLflow."""

    def __init__(self, run_dir: Path, run_uid: str, *, tracking_uri: str, experiment: str,
                 parent_run_id: str | None, params: dict):
        self.run_dir = Path(run_dir)
        self.run_uid = run_uid
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.params = dict(params)
        self._tracker = None
        self._tracking_failed = False
        self._created: dict[str, float] = {}  # trial id -> Unix time this driver first saw it (its scheduling)
        self._queue: queue.Queue | None = None  # records for MLflow, logged in order by ``_worker``
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None, "_tracking_failed": False, "_queue": None, "_worker": None}

    def __setstate__(self, state: dict) -> None:  # a recorder pickled before ``_created`` existed
        self.__dict__.update({"_created": {}, "_queue": None, "_worker": None, **state})

    def on_step_end(self, iteration, trials, **info) -> None:
        for trial in trials:  # a trial appears here in the step the searcher created it
            if trial.trial_id not in self._created:
                self._created[trial.trial_id] = time.time()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from prunetune.search.failures import trial_cause

        self.record({**trial_record(self.run_uid, trial, STATUS_FAILED, params=self.params),
                     "error": trial_cause(trial)})  # Type: first line; the traceback is the trial's error.txt

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if result.get(REUSED_KEY):  # a resumed trial that handed back its recorded result: already here
            return
        self.record(trial_record(self.run_uid, trial, ended_status(trial), params=self.params))

    def record(self, record: dict) -> None:
        """Append ``record`` (with its checkpoint's digest) unless its trial is already there, then log it.

        Its ``timing`` gains the driver's phases: ``scheduling``, and ``logging``, the seconds this
        took until the line was written (the checkpoint's digest). MLflow is logged after the line,
        on a thread of its own (:meth:`log_later`): a child run costs the driver a few tenths of a
        second, during which Ray Tune's loop, which runs this callback, would start no trial.
        """
        started = time.perf_counter()
        if record.get("checkpoint"):
            model = local_checkpoint(self.run_dir, record["checkpoint"]) / CHECKPOINT_MODEL
            record = {**record, "checkpoint_sha256": file_sha256(model) if model.is_file() else None}
        if record.get("timing"):
            record = {**record, "timing": driver_timing(record["timing"], created=self._created.get(record["trial_id"]),
                                                        logging_s=time.perf_counter() - started)}
        if append_trial(self.run_dir, record):
            self.log_later(record)

    def log_later(self, record: dict) -> None:
        """Queue ``record`` for MLflow; one thread logs the queue in order (``flush`` waits for it).

        A driver killed before the queue is logged leaves those trials in ``trials.jsonl`` only:
        ``prunetune resume`` and ``prunetune sync`` log them, as they do a trial whose logging failed.
        """
        if self.parent_run_id is None or self._tracking_failed:
            return
        if self._worker is None or not self._worker.is_alive():
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._log_queued, args=(self._queue,), daemon=True,
                                            name="prunetune-mlflow")
            self._worker.start()
        self._queue.put(record)

    def _log_queued(self, records: queue.Queue) -> None:
        while (record := records.get()) is not None:
            self.log_to_mlflow(record)

    def flush(self) -> None:
        """Wait until every queued record is logged to MLflow (or its logging failed)."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()
        self._worker = self._queue = None

    def on_experiment_end(self, trials, **info) -> None:
        self.flush()

    def log_to_mlflow(self, record: dict) -> None:
        if self.parent_run_id is None or self._tracking_failed:
            return
        try:
            if self._tracker is None:
                from prunetune.tracking.tracker import Tracker

                self._tracker = Tracker(self.tracking_uri, self.experiment)
            self._tracker.log_trial(self.parent_run_id, record)
        except Exception as exc:  # noqa: BLE001 - any tracking failure must not stop the search
            self._tracking_failed = True
            print(f"prunetune: warning: MLflow at {self.tracking_uri} failed ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); the run directory keeps every "
                  f"trial: run `prunetune sync {self.run_dir}` when it is back", file=sys.stderr)


class ProgressLine(Callback):
    """A concise progress display: done / running / pending, best so far, elapsed and ETA.

    On a terminal one line is redrawn in place; elsewhere one line is printed per ended trial: its
    score when it finished, the epoch ASHA stopped it after, or the first line of why it failed.
    The best so far is the summary's best (``search.summary.best_trial``: finished full-fidelity
    trials within ``macs_limit``), so a stopped trial's partial score or a proxy's never counts.
    A resumed search calls :meth:`resume` with the recorded trials: the count and the best start
    from them, and the clock and the estimate from the trials this process ends.
    """

    def __init__(self, total: int, *, metric: str = "val_accuracy", macs_limit: float = math.inf, stream=None):
        self.total = total
        self.metric = metric
        self.macs_limit = macs_limit  # the search's macs_target + macs_tolerance (``search.driver``)
        self.started = time.monotonic()
        self.best_record: dict | None = None  # the record of the best trial so far (``trial_record``'s)
        self.finished = 0
        self.session_finished = 0  # trials ended by this process: what the estimate divides by
        self.counted: set[str] = set()
        self._stream = stream

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}

    def __setstate__(self, state: dict) -> None:  # a ProgressLine pickled before these fields existed
        self.__dict__.update({"session_finished": 0, "counted": set(), "macs_limit": math.inf,
                              "best_record": None, **state})

    @property
    def best(self) -> float | None:
        """The best trial's validation accuracy so far, or None."""
        return None if self.best_record is None else self.best_record["metrics"]["val_accuracy"]

    def resume(self, records) -> None:
        """Start again from the trials of ``trials.jsonl``: count them, take their best, restart the clock."""
        ended = [r for r in records if r.get("trial_id")]
        self.counted = {r["trial_id"] for r in ended}
        self.finished = len(self.counted)
        self.best_record = None
        self._take_best(ended)
        self.started = time.monotonic()
        self.session_finished = 0

    def _take_best(self, records) -> None:
        """Keep the best of ``records`` and the best so far, by the summary's rule."""
        from prunetune.search.summary import best_trial

        candidates = [r for r in (self.best_record, *records) if r is not None]
        point = best_trial(candidates, macs_limit=self.macs_limit)
        self.best_record = next((r for r in candidates if point and r["trial_id"] == point["trial_id"]), None)

    @property
    def stream(self):
        return self._stream or sys.stderr

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trials, trial, ended_status(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trials, trial, STATUS_FAILED)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.stream.isatty():
            self._draw(trials)

    def _finish(self, trials, trial, status: str) -> None:
        if trial.trial_id in self.counted:  # recorded before a resume and handed back: counted already
            return
        self.counted.add(trial.trial_id)
        self.finished += 1
        self.session_finished += 1
        if status == STATUS_FINISHED:
            self._take_best([trial_record("", trial, status, params={})])
        if self.stream.isatty():
            self._draw(trials)
            return
        print(f"[{self.finished}/{self.total}] trial {trial.trial_id} {self._outcome(trial, status)}; "
              f"best {self._best()}; {self._elapsed()}", file=self.stream, flush=True)

    def _outcome(self, trial, status: str) -> str:
        """``done: <score>``, ``stopped early after epoch K: <score>`` or ``failed: <first line of the cause>``."""
        if status == STATUS_FAILED:
            from prunetune.search.failures import trial_cause

            return f"failed: {trial_cause(trial)}"
        result = trial.last_result or {}
        value, macs = result.get(self.metric), result.get("macs_ratio")
        score = f"{self.metric} {value:.4f}, MACs ratio {macs:.3f}" if isinstance(value, float) and macs else "no score"
        if status == STATUS_STOPPED:
            epoch = result.get("epoch")
            after = f" after epoch {int(epoch)}" if isinstance(epoch, int | float) else ""
            return f"stopped early{after}: {score}"
        return f"done: {score}"

    def _draw(self, trials) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING")
        pending = max(0, self.total - self.finished - running)
        line = (f"\r{self.finished}/{self.total} done, {running} running, {pending} pending | "
                f"best {self.metric} {self._best()} | {self._elapsed()}")
        print(line.ljust(100), end="", file=self.stream, flush=True)

    def _best(self) -> str:
        return "-" if self.best is None else f"{self.best:.4f}"

    def _elapsed(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{elapsed / 60:.1f} min elapsed"
        if self.session_finished:
            remaining = elapsed / self.session_finished * max(0, self.total - self.finished)
            text += f", ~{remaining / 60:.1f} min left"
        return text

    def on_experiment_end(self, trials, **info) -> None:
        if self.stream.isatty():
            print(file=self.stream)


def flush_recorders(tuner) -> None:
    """Wait for the ``TrialRecorder`` of ``tuner`` (new or restored) to log its queue to MLflow."""
    for callback in tuner._local_tuner.get_run_config().callbacks or []:  # where Ray keeps them
        if isinstance(callback, TrialRecorder):
            callback.flush()


def resume_progress(tuner, run_dir: Path) -> None:
    """Bring the ``ProgressLine`` that Ray restored with ``tuner`` up to the trials recorded in ``run_dir``.

    Ray pickled the callbacks when the search started, so without this the count restarts at 1 and
    the best and the estimate ignore every trial that ended before the interruption.
    """
    run_config = tuner._local_tuner.get_run_config()  # Ray keeps the restored callbacks only here
    records = read_trials(Path(run_dir) / TRIALS_FILE)
    for callback in run_config.callbacks or []:
        if isinstance(callback, ProgressLine):
            callback.resume(records)
