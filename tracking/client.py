"""An explicit MLflow client for one tracking URI, its experiment, and searches by tag.

Everything goes through ``MlflowClient(tracking_uri=...)``: no fluent API, no process-wide
tracking URI. MLflow is imported inside the functions, so importing ``tracking`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prunetune.pruning.errors import UserError
from prunetune.tracking.uri import sqlite_file, uri_scheme

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

SEARCH_PAGE_SIZE = 1000


def make_client(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` bound to ``tracking_uri``, creating an sqlite database's folder if needed."""
    import os

    from mlflow.tracking import MlflowClient

    # MLflow prints "View run ... at: URL" on stdout for every run it ends on a server; stdout is
    # the search's result table. The user's own setting wins.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for our messages
    if uri_scheme(tracking_uri) == "sqlite":
        sqlite_file(tracking_uri).parent.mkdir(parents=True, exist_ok=True)
    quiet_store_creation()
    return MlflowClient(tracking_uri=tracking_uri)


def quiet_store_creation() -> None:
    """Keep MLflow's INFO lines about creating and migrating a new sqlite store's tables ("Creating
    initial MLflow database tables...") off stderr: a first search in an empty folder printed them
    among its own lines. Its warnings and errors still show."""
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``<db folder>/mlartifacts`` for sqlite.

    Without it MLflow puts an sqlite store's artifacts under ``./mlruns`` of whatever the current
    directory is. Servers and other databases choose for themselves (None).
    """
    if uri_scheme(tracking_uri) != "sqlite":
        return None
    return (sqlite_file(tracking_uri).parent / "mlartifacts").as_uri()


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if missing; a deleted one is a UserError."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
        except MlflowException as error:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise error from None
    if experiment.lifecycle_stage != "active":
        raise UserError(
            f"MLflow experiment {name!r} is deleted in {tracking_uri}; restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or pick another name"
        )
    return experiment.experiment_id


def quoted(value: str) -> str:
    """``value`` as a single-quoted string literal for an MLflow search filter."""
    if "'" in value or "\\" in value:
        raise ValueError(f"cannot search MLflow for a value with quotes or backslashes: {value!r}")
    return f"'{value}'"


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow filter string matching every ``tag = value`` of ``tags``."""
    return " and ".join(f"tags.`{key}` = {quoted(value)}" for key, value in tags.items())


def search_runs_by_tags(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> list[Run]:
    """Every active run of the experiment carrying all of ``tags``, oldest first, across all pages."""
    runs: list[Any] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=tag_filter(tags),
            max_results=SEARCH_PAGE_SIZE,
            order_by=["attributes.start_time ASC"],
            page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs
