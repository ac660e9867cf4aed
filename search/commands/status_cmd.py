"""`prunetune status RUN_DIR`: trial counts, the best trial so far, and whether the search runs;
``--timing``: where each ended trial's time went (``search.timing``).

It reads the run directory's JSON and YAML files only, so it imports neither torch nor ray nor
mlflow (a test holds it to that) and answers at once, even while the search runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "status"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="show a search's progress and best trial so far")
    parser.add_argument("run_dir", help="the run directory of the search")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timing", action="store_true",
                        help="also show where each ended trial's time went: seconds per phase (scheduling, "
                             "a learner's learning, load, prune, bn_recalibration, train, evaluate, latency, "
                             "checkpoint, report, logging)")
    parser.set_defaults(handler=run)
    return parser


def search_status(run_dir: Path) -> dict:
    """Counts by status, the best trial within the target so far, and the state of the search."""
    from prunetune.search.config import load_config
    from prunetune.search.summary import best_trial
    from prunetune.tracking.rundir import (
        CONFIG_FILE,
        SUMMARY_FILE,
        TRIALS_FILE,
        driver_alive,
        read_meta,
        read_trials,
    )

    meta = read_meta(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE, saved=True, names=False)  # checked at its start; torch checks them
    records = read_trials(run_dir / TRIALS_FILE)
    counts = {s: sum(1 for r in records if r["status"] == s) for s in ("finished", "stopped", "failed")}
    best = best_trial(records, macs_limit=cfg.macs_target + cfg.macs_tolerance)
    state = ("finished" if (run_dir / SUMMARY_FILE).exists() else
             "running" if driver_alive(run_dir) else "interrupted")
    return {"name": meta["name"], "run_dir": str(run_dir), "method": meta["method"], "state": state,
            "trials": {**counts, "budget": cfg.trials}, "macs_target": cfg.macs_target,
            "best": None if best is None else {k: best[k] for k in ("trial_id", "val_accuracy", "macs_ratio")},
            "tracking_uri": meta["tracking_uri"]}


def trial_timings(run_dir: Path) -> dict:
    """``{trial_id: timing}`` of the ended trials that recorded one (``search.timing``)."""
    from prunetune.tracking.rundir import TRIALS_FILE, read_trials

    return {r["trial_id"]: r["timing"] for r in read_trials(run_dir / TRIALS_FILE) if r.get("timing")}


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).expanduser().resolve()
    status = search_status(run_dir)
    if args.json:
        print(json.dumps({**status, **({"timing": trial_timings(run_dir)} if args.timing else {})}, indent=1))
        return 0
    t = status["trials"]
    print(f"{status['name']} ({status['method']}): {status['state']}; {t['finished']} finished, "
          f"{t['stopped']} stopped early, {t['failed']} failed of {t['budget']} trials")
    best = status["best"]
    print("best so far: " + ("none within the MACs target" if best is None else
                             f"trial {best['trial_id']}, val accuracy {best['val_accuracy']:.4f}, "
                             f"MACs ratio {best['macs_ratio']:.3f}"))
    if status["state"] == "interrupted":
        print(f"continue with: prunetune resume {status['run_dir']}")
    if args.timing:
        from prunetune.search.timing import timing_table
        from prunetune.tracking.rundir import TRIALS_FILE, read_trials

        print()
        print(timing_table(read_trials(run_dir / TRIALS_FILE)))
    return 0
