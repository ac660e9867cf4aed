"""The Tracker: one MLflow parent run per search, one child run per trial, never logged twice.

Written from the driver only (a Ray Tune callback, or ``sync_run_dir``). Runs are found again by
tags, not remembered: the parent by ``prunetune.run_uid``, a child by ``prunetune.trial_key`` under
its parent, so a resumed search or a repeated sync completes what is missing and duplicates nothing.
MLflow params are immutable, so a param already present is never logged again (a differing value is
skipped with a warning); metrics are logged only when their value changed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunetune.tracking.client import ensure_experiment, make_client, search_runs_by_tags
from prunetune.tracking.experiment_view import mark_experiment, search_tags
from prunetune.tracking.learning import keep_ratio_curves, learning_metrics, trajectory
from prunetune.tracking.names import (
    fidelity_of,
    flatten,
    metric_value,
    mlflow_key,
    param_dict,
    param_value,
    trial_run_name,
)
from prunetune.tracking.tags import (
    TAG_BEST_TRIAL,
    TAG_DATASET,
    TAG_FIDELITY,
    TAG_FINAL_STEP,
    TAG_LOGGED,
    TAG_MACS_TARGET,
    TAG_METHOD,
    TAG_MODEL,
    TAG_PARENT,
    TAG_ROLE,
    TAG_RUN_UID,
    TAG_TRIAL_KEY,
)
from prunetune.tracking.trial_payload import (
    detail_tags,
    duration_ms,
    identity_tags,
    run_status,
    test_metric,
    timing_metrics,
    trial_metrics,
    trial_params,
    validate_record,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

logger = logging.getLogger(__name__)

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
LEARNING_PNG = "keep_ratios.png"  # a learner's trajectory, in its trial's child run
SEARCH_TAG_KEYS = (TAG_METHOD, TAG_MODEL, TAG_DATASET, TAG_MACS_TARGET)
SUMMARY_BEST_METRICS = ("val_accuracy", "test_accuracy", "macs", "params", "macs_ratio", "params_ratio")


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """MLflow logging of one search into experiment ``experiment`` of store ``tracking_uri``.

    The experiment is created if missing (for an sqlite store with its artifacts beside the
    database, in ``mlartifacts/``).
    """

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = make_client(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment, tracking_uri)
        mark_experiment(self.client, self.experiment_id)
        self._parent_tags: dict[str, dict[str, str]] = {}  # parent run id -> what its children inherit
        self._spaces: dict[str, Any] = {}  # parent run id -> its SearchSpace (None: not logged)

    # -- the parent run ------------------------------------------------------------------------

    def find_parent(self, run_uid: str) -> str | None:
        """The id of the search's parent run (the oldest, should there be several), or None."""
        runs = search_runs_by_tags(
            self.client, self.experiment_id, {TAG_RUN_UID: run_uid, TAG_ROLE: "parent"}
        )
        return runs[0].info.run_id if runs else None

    def start_parent(
        self, run_uid: str, name: str, config: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> str:
        """Create, or find by ``run_uid`` and set RUNNING again, the parent run; return its id.

        Logs the flattened config as params (only those not already there) and ``config.yaml``.
        """
        import yaml

        run_id = self.find_parent(run_uid)
        extra_tags = {**search_tags(config), **{key: str(value) for key, value in (tags or {}).items()}}
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={TAG_RUN_UID: run_uid, TAG_ROLE: "parent", **extra_tags},
            )
            run_id = run.info.run_id
        else:
            run = self.client.get_run(run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self._log_batch(run_id, tags=extra_tags)
        self._log_new_params(run, param_dict(flatten(config)))
        plain_config = json.loads(json.dumps(config, default=str))  # tuples, paths -> lists, strings
        self.client.log_text(run_id, yaml.safe_dump(plain_config, sort_keys=False), "config.yaml")
        return run_id

    def log_space(self, parent_id: str, space: Mapping[str, Any], base_metrics: Mapping[str, Any]) -> None:
        """Log ``space.json`` and the base model's metrics as ``base_<name>``.

        ``base_metrics`` is the summary's ``baseline`` (``val_accuracy``, ``test_accuracy``, ``macs``,
        ``params``); keys already starting with ``base_`` are kept as they are.
        """
        self.client.log_dict(parent_id, dict(space), "space.json")
        prefixed = {
            key if key.startswith("base_") else f"base_{key}": value for key, value in base_metrics.items()
        }
        self._log_changed_metrics(self.client.get_run(parent_id), prefixed, step=0)

    def log_parent_step(self, parent_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log a searcher's per-round metrics (e.g. ``incumbent_val_accuracy``) at ``step``."""
        now = _now_ms()
        self._log_batch(
            parent_id, metrics=[(mlflow_key(key), value, now, step) for key, value in metrics.items()]
        )

    def finish_parent(
        self,
        parent_id: str,
        summary: Mapping[str, Any],
        *,
        status: str = "FINISHED",
        pareto_png: Path | None = None,
        best_policy: Mapping[str, Any] | None = None,
    ) -> None:
        """Log the summary (``summary.json``, ``best_*`` and trial-count metrics, the Pareto plot as
        ``pareto.png``, ``best_policy.json``) and end the parent run with ``status``."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"parent status must be one of {TERMINAL_STATUSES}, not {status!r}")
        self.client.log_dict(parent_id, dict(summary), "summary.json")
        best = summary.get("best") or {}
        metrics = {f"best_{key}": best.get(key) for key in SUMMARY_BEST_METRICS}
        metrics |= {f"base_{key}": value for key, value in (summary.get("baseline") or {}).items()}
        metrics |= {f"trials_{key}": value for key, value in (summary.get("trials") or {}).items()}
        metrics |= {"wall_s": summary.get("wall_s"), "pareto_size": len(summary.get("pareto") or [])}
        self._log_changed_metrics(self.client.get_run(parent_id), metrics, step=0)
        if best.get("trial_id") is not None:
            self._log_batch(parent_id, tags={TAG_BEST_TRIAL: str(best["trial_id"])})
        if pareto_png is not None:
            self._log_file_as(parent_id, Path(pareto_png), "pareto.png")
        policy = best_policy if best_policy is not None else best.get("policy")
        if policy is not None:
            self.client.log_dict(parent_id, dict(policy), "best_policy.json")
        self.client.set_terminated(parent_id, status=status)

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status (RUNNING, or a terminal one that also stamps its end time)."""
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=status)

    # -- the child runs ------------------------------------------------------------------------

    def trial_runs(self, parent_id: str) -> dict[str, Run]:
        """The parent's child runs by trial key (the oldest run where a key appears twice)."""
        runs: dict[str, Run] = {}
        for run in search_runs_by_tags(self.client, self.experiment_id, {TAG_PARENT: parent_id}):
            key = run.data.tags.get(TAG_TRIAL_KEY)
            if key is not None:
                runs.setdefault(key, run)
        return runs

    def find_trial(self, parent_id: str, trial_key: str) -> Run | None:
        """The child run of ``trial_key`` under ``parent_id``, or None."""
        runs = search_runs_by_tags(
            self.client, self.experiment_id, {TAG_PARENT: parent_id, TAG_TRIAL_KEY: trial_key}
        )
        return runs[0] if runs else None

    def log_trial(self, parent_id: str, record: Mapping[str, Any]) -> str:
        """Log one trial record (a line of ``trials.jsonl``) as a child run; return its id.

        Idempotent: a completely logged child (tag ``prunetune.logged=1``) is returned as it is; a
        half-logged one is completed, never duplicated.
        """
        validate_record(record)
        run = self.find_trial(parent_id, record["trial_key"])
        if run is not None and run.data.tags.get(TAG_LOGGED) == "1":
            return run.info.run_id
        if run is None:
            inherited = self._inherited_tags(parent_id)
            fidelity = fidelity_of(record.get("params") or {})
            run = self.client.create_run(
                self.experiment_id,
                start_time=_now_ms() - duration_ms(record),
                tags={**inherited, TAG_FIDELITY: fidelity, **identity_tags(record, parent_id)},
                run_name=trial_run_name(record, inherited.get(TAG_METHOD, ""), fidelity),
            )
        self._complete_trial(run, record)
        return run.info.run_id

    def log_final(self, parent_id: str, result: Mapping[str, Any], *, chosen: bool = True) -> str:
        """Log a final fine-tune (``search.final``) as a child run; return its id.

        It is logged like a trial whose id is ``final-<trial>`` (found again by its plan folder, so
        logging it twice makes no second run), then re-tagged: fidelity ``final`` and role ``final``
        for the ``chosen`` one, ``final_candidate`` for the other candidates of a multi-candidate final
        (set on every call: a candidate logged again by a later choice takes that choice's role).
        """
        metrics = {key: result.get(key) for key in ("val_accuracy", "macs", "params", "macs_ratio",
                                                    "params_ratio", "latency_ms")}
        record = {"trial_id": f"final-{result['trial_id']}", "trial_key": f"final-{result['folder']}",
                  "status": "finished", "policy": result["policy"], "metrics": metrics,
                  "test_accuracy": result.get("test_accuracy"), "history": result.get("history") or [],
                  "seconds": result.get("trial_seconds"),
                  "params": {"of_trial": result["trial_id"], "final_epochs": result["recipe"]["epochs"],
                             "final_lr": result["recipe"]["lr"], "distill": result["distill"],
                             "distill_weight": result.get("distill_weight"),
                             "temperature": result.get("temperature"), "heuristic": result.get("heuristic")}}
        run_id = self.log_trial(parent_id, record)
        self.client.set_tag(run_id, TAG_ROLE, "final" if chosen else "final_candidate")
        self.client.set_tag(run_id, TAG_FIDELITY, "final")
        return run_id

    def _inherited_tags(self, parent_id: str) -> dict[str, str]:
        """The parent's method, model, dataset and target tags, which every child carries too."""
        if parent_id not in self._parent_tags:
            parent_tags = self.client.get_run(parent_id).data.tags
            self._parent_tags[parent_id] = {key: parent_tags[key] for key in SEARCH_TAG_KEYS if key in parent_tags}
        return self._parent_tags[parent_id]

    def _kept_channels(self, parent_id: str, record: Mapping[str, Any]) -> dict[str, str]:
        """Params ``channels.<group>``: the channels the trial's policy keeps in every group, from the
        parent's ``space.json`` (none when the parent has no space or the policy does not fit it)."""
        policy = record.get("policy")
        if not policy:
            return {}
        if parent_id not in self._spaces:
            self._spaces[parent_id] = self._load_space(parent_id)
        space = self._spaces[parent_id]
        if space is None:
            return {}
        from prunetune.pruning.policy import Policy

        try:
            channels = space.channels(Policy.from_json(policy))
        except (KeyError, ValueError, TypeError):  # a policy of another space: nothing to report
            return {}
        return {mlflow_key(f"channels.{group}"): param_value(count) for group, count in channels.items()}

    def _load_space(self, parent_id: str):
        """The SearchSpace the parent logged as ``space.json``, or None."""
        from prunetune.pruning.space import SearchSpace

        try:
            with tempfile.TemporaryDirectory() as folder:
                path = self.client.download_artifacts(parent_id, "space.json", folder)
                return SearchSpace.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except Exception:  # noqa: BLE001 - no space logged (or unreadable): channels are optional
            return None

    def log_test_accuracy(self, parent_id: str, trial_key: str, test_accuracy: float) -> None:
        """Add ``test_accuracy`` to a trial's child run (for the trials of the Pareto front)."""
        run = self.find_trial(parent_id, trial_key)
        if run is None:
            raise LookupError(f"no MLflow child run for trial key {trial_key!r} under parent run {parent_id}")
        step = int(run.data.tags.get(TAG_FINAL_STEP, "0"))
        self._log_changed_metrics(run, {"test_accuracy": test_accuracy}, step=step)

    def _complete_trial(self, run: Run, record: Mapping[str, Any]) -> None:
        """Log params, metrics, tags and ``policy.json``, set the final status, then ``logged=1``."""
        run_id = run.info.run_id
        start_ms = run.info.start_time
        params = {**trial_params(record), **self._kept_channels(run.data.tags.get(TAG_PARENT, ""), record)}
        self._log_new_params(run, params, tags=detail_tags(record))
        self._log_batch(run_id, metrics=trial_metrics(record, start_ms) + learning_metrics(record, start_ms)
                        + timing_metrics(record, start_ms) + test_metric(record, start_ms))
        if record.get("policy") is not None:
            self.client.log_dict(run_id, dict(record["policy"]), "policy.json")
        if trajectory(record):
            self._log_learning_plot(run_id, record)
        self.client.set_terminated(run_id, status=run_status(record), end_time=start_ms + duration_ms(record))
        self.client.set_tag(run_id, TAG_LOGGED, "1")

    def _log_learning_plot(self, run_id: str, record: Mapping[str, Any]) -> None:
        """A learner's keep-ratio curves as ``keep_ratios.png`` (drawn from the record's trajectory)."""
        from prunetune.tracking.choices import CHOICES_PNG, choice_rows, plot_choice_heatmap
        from prunetune.tracking.plots import plot_keep_ratio_curves
        from prunetune.tracking.survival import SURVIVAL_PNG, dropped_blocks, plot_survival, survival_rows

        steps, curves = keep_ratio_curves(record)
        learning = record.get("learning") or {}
        macs = [float(row.get("macs_ratio", math.nan)) for row in trajectory(record)]
        with tempfile.TemporaryDirectory() as folder:
            png = plot_keep_ratio_curves(steps, curves, Path(folder) / LEARNING_PNG, macs_ratio=macs,
                                         target=learning.get("loss_target"),
                                         title=f"trial {record['trial_id']}: keep ratio per group while learning")
            self.client.log_artifact(run_id, str(png))
            rows = choice_rows(record)  # DCP-A: its final distribution over widths and depths
            if rows:
                heat = plot_choice_heatmap(rows, Path(folder) / CHOICES_PNG,
                                           title=f"trial {record['trial_id']}: final choice probabilities")
                self.client.log_artifact(run_id, str(heat))
            survival = survival_rows(record)  # CDP + DTC: live filters and stripes per layer, dropped blocks
            if survival:
                bars = plot_survival(survival, Path(folder) / SURVIVAL_PNG, dropped=dropped_blocks(record),
                                     title=f"trial {record['trial_id']}: survival per layer after learning")
                self.client.log_artifact(run_id, str(bars))

    # -- helpers -------------------------------------------------------------------------------

    def _log_batch(
        self, run_id: str, *, metrics=(), params: Mapping[str, str] | None = None, tags=None
    ) -> None:
        """``log_batch`` of (key, value, timestamp_ms, step) metrics, params and tags, synchronously."""
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), int(ts), int(step))
                for k, v, ts, step in metrics
                if metric_value(v) is not None
            ],
            params=[Param(key, value) for key, value in (params or {}).items()],
            tags=[RunTag(key, value) for key, value in (tags or {}).items()],
            synchronous=True,
        )

    def _log_new_params(
        self, run: Run, params: Mapping[str, str], tags: Mapping[str, str] | None = None
    ) -> None:
        """Log the params the run lacks; warn about (and skip) those already set to another value."""
        present = run.data.params
        differing = sorted(key for key, value in params.items() if key in present and present[key] != value)
        if differing:
            logger.warning(
                "run %s keeps its earlier values of params %s (MLflow params are immutable)",
                run.info.run_id,
                ", ".join(differing),
            )
        missing = {key: value for key, value in params.items() if key not in present}
        self._log_batch(run.info.run_id, params=missing, tags=tags)

    def _log_changed_metrics(self, run: Run, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric ``metrics`` whose value differs from the run's latest one."""
        latest = run.data.metrics
        now = _now_ms()
        changed = [
            (mlflow_key(key), value, now, step)
            for key, value in metrics.items()
            if metric_value(value) is not None
            and not _same_number(latest.get(mlflow_key(key)), metric_value(value))
        ]
        self._log_batch(run.info.run_id, metrics=changed)

    def _log_file_as(self, run_id: str, path: Path, name: str) -> None:
        """Log the file ``path`` as the artifact ``name`` at the run's artifact root."""
        if path.name == name:
            self.client.log_artifact(run_id, str(path))
            return
        with tempfile.TemporaryDirectory() as folder:
            shutil.copyfile(path, Path(folder) / name)
            self.client.log_artifact(run_id, str(Path(folder) / name))


def _same_number(old: float | None, new: float) -> bool:
    """True when ``old`` equals ``new``, NaN counting as equal to NaN."""
    if old is None:
        return False
    return old == new or (math.isnan(old) and math.isnan(new))
