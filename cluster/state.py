"""The state file of a local cluster: what ``cluster up`` started, so ``down`` stops exactly that.

``<cluster dir>/state.json`` (owner-only) lists every process with its PID and start time, every
port and path, the Ray address, the tracking URI and how nodes authenticate. It is rewritten after
each process starts, so a ``cluster up`` that fails or is killed half-way leaves a file from which
``cluster down`` still stops what did start. No secret is written: the token and the database
password stay in their own owner-only files, named here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prunetune.cluster.auth import Auth
from prunetune.cluster.processes import ProcessRecord
from prunetune.cluster.ray_nodes import RayNode
from prunetune.pruning.errors import UserError

STATE_FILE = "state.json"
STATE_FORMAT = 1
CLUSTER_DIR_ENV = "PRUNETUNE_CLUSTER_DIR"
DEFAULT_CLUSTER_DIR = "~/.prunetune/cluster"


@dataclass(frozen=True)
class TrackingService:
    """The MLflow server (and the PostgreSQL under it, if any) of a cluster."""

    uri: str
    port: int
    backend: str  # sqlite | postgresql
    backend_store: str  # the sqlite file, or postgresql://user@host:port/db (no password)
    artifacts: str
    process: ProcessRecord | None = None
    postgres: ProcessRecord | None = None
    postgres_port: int | None = None
    postgres_password_file: str | None = None
    postgres_data: str | None = None
    postgres_data_temporary: bool = False

    def to_json(self) -> dict:
        return {"uri": self.uri, "port": self.port, "backend": self.backend, "backend_store": self.backend_store,
                "artifacts": self.artifacts, "process": self.process.to_json() if self.process else None,
                "postgres": self.postgres.to_json() if self.postgres else None,
                "postgres_port": self.postgres_port, "postgres_password_file": self.postgres_password_file,
                "postgres_data": self.postgres_data, "postgres_data_temporary": self.postgres_data_temporary}

    @classmethod
    def from_json(cls, data: Mapping) -> TrackingService:
        return cls(uri=data["uri"], port=int(data["port"]), backend=data["backend"],
                   backend_store=data["backend_store"], artifacts=data["artifacts"],
                   process=ProcessRecord.from_json(data["process"]) if data.get("process") else None,
                   postgres=ProcessRecord.from_json(data["postgres"]) if data.get("postgres") else None,
                   postgres_port=data.get("postgres_port"), postgres_password_file=data.get("postgres_password_file"),
                   postgres_data=data.get("postgres_data"),
                   postgres_data_temporary=bool(data.get("postgres_data_temporary")))


@dataclass(frozen=True)
class ClusterState:
    """A local cluster: its directory, address, nodes, tracking service and authentication."""

    dir: str
    host: str
    address: str
    temp_root: str
    auth: Auth
    tracking: TrackingService
    created: str
    nodes: tuple[RayNode, ...] = field(default_factory=tuple)

    def processes(self) -> list[ProcessRecord]:
        """Every process the cluster started, nodes first (the tracking service last)."""
        records = [node.process for node in self.nodes]
        return records + [r for r in (self.tracking.process, self.tracking.postgres) if r is not None]

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "dir": self.dir, "host": self.host, "address": self.address,
                "temp_root": self.temp_root, "auth": self.auth.to_json(), "tracking": self.tracking.to_json(),
                "created": self.created, "nodes": [node.to_json() for node in self.nodes]}

    @classmethod
    def from_json(cls, data: Mapping) -> ClusterState:
        return cls(dir=data["dir"], host=data["host"], address=data["address"], temp_root=data["temp_root"],
                   auth=Auth.from_json(data["auth"]), tracking=TrackingService.from_json(data["tracking"]),
                   created=data["created"], nodes=tuple(RayNode.from_json(n) for n in data["nodes"]))


def cluster_dir(path: str | None) -> Path:
    """The cluster directory: ``path``, else ``$PRUNETUNE_CLUSTER_DIR``, else ``~/.prunetune/cluster``."""
    return Path(path or os.environ.get(CLUSTER_DIR_ENV) or DEFAULT_CLUSTER_DIR).expanduser().resolve()


def state_path(directory: Path) -> Path:
    return Path(directory) / STATE_FILE


def write_state(state: ClusterState) -> None:
    """Write the state file atomically, readable by its owner only."""
    path = state_path(Path(state.dir))
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".state.", delete=False) as tmp:
        json.dump(state.to_json(), tmp, indent=1)
        tmp.write("\n")
    os.chmod(tmp.name, 0o600)
    os.replace(tmp.name, path)


def read_state(directory: Path) -> ClusterState | None:
    """The cluster recorded in ``directory``, or None if there is none."""
    path = state_path(directory)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"the cluster state file {path} cannot be read ({error}); stop the cluster's "
                        f"processes by hand and delete the file") from None
    if data.get("format") != STATE_FORMAT:
        raise UserError(f"{path} has state format {data.get('format')!r}, this prunetune reads {STATE_FORMAT}; "
                        f"stop that cluster with the prunetune version that started it")
    return ClusterState.from_json(data)


def remove_state(directory: Path) -> None:
    state_path(directory).unlink(missing_ok=True)
