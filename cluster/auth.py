"""Ray's token authentication for the clusters prunetune starts: on unless explicitly turned off.

Ray 2.60 authenticates every gRPC call with a shared token when ``RAY_AUTH_MODE=token``. A local
cluster uses the token file named by ``RAY_AUTH_TOKEN_PATH`` when that is set (or the token in
``RAY_AUTH_TOKEN``), else a fresh one in its own directory, readable by its owner only. Every node
is started with the mode and the token; a driver must present the same (``driver_environment``): an
explicit ``--address`` never enables authentication by itself in Ray. ``--no-auth`` (local tests
only) starts the nodes with ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prunetune.pruning.errors import UserError

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


def check_driver_auth(address: str, *, timeout_s: float = 10.0) -> None:
    """Refuse at once a driver whose authentication the cluster at ``address`` rejects.

    Without it ``ray.init`` retries for many minutes (against the machine's outward address, having
    rewritten a loopback one). One call to the cluster's GCS tells in well under a second; its
    C++ client's warning on stderr is kept off the driver's output. Any other failure is left to
    ``ray.init``, which reports it.
    """
    from ray.exceptions import AuthenticationError

    _check_token_file(os.environ.get(TOKEN_PATH))
    try:
        with _stderr_silenced():
            from ray._raylet import GcsClient

            GcsClient(address=address).get_all_node_info(timeout=timeout_s)
    except AuthenticationError:
        mode = os.environ.get(AUTH_MODE)
        has = f"{AUTH_MODE}={mode}" if mode else f"no {AUTH_MODE}"
        raise UserError(f"the Ray cluster at {address} refused this driver's authentication ({has}"
                        f"{', ' + TOKEN_PATH + ' set' if os.environ.get(TOKEN_PATH) else ''}); "
                        f"export {AUTH_MODE}=token {TOKEN_PATH}=<the cluster's token file> (`prunetune cluster "
                        f"status` prints the exports, `prunetune cluster up --json` gives them as driver_env)"
                        ) from None
    except Exception:  # noqa: BLE001 - anything else: ray.init reports it
        return


def _check_token_file(path: str | None) -> None:
    """A set RAY_AUTH_TOKEN_PATH must name a readable, non-empty file (Ray aborts the process otherwise)."""
    if not path:
        return
    try:
        empty = not Path(path).expanduser().read_text().strip()
    except OSError as error:
        raise UserError(f"{TOKEN_PATH}={path} cannot be read ({error.strerror or error}); point it at the "
                        f"cluster's token file (`prunetune cluster status` prints it)") from None
    if empty:
        raise UserError(f"{TOKEN_PATH}={path} is empty; point it at the cluster's token file "
                        f"(`prunetune cluster status` prints it)")


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 points at /dev/null for the block (C++ code writes there directly)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
