"""MLflow conventions that make its own UI useful for prunetune, without prunetune.

- The experiment's kind (``mlflow.experimentKind``) says it holds model training runs. MLflow 3.17's
  UI itself chooses between GenAI and model training with its own toggle, remembered per browser
  and GenAI at first; the URL parameter ``workflowType=machine_learning`` sets it, so every link
  prunetune gives (``trials_url``) carries it.
- A saved view (``mlflow.sharedViewState.trials``, opened by ``?viewStateShareKey=trials``) lists
  the trials flat, best first, with their accuracy, MACs and fidelity columns shown.
- Its description says how to read it and links to that view; it shows above every tab.
- Every parent and child run carries tags of what the search is: method, model, dataset, MACs target.

Pure data and a few client calls; MLflow is imported only inside ``mark_experiment``.
"""

from __future__ import annotations

import json
import logging
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

logger = logging.getLogger(__name__)

TRIALS_VIEW_KEY = "trials"
# Kinds a user may have chosen in the UI for training runs: left as they are. Any other (missing, a
# GenAI kind, or one the UI inferred) is replaced by ours.
TRAINING_KINDS = ("custom_model_development", "finetuning", "forecasting", "classification", "regression",
                  "automl")
TRIAL_COLUMNS = ("metrics.`val_accuracy`", "metrics.`test_accuracy`", "metrics.`macs_ratio`",
                 "tags.`prunetune.fidelity`")
NOTE_START = "prunetune searches:"  # a description starting so is ours, and kept up to date


def trials_path(experiment_id: str) -> str:
    """The UI's route to the trials view, in model-training mode."""
    return (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={TRIALS_VIEW_KEY}")


def trials_url(ui_url: str, experiment_id: str) -> str:
    """The trials view of an MLflow UI at ``ui_url`` (a tracking server, or ``mlflow ui``'s address)."""
    return f"{ui_url.rstrip('/')}/{trials_path(experiment_id)}"


def note(experiment_id: str) -> str:
    """The experiment's description (Markdown): what the runs are, and a link to every trial."""
    return (
        f"{NOTE_START} one parent run per search, one child run per trial, named by method and "
        f"policy. **[Show every trial]({trials_path(experiment_id)})** with its accuracy and MACs ratio "
        "(or choose *Model training* above and filter on `tags.prunetune.role = 'trial'`). Proxy trials "
        "(`tags.prunetune.fidelity = 'proxy'`) had a short fine-tune only: compare them with each other, "
        "not with full ones. `prunetune compare --experiment NAME --out DIR` gives the best accuracy per "
        "MACs budget of every search and their Pareto fronts."
    )


def trials_view() -> dict[str, Any]:
    """The saved runs view: trials only, best validation accuracy first, the useful columns shown."""
    return {"searchFilter": "tags.`prunetune.role` = 'trial'", "orderByKey": "metrics.`val_accuracy`",
            "orderByAsc": False, "selectedColumns": list(TRIAL_COLUMNS)}


def experiment_tags(experiment_id: str, existing: Mapping[str, str]) -> dict[str, str]:
    """The experiment tags to set, given those it has: the trials view; the kind unless the user chose
    a training kind; the description unless the user wrote their own."""
    wanted = {TAG_SHARED_VIEW_PREFIX + TRIALS_VIEW_KEY: json.dumps(trials_view())}
    if existing.get(TAG_EXPERIMENT_KIND) not in TRAINING_KINDS:
        wanted[TAG_EXPERIMENT_KIND] = EXPERIMENT_KIND_TRAINING
    if existing.get(TAG_EXPERIMENT_NOTE, NOTE_START).startswith(NOTE_START):
        wanted[TAG_EXPERIMENT_NOTE] = note(experiment_id)
    return {key: value for key, value in wanted.items() if existing.get(key) != value}


def mark_experiment(client, experiment_id: str) -> None:
    """Set the experiment's kind, description and trials view where they are missing (idempotent).

    A store that refuses (e.g. a server where this user may log runs but not edit the experiment)
    costs a warning, never the search."""
    from mlflow.exceptions import MlflowException

    try:
        existing = client.get_experiment(experiment_id).tags
        for key, value in experiment_tags(experiment_id, existing).items():
            client.set_experiment_tag(experiment_id, key, value)
    except MlflowException as error:
        logger.warning("could not set the view tags of MLflow experiment %s: %s", experiment_id,
                       str(error).splitlines()[0][:200] if str(error) else type(error).__name__)


def search_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """A parent run's tags of what the search is, from its config: method, model, dataset, target."""
    values = {TAG_METHOD: config.get("method"), TAG_MODEL: _name(config.get("model")),
              TAG_DATASET: _name(config.get("dataset")), TAG_MACS_TARGET: config.get("macs_target")}
    return {key: str(value) for key, value in values.items() if value not in (None, "")}


def _name(value: Any) -> Any:
    """A config section's ``name`` (``dataset: {name: digits, ...}``), or the value itself."""
    return value.get("name") if isinstance(value, Mapping) else value
