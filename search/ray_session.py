"""Starting or joining Ray for one search, and cleaning up after a driver that was killed.

A local Ray started by prunetune gets a temp dir of its own (short: Unix socket paths are limited),
recorded in ``prunetune.json``. A driver killed with SIGKILL leaves that Ray's processes behind;
``prunetune resume`` finds them by that directory in their command lines and stops them by PID,
never with ``ray stop`` (which would end every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

from prunetune.pruning.errors import UserError


def new_temp_dir() -> str:
    return f"/tmp/prunetune-ray-{uuid.uuid4().hex[:8]}"


def remove_temp_dirs(temp_dirs) -> None:
    """Remove the temp dirs of local Ray sessions that have ended (their logs and sockets)."""
    for directory in temp_dirs:
        if directory and Path(directory).name.startswith("prunetune-ray-"):
            shutil.rmtree(directory, ignore_errors=True)


def start_ray(*, address: str | None, temp_dir: str | None, num_cpus: int | None = None,
              runtime_env: dict | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a local Ray in ``temp_dir``.

    ``runtime_env`` (joining a cluster only): what the workers need beyond the cluster's image,
    such as the user's model code (:func:`user_code_runtime_env`).

    Joining is checked first, each in seconds, where ``ray.init`` would retry for minutes: that
    something answers at the address, and that this driver's authentication is accepted there.
    """
    import logging

    import ray

    quiet_ray_environment()
    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                  configure_logging=True)
    if address:
        from prunetune.cluster.auth import check_driver_auth
        from prunetune.cluster.loopback import (
            host_of,
            is_loopback,
            keep_loopback_addresses,
            nodes_on_loopback,
        )

        check_reachable(address)
        check_driver_auth(address)
        if is_loopback(host_of(address)) and nodes_on_loopback(address):
            keep_loopback_addresses()  # a local cluster on loopback (`prunetune cluster up --local`)
        try:
            ray.init(address=address, **kwargs, **({"runtime_env": runtime_env} if runtime_env else {}))
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise UserError(f"cannot reach the Ray cluster at {address} ({str(exc).splitlines()[0][:120]}); "
                            f"check the address printed by `prunetune cluster up` or `ray start`, and that "
                            f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH name the cluster's token "
                            f"(`prunetune cluster status` prints them)") from None
    else:  # Ray's note that token auth is on by default for this local Ray is not the user's concern
        from prunetune.cluster.loopback import LOOPBACK, loopback_addresses

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # This machine's Ray only: its GCS, raylet and workers listen on loopback, where given the
        # machine's outward address (Ray's default) they would listen on every interface.
        with loopback_addresses():
            ray.init(num_cpus=num_cpus or os.cpu_count(), _temp_dir=temp_dir, _node_ip_address=LOOPBACK, **kwargs)
    quiet_tune_logs()


def quiet_tune_logs() -> None:
    """Drop Ray Tune's error log of each failed trial attempt (a traceback each, all printed again at
    the end): the search names its failures itself, in one line (``search.failures``), and each
    trial's traceback stays in its ``error.txt``. Ray Tune's other messages pass."""
    import logging

    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TrialFailureFilter) for f in logger.filters):
            logger.addFilter(_TrialFailureFilter())


class _TrialFailureFilter:
    """A logging filter that refuses Ray Tune's records of failed trials, its ``Tuner.restore(...)``
    hint after an interruption (prunetune says ``prunetune resume RUN_DIR`` instead) and its
    warnings about metrics it cannot read of trials an interruption cut short."""

    PREFIXES = ("Trial task failed", "Trials did not complete", "Experiment has been interrupted",
                "Training has been interrupted", "Failed to fetch metrics", "Could not fetch metrics")

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


class RaySession:
    """Ray for one driver: ``start()`` joins ``address``, or starts a local Ray in a temp dir of its
    own; leaving the block disconnects, stops the local Ray and removes its temp dir (whatever
    ended the driver, short of SIGKILL: ``prunetune resume`` cleans up after that)."""

    def __init__(self, address: str | None, runtime_env: dict | None = None) -> None:
        self.address = address
        self.runtime_env = runtime_env
        self.temp_dir: str | None = None
        self.started = False

    @property
    def temp_dirs(self) -> list[str]:
        """The local Ray's temp dir, as ``prunetune.json`` records it (none for a joined cluster)."""
        return [self.temp_dir] if self.temp_dir else []

    def start(self) -> None:
        if not self.address:
            self.temp_dir = new_temp_dir()
        self.started = True  # also when start_ray fails half way: what it started is stopped on exit
        start_ray(address=self.address, temp_dir=self.temp_dir, runtime_env=self.runtime_env)

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.started:
            stop_ray()
            remove_temp_dirs(self.temp_dirs)


def check_trial_resources(*, cpus: float, gpus: float, address: str | None) -> None:
    """Refuse a trial that no node of the Ray cluster could ever hold (Ray would wait forever).

    Compared with the largest alive node, as a trial runs on one node; the message gives the
    cluster's totals too. A cluster with an autoscaler is judged by its node types too (KubeRay
    publishes them), or not at all where they are unknown (``ray up``'s autoscaler). A local Ray
    (no ``address``) is judged before it starts, by what it will get: this machine's CPUs and the
    GPUs torch sees; a joined cluster once joined, by its alive nodes.
    """
    nodes = _node_resources(address)
    if nodes is None:
        return  # an autoscaler whose node types are unknown here may add nodes that fit
    where = f"the Ray cluster at {address}" if address else "the local Ray (this machine)"
    for key, flag, asked in (("CPU", "--cpus-per-trial", cpus), ("GPU", "--gpus-per-trial", gpus)):
        if asked <= 0:
            continue
        largest = max((float(n.get(key, 0)) for n in nodes), default=0.0)
        if asked > largest + 1e-9:
            total = sum(float(n.get(key, 0)) for n in nodes)
            fix = f"set {flag} 0" if largest == 0 else f"lower {flag} to {largest:g} or less"
            raise UserError(f"{flag} {asked:g}: no trial could start, since {where} has {total:g} {key}s in "
                            f"all and at most {largest:g} on one node; {fix}, or join a cluster that has "
                            f"them (--address)")


def _node_resources(address: str | None) -> list[dict] | None:
    if address is None:  # what start_ray gives a local Ray
        import torch

        return [{"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}]
    import ray

    alive = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    types = _autoscaled_node_types()
    return None if types is None else alive + types


def _autoscaled_node_types() -> list[dict] | None:
    """The resources of the node types an autoscaler may start (KubeRay and autoscaler v2 publish
    them in the cluster config); [] without an autoscaler; None when one runs whose node types are
    not published (``ray up``'s autoscaler v1)."""
    try:
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return None if status is not None and _configured_node_types(status) else []
    except Exception:  # noqa: BLE001 - Ray's private state API changed: judge by the alive nodes only
        return []


def _configured_node_types(status: bytes) -> bool:
    """Whether Ray's autoscaler status names configured node types. Every Ray head runs the monitor;
    without an autoscaling config (``ray start``, a local Ray) it calls each node ``node_<id>``."""
    import json

    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


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
    """PIDs of this user's Ray processes of the local Ray whose temp dir is ``path``.

    Those are the processes that name ``path`` on their command line (GCS, raylet, Ray's Python
    daemons), and Ray's renamed ones (``ray::DashboardAgent``, ``ray::IDLE``: their command line no
    longer names it) that hold a file under it. Any other process is not Ray's, even if it holds
    such a file: a notebook or test process whose in-process driver once started that Ray keeps
    its log files open. Linux /proc only.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline or (cmdline.startswith("ray::") and _holds_file_under(entry, path)):
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


# --- the user's own model and data code, shipped to a cluster's workers (issue 14) ---------------


def user_code_runtime_env(cfg) -> dict | None:
    """A Ray runtime environment shipping the user's model and dataset code to a cluster's workers:
    ``py_modules`` with a file reference's file or an import path's top-level package folder (none
    for registry names, torchvision, or code installed in the environment). A local Ray needs none:
    its workers see the driver's files at the same paths, and its working directory."""
    from prunetune.pruning.user_models import code_to_ship

    if not cfg.address:
        return None
    modules = list(dict.fromkeys(code_to_ship(cfg.model) + code_to_ship(cfg.dataset.name)))
    return {"py_modules": modules} if modules else None
