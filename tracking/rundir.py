"""Reading a run directory, the source of truth that MLflow mirrors.

A search writes ``prunetune.json`` (identity, tracking URI, experiment, parent run id),
``config.yaml``, ``space.json``, ``trials.jsonl`` (one finished trial a line, appended) and, at the
end, ``summary.json``. A last line of ``trials.jsonl`` cut short by a crash is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.pruning.errors import UserError

logger = logging.getLogger(__name__)

META_FILE = "prunetune.json"
CONFIG_FILE = "config.yaml"
SPACE_FILE = "space.json"
TRIALS_FILE = "trials.jsonl"
SUMMARY_FILE = "summary.json"
PARETO_PNG = "pareto.png"
META_FORMAT = 1
REQUIRED_META = ("run_uid", "name", "tracking_uri", "experiment")


@dataclass(frozen=True)
class RunDirContents:
    """Everything of a run directory that MLflow shows; absent optional files are None or empty."""

    meta: dict[str, Any]
    config: dict[str, Any]
    space: dict[str, Any] | None
    trials: tuple[dict[str, Any], ...]
    summary: dict[str, Any] | None


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
    )


def read_meta(run_dir: Path) -> dict[str, Any]:
    """``prunetune.json``, checked for its format and the keys tracking needs."""
    path = Path(run_dir) / META_FILE
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


def write_parent_run_id(run_dir: Path, parent_run_id: str) -> None:
    """Record the parent run's id in ``prunetune.json`` (atomically: write a sibling, then rename)."""
    path = Path(run_dir) / META_FILE
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["parent_run_id"] = parent_run_id
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=".prunetune.", suffix=".json", delete=False
    ) as tmp:
        json.dump(meta, tmp, indent=2)
        tmp.write("\n")
    os.replace(tmp.name, path)


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
