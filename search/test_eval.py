"""The test split at a search's end, for the trials it reports (``test_eval: reportable``).

A trial scores itself on validation only; the test split is for reporting, so it is scored once the
search knows what it reports: the Pareto front (validation accuracy against MACs over the finished
full-fidelity trials) and the best trial within the MACs target (``search.summary``). Every trial
a searcher could choose among is on that front, so ``prunetune compare``'s best per budget is too.
Each such trial's last checkpoint (Ray keeps it: ``search.trial.CHECKPOINT_MODEL``), checked
against its record's SHA-256 as ``prunetune export`` does, is evaluated, and the accuracy is written
into its ``trials.jsonl`` record (and so into the summary and MLflow).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

TEST_EVAL_REPORTABLE, TEST_EVAL_ALL = "reportable", "all"  # search.config TEST_EVALS


def reportable_trials(records: Sequence[Mapping], *, macs_limit: float) -> list[str]:
    """The ids of the Pareto front's trials and the best trial within ``macs_limit``, in record order."""
    from prunetune.search.summary import best_trial, front_points

    wanted = {p["trial_id"] for p in front_points(records)}
    best = best_trial(records, macs_limit=macs_limit)
    if best is not None:
        wanted.add(best["trial_id"])
    return [r["trial_id"] for r in records if r["trial_id"] in wanted]


def score_reportable(run_dir: Path, records: Sequence[Mapping], setup, *, macs_limit: float, log) -> int:
    """Evaluate the reportable trials without a test accuracy on ``setup``'s test split and record
    it in ``trials.jsonl``; returns how many were scored. A checkpoint that is gone or damaged is
    said in one line and leaves that trial without a test accuracy."""
    from prunetune.pruning.errors import UserError
    from prunetune.pruning.train import evaluate
    from prunetune.search.commands.export_cmd import _checkpoint_model, load_checked
    from prunetune.search.trial import CHECKPOINT_MODEL
    from prunetune.tracking.rundir import update_trials

    by_id = {r["trial_id"]: r for r in records}
    todo = [by_id[t] for t in reportable_trials(records, macs_limit=macs_limit)
            if by_id[t].get("test_accuracy") is None and by_id[t].get("checkpoint")]
    scores = {}
    for record in todo:
        with tempfile.TemporaryDirectory(prefix="prunetune-test-eval-") as fetched:
            try:
                model, _ = load_checked(run_dir, record, _checkpoint_model(run_dir, record, Path(fetched),
                                                                          CHECKPOINT_MODEL))
            except UserError as error:
                log(f"prunetune: warning: trial {record['trial_id']} is not scored on the test split: {error}")
                continue
            scores[record["trial_key"]] = {"test_accuracy": evaluate(model.to(setup.device), setup.splits.test,
                                                                     device=setup.device)[0]}
    if scores:
        update_trials(run_dir, scores)
        log(f"scored {len(scores)} reportable trial{'' if len(scores) == 1 else 's'} (the Pareto front and the best) on the test split "
            f"({len(setup.splits.test)} images)")
    return len(scores)


def evaluated_on(cfg, splits=None) -> dict:
    """What each figure of the summary was evaluated on, in words (summary.json ``evaluated_on``);
    with ``splits``, how many images."""

    def images(dataset) -> str:
        return "" if splits is None else f" ({len(dataset)} images)"

    subset = ""
    if cfg.val_subset < 1:
        count = f" ({max(1, round(cfg.val_subset * len(splits.val)))} images)" if splits is not None else ""
        subset = f"; intermediate epochs on a fixed {cfg.val_subset:g} of it{count}"
    test_on = ("the Pareto front and the best trial only, at the search's end"
               if cfg.test_eval == TEST_EVAL_REPORTABLE else "every full-fidelity trial as it ended")
    return {"val_accuracy": f"the full validation split{images(splits and splits.val)}, after the last epoch{subset}",
            "test_accuracy": f"the test split{images(splits and splits.test)}: {test_on}"}
