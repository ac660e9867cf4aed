"""`prunetune sync RUN_DIR`: log to MLflow whatever the run directory has and MLflow lacks, never twice."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "sync"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="fill MLflow in from a run directory (idempotent)")
    parser.add_argument("run_dir", help="the run directory of the search")
    parser.add_argument("--tracking-uri", default=None, help="log into this store instead of the run's own")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Sync; into the run's own store only while no ``run``, ``resume`` or ``finetune`` logs into it
    (the run directory's lock, ``tracking.run_lock``). A sync into another store shares nothing with
    the run's writer, so it may run beside it."""
    import contextlib

    from prunetune.tracking.run_lock import run_lock
    from prunetune.tracking.rundir import read_meta
    from prunetune.tracking.sync import sync_run_dir
    from prunetune.tracking.uri import check_tracking_uri, same_store

    run_dir = Path(args.run_dir).expanduser().resolve()
    if args.tracking_uri:
        check_tracking_uri(args.tracking_uri, folder_may_be_missing=True)  # sync may start a new store
    own_store = args.tracking_uri is None or same_store(args.tracking_uri, read_meta(run_dir)["tracking_uri"])
    with run_lock(run_dir, NAME) if own_store else contextlib.nullcontext():
        report = sync_run_dir(run_dir, tracking_uri=args.tracking_uri)
    print(f"synced {run_dir}: parent run {report.parent_run_id}"
          f"{' (created)' if report.created_parent else ''}, {report.trials_logged} trials logged, "
          f"{report.trials_already_present} already present")
    return 0
