"""Rebuild or complete the MLflow view of a search from its run directory (``prunetune sync``).

The run directory is the source of truth. A sync finds the parent run by the search's ``run_uid``
(creating it if missing), logs every trial of ``trials.jsonl`` that has no complete child run yet,
the test accuracies of the Pareto front and, once ``summary.json`` exists, the summary. Run it as
often as you like: what is already in MLflow is never logged twice.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.tracking.rundir import PARETO_PNG, RunDirContents, read_run_dir, write_parent_run_id
from prunetune.tracking.tags import TAG_LOGGED
from prunetune.tracking.tracker import Tracker
from prunetune.tracking.uri import check_tracking_uri, make_sqlite_folder, same_store


@dataclass(frozen=True)
class SyncReport:
    """What a sync did: the parent run, whether it was created, and how many trials were logged."""

    parent_run_id: str
    created_parent: bool
    trials_logged: int
    trials_already_present: int


def sync_run_dir(run_dir: Path, *, tracking_uri: str | None = None) -> SyncReport:
    """Make MLflow show everything ``run_dir`` holds; return what was done.

    ``tracking_uri`` defaults to the run directory's own. When the sync creates the parent in that
    store, its id is written to ``prunetune.json``; a sync into another store leaves the file alone.
    Without a ``summary.json`` (a search still running, or interrupted) the parent keeps its status,
    or is marked KILLED if this sync created it.
    """
    run_dir = Path(run_dir)
    contents = read_run_dir(run_dir)
    meta = contents.meta
    uri = tracking_uri or meta["tracking_uri"]
    check_tracking_uri(uri, folder_may_be_missing=True)  # a sync may start a new store
    make_sqlite_folder(uri)
    tracker = Tracker(uri, meta["experiment"])

    existing_id = tracker.find_parent(meta["run_uid"])
    prior_status = tracker.client.get_run(existing_id).info.status if existing_id else "KILLED"
    tags = {"prunetune.method": str(meta.get("method", "")), "prunetune.run_dir": str(run_dir.resolve())}
    parent_id = tracker.start_parent(meta["run_uid"], meta["name"], contents.config, tags=tags)
    if contents.space is not None:
        tracker.log_space(parent_id, contents.space, (contents.summary or {}).get("baseline") or {})
    logged, present = _sync_trials(tracker, parent_id, contents.trials)
    _sync_search_path(tracker, parent_id, contents.search_path)
    if contents.summary is not None:
        _sync_summary(tracker, parent_id, run_dir, contents)
    else:
        tracker.set_status(parent_id, prior_status)

    if same_store(uri, meta["tracking_uri"]) and meta.get("parent_run_id") != parent_id:
        write_parent_run_id(run_dir, parent_id)
    return SyncReport(
        parent_id, created_parent=existing_id is None, trials_logged=logged, trials_already_present=present
    )


def _sync_search_path(tracker: Tracker, parent_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Log each round of a step-wise searcher's path (``search.<name>`` at step ``round``) that the
    parent run lacks; a round already there is left alone."""
    from prunetune.search.search_path import path_metrics
    from prunetune.tracking.names import mlflow_key

    rows = list(rows)
    if not rows:
        return
    keys = {key for row in rows for key in path_metrics(row)}
    logged = {key: {m.step for m in tracker.client.get_metric_history(parent_id, mlflow_key(key))} for key in keys}
    for row in rows:
        missing = {key: value for key, value in path_metrics(row).items() if row["round"] not in logged[key]}
        if missing:
            tracker.log_parent_step(parent_id, missing, step=int(row["round"]))


def _sync_trials(tracker: Tracker, parent_id: str, trials: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """Log each trial without a complete child run; return (logged, already present)."""
    complete = {
        key for key, run in tracker.trial_runs(parent_id).items() if run.data.tags.get(TAG_LOGGED) == "1"
    }
    logged = present = 0
    for record in trials:
        if record["trial_key"] in complete:
            present += 1
            continue
        tracker.log_trial(parent_id, record)
        complete.add(record["trial_key"])
        logged += 1
    return logged, present


def _sync_summary(tracker: Tracker, parent_id: str, run_dir: Path, contents: RunDirContents) -> None:
    """Log the Pareto trials' test accuracies, then the summary with its plot, and finish the parent."""
    summary = contents.summary or {}
    key_of = {record.get("trial_id"): record["trial_key"] for record in contents.trials}
    best = summary.get("best") or {}
    for point in [*(summary.get("pareto") or []), best]:
        key = key_of.get(point.get("trial_id"))
        if key is not None and point.get("test_accuracy") is not None:
            tracker.log_test_accuracy(parent_id, key, point["test_accuracy"])
    with tempfile.TemporaryDirectory() as folder:
        png = run_dir / PARETO_PNG
        if not png.is_file():
            png = _render_pareto(contents, Path(folder) / PARETO_PNG)
        tracker.finish_parent(parent_id, summary, status="FINISHED", pareto_png=png)


def _render_pareto(contents: RunDirContents, out_png: Path) -> Path:
    """Draw the Pareto plot from the trial records and the summary (as the search draws it)."""
    from prunetune.tracking.plots import plot_search

    return plot_search(contents.trials, contents.summary or {}, out_png)
