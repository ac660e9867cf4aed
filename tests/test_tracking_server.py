"""The Tracker against a real `mlflow server` subprocess: runs and proxied artifacts over HTTP.

One server for the module, started in its own process group and killed with it: the fixture's
teardown asserts that no process of the group is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tracking import Tracker, check_tracking_uri

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90


@dataclass(frozen=True)
class Server:
    uri: str
    artifacts: Path
    pid: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the process group that are not zombies (a zombie has exited; only its parent can reap it)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid pgrp ...
        if entry.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_for_health(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def group_gone(process: subprocess.Popen, within_s: float) -> bool:
    """Wait up to ``within_s`` for the leader to exit and every process of its group to be gone."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None and not live_group_members(process.pid):
            return True
        time.sleep(0.1)
    return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if anything is left after 10 s, reap the leader."""
    pgid = process.pid  # start_new_session made the server the leader of its own group
    for sig, grace_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        if group_gone(process, grace_s):
            break
    process.wait(timeout=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow_server")
    artifacts = root / "artifacts"
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_for_health(f"http://127.0.0.1:{port}/health", process, log)
        yield Server(uri=f"http://127.0.0.1:{port}", artifacts=artifacts, pid=process.pid)
    finally:
        stop_group(process)
        assert process.poll() is not None, "mlflow server still running"
        assert not live_group_members(process.pid), "a process of the mlflow server's group is still alive"


def test_tracker_logs_parent_and_child_through_a_real_server(server: Server, tmp_path: Path) -> None:
    check_tracking_uri(server.uri, timeout_s=5)
    tracker = Tracker(server.uri, "prunetune-server")
    parent = tracker.start_parent("server-uid", "served", {"model": {"name": "resnet20"}})
    policy = {"space_id": "s", "keep_ratios": {"layer1": 0.5}, "dropped_blocks": []}
    record = {
        "trial_id": "trial_000", "trial_key": "k0", "status": "finished", "policy": policy,
        "params": {"method": "random", "seed": 0},
        "metrics": {"val_accuracy": 0.8, "macs": 2.0e7, "macs_ratio": 0.5},
        "history": [{"epoch": 0, "val_accuracy": 0.7}, {"epoch": 1, "val_accuracy": 0.8}],
        "node": "n0", "seconds": 2.0,
    }  # fmt: skip
    child = tracker.log_trial(parent, record)
    assert tracker.log_trial(parent, record) == child
    tracker.finish_parent(parent, {"best": {"trial_id": "trial_000", "val_accuracy": 0.8, "policy": policy}})

    reader = Tracker(server.uri, "prunetune-server")  # a second client reads back what the first wrote
    assert reader.find_parent("server-uid") == parent
    run = reader.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["prunetune.logged"] == "1"
    assert run.data.params["keep.layer1"] == "0.5" and run.data.metrics["val_accuracy"] == 0.8
    assert list(reader.trial_runs(parent)) == ["k0"]
    assert reader.client.get_run(parent).info.status == "FINISHED"

    downloaded = Path(reader.client.download_artifacts(child, "policy.json", str(tmp_path)))
    assert json.loads(downloaded.read_text()) == policy
    on_server_disk = {path.name for path in server.artifacts.rglob("*") if path.is_file()}
    assert {"policy.json", "config.yaml", "summary.json", "best_policy.json"} <= on_server_disk
