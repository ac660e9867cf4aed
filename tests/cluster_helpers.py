"""Helpers for the cluster tests: a local multi-node cluster started, used and stopped through the real CLI.

Each cluster has its own directory, ports, Ray temp dirs and token file, so tests never meet other
Ray instances on the machine. Drivers get the cluster's token through the environment, as a user's
shell would (``prunetune cluster status`` prints it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prunetune.cluster.processes import ProcessRecord, session_members

# Nodes declared dead after ~1.5 s of failed health checks instead of Ray's ~15 s: the cluster
# tests kill nodes on purpose. Read by the head's GCS, so it is set when the cluster starts.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_timeout_ms": "1000"}


def base_env(cache: Path) -> dict:
    env = {**os.environ, "PRUNETUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    return env


def cli(args: list[str], *, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``prunetune ARGS`` in a fresh process with ``env``; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "prunetune.search.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args: list[str], *, env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """``prunetune ARGS`` in the background, output to ``log``, in its own process group."""
    handle = open(log, "w")  # noqa: SIM115 - closed with the process by the caller's cleanup
    return subprocess.Popen([sys.executable, "-m", "prunetune.search.cli", *args], cwd=cwd, env=env, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


@dataclass(frozen=True)
class LocalCluster:
    """A cluster started by ``prunetune cluster up --local`` for a test module."""

    dir: Path
    address: str
    tracking_uri: str
    driver_env: dict  # the environment of a driver: base env + the cluster's auth settings
    work: Path

    def state(self) -> dict:
        return json.loads((self.dir / "state.json").read_text())

    def nodes(self) -> list[dict]:
        return self.state()["nodes"]

    def workers(self) -> list[dict]:
        return [n for n in self.nodes() if not n["spec"]["head"]]

    def worker_ids(self) -> dict[str, dict]:
        """The worker nodes by the first 8 characters of their Ray node id (as trials.jsonl names them)."""
        return {n["node_id"][:8]: n for n in self.workers()}

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return cli(args, env=self.driver_env, cwd=self.work, **kwargs)

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        return start_cli(args, env=self.driver_env, cwd=self.work, log=log)

    def sweep_args(self, name: str, *, experiment: str) -> list[str]:
        return ["--name", name, "--storage", str(self.work / "runs"), "--address", self.address,
                "--tracking-uri", self.tracking_uri, "--experiment", experiment]


def cluster_up(work: Path, *, workers: int, node_env: dict, extra: tuple[str, ...] = ()) -> LocalCluster:
    """Start a cluster with ``workers`` one-CPU worker nodes; ``node_env`` is the nodes' environment."""
    directory = work / "cluster"
    token = work / "token"
    env = {**node_env, "RAY_AUTH_TOKEN_PATH": str(token), **FAST_NODE_DEATH}
    result = cli(["cluster", "up", "--local", "--workers", str(workers), "--dir", str(directory), "--json", *extra],
                 env=env, cwd=work, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert set(printed) == {"address", "tracking_uri", "driver_env"}
    status = json.loads(cli(["cluster", "status", "--dir", str(directory), "--json"], env=env, cwd=work).stdout)
    assert printed["driver_env"] == status["driver_env"]
    return LocalCluster(dir=directory, address=printed["address"], tracking_uri=printed["tracking_uri"],
                        driver_env={**node_env, **printed["driver_env"]}, work=work)


def recorded_processes(state: dict) -> list[ProcessRecord]:
    records = [ProcessRecord.from_json(n["process"]) for n in state["nodes"]]
    tracking = state["tracking"]
    return records + [ProcessRecord.from_json(tracking[k]) for k in ("process", "postgres") if tracking.get(k)]


def all_members(state: dict) -> dict[int, int]:
    """``{pid: start time}`` of every live process in the sessions of the recorded processes."""
    from prunetune.cluster.processes import start_time

    members = {}
    for record in recorded_processes(state):
        for pid in session_members(record):
            started = start_time(pid)
            if started is not None:
                members[pid] = started
    return members


def still_running(members: dict[int, int]) -> list[int]:
    """The PIDs of ``members`` that still run as the same process (same start time), zombies aside."""
    from prunetune.cluster.processes import PROC, start_time

    alive = []
    for pid, started in members.items():
        try:
            state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and start_time(pid) == started:
            alive.append(pid)
    return alive


def listening_sockets(pids: list[int]) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket the processes listen on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((_decode_address(address, v6), int(port, 16)))
    return found


def _decode_address(hex_address: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_address)
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # each 32-bit word is host-endian
    address = ipaddress.ip_address(b"".join(words)) if v6 else ipaddress.ip_address(words[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def wait_for(condition, *, timeout_s: float, what: str, log: Path | None = None, poll_s: float = 0.2):
    """Poll ``condition()`` until it returns something truthy; fail with ``what`` (and a log's tail) on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    detail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{detail}")
