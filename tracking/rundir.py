"""The run directory: its format, and every read and write of it (the source of truth MLflow mirrors).

The run directory is ``<storage>/<name>``: Ray's experiment directory plus our files. A search writes
``config.yaml`` and ``space.json`` first, then ``prunetune.json`` (identity, tracking URI, experiment,
parent run id) last, so a directory without it never looks like a run and a failed start can remove
what it made; ``driver.json`` while a driver runs; ``trials.jsonl`` (one ended trial a line, appended
once per trial); and, at the end, ``summary.json``. A last line of ``trials.jsonl`` cut short by a
crash is skipped with a warning.

A record's ``checkpoint`` is relative to the experiment directory (``trial_<id>/checkpoint_<n>``), so
a run folder can be moved or copied; ``checkpoint_sha256`` is the digest of its model file when the
driver could read it. Older records held absolute paths: only their last two parts are used.

This module imports neither ray nor mlflow: ``search`` writes through it, ``tracking`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from prunetune.pruning.errors import UserError

logger = logging.getLogger(__name__)

META_FILE = "prunetune.json"
CONFIG_FILE = "config.yaml"
SPACE_FILE = "space.json"
TRIALS_FILE = "trials.jsonl"
SUMMARY_FILE = "summary.json"
HEURISTICS_FILE = "heuristics.json"  # the warm start's policies by name (methods.heuristics)
SEARCH_PATH_FILE = "search_path.jsonl"  # a step-wise searcher's rows, one per round (search.search_path)
DRIVER_FILE = "driver.json"
PARETO_PNG = "pareto.png"
META_FORMAT = 1
STATUS_FINISHED, STATUS_STOPPED, STATUS_FAILED = "finished", "stopped", "failed"  # a trial record's status
REQUIRED_META = ("run_uid", "name", "tracking_uri", "experiment")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDirContents:
    """Everything of a run directory that MLflow shows; absent optional files are None or empty."""

    meta: dict[str, Any]
    config: dict[str, Any]
    space: dict[str, Any] | None
    trials: tuple[dict[str, Any], ...]
    summary: dict[str, Any] | None
    search_path: tuple[dict[str, Any], ...] = ()


def read_run_dir(run_dir: Path) -> RunDirContents:
    """Read a run directory; a missing or malformed ``prunetune.json`` is a UserError."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    return RunDirContents(
        meta=meta,
        config=_read_yaml(run_dir / CONFIG_FILE),
        space=_read_json(run_dir / SPACE_FILE),
        trials=tuple(read_trials(run_dir / TRIALS_FILE)),
        summary=_read_json(run_dir / SUMMARY_FILE),
        search_path=tuple(read_search_path(run_dir)),
    )


def read_meta(run_dir: Path) -> dict[str, Any]:
    """``prunetune.json``, checked for its format and the keys tracking needs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist or is not a folder; pass the run directory a search created")
    path = run_dir / META_FILE
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a prunetune run directory (no {META_FILE}); pass the folder a search created"
        )
    meta = _read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UserError(
            f"{path} is not a format-{META_FORMAT} prunetune run file; pass a run directory of this version"
        )
    missing = [key for key in REQUIRED_META if not meta.get(key)]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; restore the file or start a new search")
    return meta


def read_trials(path: Path) -> list[dict[str, Any]]:
    """The records of ``trials.jsonl`` in order; a torn last line is skipped, a bad earlier one is a UserError."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("skipping the incomplete last line %d of %s", number, path)
                continue
            raise UserError(
                f"{path}:{number} is not valid JSON; repair or delete that line, then sync again"
            ) from None
        if not isinstance(record, dict) or not record.get("trial_key"):
            raise UserError(
                f"{path}:{number} is not a trial record with a trial_key; repair or delete that line"
            )
        records.append(record)
    return records


def _read_json(path: Path) -> Any:
    """A JSON file's content, None when the file is absent; bad JSON is a UserError."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path} is not valid JSON ({error.msg}, line {error.lineno}); repair or remove it"
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, {} when the file is absent."""
    if not path.is_file():
        return {}
    import yaml

    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    return content if isinstance(content, dict) else {}


# ----------------------------------------------------------------------------------------------
# Creating a run, its identity and its driver
# ----------------------------------------------------------------------------------------------


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
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is a file, not a run directory; remove it or choose another --name")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not a prunetune run; remove it or choose another --name")


def create_run_dir(run_dir: Path, *, write_config: Callable[[Path], None], space: dict) -> None:
    """Make the directory with the resolved config (``write_config(path)``) and the space; not yet a run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir / CONFIG_FILE)
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
    write_json_atomically(Path(run_dir) / META_FILE, meta)


def update_meta(run_dir: Path, **changes) -> dict:
    meta = {**read_meta(run_dir), **changes}
    write_meta(run_dir, meta)
    return meta


def write_parent_run_id(run_dir: Path, parent_run_id: str) -> None:
    """Record the parent MLflow run's id in ``prunetune.json``."""
    update_meta(run_dir, parent_run_id=parent_run_id)


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


def write_heuristics(run_dir: Path, policies: dict) -> None:
    """The warm start's heuristic policies (name -> ``Policy.to_json()``), for the summary's margin."""
    write_json_atomically(run_dir / HEURISTICS_FILE, policies)


def read_heuristics(run_dir: Path) -> dict:
    """What :func:`write_heuristics` wrote (name -> policy JSON), or {} for a search without a warm start."""
    path = run_dir / HEURISTICS_FILE
    return _read_json(path) if path.exists() else {}


# ----------------------------------------------------------------------------------------------
# Trials and their checkpoints
# ----------------------------------------------------------------------------------------------


def append_trial(run_dir: Path, record: dict) -> bool:
    """Append ``record`` to ``trials.jsonl`` (flushed to disk) unless its trial is there; whether it was."""
    path = Path(run_dir) / TRIALS_FILE
    if record["trial_key"] in {r["trial_key"] for r in read_trials(path)}:
        return False
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())
    return True


def append_search_path(run_dir: Path, row: dict) -> None:
    """Append a searcher's path row (``round`` and its numbers) to ``search_path.jsonl``."""
    with open(Path(run_dir) / SEARCH_PATH_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")


def read_search_path(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``search_path.jsonl``, one per round (the last one per round where a resume
    wrote a round twice); a torn last line is skipped."""
    path = Path(run_dir) / SEARCH_PATH_FILE
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows[row["round"]] = row
    return [rows[key] for key in sorted(rows)]


def update_trials(run_dir: Path, changes: dict[str, dict]) -> None:
    """Set fields of recorded trials (``{trial_key: {field: value}}``), rewriting ``trials.jsonl``
    atomically: a search's end adds the test accuracy of the trials it reports (``search.test_eval``)."""
    path = Path(run_dir) / TRIALS_FILE
    records = [{**r, **changes.get(r["trial_key"], {})} for r in read_trials(path)]
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.writelines(json.dumps(r) + "\n" for r in records)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def relative_checkpoint(path: str | None) -> str | None:
    """A trial checkpoint's path as ``trial_<id>/checkpoint_<n>``: its place in the experiment directory.

    Ray keeps checkpoints at ``<experiment>/<trial folder>/<checkpoint folder>``, on a local disk or
    in ``ray_storage``; the last two parts are all a moved or copied run needs.
    """
    if not path:
        return None
    parts = PurePosixPath(str(path).rstrip("/")).parts
    return "/".join(parts[-2:])


def local_checkpoint(run_dir: Path, recorded: str) -> Path:
    """The folder of a recorded checkpoint (relative, or an older absolute path) inside ``run_dir``."""
    return Path(run_dir) / relative_checkpoint(recorded)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
