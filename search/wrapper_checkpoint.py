"""One checkpoint file for a wrapping Ray searcher: the wrapped searcher's own checkpoint and the
wrapper's state together (Ray keeps one file per search algorithm).

``FeasibleOnly`` (search.optuna_space) and ``TwoStage`` (search.two_stage) wrap another searcher
and keep state of their own; both save through here. The payload is a pickled dict marked with the
wrapper's ``format_key``, so a file written before the wrapper kept any state is still read.
"""

from __future__ import annotations

import pickle
from pathlib import Path


def _inner_path(checkpoint_path: str) -> Path:
    return Path(checkpoint_path).with_name(Path(checkpoint_path).name + ".inner")


def save_wrapped(searcher, checkpoint_path: str, *, format_key: str, state: dict) -> None:
    """Write ``searcher``'s checkpoint and the wrapper's ``state`` into ``checkpoint_path``."""
    inner = _inner_path(checkpoint_path)
    try:
        searcher.save(str(inner))
        payload = {format_key: 1, "inner": inner.read_bytes(), "state": state}
    finally:
        inner.unlink(missing_ok=True)
    Path(checkpoint_path).write_bytes(pickle.dumps(payload))


def restore_wrapped(searcher, checkpoint_path: str, *, format_key: str) -> dict | None:
    """Restore ``searcher`` from ``checkpoint_path``; return the wrapper's state, or None for a file
    that holds the wrapped searcher's checkpoint alone (written before the wrapper kept state)."""
    payload = pickle.loads(Path(checkpoint_path).read_bytes())
    if not (isinstance(payload, dict) and format_key in payload):
        searcher.restore(checkpoint_path)
        return None
    inner = _inner_path(checkpoint_path)
    try:
        inner.write_bytes(payload["inner"])
        searcher.restore(str(inner))
    finally:
        inner.unlink(missing_ok=True)
    return payload["state"]
