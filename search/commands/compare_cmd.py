"""`prunetune compare [RUN_DIR ...] [--experiment NAME ...]`: searches side by side, in one table.

Reads each search from its run directory or from MLflow (every search of the experiments named),
prints one row per search: method, model, dataset, trials by fidelity, wall time, the best
validation/test accuracy within each MACs budget and within the search's own target, the size of
its Pareto front, and its final fine-tune's accuracy where there is one (``tracking.compare`` says
how each is chosen). ``--json`` prints the same table as data. ``--out DIR`` also writes the
figures and a self-contained ``compare.html``, and logs them to the compared searches' parent runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prunetune.pruning.errors import UserError

NAME = "compare"
DEFAULT_EXPERIMENT = "prunetune"
ARTIFACT_PATH = "compare"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help="compare searches: best accuracy per MACs budget, Pareto fronts, an HTML report",
        description="Compare searches read from run directories or MLflow experiments (with neither: "
                    f"experiment '{DEFAULT_EXPERIMENT}' of the tracking store).")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories of searches")
    parser.add_argument("--experiment", action="append", default=[], metavar="NAME",
                        help="every search of this MLflow experiment (repeatable)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="the MLflow store of --experiment (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///runs/mlflow.db)")
    parser.add_argument("--macs-budgets", default="0.25,0.5,0.75", metavar="B1,B2,...",
                        help="MACs ratios (of the base model) to report the best trial within (default: 0.25,0.5,0.75)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write the figures and compare.html here, and log them to the parent runs")
    parser.add_argument("--json", action="store_true", help="print the table as one JSON object")
    parser.set_defaults(handler=run)
    return parser


def load_searches(run_dirs: list[str], experiments: list[str], tracking_uri: str | None) -> list:
    """The searches named, run directories first; a search read twice (a run directory given twice, or
    its run directory and its MLflow parent run) is kept once, as read from its run directory."""
    from prunetune.tracking.compare import search_from_run_dir

    unique = dict.fromkeys(Path(path).expanduser().resolve() for path in run_dirs)  # one row per search
    searches = [search_from_run_dir(path) for path in unique]
    if experiments or not run_dirs:
        from prunetune.tracking.compare_mlflow import searches_from_mlflow
        from prunetune.tracking.uri import default_tracking_uri

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("runs")
        seen = {s.parent_run_id for s in searches if s.parent_run_id}
        searches += [s for s in searches_from_mlflow(uri, experiments or [DEFAULT_EXPERIMENT])
                     if s.parent_run_id not in seen]
    return searches


def write_report(searches: list, table: dict, budgets, out_dir: Path) -> list[Path]:
    """The figures and compare.html in ``out_dir``; returns every file written."""
    from prunetune.tracking.compare_plots import plot_all
    from prunetune.tracking.report_html import write_html

    figures = plot_all(searches, budgets, out_dir)
    captions = ["Validation accuracy against MACs ratio (of base): every trial (proxy trials hollow), each "
                "search's front of full trials, the budgets (dashed), each search's target (dotted), its best "
                "trial ringed", "Keep ratio per layer group of each search's best policy, and the blocks it "
                "drops", "Best validation accuracy within each search's target against the trials ended"]
    return [*figures, write_html(table, list(zip(figures, captions, strict=True)), out_dir)]


def log_to_parents(searches: list, files: list[Path]) -> None:
    """Log the report to each compared search's parent run; a store that fails is a warning."""
    from prunetune.tracking.compare_mlflow import log_report
    from prunetune.tracking.uri import sqlite_file, uri_scheme

    by_uri: dict[str, list[str]] = {}
    for search in searches:
        if search.tracking_uri and uri_scheme(search.tracking_uri) == "sqlite" and \
                not sqlite_file(search.tracking_uri).is_file():
            print(f"prunetune: warning: {search.name}'s MLflow store {search.tracking_uri} is gone; "
                  f"the report is not logged there", file=sys.stderr)
            continue
        if search.tracking_uri and search.parent_run_id:
            by_uri.setdefault(search.tracking_uri, []).append(search.parent_run_id)
    for uri, run_ids in by_uri.items():
        try:
            log_report(uri, run_ids, files, artifact_path=ARTIFACT_PATH)
            print(f"logged the report to {len(run_ids)} parent runs in {uri} (artifacts {ARTIFACT_PATH}/)",
                  file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - the report on disk is the result; MLflow is a copy
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            print(f"prunetune: warning: could not log the report to {uri} ({type(exc).__name__}: {first})",
                  file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from prunetune.tracking.compare import compare_rows, format_table, parse_budgets

    budgets = parse_budgets(args.macs_budgets)
    searches = load_searches(args.run_dirs, args.experiment, args.tracking_uri)
    if not searches:
        raise UserError("nothing to compare; pass run directories or --experiment NAME")
    table = compare_rows(searches, budgets)
    settings = sorted({(s.model, s.dataset) for s in searches})
    if len(settings) > 1:  # accuracies of different models or data are not one ranking
        print(f"prunetune: warning: these searches prune different models or data "
              f"({'; '.join(f'{model} on {dataset}' for model, dataset in settings)}): compare their rows "
              f"within one setting", file=sys.stderr)
    if args.out:
        out_dir = Path(args.out).expanduser()
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file; give a folder for the figures and compare.html")
        files = write_report(searches, table, budgets, out_dir)
        table["report"] = [str(path) for path in files]
        log_to_parents(searches, files)
        print(f"wrote {', '.join(path.name for path in files)} to {out_dir}", file=sys.stderr)
    print(json.dumps(table, indent=1) if args.json else format_table(table))
    print_ui_links(searches)
    return 0


def print_ui_links(searches: list) -> None:
    """Where MLflow's UI shows every trial of the experiments read (to stderr: stdout is the table)."""
    from prunetune.tracking.experiment_view import trials_url
    from prunetune.tracking.uri import HTTP_SCHEMES, uri_scheme

    for uri, experiment_id in dict.fromkeys((s.tracking_uri, s.experiment_id) for s in searches
                                            if s.experiment_id is not None):
        if uri_scheme(uri) in HTTP_SCHEMES:
            print(f"every trial in MLflow: {trials_url(uri, experiment_id)}", file=sys.stderr)
        else:
            print(f"every trial in MLflow: run `mlflow ui --backend-store-uri {uri}`, then open "
                  f"{trials_url('http://127.0.0.1:5000', experiment_id)}", file=sys.stderr)
