"""What one trial record becomes in MLflow: params, metrics with steps and timestamps, tags, status.

Pure Python, no MLflow import. Timestamps are derived from the child run's start time and the
trial's duration, never from the clock, so logging the same record again writes identical metric
rows, which MLflow's store de-duplicates: completing a half-logged child never doubles its history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from prunetune.tracking.names import metric_value, mlflow_key, param_dict, param_value
from prunetune.tracking.tags import (
    TAG_FINAL_STEP,
    TAG_NODE,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TAG_TRIAL_KEY,
)

RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
TIMING_PREFIX = "timing."  # a trial's seconds per phase: ``timing.train_s``, ...


class MetricPoint(NamedTuple):
    """One metric value as MLflow stores it."""

    key: str
    value: float
    timestamp_ms: int
    step: int


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``record`` has a trial id, a trial key and a known status."""
    for field in ("trial_id", "trial_key"):
        if not isinstance(record.get(field), str) or not record[field]:
            raise ValueError(f"trial record needs a non-empty string {field!r}: {dict(record)!r:.200}")
    if record.get("status") not in RUN_STATUS:
        raise ValueError(
            f"trial record status must be one of {sorted(RUN_STATUS)}, not {record.get('status')!r}"
        )


def run_status(record: Mapping[str, Any]) -> str:
    """The MLflow run status of a trial: finished -> FINISHED, failed -> FAILED, stopped -> KILLED."""
    return RUN_STATUS[record["status"]]


def duration_ms(record: Mapping[str, Any]) -> int:
    """The trial's duration in whole milliseconds (0 when unknown)."""
    seconds = metric_value(record.get("seconds"))
    return max(0, round(seconds * 1000)) if seconds is not None else 0


def final_step(record: Mapping[str, Any]) -> int:
    """The step of the final metrics: the last epoch of the history, or 0 without one."""
    epochs = [int(row.get("epoch", index)) for index, row in enumerate(record.get("history") or [])]
    return max(epochs, default=0)


def trial_params(record: Mapping[str, Any]) -> dict[str, str]:
    """The child run's params: the record's params, trial id, and the policy (one keep ratio per group)."""
    params = param_dict(record.get("params") or {})
    params["trial_id"] = param_value(record["trial_id"])
    policy = record.get("policy")
    if policy:
        for group, ratio in (policy.get("keep_ratios") or {}).items():
            params[mlflow_key(f"keep.{group}")] = param_value(ratio)
        params["dropped_blocks"] = param_value(",".join(policy.get("dropped_blocks") or []))
        if policy.get("space_id") is not None:
            params["space_id"] = param_value(policy["space_id"])
    return params


def trial_metrics(record: Mapping[str, Any], start_ms: int) -> list[MetricPoint]:
    """Per-epoch history at ``step=epoch``, then the final metrics at the last epoch, later in time.

    History rows are spread evenly over the trial's duration; the final metrics sit at its end, so
    where a final value differs from the last epoch's (e.g. the best checkpoint), the final one is
    the run's latest value.
    """
    history = record.get("history") or []
    span = duration_ms(record)
    points = []
    for index, row in enumerate(history):
        timestamp = start_ms + (span * (index + 1)) // (len(history) + 1)
        step = int(row.get("epoch", index))
        points += _points(row, timestamp, step, skip=("epoch",))
    points += _points(record.get("metrics") or {}, start_ms + span, final_step(record))
    return points


def timing_metrics(record: Mapping[str, Any], start_ms: int) -> list[MetricPoint]:
    """``timing.<phase>_s`` for each phase of the record's ``timing`` (seconds, ``search.timing``:
    ``scheduling``, ``learning``, ``train``, ... and ``wall``) at the final step and the trial's end.

    ``started_at`` (a Unix time) and ``resumed`` (a flag) are not seconds of a phase: left out.
    """
    timing = record.get("timing") or {}
    at, step = start_ms + duration_ms(record), final_step(record)
    return [MetricPoint(mlflow_key(f"{TIMING_PREFIX}{phase}_s"), float(seconds), at, step)
            for phase, seconds in timing.items()
            if phase != "started_at" and not isinstance(seconds, bool) and metric_value(seconds) is not None]


def test_metric(record: Mapping[str, Any], start_ms: int) -> list[MetricPoint]:
    """``test_accuracy`` at the final step, for a trial evaluated on the test split (not a proxy)."""
    number = metric_value(record.get("test_accuracy"))
    if number is None:
        return []
    return [MetricPoint("test_accuracy", number, start_ms + duration_ms(record), final_step(record))]


def _points(
    values: Mapping[str, Any], timestamp: int, step: int, skip: tuple[str, ...] = ()
) -> list[MetricPoint]:
    """The numeric entries of ``values`` as metric points (strings and None are left out)."""
    points = []
    for key, value in values.items():
        number = metric_value(value)
        if key not in skip and number is not None:
            points.append(MetricPoint(mlflow_key(key), number, timestamp, step))
    return points


def identity_tags(record: Mapping[str, Any], parent_id: str) -> dict[str, str]:
    """The tags a child run is created with, so it can be found again even if logging stops there."""
    return {
        TAG_PARENT: parent_id,
        TAG_ROLE: "trial",
        TAG_TRIAL_ID: str(record["trial_id"]),
        TAG_TRIAL_KEY: str(record["trial_key"]),
    }


def detail_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The tags logged with the params and metrics: node, trial status, step of the final metrics."""
    return {
        TAG_NODE: str(record.get("node") or ""),
        TAG_STATUS: str(record["status"]),
        TAG_FINAL_STEP: str(final_step(record)),
    }
