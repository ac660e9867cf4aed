"""BENCHMARKS.md's method tables from ``prunetune compare``: one row per method, mean and sd over seeds.

Runs ``prunetune compare --json`` over the benchmark's searches (run directories, kept ones
included, or MLflow experiments: any arguments ``prunetune compare`` takes), groups its rows by
method, or by the search name with its ``-s<seed>`` suffix removed (``--by name``), and prints the
Markdown table: best validation and test accuracy within the target, its MACs ratio, the trials by
fidelity and the mean wall time. So the tables can be regenerated from what a benchmark kept:

    python benchmarks/compare_table.py /tmp/prunetune-bench/baselines/*-s[0-9]
    python benchmarks/compare_table.py --by name -- --experiment prunetune --tracking-uri sqlite:///DIR/mlflow.db

``--keep DIR`` copies the small files of each run directory given (``prunetune.json``,
``config.yaml``, ``space.json``, ``trials.jsonl``, ``summary.json``; no checkpoints) into DIR,
where ``prunetune compare`` reads them as it reads the originals.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

KEPT_FILES = ("prunetune.json", "config.yaml", "space.json", "trials.jsonl", "summary.json")


def compare_json(arguments: list[str]) -> dict:
    """The output of ``prunetune compare ARGUMENTS --json``."""
    done = subprocess.run([sys.executable, "-m", "prunetune.search.cli", "compare", *arguments, "--json"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip() or f"prunetune compare exited {done.returncode}")
    return json.loads(done.stdout)


def group_key(row: dict, by: str) -> str:
    return row["method"] if by == "method" else re.sub(r"-s[0-9]+$", "", row["name"])


def _stat(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(table: dict, by: str) -> str:
    """One row per group: searches, trials, best val / test within the target, MACs ratio, wall time."""
    groups: dict[str, list[dict]] = {}
    for row in table["searches"]:
        groups.setdefault(group_key(row, by), []).append(row)
    lines = ["| method | searches | trials per search (full + proxy) | best val | best test | MACs ratio "
             "| search s (mean) |", "|---|---|---|---|---|---|---|"]
    for key, rows in groups.items():
        bests = [r["best"] for r in rows if r["best"]]
        trials = {f"{r['trials']['full']} + {r['trials']['proxy']}" for r in rows}
        walls = [r["wall_s"] for r in rows if r["wall_s"] is not None]
        wall = f"{statistics.mean(walls):.0f}" if walls else "-"
        lines.append(f"| {key} | {len(rows)} | {', '.join(sorted(trials))} "
                     f"| {_stat([b['val_accuracy'] for b in bests])} | {_stat([b['test_accuracy'] for b in bests])} "
                     f"| {_stat([b['macs_ratio'] for b in bests], 3)} | {wall} |")
    return "\n".join(lines)


NO_BEST_EXIT = 1  # `prunetune run`'s status when its trials finished but none met a constrained MACs target


def search_failed(done: subprocess.CompletedProcess, run_dir: Path) -> bool:
    """Whether a ``prunetune run`` failed: any non-zero exit but the one for "no trial met the MACs
    target", a finished search (summary.json written, ``best`` null) that a table shows as such."""
    if done.returncode in (0, NO_BEST_EXIT) and (Path(run_dir) / "summary.json").is_file():
        return done.returncode != 0 and json.loads((Path(run_dir) / "summary.json").read_text()).get("best") is not None
    return True


def keep(run_dirs: list[str], out: Path) -> None:
    """Copy each run directory's small files into ``out/<name>/``."""
    for run_dir in map(Path, run_dirs):
        target = out / run_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, target / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", help="run directories (or pass compare's arguments after --)")
    parser.add_argument("--by", choices=("method", "name"), default="method",
                        help="group rows by method, or by search name without its -s<seed> suffix")
    parser.add_argument("--keep", type=Path, default=None, help="copy the run directories' small files here")
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if args.keep:
        keep(args.run_dirs, args.keep)
    print(markdown(compare_json([*args.run_dirs, *rest]), args.by))


if __name__ == "__main__":
    main()
