"""A real multi-node Ray cluster on this machine, with an MLflow tracking server on its head.

``up`` starts a head node (no CPUs: it runs no trials), ``workers`` worker nodes (each its own
raylet with ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs) and ``mlflow server`` (over
sqlite, or over a PostgreSQL it starts), all on loopback unless another host is given, and records
every process in the cluster directory's state file. ``down`` stops exactly the recorded processes,
by PID, and checks that none is left. ``status`` reports each of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from prunetune.cluster.auth import cluster_auth, driver_environment, node_environment
from prunetune.cluster.loopback import is_loopback
from prunetune.cluster.ports import free_ports
from prunetune.cluster.processes import is_running, session_members, stop
from prunetune.cluster.ray_nodes import RayNode, launch_node, node_spec, wait_node
from prunetune.cluster.state import ClusterState, TrackingService, read_state, remove_state, write_state
from prunetune.cluster.tracking_server import healthy, launch_tracking_server, server_uri, wait_healthy
from prunetune.pruning.errors import UserError

BACKENDS = ("sqlite", "postgresql")
TEMP_PREFIX = "ptc-"  # short: Ray's Unix socket paths under a node's temp dir must stay under 107 bytes
NODE_GRACE_S = 3.0  # SIGTERM to SIGKILL for a Ray node (see _teardown)
Log = Callable[[str], None]


@dataclass(frozen=True)
class LocalClusterSpec:
    """What ``prunetune cluster up --local`` starts."""

    workers: int
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    backend: str = "sqlite"
    auth: bool = True
    host: str = "127.0.0.1"
    object_store_mb: int = 512

    def check(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise UserError(f"--cpus-per-worker must be at least 1, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        if self.backend not in BACKENDS:
            raise UserError(f"--tracking-backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.object_store_mb < 80:
            raise UserError(f"--object-store-mb must be at least 80 (Ray's minimum), got {self.object_store_mb}")


def _quiet(message: str) -> None:
    del message


def up(directory: Path, spec: LocalClusterSpec, *, env: Mapping[str, str] | None = None,
       log: Log = _quiet) -> ClusterState:
    """Start the cluster recorded in ``directory``; on any failure stop what started and re-raise."""
    spec.check()
    directory = Path(directory)
    _refuse_running(directory)
    env = dict(os.environ if env is None else env)
    devices = _gpu_assignment(spec)
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)  # the state, the logs and the tracking store: owner only
    auth = cluster_auth(directory, enabled=spec.auth, env=env)
    temp_root = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp")
    head_port, tracking_port = free_ports(2, host=spec.host)
    state = ClusterState(
        dir=str(directory), host=spec.host, address=f"{spec.host}:{head_port}", temp_root=temp_root, auth=auth,
        tracking=TrackingService(uri=server_uri(spec.host, tracking_port), port=tracking_port,
                                 backend=spec.backend, backend_store="", artifacts=str(directory / "artifacts")),
        created=datetime.now(UTC).isoformat(timespec="seconds"))
    write_state(state)
    try:
        return _start(state, spec, env=env, devices=devices, log=log)
    except BaseException:
        _teardown(read_state(directory) or state)
        raise


def _start(state: ClusterState, spec: LocalClusterSpec, *, env: dict, devices: list[str | None], log: Log) -> ClusterState:
    directory = Path(state.dir)
    logs = directory / "logs"
    state = _launch_tracking(state, spec, env=env, log=log)
    node_env = node_environment(state.auth, env)
    object_store = spec.object_store_mb * 1024 * 1024
    head = node_spec("head", head=True, cpus=0, gpus=0, temp_dir=f"{state.temp_root}/h", host=spec.host,
                     object_store_bytes=object_store)
    log(f"starting the Ray head node at {state.address}")
    head_process = launch_node(head, host=spec.host, env=node_env, log=logs / "head.log",
                               head_port=int(state.address.rsplit(":", 1)[1]))
    state = _record_node(state, RayNode(spec=head, process=head_process, node_id=None))
    state = _record_node(state, wait_node(head, head_process))
    workers = []
    for index in range(spec.workers):
        name = f"worker-{index + 1}"
        worker = node_spec(name, head=False, cpus=spec.cpus_per_worker, gpus=spec.gpus_per_worker,
                           temp_dir=f"{state.temp_root}/w{index + 1}", host=spec.host,
                           object_store_bytes=object_store, cuda_visible_devices=devices[index])
        process = launch_node(worker, host=spec.host, env=node_env, log=logs / f"{name}.log", address=state.address)
        state = _record_node(state, RayNode(spec=worker, process=process, node_id=None))
        workers.append((worker, process))
    log(f"starting {spec.workers} worker node{'s' if spec.workers > 1 else ''} ({spec.cpus_per_worker} CPU, "
        f"{spec.gpus_per_worker} GPU each)")
    for worker, process in workers:
        state = _record_node(state, wait_node(worker, process))
    wait_healthy(state.tracking.uri, state.tracking.process, timeout_s=90)
    return state


def _record_node(state: ClusterState, node: RayNode) -> ClusterState:
    """The state with ``node`` added (or updated, by name), written to disk."""
    nodes = [n for n in state.nodes if n.spec.name != node.spec.name]
    position = next((i for i, n in enumerate(state.nodes) if n.spec.name == node.spec.name), len(nodes))
    nodes.insert(position, node)
    state = replace(state, nodes=tuple(nodes))
    write_state(state)
    return state


def _launch_tracking(state: ClusterState, spec: LocalClusterSpec, *, env: dict, log: Log) -> ClusterState:
    """Start PostgreSQL if asked (and wait for it), then the MLflow server (without waiting)."""
    directory = Path(state.dir)
    tracking = state.tracking
    if spec.backend == "postgresql":
        tracking, backend_uri = _start_postgres(state, log=log)
        state = replace(state, tracking=tracking)
        write_state(state)
    else:
        database = directory / "mlflow.db"
        backend_uri = f"sqlite:///{database}"
        tracking = replace(tracking, backend_store=str(database))
    log(f"starting the MLflow tracking server at {tracking.uri} ({spec.backend})")
    process = launch_tracking_server(host=spec.host, port=tracking.port, backend_uri=backend_uri,
                                     artifacts=Path(tracking.artifacts), log=directory / "logs" / "mlflow-server.log",
                                     env=env)
    state = replace(state, tracking=replace(tracking, process=process))
    write_state(state)
    return state


def _start_postgres(state: ClusterState, *, log: Log) -> tuple[TrackingService, str]:
    from prunetune.cluster.postgres import (
        create_database,
        data_directory,
        init_database_cluster,
        require_postgres,
        start_postgres,
    )

    binaries = require_postgres()
    directory = Path(state.dir)
    data_dir, temporary = data_directory(directory)
    password_file = directory / "postgres.password"
    tracking = replace(state.tracking, postgres_data=str(data_dir), postgres_data_temporary=temporary,
                       postgres_password_file=str(password_file))
    write_state(replace(state, tracking=tracking))
    fresh = not (data_dir / "PG_VERSION").exists()
    if fresh:
        log(f"creating a PostgreSQL database cluster in {data_dir}")
        init_database_cluster(binaries, data_dir, password_file)
    (port,) = free_ports(1, host=state.host)
    process = start_postgres(binaries, data_dir, host=state.host, port=port, log=directory / "logs" / "postgres.log")
    tracking = replace(tracking, postgres=process, postgres_port=port)
    write_state(replace(state, tracking=tracking))
    if fresh:
        create_database(binaries, host=state.host, port=port, password_file=password_file)
    uri = postgres_uri(tracking)
    return replace(tracking, backend_store=uri.replace(":" + _password(tracking) + "@", "@")), uri


def _password(tracking: TrackingService) -> str:
    return Path(tracking.postgres_password_file).read_text().strip()


def postgres_uri(tracking: TrackingService) -> str:
    """The backend URI of a PostgreSQL-backed tracking server, with its password."""
    from prunetune.cluster.postgres import DB_NAME, DB_USER

    host = tracking.uri.split("://", 1)[1].rsplit(":", 1)[0]
    return f"postgresql+psycopg2://{DB_USER}:{_password(tracking)}@{host}:{tracking.postgres_port}/{DB_NAME}"


def _gpu_assignment(spec: LocalClusterSpec) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each worker: disjoint GPUs of this machine, or None without GPUs."""
    if spec.gpus_per_worker == 0:
        return [None] * spec.workers
    available = _gpu_count()
    needed = spec.workers * spec.gpus_per_worker
    if needed > available:
        raise UserError(f"{spec.workers} workers with {spec.gpus_per_worker} GPUs each need {needed} GPUs; this "
                        f"machine has {available}; lower --workers or --gpus-per-worker")
    g = spec.gpus_per_worker
    return [",".join(str(i * g + k) for k in range(g)) for i in range(spec.workers)]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _refuse_running(directory: Path) -> None:
    existing = read_state(directory)
    if existing is not None and any(session_members(p) for p in existing.processes()):
        raise UserError(f"a cluster started from {directory} still runs (Ray at {existing.address}); stop it with "
                        f"`prunetune cluster down --dir {directory}` or use another --dir")
    if existing is not None:
        _teardown(existing)  # its processes are gone: clear what they left


def down(directory: Path, *, log: Log = _quiet) -> list[int]:
    """Stop every process the cluster in ``directory`` started; return the PIDs signalled."""
    state = read_state(Path(directory))
    if state is None:
        return []
    log(f"stopping the cluster at {state.address}: {len(state.nodes)} Ray nodes and the tracking server")
    return _teardown(state)


def _teardown(state: ClusterState) -> list[int]:
    """Stop the nodes first (their drivers' MLflow calls may still finish), then MLflow, then PostgreSQL.

    Ray's processes hardly heed SIGTERM (a GCS was still running 20 s after one), and nothing of a
    node needs keeping, so they get 3 s before SIGKILL; the servers get their full grace to close
    their stores cleanly.
    """
    node_records = [n.process for n in state.nodes]
    stopped = stop(node_records, grace_s=NODE_GRACE_S)
    if state.tracking.process is not None:
        stopped += stop([state.tracking.process])
    if state.tracking.postgres is not None:
        stopped += stop([state.tracking.postgres])
    left = sorted({pid for record in state.processes() for pid in session_members(record)})
    if left:
        raise UserError(f"processes of the cluster are still running after SIGKILL: {left}; the state file "
                        f"{Path(state.dir) / 'state.json'} is kept")
    for temporary in (Path(state.temp_root), _temporary_postgres_folder(state.tracking)):
        if temporary is not None and temporary.name.startswith(TEMP_PREFIX) and temporary.parent == Path("/tmp"):
            shutil.rmtree(temporary, ignore_errors=True)
    remove_state(Path(state.dir))
    return stopped


def _temporary_postgres_folder(tracking: TrackingService) -> Path | None:
    """The /tmp folder holding a temporary PostgreSQL data directory (see cluster.postgres), if any."""
    if not (tracking.postgres_data and tracking.postgres_data_temporary):
        return None
    return Path(tracking.postgres_data).parent


def status(directory: Path) -> dict | None:
    """What runs of the cluster in ``directory``: every node and server with its PID; None if none is recorded."""
    state = read_state(Path(directory))
    if state is None:
        return None
    nodes = [{"name": n.spec.name, "role": "head" if n.spec.head else "worker", "pid": n.process.pid,
              "running": is_running(n.process), "processes": len(session_members(n.process)),
              "node_id": n.node_id, "cpus": n.spec.cpus, "gpus": n.spec.gpus, "temp_dir": n.spec.temp_dir,
              "ports": n.spec.ports, "log": n.process.log} for n in state.nodes]
    tracking = state.tracking
    services = [{"name": r.name, "pid": r.pid, "running": is_running(r), "log": r.log}
                for r in (tracking.process, tracking.postgres) if r is not None]
    up_count = sum(1 for n in nodes if n["running"]) + sum(1 for s in services if s["running"])
    total = len(nodes) + len(services)
    return {
        "dir": state.dir, "state": "running" if up_count == total else "stopped" if up_count == 0 else "degraded",
        "address": state.address, "tracking_uri": tracking.uri, "tracking_healthy": healthy(tracking.uri),
        "tracking_backend": tracking.backend, "backend_store": tracking.backend_store,
        "artifacts": tracking.artifacts, "loopback_only": is_loopback(state.host),
        "auth": state.auth.mode, "driver_env": driver_environment(state.auth),
        "nodes": nodes, "services": services, "created": state.created,
    }


def stop_tracking_server(directory: Path) -> None:
    """Stop the cluster's MLflow server (its store stays); ``start_tracking_server`` starts it again."""
    state = _require_state(directory)
    if state.tracking.process is not None:
        stop([state.tracking.process])


def start_tracking_server(directory: Path, *, env: Mapping[str, str] | None = None) -> ClusterState:
    """Start the cluster's MLflow server again, on the same port over the same store."""
    state = _require_state(directory)
    tracking = state.tracking
    if tracking.process is not None and is_running(tracking.process):
        return state
    backend_uri = postgres_uri(tracking) if tracking.backend == "postgresql" else f"sqlite:///{tracking.backend_store}"
    process = launch_tracking_server(host=state.host, port=tracking.port, backend_uri=backend_uri,
                                     artifacts=Path(tracking.artifacts), log=Path(state.dir) / "logs" / "mlflow-server.log",
                                     env=dict(os.environ if env is None else env))
    state = replace(state, tracking=replace(tracking, process=process))
    write_state(state)
    wait_healthy(tracking.uri, process, timeout_s=90)
    return state


def _require_state(directory: Path) -> ClusterState:
    state = read_state(Path(directory))
    if state is None:
        raise UserError(f"no cluster is recorded in {directory}; start one with `prunetune cluster up --local`")
    return state
