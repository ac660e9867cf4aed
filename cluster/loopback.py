"""Keeping a Ray cluster on loopback: every node's address exactly 127.0.0.1.

Ray's gRPC servers (the GCS, every raylet) listen on all network interfaces, except on a node whose
address is exactly 127.0.0.1: there they listen on loopback only. But ``ray start`` and
``ray.init(address=...)`` rewrite a loopback address into the machine's outward one
(``ray._private.services.resolve_ip_for_localhost``; Ray allows loopback nodes only in its
single-node mode, which refuses worker nodes). ``keep_loopback_addresses`` turns that rewrite off
in this process, so a local multi-node cluster is reachable from this machine only. It is used by
``cluster.ray_start`` (each local node) and by a driver joining a cluster whose nodes are on
loopback (``search.ray_session.start_ray``, after ``nodes_on_loopback``); ``loopback_addresses``
does the same for one block only, around the local Ray a plain ``prunetune run`` starts. Ordinary
clusters never call either.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"


def host_of(address: str) -> str:
    """The host part of ``host:port`` (``[v6]:port`` too), without a scheme such as ``ray://``."""
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def nodes_on_loopback(address: str, *, timeout_s: float = 10.0) -> bool:
    """Whether the Ray cluster at ``address`` has nodes whose own address is loopback.

    A driver on the head of an ordinary cluster may join it at 127.0.0.1 too: there Ray's rewrite
    to the machine's address is what finds the head's raylet, so it must stay on. False when the
    cluster cannot be asked (``ray.init`` then reports why).
    """
    try:
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        nodes = GcsClient(address=address).get_all_node_info(
            timeout=timeout_s, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
    except Exception:  # noqa: BLE001 - any failure here means: not known to be a loopback cluster
        return False
    return any(is_loopback(info.node_manager_address) for info in nodes.values())


@contextlib.contextmanager
def loopback_addresses() -> Iterator[None]:
    """Ray keeps loopback addresses as given within the block only, then rewrites them again: a local
    Ray started on 127.0.0.1 (``search.ray_session.start_ray``) leaves a later ``ray.init(address=...)``
    in the same process (a notebook that joins an ordinary cluster next) as Ray would have it."""
    from ray._private import services

    original = services.resolve_ip_for_localhost
    keep_loopback_addresses()
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def keep_loopback_addresses() -> None:
    """Make Ray keep loopback addresses as given in this process (see the module docstring)."""
    from ray._private import services

    if not callable(getattr(services, "resolve_ip_for_localhost", None)):
        raise RuntimeError("this Ray version has no ray._private.services.resolve_ip_for_localhost; "
                           "cluster.loopback needs updating for it")
    services.resolve_ip_for_localhost = _unchanged


def _unchanged(host: str) -> str:
    if not host:
        raise ValueError(f"Malformed host: {host!r}")
    return host
