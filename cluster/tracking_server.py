"""The MLflow tracking server of a cluster: ``mlflow server`` on the head, loopback by default.

Started as a subprocess (nothing here imports mlflow), in a session of its own, with one worker and
MLflow's job execution off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: it then starts in seconds
in about 0.5 GB). The backend store URI goes through the environment (``MLFLOW_BACKEND_STORE_URI``),
so a database password never shows in ``ps``. Artifacts are proxied: clients upload through the
server to ``--artifacts-destination``, so no client needs the server's disk.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from prunetune.cluster.processes import ProcessRecord, is_running, spawn, stop, tail
from prunetune.pruning.errors import UserError

START_TIMEOUT_S = 90.0


def server_uri(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def mlflow_server_command(*, host: str, port: int, artifacts: Path) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
            "--artifacts-destination", str(artifacts)]


def launch_tracking_server(*, host: str, port: int, backend_uri: str, artifacts: Path, log: Path,
                           env: Mapping[str, str] | None = None) -> ProcessRecord:
    """Start ``mlflow server`` on ``host:port`` over ``backend_uri`` in the background."""
    artifacts.mkdir(parents=True, exist_ok=True)
    server_env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                  "MLFLOW_BACKEND_STORE_URI": backend_uri}
    return spawn("mlflow server", mlflow_server_command(host=host, port=port, artifacts=artifacts),
                 log=log, env=server_env)


def start_tracking_server(*, host: str, port: int, backend_uri: str, artifacts: Path, log: Path,
                          env: Mapping[str, str] | None = None,
                          timeout_s: float = START_TIMEOUT_S) -> ProcessRecord:
    """Start ``mlflow server`` on ``host:port`` over ``backend_uri`` and wait until it answers."""
    record = launch_tracking_server(host=host, port=port, backend_uri=backend_uri, artifacts=artifacts,
                                    log=log, env=env)
    try:
        wait_healthy(server_uri(host, port), record, timeout_s=timeout_s)
    except BaseException:
        stop([record])
        raise
    return record


def healthy(uri: str, *, timeout_s: float = 1.0) -> bool:
    """Whether ``GET <uri>/health`` answers 200."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def wait_healthy(uri: str, record: ProcessRecord, *, timeout_s: float) -> None:
    """Wait until the server answers its health check; one that exits or stays silent is a UserError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(uri):
            return
        if not is_running(record):
            raise UserError(f"the MLflow server exited while starting; its log {record.log} ends: "
                            f"{tail(Path(record.log))}")
        time.sleep(0.25)
    raise UserError(f"the MLflow server at {uri} did not answer within {timeout_s:.0f} s; see its log "
                    f"{record.log}: {tail(Path(record.log))}")
