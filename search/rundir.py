"""Writing the run directory: identity, resolved config, space, the driver's pid, the summary.

The run directory is ``<storage>/<name>``: Ray's experiment directory plus our files (names in
``tracking.rundir``, which reads them). ``prunetune.json`` is written last when a search starts,
so a directory without it never looks like a run; until then a failed start removes what it made.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from prunetune.pruning.errors import UserError
from prunetune.tracking.rundir import CONFIG_FILE, META_FILE, META_FORMAT, SPACE_FILE, SUMMARY_FILE, read_meta

DRIVER_FILE = "driver.json"


def write_json_atomically(path: Path, data) -> None:
    """Write JSON to a sibling temporary file, then rename it over ``path``."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(data, tmp, indent=2, default=str)
        tmp.write("\n")
    os.replace(tmp.name, path)


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a run name already used: say how to resume it instead."""
    if (run_dir / META_FILE).exists():
        raise UserError(f"a run named '{run_dir.name}' already exists in {run_dir.parent}; resume it with "
                        f"`prunetune resume {run_dir}` or choose another --name")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not a prunetune run; remove it or choose another --name")


def create_run_dir(run_dir: Path, *, cfg, space: dict) -> None:
    """Make the directory with the resolved config and the space (not yet a run: no prunetune.json)."""
    from prunetune.search.config import dump_config

    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / CONFIG_FILE)
    write_json_atomically(run_dir / SPACE_FILE, space)


def remove_unstarted_run_dir(run_dir: Path) -> None:
    """Undo ``create_run_dir`` after a failed start: only while the directory is not yet a run."""
    if run_dir.exists() and not (run_dir / META_FILE).exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def new_meta(*, name: str, method: str, tracking_uri: str, experiment: str) -> dict:
    return {"format": META_FORMAT, "name": name, "run_uid": uuid.uuid4().hex, "method": method,
            "tracking_uri": tracking_uri, "experiment": experiment, "parent_run_id": None,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "ray_temp_dirs": []}


def write_meta(run_dir: Path, meta: dict) -> None:
    write_json_atomically(run_dir / META_FILE, meta)


def update_meta(run_dir: Path, **changes) -> dict:
    meta = {**read_meta(run_dir), **changes}
    write_meta(run_dir, meta)
    return meta


def mark_driver(run_dir: Path) -> None:
    """Record this process as the run's driver (``prunetune status`` tells whether it still runs)."""
    write_json_atomically(run_dir / DRIVER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                  "started": datetime.now(UTC).isoformat(timespec="seconds")})


def clear_driver(run_dir: Path) -> None:
    (run_dir / DRIVER_FILE).unlink(missing_ok=True)


def driver_alive(run_dir: Path) -> bool:
    """Whether the process recorded as this run's driver still runs (on this host)."""
    try:
        driver = json.loads((run_dir / DRIVER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if driver.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(driver["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return False
    except PermissionError:
        return True
    return _is_prunetune_process(int(driver["pid"]))


def _is_prunetune_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc: trust the pid
    return "prunetune" in cmdline or "prunetune.search.cli" in cmdline or "pytest" in cmdline


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json_atomically(run_dir / SUMMARY_FILE, summary)
