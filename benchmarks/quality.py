"""Search quality at equal budget: do searched policies beat the one-shot heuristics?

For every MACs target, seed and method it runs a real search (``prunetune run``: local Ray, sqlite
MLflow), then gives each search's best policy the same final fine-tune (``prunetune finetune``,
with and without distillation from the base model) and prints Markdown for BENCHMARKS.md: per
method the mean and sd over seeds of the final test accuracy, the paired difference to the best
heuristic of the same seed and target (uniform, global l1, global LAMP) with its sd, trials and
wall time. The goal it measures against: at target 0.25 the best search at least 1 point above the
best heuristic, at 0.5 no search below it.

Setting: Fashion-MNIST at 28x28, resnet20, one base model per seed (cached), ``--data-fraction``
of the training split (default 0.02: about 1,100 images, so the whole grid fits in about an hour
and a half on 2 cores). It is resumable: a search or final fine-tune whose result is already in
``--storage`` is not run again, so after an interruption run the same command again:

    PRUNETUNE_CACHE=/work/cache python benchmarks/quality.py --storage /tmp/quality
    python benchmarks/quality.py --targets 0.25 --seeds 0 --methods global,optuna   # a slice

Raw results (every search's small files and the final results) are kept under ``--keep``.
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

ROOT = Path(__file__).resolve().parents[1]
HEURISTIC_METHODS = ("uniform", "global", "global-lamp")
SEARCH_METHODS = ("random", "optuna", "arpruning", "dcm")
# method name -> the flags that make it (global-lamp is the global baseline with LAMP normalisation)
METHOD_FLAGS = {
    "uniform": ["--method", "uniform"],
    "global": ["--method", "global", "--importance", "l1"],
    "global-lamp": ["--method", "global", "--importance", "l1", "--set", "global.normalizer=lamp"],
    "random": ["--method", "random"],
    "optuna": ["--method", "optuna"],
    "arpruning": ["--method", "arpruning", "--set", "arpruning.proxy=bn"],
    "dcm": ["--method", "dcm"],
    "dcpa": ["--method", "dcpa"],
}


def shared_flags(args) -> list[str]:
    return ["--model", "resnet20", "--dataset", "fashion-mnist", "--data-fraction", str(args.data_fraction),
            "--pretrain-epochs", str(args.pretrain_epochs), "--finetune-epochs", str(args.finetune_epochs),
            "--trials", str(args.trials), "--concurrency", "2", "--scheduler", "none"]


def cli(arguments: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "prunetune.search.cli", *arguments], capture_output=True, text=True,
                          cwd=ROOT)
    return done, time.monotonic() - started


def search(method: str, target: float, seed: int, args) -> dict:
    """One search (skipped when its summary.json exists); returns its summary."""
    name = f"{method}-t{target:g}-s{seed}"
    run_dir = args.storage / name
    if not (run_dir / "summary.json").exists():
        done, wall = cli(["run", *shared_flags(args), *METHOD_FLAGS[method], "--macs-target", str(target),
                          "--seed", str(seed), "--name", name, "--storage", str(args.storage)])
        if done.returncode != 0:
            raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        print(f"  {name}: {wall:.0f} s", file=sys.stderr, flush=True)
    return json.loads((run_dir / "summary.json").read_text())


def final(method: str, target: float, seed: int, distill: bool, args) -> dict:
    """The final fine-tune of the search's best policy (recorded in the run: resumable)."""
    name = f"{method}-t{target:g}-s{seed}"
    flags = ["--distill"] if distill else ["--no-distill"]
    done, wall = cli(["finetune", str(args.storage / name), "--epochs", str(args.final_epochs), *flags])
    if done.returncode != 0:
        raise SystemExit(f"final of {name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    results = [json.loads(p.read_text()) for p in (args.storage / name / "final").glob("*/result.json")]
    chosen = [r for r in results if r["distill"] == distill and r["recipe"]["epochs"] == args.final_epochs]
    print(f"  final of {name}{' (distilled)' if distill else ''}: {wall:.0f} s", file=sys.stderr, flush=True)
    return chosen[-1]


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def table(rows: list[dict], methods: list[str], targets: list[float], distill: bool) -> list[str]:
    """Per target and method: final test accuracy, the paired difference to the best heuristic."""
    out = ["| target | method | final test % (mean ± sd) | minus best heuristic, points (mean ± sd) | "
           "trials | search s |", "|---|---|---|---|---|---|"]
    for target in targets:
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["target"] == target and r["distill"] == distill]
            differences = []
            for row in mine:
                heuristics = [r["final"]["test_accuracy"] for r in rows if r["method"] in HEURISTIC_METHODS
                              and r["target"] == target and r["seed"] == row["seed"] and r["distill"] == distill]
                if heuristics:
                    differences.append(row["final"]["test_accuracy"] - max(heuristics))
            trials = statistics.mean(r["summary"]["trials"]["finished"] for r in mine) if mine else 0
            wall = statistics.mean(r["summary"]["wall_s"] for r in mine) if mine else 0
            out.append(f"| {target:g} | {method} | {mean_sd([r['final']['test_accuracy'] for r in mine])} | "
                       f"{mean_sd(differences)} | {trials:.1f} | {wall:.0f} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(HEURISTIC_METHODS + SEARCH_METHODS))
    parser.add_argument("--targets", default="0.5,0.25")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-fraction", type=float, default=0.02)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--final-epochs", type=int, default=5)
    parser.add_argument("--storage", type=Path, default=Path("/tmp/prunetune-quality"))
    parser.add_argument("--keep", type=Path, default=ROOT / "benchmarks" / "results" / "quality" / date.today().isoformat())
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    args.storage.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        for target in targets:
            for method in methods:
                summary = search(method, target, seed, args)
                for distill in (False, True):
                    rows.append({"method": method, "target": target, "seed": seed, "distill": distill,
                                 "summary": summary, "final": final(method, target, seed, distill, args)})
    args.keep.mkdir(parents=True, exist_ok=True)
    (args.keep / "rows.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"# search quality, {date.today()}, {platform.machine()}, {platform.node()}\n")
    print(f"settings: `prunetune run {' '.join(shared_flags(args))} --macs-target T --seed S` per method, then "
          f"`prunetune finetune RUN --epochs {args.final_epochs} [--distill]`\n")
    for distill in (False, True):
        print(f"\nfinal fine-tune {'with' if distill else 'without'} distillation:\n")
        print("\n".join(table(rows, methods, targets, distill)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
