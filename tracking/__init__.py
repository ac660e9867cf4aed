"""MLflow: parent and child runs, sync from the run directory, compare, plots."""
