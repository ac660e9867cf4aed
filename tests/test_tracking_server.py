"""The Tracker against a real `mlflow server` subprocess: runs and proxied artifacts over HTTP.

One server for the module, started by the cluster's own code (cluster.tracking_server) in a session
of its own and stopped by PID: the fixture's teardown asserts that no process of it is left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prunetune.cluster.ports import free_ports
from prunetune.cluster.processes import session_members, stop
from prunetune.cluster.tracking_server import server_uri, start_tracking_server
from prunetune.tracking import Tracker, check_tracking_uri

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Server:
    uri: str
    artifacts: Path
    pid: int


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tracking_store) -> Iterator[Server]:
    root = tracking_store(tmp_path_factory.mktemp("mlflow_server"))  # a migrated empty store: a faster start
    artifacts = root / "artifacts"
    (port,) = free_ports(1)
    record = start_tracking_server(host="127.0.0.1", port=port, backend_uri=f"sqlite:///{root / 'mlflow.db'}",
                                   artifacts=artifacts, log=root / "server.log")
    try:
        yield Server(uri=server_uri("127.0.0.1", port), artifacts=artifacts, pid=record.pid)
    finally:
        stop([record])
        assert not session_members(record), "a process of the mlflow server is still alive"


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
