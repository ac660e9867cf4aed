"""Helpers for the learner tests: run a learner trial keeping every checkpoint, and cut it short."""

from __future__ import annotations

from pathlib import Path


class Interrupted(RuntimeError):
    """Raised from a report to stop a trial as a kill would."""


def run_and_keep_checkpoints(setup, job, config, folder: Path, *, stop_after: int | None = None, stop_when=None,
                             checkpoint_dir=None):
    """Run a learner trial, every checkpoint written to ``folder/<n>``; stop after ``stop_after`` reports
    or once ``stop_when(report)``. Returns (the result, or None when stopped; the reports)."""
    from prunetune.search.learner_trial import run_learner_trial

    reports = []

    def report(metrics, write_checkpoint):
        reports.append(metrics)
        if write_checkpoint is not None:
            target = folder / str(len(reports))
            target.mkdir(parents=True)
            write_checkpoint(target)
        if len(reports) == stop_after or (stop_when is not None and stop_when(metrics)):
            raise Interrupted

    try:
        result = run_learner_trial(setup, job, config, seed=0, report=report, checkpoint_dir=checkpoint_dir)
    except Interrupted:
        result = None
    return result, reports
