"""Compare searches at a glance: one row per search, the best accuracy within each MACs budget.

A search is read from its run directory (``search_from_run_dir``) or from MLflow
(``tracking.compare_mlflow``) into the same plain value, ``Search``; ``compare_rows`` turns searches
into the table ``prunetune compare`` prints (``format_table``) or gives as JSON.

The rules, the same as ``summary.json``'s (``search.summary``):

- a trial is *proxy* when the searcher gave it its own short fine-tune (``finetune_epochs`` in its
  params, e.g. ARPruning's neighbours, scored after BatchNorm recalibration only) and *full*
  otherwise. Proxy scores are not comparable with full ones: they are counted and drawn apart, and
  never chosen as a best or put on a front.
- the best trial within a MACs budget ``b`` is the finished full trial evaluated on the test split
  with ``macs_ratio <= b`` and the highest *validation* accuracy (fewer MACs break a tie); its test
  accuracy is reported beside it, never used to choose. The ``target`` column uses the search's own
  ``macs_target + macs_tolerance``, so it is ``summary.json``'s ``best``.
- the Pareto front is validation accuracy against MACs ratio over the finished full trials.

Pure Python: no MLflow import, so reading run directories and the table are testable on their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune.pruning.errors import UserError
from prunetune.tracking.names import fidelity_of, is_number
from prunetune.tracking.pareto import pareto_front

DEFAULT_BUDGETS = (0.25, 0.5, 0.75)
FULL, PROXY = "full", "proxy"
_EPS = 1e-9


@dataclass(frozen=True)
class TrialPoint:
    """One ended trial as compare sees it: where it lies (MACs ratio, accuracies) and what it kept."""

    trial_id: str
    order: int  # 0, 1, ... in the order the trials ended
    status: str  # finished | stopped | failed
    fidelity: str = FULL  # full | proxy
    role: str = ""  # a searcher's role for it (ARPruning: start, neighbour, final)
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    macs_ratio: float | None = None
    macs: float | None = None
    keep_ratios: Mapping[str, float] = field(default_factory=dict)
    dropped_blocks: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Finished with a validation accuracy and a MACs ratio: a point a plot or a front can use."""
        return self.status == "finished" and is_number(self.val_accuracy) and is_number(self.macs_ratio)


@dataclass(frozen=True)
class Search:
    """One search, from a run directory or an MLflow parent run."""

    name: str
    method: str
    model: str
    dataset: str
    macs_target: float | None
    macs_tolerance: float
    wall_s: float | None
    trials: tuple[TrialPoint, ...]
    source: str  # the run directory, or "<tracking URI> run <parent run id>"
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    baseline: Mapping[str, Any] = field(default_factory=dict)
    groups: Mapping[str, int] = field(default_factory=dict)  # group -> base channels (from the space)
    experiment_id: str | None = None  # the MLflow experiment, for a search read from MLflow
    final: TrialPoint | None = None  # ``prunetune finetune``'s result (summary.json's ``final``)


def best_within(search: Search, budget: float) -> TrialPoint | None:
    """The finished full, test-evaluated trial with the highest validation accuracy within ``budget``."""
    feasible = [t for t in search.trials if t.usable and t.fidelity == FULL
                and is_number(t.test_accuracy) and t.macs_ratio <= budget + _EPS]
    return max(feasible, key=lambda t: (t.val_accuracy, -t.macs_ratio), default=None)


def target_budget(search: Search) -> float | None:
    """The search's own MACs limit, ``macs_target + macs_tolerance`` (None when unknown)."""
    return None if search.macs_target is None else search.macs_target + search.macs_tolerance


def best_of(search: Search) -> TrialPoint | None:
    """The best trial within the search's own target, as ``summary.json``'s ``best``."""
    budget = target_budget(search)
    return None if budget is None else best_within(search, budget)


def front_of(search: Search) -> list[TrialPoint]:
    """The Pareto front (validation accuracy against MACs ratio) of the finished full trials."""
    points = [{"x": t.macs_ratio, "y": t.val_accuracy, "trial": t} for t in search.trials
              if t.usable and t.fidelity == FULL]
    return [point["trial"] for point in pareto_front(points, x="x", y="y")]


def final_of(search: Search) -> TrialPoint | None:
    """The search's final fine-tune: ``prunetune finetune``'s result where there is one, else a
    searcher's own final full fine-tune (ARPruning's ``role: final`` trial, the last if several)."""
    if search.final is not None:
        return search.final
    finals = [t for t in search.trials if t.role == "final" and t.status == "finished"]
    return finals[-1] if finals else None


def best_so_far(search: Search) -> list[tuple[int, float]]:
    """(trial number from 1, best validation accuracy so far) over the full trials within the target."""
    budget = target_budget(search)
    points, best = [], None
    for number, trial in enumerate(sorted(search.trials, key=lambda t: t.order), start=1):
        if trial.usable and trial.fidelity == FULL and (budget is None or trial.macs_ratio <= budget + _EPS):
            best = trial.val_accuracy if best is None else max(best, trial.val_accuracy)
        if best is not None:
            points.append((number, best))
    return points


def _cell(trial: TrialPoint | None) -> dict | None:
    if trial is None:
        return None
    return {"trial_id": trial.trial_id, "val_accuracy": trial.val_accuracy,
            "test_accuracy": trial.test_accuracy, "macs_ratio": trial.macs_ratio}


def trial_counts(search: Search) -> dict[str, int]:
    """Finished trials by fidelity, and the stopped and failed ones."""
    finished = [t for t in search.trials if t.status == "finished"]
    return {FULL: sum(t.fidelity == FULL for t in finished), PROXY: sum(t.fidelity == PROXY for t in finished),
            "stopped": sum(t.status == "stopped" for t in search.trials),
            "failed": sum(t.status == "failed" for t in search.trials)}


def compare_row(search: Search, budgets: Sequence[float]) -> dict[str, Any]:
    """The table's row of one search, as plain data (``--json``)."""
    best = best_of(search)
    return {
        "name": search.name, "method": search.method, "model": search.model, "dataset": search.dataset,
        "source": search.source, "parent_run_id": search.parent_run_id,
        "trials": trial_counts(search), "wall_s": search.wall_s,
        "macs_target": search.macs_target,
        "best_within": {_budget_key(b): _cell(best_within(search, b)) for b in budgets},
        "best": None if best is None else {**_cell(best), "keep_ratios": dict(best.keep_ratios),
                                           "dropped_blocks": list(best.dropped_blocks)},
        "pareto_size": len(front_of(search)),
        "final": _cell(final_of(search)),
        "baseline": {k: search.baseline.get(k) for k in ("val_accuracy", "test_accuracy", "macs")
                     if search.baseline.get(k) is not None},
    }


def compare_rows(searches: Iterable[Search], budgets: Sequence[float] = DEFAULT_BUDGETS) -> dict[str, Any]:
    """The whole table as data: the budgets, then one row per search."""
    return {"budgets": list(budgets), "searches": [compare_row(s, budgets) for s in searches]}


def _budget_key(budget: float) -> str:
    return f"{budget:g}"


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.25,0.5"`` -> (0.25, 0.5): MACs ratios in (0, 1], sorted; anything else is a UserError."""
    try:
        budgets = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--macs-budgets {text!r} is not a comma-separated list of numbers, "
                        f"e.g. 0.25,0.5,0.75") from None
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise UserError(f"--macs-budgets {text!r}: give MACs ratios of the base model in (0, 1], "
                        f"e.g. 0.25,0.5,0.75")
    return tuple(budgets)


# -- the printed table ---------------------------------------------------------------------------


def _acc(cell: Mapping | None) -> str:
    if not cell:
        return "-"
    test = cell.get("test_accuracy")
    return f"{cell['val_accuracy']:.4f}/" + ("-" if test is None else f"{test:.4f}")


def _trials_text(counts: Mapping[str, int]) -> str:
    text = f"{counts[FULL]} full"
    if counts[PROXY]:
        text += f" + {counts[PROXY]} proxy"
    extra = [f"{counts[k]} {k}" for k in ("stopped", "failed") if counts[k]]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _wall_text(wall_s: float | None) -> str:
    if wall_s is None:
        return "-"
    return f"{wall_s:.0f} s" if wall_s < 120 else f"{wall_s / 60:.1f} min"


def table_cells(table: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text cells) of the table: what both the terminal and the HTML show."""
    budgets = table["budgets"]
    header = ["search", "method", "model", "dataset", "trials", "wall",
              *[f"MACs <= {b:g}" for b in budgets], "own target", "front", "final fine-tune"]
    rows = []
    for row in table["searches"]:
        target = "-" if row["macs_target"] is None else f"{row['macs_target']:g}: {_acc(row['best'])}"
        rows.append([row["name"], row["method"], row["model"], row["dataset"], _trials_text(row["trials"]),
                     _wall_text(row["wall_s"]), *[_acc(row["best_within"][_budget_key(b)]) for b in budgets],
                     target, str(row["pareto_size"]), _acc(row["final"])])
    return header, rows


TABLE_NOTE = ("accuracy cells: validation/test accuracy of the full trial with the best validation accuracy "
              "within that MACs ratio (of the base model); proxy trials (a searcher's short fine-tunes) are "
              "counted apart and never chosen; front: trials on the Pareto front of the full trials")


def format_table(table: Mapping[str, Any]) -> str:
    """The table as aligned text for a terminal, with a note that says what the cells are."""
    header, rows = table_cells(table)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([*lines, "", TABLE_NOTE])


# -- reading a run directory ----------------------------------------------------------------------


def _dataset_name(dataset: Any) -> str:
    return str(dataset.get("name", "")) if isinstance(dataset, Mapping) else str(dataset or "")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if is_number(number) else None


def point_from_record(record: Mapping[str, Any], order: int) -> TrialPoint:
    """A ``trials.jsonl`` record as a TrialPoint."""
    metrics = record.get("metrics") or {}
    params = record.get("params") or {}
    policy = record.get("policy") or {}
    return TrialPoint(
        trial_id=str(record["trial_id"]), order=order, status=str(record.get("status", "")),
        fidelity=fidelity_of(params), role=str(params.get("role") or ""),
        val_accuracy=_number(metrics.get("val_accuracy")), test_accuracy=_number(record.get("test_accuracy")),
        macs_ratio=_number(metrics.get("macs_ratio")), macs=_number(metrics.get("macs")),
        keep_ratios={str(g): float(r) for g, r in (policy.get("keep_ratios") or {}).items()},
        dropped_blocks=tuple(policy.get("dropped_blocks") or ()))


def final_point(result: Mapping[str, Any] | None, order: int) -> TrialPoint | None:
    """``summary.json``'s ``final`` (a ``prunetune finetune`` result) as a TrialPoint, or None."""
    if not isinstance(result, Mapping) or _number(result.get("val_accuracy")) is None:
        return None
    policy = result.get("policy") or {}
    return TrialPoint(
        trial_id=f"final-{result.get('trial_id', '')}", order=order, status="finished", fidelity="final",
        role="final", val_accuracy=_number(result.get("val_accuracy")),
        test_accuracy=_number(result.get("test_accuracy")), macs_ratio=_number(result.get("macs_ratio")),
        macs=_number(result.get("macs")),
        keep_ratios={str(g): float(r) for g, r in (policy.get("keep_ratios") or {}).items()},
        dropped_blocks=tuple(policy.get("dropped_blocks") or ()))


def search_from_run_dir(run_dir: Path) -> Search:
    """Read one search from its run directory; a folder that is not a run is a UserError."""
    from prunetune.tracking.rundir import read_run_dir

    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass run directories made by `prunetune run`")
    contents = read_run_dir(run_dir)
    config, meta, summary = contents.config, contents.meta, contents.summary or {}
    groups = {g["name"]: int(g["channels"]) for g in (contents.space or {}).get("groups", [])}
    return Search(
        name=str(meta["name"]), method=str(meta.get("method") or config.get("method", "")),
        model=str(config.get("model", "")), dataset=_dataset_name(config.get("dataset")),
        macs_target=_number(config.get("macs_target", summary.get("macs_target"))),
        macs_tolerance=_number(config.get("macs_tolerance")) or 0.0,
        wall_s=_number(summary.get("wall_s")),
        trials=tuple(point_from_record(r, i) for i, r in enumerate(contents.trials)),
        source=str(run_dir), tracking_uri=meta.get("tracking_uri"), parent_run_id=meta.get("parent_run_id"),
        baseline=dict(summary.get("baseline") or {}), groups=groups,
        final=final_point(summary.get("final"), len(contents.trials)))
