"""Where one trial's time goes: seconds per phase, recorded in the trial's result and ``trials.jsonl``.

A trial (``search.trial.run_trial``) times its own phases; the driver adds the two it sees
(``search.callbacks.TrialRecorder``): ``scheduling`` (the trial created by the searcher until its
trainable started) and ``logging`` (the driver's record of it in the run directory; its MLflow
child run is logged after that record is written, so it is not in it).
A learner's trial (``search.learner_trial``: dcm, dcpa, cdp-dtc) also has ``learning``: the
seconds its learner trained to find the policy, every attempt's, before the policy trial's phases.
``prunetune status --timing`` shows them (``timing_table``). Whatever no phase names (the last report
call, the result's hand-over, a new worker's imports) is ``other``: the trial's wall time less its
phases. A trial's *overhead* is everything but learning, training and evaluation (the trial's work),
the driver's phases included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

# In the order a trial runs them; ``scheduling`` and ``logging`` are the driver's.
TRIAL_PHASES = ("load", "prune", "bn_recalibration", "train", "evaluate", "latency", "checkpoint", "report")
LEARNING = "learning"  # a learner's trial only, before the others
WORKER_PHASES = (LEARNING, *TRIAL_PHASES)  # what the trial's own process times (``PhaseTimer``)
PHASES = ("scheduling", *WORKER_PHASES, "logging")
WORK_PHASES = (LEARNING, "train", "evaluate")  # the trial's work; every other second is overhead
RESUMED_KEY = "resumed"  # in a timing: the trial continued from a checkpoint; its phases sum every attempt's


class PhaseTimer:
    """Seconds per named phase, summed over every time a phase runs (each epoch's training, ...).

    ``start`` is this attempt's ``perf_counter`` at creation; a retried trial continues, with
    :meth:`resume`, the timing its interrupted attempt saved in its checkpoint.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.started_at = time.time()  # the driver's ``scheduling`` ends here (same clock on one machine)
        self.seconds: dict[str, float] = {}
        self.resumed = False

    def resume(self, earlier: Mapping | None) -> None:
        """Continue the timing an earlier attempt saved in its checkpoint (None: it saved none)."""
        self.resumed = True
        self.started_at = min(self.started_at, float((earlier or {}).get("started_at") or self.started_at))
        for name, seconds in (earlier or {}).items():
            if name in WORKER_PHASES or name == "wall":
                self.add(name, float(seconds))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timed(self, name: str, function: Callable | None) -> Callable | None:
        """``function`` (or None) wrapped so that each of its calls counts towards ``name``."""
        if function is None:
            return None

        def timed_call(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return timed_call

    def to_json(self) -> dict:
        """``{phase: seconds}`` with ``wall`` (this attempt's and the earlier ones'), ``started_at``
        (the first attempt's Unix time) and ``resumed``."""
        wall = self.seconds.get("wall", 0.0) + time.perf_counter() - self.start
        phases = {k: round(self.seconds[k], 4) for k in WORKER_PHASES if k in self.seconds}
        return {**phases, "wall": round(wall, 4), "started_at": round(self.started_at, 3),
                **({RESUMED_KEY: True} if self.resumed else {})}


def driver_timing(timing: Mapping | None, *, created: float | None, logging_s: float) -> dict | None:
    """A trial's ``timing`` with the driver's phases: ``scheduling`` (``created``, the Unix time the
    driver first saw the trial, to the trial's ``started_at``) and ``logging``; None without one."""
    if not timing:
        return None
    scheduling = max(0.0, float(timing["started_at"]) - created) if created and timing.get("started_at") else None
    return {**({"scheduling": round(scheduling, 4)} if scheduling is not None else {}), **timing,
            "logging": round(logging_s, 4)}


def other_seconds(timing: Mapping) -> float:
    """The trial's wall time its phases do not account for (its last report, Ray's hand-over, imports)."""
    return max(0.0, float(timing.get("wall") or 0.0) - sum(float(timing.get(k) or 0.0) for k in WORKER_PHASES))


def overhead_seconds(timing: Mapping) -> float:
    """A trial's seconds beyond its work (learning, training, evaluation): its wall time and the
    driver's phases, less those."""
    driver = sum(float(timing.get(k) or 0.0) for k in ("scheduling", "logging"))
    return max(0.0, driver + float(timing.get("wall") or 0.0) - sum(float(timing.get(k) or 0.0) for k in WORK_PHASES))


HEADERS = {"scheduling": "sched", "learning": "learn", "bn_recalibration": "bn_recal", "checkpoint": "ckpt",
           "evaluate": "eval"}


def timing_table(records: Sequence[Mapping]) -> str:
    """The ended trials' phases in seconds, a row each (those that recorded a timing), and their mean."""
    rows = [(r["trial_id"], r["timing"]) for r in records if r.get("timing")]
    if not rows:
        return "no ended trial recorded a timing (none ended yet, or a prunetune older than the timing ran them)"
    columns = [*PHASES, "other", "wall", "overhead"]
    lines = ["seconds per phase (sched = created to started, learn = a learner's, logging = the driver's "
             "record); wall = the trial's own process; overhead = sched + wall + logging less learn, train and eval "
             "(so it may exceed wall); R = resumed from a checkpoint",
             f"{'trial':<12}" + "".join(f"{HEADERS.get(c, c):>9}" for c in columns)]

    def cells(timing: Mapping) -> str:
        values = [timing.get(c) for c in PHASES] + [other_seconds(timing), timing.get("wall"), overhead_seconds(timing)]
        return "".join(f"{'-' if v is None else f'{v:.3f}':>9}" for v in values)

    for trial_id, timing in rows:
        lines.append(f"{trial_id + (' R' if timing.get(RESUMED_KEY) else ''):<12}" + cells(timing))
    mean = {c: sum(float(t.get(c) or 0.0) for _, t in rows) / len(rows) for c in (*PHASES, "wall")}
    lines.append(f"{'mean':<12}" + cells(mean))
    return "\n".join(lines)
