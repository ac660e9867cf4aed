"""Tracking URIs: the default local store, and a fast check that a store can be used.

MLflow 3 refuses the plain file store, so the local default is an SQLite database in the storage
directory. ``check_tracking_uri`` creates nothing and answers in seconds: MLflow's own HTTP client retries a dead
server for minutes, so the server is probed with a plain ``GET /health`` first.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from prunetune.pruning.errors import UserError

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
HTTP_SCHEMES = ("http", "https")
_FIX = "use sqlite:///<abs dir>/mlflow.db or the http(s):// address of a running `mlflow server`"


def default_tracking_uri(storage_dir: str | os.PathLike[str]) -> str:
    """The local default store: ``sqlite:///<absolute storage_dir>/mlflow.db``."""
    return f"sqlite:///{Path(storage_dir).expanduser().resolve() / 'mlflow.db'}"


def same_store(first: str, second: str) -> bool:
    """Whether two tracking URIs name one store: one sqlite file however its path is spelled
    (relative or absolute, ``sqlite:///`` or ``sqlite:////``), else the same URI."""
    if uri_scheme(first) == uri_scheme(second) == "sqlite":
        return sqlite_file(first) == sqlite_file(second)
    return first.rstrip("/") == second.rstrip("/")


def sqlite_file(uri: str) -> Path:
    """The absolute database file of an sqlite URI, as SQLAlchemy reads it.

    ``sqlite:////abs/mlflow.db`` is absolute, ``sqlite:///rel/mlflow.db`` is relative to the cwd;
    ``sqlite://`` and ``sqlite:///:memory:`` are in-memory databases no other process sees.
    """
    path = uri.removeprefix("sqlite://").removeprefix("/").split("?", 1)[0]
    if path in ("", ":memory:"):
        raise UserError(f"tracking URI {uri!r} is an in-memory database that no other process sees; {_FIX}")
    return Path(path).expanduser().resolve()


def uri_scheme(uri: str) -> str:
    """The scheme of a tracking URI without a driver suffix: ``postgresql+psycopg2`` -> ``postgresql``."""
    return urlsplit(uri).scheme.split("+", 1)[0].lower()


def check_tracking_uri(uri: str, *, timeout_s: float = 5, folder_may_be_missing: bool = False) -> None:
    """Raise ``UserError`` unless ``uri`` names a tracking store this process can write to.

    Nothing is created: a check that passes may still be followed by a refusal of something else.
    sqlite: the database's folder must exist and be writable (``folder_may_be_missing``: the default
    store in --storage, which the run creates, so the nearest existing folder above it must be
    writable), and an existing database must open. http(s): ``GET <uri>/health`` must answer 200
    within ``timeout_s``, then one API call must succeed. Other SQL databases: one API call.
    The plain file store and other schemes are refused.
    """
    scheme = uri_scheme(uri)
    if scheme in ("", "file"):
        raise UserError(f"tracking URI {uri!r} is a plain file store, which MLflow 3 refuses; {_FIX}")
    if scheme not in SQL_SCHEMES + HTTP_SCHEMES:
        raise UserError(
            f"tracking URI {uri!r} has unsupported scheme {scheme!r} (use one of "
            f"{', '.join(SQL_SCHEMES + HTTP_SCHEMES)}); {_FIX}"
        )
    if scheme == "sqlite" and not _check_sqlite_folder(uri, folder_may_be_missing=folder_may_be_missing):
        return  # a new database: MLflow creates it, and its tables, on first use
    if scheme in HTTP_SCHEMES:
        _check_health(uri, timeout_s)
    _check_api(uri)


def _check_sqlite_folder(uri: str, *, folder_may_be_missing: bool) -> bool:
    """Prove the database's folder writable without creating anything; whether the database exists."""
    path = sqlite_file(uri)
    folder = path.parent
    if not folder.is_dir():
        if not folder_may_be_missing:
            raise UserError(f"tracking database folder {str(folder)!r} does not exist; create it first, or "
                            f"choose an existing folder, e.g. {default_tracking_uri('runs')}")
        folder = nearest_existing(folder)
        if not writable_folder(folder):
            raise UserError(f"tracking database {str(path)!r} cannot be created: {str(folder)!r} is not a "
                            f"writable folder; choose a writable --storage or --tracking-uri")
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if path.exists():
            with path.open("ab"):
                pass
    except OSError as error:
        raise UserError(
            f"tracking database {str(path)!r} cannot be written ({error.strerror or error}); "
            f"choose a writable folder, e.g. {default_tracking_uri('runs')}"
        ) from None
    return path.exists()


def make_sqlite_folder(uri: str) -> None:
    """Create the folder of an sqlite store (after ``check_tracking_uri``), where a command makes a new one."""
    if uri_scheme(uri) == "sqlite":
        sqlite_file(uri).parent.mkdir(parents=True, exist_ok=True)


def nearest_existing(path: Path) -> Path:
    """``path`` or the nearest of its parents that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_folder(folder: Path) -> bool:
    """Whether ``folder`` is a folder this process can create files in (tried with a temporary file,
    which is removed: permission bits do not tell for root or on read-only file systems)."""
    if not folder.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _check_health(uri: str, timeout_s: float) -> None:
    """``GET <uri>/health`` with a hard timeout: connection refused or silence is a UserError."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(
            f"no MLflow tracking server answers at {uri} ({reason}); start one with "
            f"`mlflow server --backend-store-uri sqlite:///<dir>/mlflow.db`, or use a local sqlite:/// URI"
        ) from None
    if status != 200:
        raise UserError(f"{url} answered HTTP {status}, not an MLflow server's 200; check the tracking URI")


def _check_api(uri: str) -> None:
    """One cheap API call through MLflow's client, so schema and auth problems surface now."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from prunetune.tracking.client import quiet_store_creation

    quiet_store_creation()
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except (MlflowException, OSError, ImportError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"tracking store {uri} cannot be used: {first_line}; {_FIX}") from None
