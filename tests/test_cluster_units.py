"""The cluster's parts without Ray: processes stopped by PID, ports, loopback, token files, the state
file, the node command lines, and the `prunetune cluster` command's mistakes and empty answers."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from prunetune.cluster.auth import Auth, cluster_auth, driver_environment, node_environment
from prunetune.cluster.loopback import host_of, is_loopback
from prunetune.cluster.ports import free_ports, listening
from prunetune.cluster.processes import ProcessRecord, is_running, session_members, spawn, stop
from prunetune.cluster.ray_nodes import NODE_PORTS, node_spec, ray_start_command
from prunetune.cluster.state import ClusterState, TrackingService, read_state, write_state
from prunetune.pruning.errors import UserError
from prunetune.search.cli import main


def test_a_spawned_session_is_found_whole_and_stopped_by_pid(tmp_path):
    script = "sleep 60 & sleep 60 & wait"
    record = spawn("sleepers", ["sh", "-c", script], log=tmp_path / "logs" / "sleepers.log")
    try:
        assert is_running(record)
        deadline = time.monotonic() + 20
        while len(session_members(record)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the shell forks its children
        members = session_members(record)
        assert record.pid in members and len(members) == 3  # the shell and its two children
        impostor = replace(record, start_time=record.start_time + 1)  # same PID, another process
        assert not is_running(impostor) and session_members(impostor) == []
    finally:
        signalled = stop([record], grace_s=5)
    assert set(members) <= set(signalled)
    assert session_members(record) == [] and not is_running(record)


def test_free_ports_differ_and_nothing_listens_on_them():
    ports = free_ports(6)
    assert len(set(ports)) == 6 and all(1024 <= p <= 65535 for p in ports)
    assert not any(listening("127.0.0.1", p) for p in ports)


@pytest.mark.parametrize(("address", "host", "loopback"), [
    ("127.0.0.1:6379", "127.0.0.1", True), ("localhost:1", "localhost", True), ("[::1]:6379", "::1", True),
    ("ray://127.0.0.2:10001", "127.0.0.2", True), ("10.0.0.5:6379", "10.0.0.5", False),
    ("head.example.com:6379", "head.example.com", False), ("auto", "auto", False),
])
def test_loopback_addresses_are_recognised(address, host, loopback):
    assert host_of(address) == host
    assert is_loopback(host) is loopback


def test_a_cluster_gets_an_owner_only_token_unless_auth_is_off(tmp_path):
    auth = cluster_auth(tmp_path / "c", enabled=True, env={})
    token = Path(auth.token_path)
    assert auth.mode == "token" and token.parent == tmp_path / "c"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    again = cluster_auth(tmp_path / "c", enabled=True, env={})
    assert Path(again.token_path).read_text() == token.read_text()  # kept, not replaced
    assert driver_environment(auth) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    node = node_environment(auth, {"RAY_AUTH_MODE": "disabled", "PATH": "/bin"})
    assert node["RAY_AUTH_MODE"] == "token" and node["PATH"] == "/bin"

    given = tmp_path / "mine"
    assert cluster_auth(tmp_path / "d", enabled=True, env={"RAY_AUTH_TOKEN_PATH": str(given)}).token_path == str(given)
    assert given.exists()
    assert cluster_auth(tmp_path / "e", enabled=True, env={"RAY_AUTH_TOKEN": "x"}) == Auth("token")
    off = cluster_auth(tmp_path / "f", enabled=False, env={})
    assert off == Auth("disabled") and driver_environment(off) == {"RAY_AUTH_MODE": "disabled"}
    assert not (tmp_path / "f").exists()


def _state(tmp_path: Path) -> ClusterState:
    head = node_spec("head", head=True, cpus=0, gpus=0, temp_dir="/tmp/ptc-x/h", object_store_bytes=1 << 27,
                     host="127.0.0.1")
    from prunetune.cluster.ray_nodes import RayNode

    record = ProcessRecord(name="ray node head", pid=123, start_time=456, log=str(tmp_path / "head.log"))
    tracking = TrackingService(uri="http://127.0.0.1:5000", port=5000, backend="sqlite",
                               backend_store=str(tmp_path / "mlflow.db"), artifacts=str(tmp_path / "artifacts"),
                               process=replace(record, name="mlflow server", pid=124))
    return ClusterState(dir=str(tmp_path), host="127.0.0.1", address="127.0.0.1:6379", temp_root="/tmp/ptc-x",
                        auth=Auth("token", str(tmp_path / "auth_token")), tracking=tracking, created="now",
                        nodes=(RayNode(spec=head, process=record, node_id="abc"),))


def test_the_state_file_round_trips_and_is_owner_only(tmp_path):
    state = _state(tmp_path)
    Path(state.auth.token_path).write_text("s3cret")
    write_state(state)
    path = tmp_path / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_state(tmp_path) == state
    assert [r.pid for r in state.processes()] == [123, 124]
    assert "s3cret" not in path.read_text()  # secrets stay in their own files; the state names them
    assert read_state(tmp_path / "none") is None
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 99}))
    with pytest.raises(UserError, match="state format 99"):
        read_state(tmp_path)


def test_node_command_lines_name_every_port_and_keep_loopback():
    head = node_spec("head", head=True, cpus=0, gpus=0, temp_dir="/tmp/ptc-x/h", object_store_bytes=1 << 29,
                     host="127.0.0.1")
    worker = node_spec("worker-1", head=False, cpus=1, gpus=0, temp_dir="/tmp/ptc-x/w1", object_store_bytes=1 << 29,
                       host="127.0.0.1")
    assert set(head.ports) == set(NODE_PORTS) and not set(head.ports.values()) & set(worker.ports.values())
    head_command = ray_start_command(head, host="127.0.0.1", head_port=7000)
    worker_command = ray_start_command(worker, host="127.0.0.1", address="127.0.0.1:7000")
    for command, spec in ((head_command, head), (worker_command, worker)):
        assert command[:3] == [sys.executable, "-m", "prunetune.cluster.ray_start"] and "--block" in command
        assert command[command.index("--node-ip-address") + 1] == "127.0.0.1"
        assert command[command.index("--temp-dir") + 1] == spec.temp_dir
        for flag, port in spec.ports.items():
            assert command[command.index(f"--{flag}") + 1] == str(port)
    assert head_command[head_command.index("--num-cpus") + 1] == "0" and "--head" in head_command
    assert worker_command[worker_command.index("--address") + 1] == "127.0.0.1:7000" and "--head" not in worker_command


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "fragment"), [
    (["cluster", "up", "--workers", "2"], "add --local"),
    (["cluster", "up", "--local", "--workers", "1", "--no-auth", "--host", "0.0.0.0"], "--no-auth is for local tests"),
    (["cluster", "up", "--local", "--workers", "0"], "not a positive integer"),
    (["cluster", "up", "--local", "--workers", "1", "--tracking-backend", "mysql"], "invalid choice"),
    (["cluster", "up", "--local", "--workers", "1", "--gpus-per-worker", "-1"], "--gpus-per-worker must be 0 or more"),
])
def test_cluster_up_mistakes_are_one_line_errors_and_start_nothing(argv, fragment, tmp_path, capsys):
    code, out, err = _cli([*argv, "--dir", str(tmp_path / "c")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prunetune: error:") and fragment in lines[0], err
    assert not (tmp_path / "c" / "state.json").exists()


def test_status_and_down_without_a_cluster_say_so(tmp_path, capsys):
    directory = str(tmp_path / "none")
    code, out, _ = _cli(["cluster", "status", "--dir", directory], capsys)
    assert code == 0 and "no cluster recorded" in out
    code, out, _ = _cli(["cluster", "status", "--dir", directory, "--json"], capsys)
    assert code == 0 and json.loads(out) == {"dir": str(Path(directory).resolve()), "state": "none"}
    code, out, _ = _cli(["cluster", "down", "--dir", directory], capsys)
    assert code == 0 and "no cluster runs" in out


def test_the_cluster_directory_comes_from_the_environment(tmp_path, monkeypatch):
    from prunetune.cluster.state import cluster_dir

    monkeypatch.setenv("PRUNETUNE_CLUSTER_DIR", str(tmp_path / "env"))
    assert cluster_dir(None) == (tmp_path / "env").resolve()
    assert cluster_dir(str(tmp_path / "flag")) == (tmp_path / "flag").resolve()
    monkeypatch.delenv("PRUNETUNE_CLUSTER_DIR")
    assert cluster_dir(None) == Path(os.path.expanduser("~/.prunetune/cluster")).resolve()


@pytest.mark.parametrize(("device", "gpus", "expected"), [
    ("auto", 0.5, "cuda"), ("auto", 1.0, "cuda"), ("cuda", 0.25, "cuda"), ("cpu", 0.5, "cpu"), ("auto", 0.0, "cpu"),
])
def test_a_trial_uses_the_gpu_ray_gave_it_whatever_the_drivers_machine_has(device, gpus, expected):
    from prunetune.search.prepare import trial_device

    assert trial_device(device, gpus=gpus) == expected  # decided without torch.cuda on the driver


def test_workers_get_disjoint_gpus_or_a_clear_error(monkeypatch):
    import prunetune.cluster.local as local

    monkeypatch.setattr(local, "_gpu_count", lambda: 4)
    assert local._gpu_assignment(local.LocalClusterSpec(workers=2, gpus_per_worker=2)) == ["0,1", "2,3"]
    assert local._gpu_assignment(local.LocalClusterSpec(workers=3)) == [None, None, None]
    with pytest.raises(UserError, match="need 6 GPUs; this machine has 4"):
        local._gpu_assignment(local.LocalClusterSpec(workers=3, gpus_per_worker=2))
