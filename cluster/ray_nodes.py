"""Ray nodes on this machine: one ``ray start --block`` per node, each its own raylet and resources.

A head (``--num-cpus 0``: it runs no trials) and worker nodes joined to it. Every port a node opens
is chosen free beforehand and passed explicitly, and every node has a temp dir of its own, so
clusters of several users on one machine never collide (Ray's defaults, such as GCS port 6379 and
agent port 52365, would). Each node runs through ``cluster.ray_start`` so it keeps its loopback
address (cluster.loopback). ``--block`` keeps one leader process per node: stopping its session
stops the node, and the leader stops the node's other processes when one of them dies.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prunetune.cluster.ports import free_ports
from prunetune.cluster.processes import ProcessRecord, child_with_argument, spawn, wait_for_line

NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
READY_LINE = "Ray runtime started."
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class NodeSpec:
    """What one node is given: CPUs and GPUs (Ray resources), object store size, temp dir, ports."""

    name: str
    head: bool
    cpus: int
    gpus: int
    temp_dir: str
    object_store_bytes: int
    ports: dict[str, int] = field(default_factory=dict)
    cuda_visible_devices: str | None = None  # the machine's GPUs this node may use (None: leave as is)


@dataclass(frozen=True)
class RayNode:
    """A started node: its spec, its leader process, and the id Ray gave it."""

    spec: NodeSpec
    process: ProcessRecord
    node_id: str | None

    def to_json(self) -> dict:
        return {"spec": asdict(self.spec), "process": self.process.to_json(), "node_id": self.node_id}

    @classmethod
    def from_json(cls, data: Mapping) -> RayNode:
        return cls(spec=NodeSpec(**data["spec"]), process=ProcessRecord.from_json(data["process"]),
                   node_id=data.get("node_id"))


def node_spec(name: str, *, head: bool, cpus: int, gpus: int, temp_dir: str, object_store_bytes: int,
              host: str, cuda_visible_devices: str | None = None) -> NodeSpec:
    """A node's spec with a free port for everything it listens on."""
    return NodeSpec(name=name, head=head, cpus=cpus, gpus=gpus, temp_dir=temp_dir,
                    object_store_bytes=object_store_bytes,
                    ports=dict(zip(NODE_PORTS, free_ports(len(NODE_PORTS), host=host), strict=True)),
                    cuda_visible_devices=cuda_visible_devices)


def ray_start_command(spec: NodeSpec, *, host: str, head_port: int | None = None,
                      address: str | None = None) -> list[str]:
    """The command line of one node: the head on ``head_port``, or a worker joining ``address``."""
    command = [sys.executable, "-m", "prunetune.cluster.ray_start", "--block", "--disable-usage-stats",
               "--node-ip-address", host, "--temp-dir", spec.temp_dir,
               "--num-cpus", str(spec.cpus), "--num-gpus", str(spec.gpus),
               "--object-store-memory", str(spec.object_store_bytes)]
    for flag, port in spec.ports.items():
        command += [f"--{flag}", str(port)]
    if spec.head:
        return [*command, "--head", "--port", str(head_port), "--include-dashboard", "false"]
    # One log monitor per machine is enough (Ray's advice); the head's runs.
    return [*command, "--address", str(address), "--include-log-monitor", "false"]


def launch_node(spec: NodeSpec, *, host: str, env: Mapping[str, str], log: Path, head_port: int | None = None,
                address: str | None = None) -> ProcessRecord:
    """Start one node in the background; ``wait_node`` waits until it has joined."""
    node_env = dict(env)
    if spec.cuda_visible_devices is not None:
        node_env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
    Path(spec.temp_dir).mkdir(parents=True, exist_ok=True)
    command = ray_start_command(spec, host=host, head_port=head_port, address=address)
    return spawn(f"ray node {spec.name}", command, log=log, env=node_env)


def wait_node(spec: NodeSpec, process: ProcessRecord, *, timeout_s: float = START_TIMEOUT_S) -> RayNode:
    """Wait until the node's raylet runs and has registered with the head; read its node id."""
    wait_for_line(process, READY_LINE, timeout_s=timeout_s, what=f"Ray node {spec.name}")
    return RayNode(spec=spec, process=process, node_id=child_with_argument(process, "--node_id="))
