"""The search path: a searcher's per-round progress, logged as metrics of the parent MLflow run.

A searcher that moves step by step (ARPruning: the incumbent and the step d per round) lists its
rows in ``Searcher.search_path()``. The adapter hands each new row, once, to a ``SearchPathLogger``
on the driver, which logs its numbers as ``search.<name>`` metrics at step ``round`` of the
parent run, so the path can be plotted (``mlflow ui``: the parent run's metrics). Each row is
first appended to ``search_path.jsonl`` in the run directory, so a tracking failure only warns and
``prunetune sync`` logs the path again, into the run's store or another (``tracking.sync``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

METRIC_PREFIX = "search."


def path_metrics(row: Mapping) -> dict[str, float]:
    """A path row's numbers as metric names and values (``round`` is the step, not a metric)."""
    return {f"{METRIC_PREFIX}{key}": float(value) for key, value in row.items()
            if key != "round" and isinstance(value, int | float) and not isinstance(value, bool)}


class SearchPathLogger:
    """Logs path rows to the parent run through ``tracking.tracker.Tracker``; plain data, so Ray can
    pickle it with the search algorithm and a resumed search logs to the same parent run."""

    run_dir: str | None = None  # a logger pickled before rows were kept in the run directory has none

    def __init__(self, *, tracking_uri: str, experiment: str, parent_run_id: str | None,
                 run_dir: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.run_dir = run_dir
        self._tracker = None
        self._failed = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None, "_failed": False}

    def __call__(self, row: Mapping) -> None:
        if self.run_dir is not None:
            from prunetune.tracking.rundir import append_search_path

            try:
                append_search_path(Path(self.run_dir), dict(row))
            except OSError as exc:  # the search goes on: its searcher state keeps the path too
                print(f"prunetune: warning: could not keep the search path in {self.run_dir} ({exc.strerror or exc}); "
                      f"MLflow still gets it", file=sys.stderr)
        if self.parent_run_id is None or self._failed:
            return
        try:
            if self._tracker is None:
                from prunetune.tracking.tracker import Tracker

                self._tracker = Tracker(self.tracking_uri, self.experiment)
            self._tracker.log_parent_step(self.parent_run_id, path_metrics(row), step=int(row["round"]))
        except Exception as exc:  # noqa: BLE001 - the search goes on; its state keeps the path
            self._failed = True
            print(f"prunetune: warning: could not log the search path to MLflow at {self.tracking_uri} "
                  f"({type(exc).__name__}); the run directory keeps it, for `prunetune sync`",
                  file=sys.stderr)
