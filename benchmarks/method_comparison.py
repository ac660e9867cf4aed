"""Compare pruning methods at one MACs target: best validation and test accuracy over seeds.

Runs ``prunetune run`` once per method and seed (each a real search: local Ray, sqlite MLflow), then
reads every ``summary.json`` and prints Markdown for BENCHMARKS.md: one row per run and one per
method (mean and standard deviation over seeds), the latter also from ``prunetune compare`` over the
searches' small files, which it keeps (``--keep``) so the table can be regenerated. The defaults are the project's shared comparison
setting (Fashion-MNIST, resnet20, half the MACs, 10% of the training split, 8 trials, 2 at a time):

    PRUNETUNE_CACHE=/work/cache python benchmarks/method_comparison.py
    python benchmarks/method_comparison.py --methods optuna,arpruning --seeds 0 -- --set arpruning.proxy=bn

Arguments after ``--`` go to every ``prunetune run`` unchanged. Base models are cached per seed,
so the first method of each seed pays for pretraining (its wall time is reported without it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from compare_table import search_failed

# --image-size 16: the figures in BENCHMARKS.md were measured at 16x16 (the embedded default's image
# size then applied to every dataset); kept so they reproduce and stay comparable.
SHARED = ["--model", "resnet20", "--dataset", "fashion-mnist", "--image-size", "16", "--macs-target", "0.5",
          "--data-fraction", "0.1",
          "--pretrain-epochs", "15", "--finetune-epochs", "2", "--trials", "8", "--concurrency", "2"]


def run_search(method: str, seed: int, *, storage: Path, shared: list[str], extra: list[str]) -> dict:
    """One ``prunetune run``; returns its summary.json plus the command and its wall time."""
    name = f"{method}-s{seed}"
    command = [sys.executable, "-m", "prunetune.search.cli", "run", *shared, "--method", method, "--seed", str(seed),
               "--name", name, "--storage", str(storage), *extra]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.monotonic() - started
    if search_failed(done, storage / name):
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((storage / name / "summary.json").read_text())
    return {**summary, "seed": seed, "command_wall_s": wall}


def run_row(s: dict) -> str:
    best = s["best"] or {}
    t = s["trials"]
    return (f"| {s['method']} | {s['seed']} | {s['baseline']['val_accuracy']:.4f} | {s['baseline']['test_accuracy']:.4f} | "
            f"{_f(best.get('val_accuracy'))} | {_f(best.get('test_accuracy'))} | {_f(best.get('macs_ratio'), 3)} | "
            f"{t['finished']}/{t['stopped']}/{t['failed']} | {s['wall_s']:.0f} | {s['command_wall_s']:.0f} |")


def method_row(method: str, runs: list[dict]) -> str:
    def stat(key: str) -> str:
        values = [r["best"][key] for r in runs if r["best"] and r["best"].get(key) is not None]
        if not values:
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    wall = statistics.mean(r["wall_s"] for r in runs)
    return f"| {method} | {len(runs)} | {stat('val_accuracy')} | {stat('test_accuracy')} | {stat('macs_ratio')} | {wall:.0f} |"


def _f(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="uniform,global,random,optuna")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--storage", type=Path, default=Path("/tmp/prunetune-bench") / date.today().isoformat())
    parser.add_argument("--shared", default=" ".join(SHARED), help="the shared settings (one string)")
    parser.add_argument("--keep", type=Path, default=Path(__file__).parent / "results" / "runs" / date.today().isoformat(),
                        help="keep each search's small files (summary.json, trials.jsonl, ...) here, so "
                             "benchmarks/compare_table.py regenerates the table from them")
    args = parser.parse_args(argv)
    shared = args.shared.split()
    args.storage.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# method comparison, {date.today()}, {platform.machine()}, {platform.node()}\n")
    print(f"settings: `prunetune run {' '.join(shared + extra)} --method M --seed S`\n")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    rows = ["| method | seed | base val | base test | best val | best test | best MACs ratio | "
            "finished/stopped/failed | search s | command s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seed in seeds:
        for method in methods:
            summary = run_search(method, seed, storage=args.storage, shared=shared, extra=extra)
            runs[method].append(summary)
            rows.append(run_row(summary))
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    print("\n| method | seeds | best val (mean ± sd) | best test (mean ± sd) | MACs ratio | search s (mean) |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        print(method_row(method, runs[method]))
    from compare_table import compare_json, keep, markdown  # benchmarks/ is this script's folder

    names = [f"{method}-s{seed}" for seed in seeds for method in methods]
    keep([str(args.storage / name) for name in names], args.keep)
    print(f"\nfrom `python benchmarks/compare_table.py {args.keep}/*` (prunetune compare over the kept searches):\n")
    print(markdown(compare_json([str(args.keep / name) for name in names]), "method"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
