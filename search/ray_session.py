"""Starting or joining Ray for one search, and cleaning up after a driver that was killed.

A local Ray started by prunetune gets a temp dir of its own (short: Unix socket paths are limited),
recorded in ``prunetune.json``. A driver killed with SIGKILL leaves that Ray's processes behind;
``prunetune resume`` finds them by that directory in their command lines and stops them by PID,
never with ``ray stop`` (which would end every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

from prunetune.pruning.errors import UserError


def new_temp_dir() -> str:
    return f"/tmp/prunetune-ray-{uuid.uuid4().hex[:8]}"


def start_ray(*, address: str | None, temp_dir: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a local Ray in ``temp_dir``."""
    import logging

    import ray

    quiet_ray_environment()
    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                  configure_logging=True)
    if address:
        from prunetune.cluster.loopback import (
            host_of,
            is_loopback,
            keep_loopback_addresses,
            nodes_on_loopback,
        )

        check_reachable(address)
        if is_loopback(host_of(address)) and nodes_on_loopback(address):
            keep_loopback_addresses()  # a local cluster on loopback (`prunetune cluster up --local`)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise UserError(f"cannot reach the Ray cluster at {address} ({str(exc).splitlines()[0][:120]}); "
                            f"check the address printed by `prunetune cluster up` or `ray start`, and that "
                            f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH name the cluster's token "
                            f"(`prunetune cluster status` prints them)") from None
        return
    ray.init(num_cpus=num_cpus or os.cpu_count(), _temp_dir=temp_dir, **kwargs)


def check_reachable(address: str, *, timeout_s: float = 5.0) -> None:
    """Refuse at once a ``host:port`` Ray address that nothing answers on (``ray.init`` would retry
    for minutes). ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc.__class__.__name__}: nothing answers "
                        f"there); check the address printed by `prunetune cluster up` or `ray start`") from None


def quiet_ray_environment() -> None:
    """Environment defaults (the user's own settings win) that keep Ray Tune's output to our lines.

    Ray's own logger callbacks (CSV, JSON, TensorBoard) are off: trials.jsonl and MLflow are the
    record, and TensorBoard cannot log the per-epoch history list anyway.
    """
    for key, value in (("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),
                       ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"),
                       ("RAY_AIR_NEW_OUTPUT", "0"), ("RAY_DEDUP_LOGS", "0")):
        os.environ.setdefault(key, value)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def processes_using(path: str) -> list[int]:
    """PIDs of this user's processes that mention ``path`` in their command line or hold a file under it.

    Ray's agents rename themselves (``ray::DashboardAgent``), so their command line no longer names
    the temp dir; their open log files still do. Linux /proc only.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline or _holds_file_under(entry, path):
            pids.append(int(entry.name))
    return pids


def _holds_file_under(proc_entry: Path, path: str) -> bool:
    try:
        descriptors = list((proc_entry / "fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor).startswith(path):
                return True
        except OSError:
            continue
    return False


def kill_leftover_ray(temp_dirs: list[str], *, timeout_s: float = 10.0) -> list[int]:
    """Stop the processes of earlier local Ray sessions of this run (by PID); return those PIDs."""
    pids = sorted({pid for d in temp_dirs if d for pid in processes_using(d)})
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s / 2
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (OSError, IndexError):
        return False
    return state != "Z"
