"""Keeping a Ray cluster on loopback: every node's address exactly 127.0.0.1.

Ray's gRPC servers (the GCS, every raylet) listen on all network interfaces, except on a node whose
address is exactly 127.0.0.1: there they listen on loopback only. But ``ray start`` and
``ray.init(address=...)`` rewrite a loopback address into the machine's outward one
(``ray._private.services.resolve_ip_for_localhost``; Ray allows loopback nodes only in its
single-node mode, which refuses worker nodes). ``keep_loopback_addresses`` turns that rewrite off
in this process, so a local multi-node cluster is reachable from this machine only. It is used by
``cluster.ray_start`` (each local node) and by a driver joining a loopback address
(``search.ray_session.start_ray``); clusters on real networks never call it.
"""

from __future__ import annotations

import ipaddress

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
