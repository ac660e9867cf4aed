"""What a learner's trial adds to its MLflow child run: the learning trajectory, step by step.

A learner's trial record (``trials.jsonl``) has ``learning``: the ``trajectory`` (one row per ratio
step: ``step``, ``keep.<group>``, ``macs_ratio``, ...) and a summary (``learned_macs_ratio``,
``loss_target``, ``steps``, ``seconds``...). Each trajectory value becomes the metric
``learn.<key>`` at MLflow step ``step``; each summary number ``learn.<key>``. Pure Python, no MLflow
import; timestamps come from the run's start and the trial's duration, never the clock, so logging
a record again writes identical rows (see ``tracking.trial_payload``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunetune.tracking.names import metric_value, mlflow_key
from prunetune.tracking.trial_payload import MetricPoint, duration_ms

PREFIX = "learn."
KEEP_PREFIX = "keep."


def trajectory(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The record's learning trajectory rows (empty for a trial that learned nothing)."""
    learning = record.get("learning") or {}
    return [row for row in learning.get("trajectory") or [] if isinstance(row, Mapping)]


def learning_metrics(record: Mapping[str, Any], start_ms: int) -> list[MetricPoint]:
    """``learn.<key>`` at ``step`` for every trajectory row, then the summary numbers at the end."""
    rows = trajectory(record)
    if not rows:
        return []
    span = duration_ms(record)
    points = []
    for index, row in enumerate(rows):
        timestamp = start_ms + (span * (index + 1)) // (2 * (len(rows) + 1))  # the first half: learning
        step = int(row.get("step", index))
        for key, value in row.items():
            number = metric_value(value)
            if key != "step" and number is not None:
                points.append(MetricPoint(mlflow_key(PREFIX + key), number, timestamp, step))
    summary = {k: v for k, v in (record.get("learning") or {}).items() if k != "trajectory"}
    last_step = int(rows[-1].get("step", len(rows) - 1))
    for key, value in summary.items():
        number = metric_value(value)
        if number is not None:
            points.append(MetricPoint(mlflow_key(PREFIX + key), number, start_ms + span // 2, last_step))
    return points


def keep_ratio_curves(record: Mapping[str, Any]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {group: keep ratio at each step}) of the trajectory, for the plot."""
    rows = trajectory(record)
    steps = [int(row.get("step", index)) for index, row in enumerate(rows)]
    groups = [key[len(KEEP_PREFIX):] for key in (rows[0] if rows else {}) if key.startswith(KEEP_PREFIX)]
    return steps, {group: [float(row[KEEP_PREFIX + group]) for row in rows] for group in groups}
