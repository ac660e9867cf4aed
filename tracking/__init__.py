"""MLflow: parent and child runs, sync from the run directory, compare, plots.

The run directory is the source of truth; MLflow is a view of it. ``Tracker`` logs a search as it
runs (one parent run, one child run per trial, found again by tags, never duplicated);
``sync_run_dir`` rebuilds or completes that view afterwards. Only this package imports mlflow, and
only inside functions, so importing it is cheap.
"""

from prunetune.tracking.pareto import pareto_front
from prunetune.tracking.plots import plot_pareto
from prunetune.tracking.sync import SyncReport, sync_run_dir
from prunetune.tracking.tracker import Tracker
from prunetune.tracking.uri import check_tracking_uri, default_tracking_uri

__all__ = [
    "SyncReport",
    "Tracker",
    "check_tracking_uri",
    "default_tracking_uri",
    "pareto_front",
    "plot_pareto",
    "sync_run_dir",
]
