"""Read searches back from MLflow for ``prunetune compare``: every parent run of the experiments named.

A search is a parent run (tag ``prunetune.role=parent``) and its child runs (``prunetune.role=trial``);
everything compare needs is in their params, metrics and tags, so no artifact is downloaded. One
query per experiment reads every trial (not one per parent), so hundreds of trials stay quick.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prunetune.pruning.errors import UserError
from prunetune.tracking.client import search_runs_by_tags
from prunetune.tracking.compare import Search, TrialPoint, _number
from prunetune.tracking.names import fidelity_of
from prunetune.tracking.tags import TAG_FIDELITY, TAG_PARENT, TAG_ROLE, TAG_STATUS
from prunetune.tracking.uri import check_tracking_uri, sqlite_file, uri_scheme

if TYPE_CHECKING:
    from mlflow.entities import Run

KEEP_PARAM_PREFIX = "keep."


def searches_from_mlflow(tracking_uri: str, experiments: Sequence[str]) -> list[Search]:
    """Every search logged in the experiments named, oldest first; bad input is a UserError."""
    from prunetune.tracking.client import make_client

    if uri_scheme(tracking_uri) == "sqlite" and not sqlite_file(tracking_uri).is_file():
        raise UserError(f"no MLflow database at {sqlite_file(tracking_uri)} (tracking URI {tracking_uri}); "
                        f"pass run directories, or --tracking-uri of the store your searches logged to "
                        f"(by default sqlite:///<storage>/mlflow.db)")
    check_tracking_uri(tracking_uri)
    client = make_client(tracking_uri)
    searches: list[Search] = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage != "active":
            known = sorted(e.name for e in client.search_experiments(max_results=50))
            raise UserError(f"no MLflow experiment {name!r} in {tracking_uri}; experiments there: "
                            f"{', '.join(known) or 'none'}")
        parents = search_runs_by_tags(client, experiment.experiment_id, {TAG_ROLE: "parent"})
        if not parents:
            raise UserError(f"MLflow experiment {name!r} in {tracking_uri} holds no prunetune search; "
                            f"run `prunetune run --experiment {name}` or `prunetune sync RUN_DIR` first")
        children: dict[str, list[Run]] = defaultdict(list)
        for run in search_runs_by_tags(client, experiment.experiment_id, {TAG_ROLE: "trial"}):
            children[run.data.tags.get(TAG_PARENT, "")].append(run)
        finals: dict[str, Run] = {}  # the latest final fine-tune (``prunetune finetune``) of each parent
        for run in search_runs_by_tags(client, experiment.experiment_id, {TAG_ROLE: "final"}):
            finals[run.data.tags.get(TAG_PARENT, "")] = run
        searches += [search_from_runs(parent, children[parent.info.run_id], tracking_uri,
                                      final=finals.get(parent.info.run_id)) for parent in parents]
    return searches


def search_from_runs(parent: Run, children: Sequence[Run], tracking_uri: str, *,
                     final: Run | None = None) -> Search:
    """One search from its parent run, its trials' child runs and its final fine-tune's run."""
    params, metrics, tags = parent.data.params, parent.data.metrics, parent.data.tags
    ordered = sorted(children, key=lambda run: (run.info.end_time or run.info.start_time or 0))
    return Search(
        name=parent.info.run_name or params.get("name", parent.info.run_id),
        method=tags.get("prunetune.method") or params.get("method", ""),
        model=params.get("model", ""), dataset=params.get("dataset.name", params.get("dataset", "")),
        macs_target=_number(params.get("macs_target")),
        macs_tolerance=_number(params.get("macs_tolerance")) or 0.0,
        wall_s=_number(metrics.get("wall_s")),
        trials=tuple(point_from_run(run, order) for order, run in enumerate(ordered)),
        source=f"{tracking_uri} run {parent.info.run_id}", tracking_uri=tracking_uri,
        parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
        baseline={key[len("base_"):]: value for key, value in metrics.items() if key.startswith("base_")},
        final=None if final is None else point_from_run(final, len(ordered)))


def point_from_run(run: Run, order: int) -> TrialPoint:
    """A child run as a TrialPoint: its final metrics, its keep ratios from the ``keep.*`` params."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    status = tags.get(TAG_STATUS) or {"FINISHED": "finished", "FAILED": "failed"}.get(run.info.status, "stopped")
    return TrialPoint(
        trial_id=params.get("trial_id") or tags.get("prunetune.trial_id") or run.info.run_id, order=order,
        status=status, fidelity=tags.get(TAG_FIDELITY) or fidelity_of(params), role=params.get("role", ""),
        val_accuracy=_number(metrics.get("val_accuracy")), test_accuracy=_number(metrics.get("test_accuracy")),
        macs_ratio=_number(metrics.get("macs_ratio")), macs=_number(metrics.get("macs")),
        keep_ratios=_keep_ratios(params),
        dropped_blocks=tuple(b for b in params.get("dropped_blocks", "").split(",") if b))


def _keep_ratios(params: Mapping[str, Any]) -> dict[str, float]:
    ratios = {}
    for key, value in params.items():
        if key.startswith(KEEP_PARAM_PREFIX) and _number(value) is not None:
            ratios[key[len(KEEP_PARAM_PREFIX):]] = float(value)
    return ratios


def log_report(tracking_uri: str, parent_run_ids: Sequence[str], files: Sequence[Any],
               artifact_path: str = "compare") -> list[str]:
    """Log the report's files to each parent run under ``artifact_path``; return the runs logged to."""
    from prunetune.tracking.client import make_client

    client = make_client(tracking_uri)
    logged = []
    for run_id in parent_run_ids:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        logged.append(run_id)
    return logged
