"""MLflow conventions that make its own UI useful for prunetune, without prunetune.

- The experiment's kind (``mlflow.experimentKind``) says it holds model training runs, so MLflow 3
  opens it on its runs, not on an empty GenAI traces overview.
- Its description says how to read it, and a saved view (``mlflow.sharedViewState.trials``, opened
  by ``<experiment URL>?viewStateShareKey=trials``) lists the trials flat, best first, with their
  accuracy, MACs and policy columns shown.
- Every parent and child run carries tags of what the search is: method, model, dataset, MACs target.

Pure data and two client calls; MLflow is not imported here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from prunetune.tracking.tags import (
    EXPERIMENT_KIND_TRAINING,
    TAG_DATASET,
    TAG_EXPERIMENT_KIND,
    TAG_EXPERIMENT_NOTE,
    TAG_MACS_TARGET,
    TAG_METHOD,
    TAG_MODEL,
    TAG_SHARED_VIEW_PREFIX,
)

TRIALS_VIEW_KEY = "trials"
# Kinds a user may have chosen in the UI for training runs: left as they are. Any other (missing, a
# GenAI kind, or one the UI inferred) is replaced by ours.
TRAINING_KINDS = ("custom_model_development", "finetuning", "forecasting", "classification", "regression",
                  "automl")
TRIAL_COLUMNS = ("metrics.`val_accuracy`", "metrics.`test_accuracy`", "metrics.`macs_ratio`",
                 "metrics.`params_ratio`", "metrics.`latency_ms`", "tags.`prunetune.method`",
                 "tags.`prunetune.fidelity`", "params.`dropped_blocks`")
NOTE = (
    "prunetune searches: one parent run per search, one child "
    "run per trial (named by method, trial and policy).\n\n"
    "To see every trial with its accuracy and MACs, open this experiment's URL with "
    f"`?viewStateShareKey={TRIALS_VIEW_KEY}`, or filter on `tags.prunetune.role = 'trial'`. Proxy trials "
    "(`tags.prunetune.fidelity = 'proxy'`) were scored after a short fine-tune only: compare them with each "
    "other, not with full ones. `prunetune compare --experiment NAME` prints the best accuracy per MACs "
    "budget of every search and draws the Pareto fronts."
)


def trials_view() -> dict[str, Any]:
    """The saved runs view: trials only, best validation accuracy first, the useful columns shown."""
    return {"searchFilter": "tags.`prunetune.role` = 'trial'", "orderByKey": "metrics.`val_accuracy`",
            "orderByAsc": False, "selectedColumns": list(TRIAL_COLUMNS)}


def experiment_tags(existing: Mapping[str, str]) -> dict[str, str]:
    """The experiment tags to set, given those it has: only what is missing or not a training kind."""
    wanted = {TAG_SHARED_VIEW_PREFIX + TRIALS_VIEW_KEY: json.dumps(trials_view())}
    if existing.get(TAG_EXPERIMENT_KIND) not in TRAINING_KINDS:
        wanted[TAG_EXPERIMENT_KIND] = EXPERIMENT_KIND_TRAINING
    if not existing.get(TAG_EXPERIMENT_NOTE):
        wanted[TAG_EXPERIMENT_NOTE] = NOTE
    return {key: value for key, value in wanted.items() if existing.get(key) != value}


def mark_experiment(client, experiment_id: str) -> None:
    """Set the experiment's kind, description and trials view where they are missing (idempotent)."""
    existing = client.get_experiment(experiment_id).tags
    for key, value in experiment_tags(existing).items():
        client.set_experiment_tag(experiment_id, key, value)


def search_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """A parent run's tags of what the search is, from its config: method, model, dataset, target."""
    values = {TAG_METHOD: config.get("method"), TAG_MODEL: _name(config.get("model")),
              TAG_DATASET: _name(config.get("dataset")), TAG_MACS_TARGET: config.get("macs_target")}
    return {key: str(value) for key, value in values.items() if value not in (None, "")}


def _name(value: Any) -> Any:
    """A config section's ``name`` (``dataset: {name: digits, ...}``), or the value itself."""
    return value.get("name") if isinstance(value, Mapping) else value
