"""Ray's token authentication for the clusters prunetune starts: on unless explicitly turned off.

Ray 2.60 authenticates every gRPC call with a shared token when ``RAY_AUTH_MODE=token``. A local
cluster uses the token file named by ``RAY_AUTH_TOKEN_PATH`` when that is set (or the token in
``RAY_AUTH_TOKEN``), else a fresh one in its own directory, readable by its owner only. Every node
is started with the mode and the token; a driver must present the same (``driver_environment``): an
explicit ``--address`` never enables authentication by itself in Ray. ``--no-auth`` (local tests
only) starts the nodes with ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
TOKEN = "RAY_AUTH_TOKEN"
TOKEN_FILE = "auth_token"


@dataclass(frozen=True)
class Auth:
    """How the cluster's nodes authenticate: ``mode`` token or disabled, and the token's file if any."""

    mode: str
    token_path: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode == "token"

    def to_json(self) -> dict:
        return {"mode": self.mode, "token_path": self.token_path}

    @classmethod
    def from_json(cls, data: Mapping) -> Auth:
        return cls(mode=str(data["mode"]), token_path=data.get("token_path"))


def cluster_auth(cluster_dir: Path, *, enabled: bool, env: Mapping[str, str]) -> Auth:
    """The authentication of a new cluster in ``cluster_dir``, creating its token file if needed."""
    if not enabled:
        return Auth("disabled")
    if env.get(TOKEN) and not env.get(TOKEN_PATH):
        return Auth("token")  # the nodes inherit RAY_AUTH_TOKEN from the environment
    path = Path(env.get(TOKEN_PATH) or cluster_dir / TOKEN_FILE).expanduser().resolve()
    ensure_token_file(path)
    return Auth("token", str(path))


def ensure_token_file(path: Path) -> None:
    """Write a new random token (256 bits, as Ray's own) to ``path`` unless it exists; owner-only."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))


def driver_environment(auth: Auth) -> dict[str, str]:
    """The environment a driver (``prunetune run --address``) needs to join the cluster."""
    if not auth.enabled:
        return {AUTH_MODE: "disabled"}
    return {AUTH_MODE: "token", **({TOKEN_PATH: auth.token_path} if auth.token_path else {})}


def node_environment(auth: Auth, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the cluster's authentication settings, for the processes of a node."""
    env = {k: v for k, v in base.items() if k != AUTH_MODE}
    env.update(driver_environment(auth))
    return env
