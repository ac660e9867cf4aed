"""Free TCP ports on one address, chosen by the kernel, so clusters started side by side never collide."""

from __future__ import annotations

import contextlib
import socket


def free_ports(count: int, *, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that nothing listens on at ``host`` right now.

    All sockets are held open until every port is chosen, so the ports differ from each other. A
    port could still be taken by someone else between this call and its use; the servers then fail
    to start and say so in their logs.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
    return ports


def listening(host: str, port: int, *, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
