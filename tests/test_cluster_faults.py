"""Sweeps on a real local Ray cluster (a head and 2 one-CPU worker nodes) with a real MLflow server,
and the faults a cluster meets: a worker node lost mid-trial, the driver killed, the tracking server
down. Every test drives the real CLI in subprocesses; the last one stops the cluster and checks by PID
that nothing of it is left.

The tests share one cluster and run in file order: the node-loss test leaves one worker node, and
the last test stops the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest

from prunetune.cluster.local import start_tracking_server, stop_tracking_server
from prunetune.cluster.processes import ProcessRecord, signal_session, wait_gone
from tests.cluster_helpers import (
    all_members,
    base_env,
    cli,
    cluster_up,
    listening_sockets,
    still_running,
    wait_for,
)
from tests.search_helpers import QUICK, as_ended, mlflow_runs, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module; its worker nodes see a cache directory that must never be created."""
    work = tmp_path_factory.mktemp("cluster")
    node_env = base_env(work / "worker-cache-never-used")
    local = cluster_up(work, workers=2, node_env=node_env)
    local = replace(local, driver_env={**local.driver_env, "PRUNETUNE_CACHE": str(work / "cache")})
    try:
        yield local
    finally:
        cli(["cluster", "down", "--dir", str(local.dir)], env=node_env, cwd=work)


def _keys(children) -> list[str]:
    return sorted(c.data.tags["prunetune.trial_key"] for c in children)


def test_every_server_listens_on_loopback_and_ray_refuses_a_client_without_the_token(cluster):
    state = cluster.state()
    sockets = listening_sockets(list(all_members(state)))
    ports = {port for _, port in sockets}
    assert int(cluster.address.rsplit(":", 1)[1]) in ports and state["tracking"]["port"] in ports
    assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets
    assert state["auth"]["mode"] == "token" and cluster.driver_env["RAY_AUTH_MODE"] == "token"

    probe = ("import sys; from ray._raylet import GcsClient\n"
             "try:\n    GcsClient(address=sys.argv[1]).internal_kv_keys(b'', None, timeout=5); print('admitted')\n"
             "except Exception as e:\n    print('refused', type(e).__name__)")
    outsider = {**cluster.driver_env, "RAY_AUTH_MODE": "disabled"}
    refused = subprocess.run([sys.executable, "-c", probe, cluster.address], env=outsider, capture_output=True,
                             text=True, timeout=60)
    assert refused.stdout.split() == ["refused", "AuthenticationError"], refused.stdout + refused.stderr[-2000:]
    admitted = subprocess.run([sys.executable, "-c", probe, cluster.address], env=cluster.driver_env,
                              capture_output=True, text=True, timeout=60)
    assert admitted.stdout.split() == ["admitted"], admitted.stdout + admitted.stderr[-2000:]


def test_a_driver_without_the_clusters_token_is_refused_at_once(cluster):
    """Without RAY_AUTH_* ray.init retried for many minutes (against the machine's outward address):
    the driver says in one line which exports it needs, in seconds, and creates nothing."""
    import time

    env = {k: v for k, v in cluster.driver_env.items() if not k.startswith("RAY_AUTH")}
    started = time.monotonic()
    result = cli(["run", *QUICK, *cluster.sweep_args("no-token", experiment="no-token")], env=env, cwd=cluster.work,
                 timeout=120)
    assert time.monotonic() - started < 30
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "refused this driver's authentication" in lines[0] and "export RAY_AUTH_MODE=token" in lines[0]
    assert not (cluster.work / "runs" / "no-token").exists()


def test_a_trial_bigger_than_every_node_is_refused_once_joined(cluster):
    """Two CPUs per trial on one-CPU worker nodes would wait forever: refused with the cluster's sizes."""
    result = cluster.run(["run", *QUICK, *cluster.sweep_args("too-big", experiment="too-big"),
                          "--cpus-per-trial", "2"], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "--cpus-per-trial 2: no trial could start" in lines[0] and "at most 1 on one node" in lines[0]
    assert not (cluster.work / "runs" / "too-big").exists()


def test_a_sweep_spreads_over_the_nodes_and_survives_the_tracking_server_going_down(cluster):
    """Trials run on both worker nodes; with the server stopped mid-sweep and started again no trial
    fails, and `prunetune sync` completes MLflow: every trial exactly once."""
    name = "spread-outage"
    run_dir = cluster.work / "runs" / name
    log = cluster.work / f"{name}.log"
    driver = cluster.start(["run", *QUICK, *cluster.sweep_args(name, experiment=name), "--trials", "3",
                            "--concurrency", "2", "--finetune-epochs", "2", "--set", "finetune.batch_size=32"], log)
    try:
        wait_for(lambda: read_jsonl(run_dir / "trials.jsonl"), timeout_s=240, what="a first trial", log=log)
        stop_tracking_server(cluster.dir)
        wait_for(lambda: len(read_jsonl(run_dir / "trials.jsonl")) >= 2 or driver.poll() is not None,
                 timeout_s=240, what="a trial ending while the server is down", log=log)
        # MLflow is logged on a thread of its own, after MLflow's own retries: keep the server down
        # until the driver has said that logging failed, or a quick restart hides the outage
        wait_for(lambda: "MLflow at" in log.read_text() or driver.poll() is not None, timeout_s=120,
                 what="the driver saying MLflow failed", log=log)
        start_tracking_server(cluster.dir)
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 3 and all(r["status"] == "finished" for r in records), records
    nodes = {r["node"].split("/")[1] for r in records}
    assert nodes == set(cluster.worker_ids())  # both workers, never the head (it has no CPUs)
    # The base model and data reached the workers through Ray's object store: the workers' own
    # cache directory (their PRUNETUNE_CACHE) was never created, let alone trained into.
    assert not (cluster.work / "worker-cache-never-used").exists()
    assert "MLflow at" in log.read_text()  # the driver said the server failed, and went on
    _, before = mlflow_runs(cluster.tracking_uri, name)
    assert len(before) < 3  # the outage cost MLflow at least the trial that ended during it

    synced = cluster.run(["sync", str(run_dir)])
    assert synced.returncode == 0, synced.stderr[-2000:]
    parents, children = mlflow_runs(cluster.tracking_uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert _keys(children) == sorted(r["trial_key"] for r in records)


def test_a_killed_driver_is_resumed_against_the_same_cluster(cluster):
    name = "driver-killed"
    run_dir = cluster.work / "runs" / name
    log = cluster.work / f"{name}.log"
    driver = cluster.start(["run", *QUICK, *cluster.sweep_args(name, experiment=name), "--trials", "3",
                            "--concurrency", "2"], log)
    try:
        wait_for(lambda: read_jsonl(run_dir / "trials.jsonl"), timeout_s=240, what="a first trial", log=log)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    first = read_jsonl(run_dir / "trials.jsonl")
    assert len(first) < 3
    status = cluster.run(["status", str(run_dir), "--json"])
    assert json.loads(status.stdout)["state"] == "interrupted"

    resumed = cluster.run(["resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len({r["trial_key"] for r in records}) == len(records) == 3
    assert as_ended(records[: len(first)]) == as_ended(first)  # finished trials kept, not run again
    # (less the test accuracy the search's end adds for the trials it reports)
    assert all(r["status"] == "finished" for r in records)
    assert {r["node"].split("/")[1] for r in records} <= set(cluster.worker_ids())  # the same cluster
    meta = json.loads((run_dir / "prunetune.json").read_text())
    assert meta["ray_temp_dirs"] == []  # no local Ray was started, before or after the kill
    parents, children = mlflow_runs(cluster.tracking_uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert _keys(children) == sorted(r["trial_key"] for r in records)


def _first_report_on_a_worker(run_dir, workers: dict) -> tuple[str, str] | None:
    """(trial id, worker node id) of the first trial that has reported (and checkpointed) on a worker."""
    for result in sorted(run_dir.glob("trial_*/result.json")):
        for line in result.read_text().splitlines():
            node = json.loads(line).get("node", "").split("/")[-1]
            if node in workers:
                return result.parent.name.removeprefix("trial_"), node
    return None


def test_a_worker_node_killed_mid_trial_is_survived(cluster):
    """The trial continues from its last checkpoint on the other node; the sweep finishes its budget."""
    name = "node-killed"
    run_dir = cluster.work / "runs" / name
    log = cluster.work / f"{name}.log"
    workers = cluster.worker_ids()
    # checkpoint_min_s=0: a checkpoint after every epoch (these take a second, under the default's 30 s),
    # so that the trial has one to continue from
    driver = cluster.start(["run", *QUICK, *cluster.sweep_args(name, experiment=name), "--trials", "3",
                            "--concurrency", "2", "--finetune-epochs", "3", "--scheduler", "none",
                            "--set", "finetune.batch_size=8", "--set", "checkpoint_min_s=0"], log)
    try:
        trial_id, victim = wait_for(lambda: _first_report_on_a_worker(run_dir, workers), timeout_s=240,
                                    what="a trial's first checkpoint", log=log, poll_s=0.05)
        node = ProcessRecord.from_json(workers[victim]["process"])
        signal_session(node, signal.SIGKILL)  # the whole node at once: leader, raylet, agents, the trial
        assert wait_gone([node], timeout_s=10)
        assert driver.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)

    records = read_jsonl(run_dir / "trials.jsonl")
    assert len({r["trial_key"] for r in records}) == len(records) == 3
    assert all(r["status"] == "finished" for r in records), [r["status"] for r in records]
    survivor = (set(workers) - {victim}).pop()
    killed = next(r for r in records if r["trial_id"] == trial_id)
    assert killed["node"].endswith(survivor)
    reports = [json.loads(line) for line in (run_dir / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
    after = [r for r in reports if r["node"].endswith(survivor)]
    assert after and after[0]["epoch"] >= 1, [(r["node"], r["epoch"]) for r in reports]  # from the checkpoint
    assert [h["epoch"] for h in killed["history"]] == [0, 1, 2, 3]
    parents, children = mlflow_runs(cluster.tracking_uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert _keys(children) == sorted(r["trial_key"] for r in records)


def test_cluster_down_leaves_no_process_of_the_cluster(cluster):
    state = cluster.state()
    members = all_members(state)
    recorded = {n["process"]["pid"] for n in state["nodes"]} | {state["tracking"]["process"]["pid"]}
    assert recorded & set(members)  # the head, a worker and the server still run (one worker was killed)
    down = cli(["cluster", "down", "--dir", str(cluster.dir)], env=cluster.driver_env, cwd=cluster.work)
    assert down.returncode == 0, down.stderr[-2000:]
    assert still_running(members) == []
    assert not (cluster.dir / "state.json").exists()
    assert not os.path.exists(state["temp_root"])
    status = cli(["cluster", "status", "--dir", str(cluster.dir), "--json"], env=cluster.driver_env, cwd=cluster.work)
    assert json.loads(status.stdout)["state"] == "none"
