"""MLflow-safe keys and values: sanitised names, flattened configs, truncated param values.

MLflow accepts param, metric and tag keys made of letters, digits and ``_ - . / space`` (colons too,
except on Windows), at most 250 characters, and refuses keys that a path normalisation would change
(``a//b``, ``../x``, a leading ``/``). Param values are at most 6,000 characters. Pure Python: no
MLflow import, so the rules are testable on their own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
_UNSAFE_KEY_CHARACTERS = re.compile(r"[^A-Za-z0-9_.\- ]")


def mlflow_key(name: object) -> str:
    """Return ``name`` as a valid MLflow key: unsafe characters (slashes included) become ``_``.

    Slashes are replaced too, so no key can trip MLflow's path-normalisation check; a leading dot
    gets an ``_`` in front (``..x`` would read as a parent directory).
    """
    key = _UNSAFE_KEY_CHARACTERS.sub("_", str(name))
    if not key or key.startswith("."):
        key = "_" + key
    return key[:MAX_KEY_LENGTH]


def param_value(value: Any) -> str:
    """Return ``value`` as an MLflow param string: scalars as ``str``, containers as compact JSON."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, Mapping | list | tuple):
        text = json.dumps(value, sort_keys=isinstance(value, Mapping), default=str, separators=(",", ":"))
    else:
        text = str(value)
    return text[:MAX_PARAM_VALUE_LENGTH]


def metric_value(value: Any) -> float | None:
    """Return ``value`` as a float for MLflow, or None when it is not a number (None, a string...)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def is_number(value: Any) -> bool:
    """True for a real number that is not NaN (bools excluded): what a plot or a front can use."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``.

    Lists stay whole (one param), since MLflow params are strings anyway.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def param_dict(values: Mapping[str, Any]) -> dict[str, str]:
    """Sanitise the keys and stringify the values of a flat mapping, ready for MLflow params."""
    return {mlflow_key(key): param_value(value) for key, value in values.items()}


def policy_summary(policy: Mapping[str, Any] | None) -> str:
    """A policy at a glance: ``keep 0.50-0.83 mean 0.69`` and ``, 2 blocks dropped`` where some are."""
    ratios = [float(r) for r in ((policy or {}).get("keep_ratios") or {}).values() if is_number(r)]
    if not ratios:
        return "no policy"
    low, high, mean = min(ratios), max(ratios), sum(ratios) / len(ratios)
    text = f"keep {low:.2f}" if high - low < 0.005 else f"keep {low:.2f}-{high:.2f} mean {mean:.2f}"
    dropped = len((policy or {}).get("dropped_blocks") or [])
    return text + (f", {dropped} block{'s' * (dropped != 1)} dropped" if dropped else "")


def trial_run_name(record: Mapping[str, Any], method: str = "", fidelity: str = "full") -> str:
    """A child run's name: method (and ``proxy`` for a proxy trial), policy summary, trial id.

    E.g. ``arpruning proxy: keep 0.50-0.83 mean 0.69 [498f2a5e]``: MLflow's runs table cuts long
    names, so what tells the trials apart comes first.
    """
    head = " ".join(part for part in (method, "proxy" if fidelity == "proxy" else "") if part)
    name = f"{head}: " if head else ""
    return f"{name}{policy_summary(record.get('policy'))} [{record.get('trial_id', '')}]"


OWN_LENGTH_PARAM = "finetune_epochs"  # a searcher sets it for its proxy trials (methods.proxy)


def fidelity_of(params: Mapping[str, Any]) -> str:
    """``proxy`` when a trial's params give it its own fine-tune length (a searcher's cheap score,
    e.g. ARPruning's neighbours), else ``full``."""
    return "proxy" if params.get(OWN_LENGTH_PARAM) not in (None, "", "None") else "full"
