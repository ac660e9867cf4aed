"""Search quality at equal budget: do searched policies beat the one-shot heuristics?

For every MACs target, seed and method it runs a real search (``prunetune run``: local Ray, sqlite
MLflow), then gives each search's best policy the same final fine-tune (``prunetune finetune``,
with and without distillation from the base model) and prints Markdown for BENCHMARKS.md: per
method the mean and sd over seeds of the final test accuracy, the paired difference to the best
heuristic of the same seed and target (uniform, global l1, global LAMP, and uniform and global in
BatchNorm-scale order; the best by test, an oracle) and to the heuristic with the best final
validation accuracy (the one a user would pick), each with its sd, trials, the search's wall time
and the number of final fine-tunes (one, or one per candidate; their seconds are in rows.json). A ``-top3`` method is its base method's search with another final: the final
fine-tune of its 3 best trials by validation (and of its heuristics' trials, for optuna), the one
with the best final validation accuracy kept (``final.candidates``), at the cost of one final each. The goal it measures against: at target 0.25 the best search at least 1 point above the
best heuristic, at 0.5 no search below it.

Setting: Fashion-MNIST at 28x28, resnet20 (``--model``, ``--dataset``, ``--image-size`` change it), one
base model per seed (cached), ``--data-fraction`` of the training split (default 0.02: about 1,100 images; validation and test splits whole). The
no-distillation final is the search's own end-of-run fine-tune (``final.epochs``); the distilled
one is ``prunetune finetune --distill`` on the same run. The loop goes target by target (0.25
first: there the goal asks for a win), seed by seed, so an interrupted run has whole targets. It is
resumable: a search or final fine-tune whose result is already in ``--storage`` is not run again,
so after an interruption run the same command again:

    PRUNETUNE_CACHE=/work/cache python benchmarks/quality.py --storage /work/quality
    python benchmarks/quality.py --targets 0.25 --seeds 0 --methods global,optuna   # a slice
    python benchmarks/quality.py --storage /work/quality --table-only   # what is there, running nothing
    # on a GPU machine that holds CIFAR-10's files: resnet56 at 32x32 on all of it, 4 trials per GPU
    python benchmarks/quality.py --storage /tmp/q56 --model resnet56 --dataset cifar10 --set dataset.root=DIR \
        --data-fraction 1 --concurrency 4 --set resources.gpus_per_trial=0.25 \
        --methods uniform,global,uniform-bn,global-bn,random-bn,random-bn-top3

A search found in ``--storage`` with another setting (model, data, epochs) is refused, not reused.

Every search's small files (``prunetune.json``, ``config.yaml``, ``space.json``, ``trials.jsonl``,
``summary.json``) and final results are kept under ``--keep``, with ``rows.json``; the method
table is printed a second time from the kept files through ``prunetune compare``
(``benchmarks/compare_table.py``), so anyone can print it again from them.
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

import yaml
from compare_table import compare_json, keep, markdown, search_failed

ROOT = Path(__file__).resolve().parents[1]
HEURISTIC_METHODS = ("uniform", "global", "global-lamp", "uniform-bn", "global-bn")
SEARCH_METHODS = ("optuna-affine", "optuna-affine-bn", "optuna-affine-e3", "optuna-affine-full-e3", "optuna-stages", "optuna",
                  "arpruning", "dcm", "dcpa", "cdp-dtc", "optuna-affine-bn-top3", "optuna-affine-bn-top6", "optuna-affine-top3", "dcpa-top3",
                  "optuna-affine-bn-p1", "optuna-affine-bn-p1-top3", "random-bn", "random-bn-top3")
# method name -> the flags that make it (global-lamp is the global baseline with LAMP normalisation)
METHOD_FLAGS = {
    "uniform": ["--method", "uniform"],
    "global": ["--method", "global", "--importance", "l1"],
    "global-lamp": ["--method", "global", "--importance", "l1", "--set", "global.normalizer=lamp"],
    # the same two in BatchNorm-scale order (network slimming's criterion, DCP-A's default)
    "uniform-bn": ["--method", "uniform", "--importance", "bn_scale"],
    "global-bn": ["--method", "global", "--importance", "bn_scale"],
    "random": ["--method", "random"],
    "optuna": ["--method", "optuna"],
    # optuna as issue 10 asks for it: warm-started (the default), two-stage (16 proxies scored after
    # BatchNorm recalibration, the best 3 and the heuristics promoted to the full fine-tune),
    # intermediate reports on a quarter of the validation split, in a low-dimensional
    # parameterisation: LeGR's affine transform of the global ranking (24 coordinates on resnet20,
    # starting from global l1) or one keep ratio per stage in and out of its blocks (6)
    **{f"optuna-{kind}": ["--method", "optuna", "--trials", "16", "--set", "fidelity.promote=3",
                          "--set", "fidelity.proxy_epochs=0", "--set", f"space.parameterisation={kind}",
                          "--set", "val_subset=0.25"] for kind in ("affine", "stages")},
    # the same with a one-epoch proxy (on a quarter of the training split) instead of BatchNorm only
    "optuna-affine-p1": ["--method", "optuna", "--trials", "16", "--set", "fidelity.promote=3",
                         "--set", "fidelity.proxy_epochs=1", "--set", "space.parameterisation=affine",
                         "--set", "val_subset=0.25"],
    # the affine search with trials of 3 fine-tuning epochs instead of 1 (the final's budget is unchanged:
    # it prunes the base model afresh), two-stage as above or all 12 trials at full fidelity
    "optuna-affine-e3": ["--method", "optuna", "--trials", "16", "--set", "fidelity.promote=3",
                         "--set", "fidelity.proxy_epochs=0", "--set", "space.parameterisation=affine",
                         "--set", "val_subset=0.25", "--finetune-epochs", "3"],
    "optuna-affine-full-e3": ["--method", "optuna", "--trials", "12", "--set", "space.parameterisation=affine",
                              "--set", "val_subset=0.25", "--finetune-epochs", "3"],
    # optuna-affine ranking channels by BatchNorm scale instead of l1 (its heuristics then in that order too)
    "optuna-affine-bn": ["--method", "optuna", "--importance", "bn_scale", "--trials", "16",
                         "--set", "fidelity.promote=3", "--set", "fidelity.proxy_epochs=0",
                         "--set", "space.parameterisation=affine", "--set", "val_subset=0.25"],
    # the same with a one-epoch proxy (on a quarter of the training split) instead of BatchNorm only: at
    # 0.25 the BatchNorm-only proxy's tau was -0.11 ± 0.84 and its searched candidates lost to the heuristics
    "optuna-affine-bn-p1": ["--method", "optuna", "--importance", "bn_scale", "--trials", "16",
                            "--set", "fidelity.promote=3", "--set", "fidelity.proxy_epochs=1",
                            "--set", "space.parameterisation=affine", "--set", "val_subset=0.25"],
    # ARPruning with the proxy that ranks best (BENCHMARKS.md, "ARPruning: how well the proxies rank
    # policies": one fine-tuning epoch, tau 0.63 against the full fine-tune; BatchNorm alone -0.01)
    # random keep ratios per group in BatchNorm order, after the warm start's 3 heuristics (11 trials): the
    # headroom benchmark's search, where some random policies beat every heuristic by more than a point
    "random-bn": ["--method", "random", "--importance", "bn_scale", "--trials", "11"],
    "arpruning": ["--method", "arpruning", "--set", "arpruning.proxy=epochs:1"],
    "dcm": ["--method", "dcm"],
    "dcpa": ["--method", "dcpa"],
    "cdp-dtc": ["--method", "cdp-dtc"],
}
LEARNERS = ("dcm", "dcpa", "cdp-dtc")  # a trial learns its policy: fewer, longer trials (--learner-trials)
# A search's final by another rule, on the same search (its run directory is the base method's): the
# final fine-tune of several candidates, the one with the best final validation accuracy kept
# (``final.candidates``, ``final.heuristics``). Its cost is one final per candidate ("final s").
FINAL_VARIANTS = {
    "optuna-affine-bn-top3": ("optuna-affine-bn", ["--candidates", "3", "--heuristics"]),
    # the 6 best: where the heuristics lead the trials' validation (they often do), about 3 searched policies
    "optuna-affine-bn-top6": ("optuna-affine-bn", ["--candidates", "6", "--heuristics"]),
    "optuna-affine-top3": ("optuna-affine", ["--candidates", "3", "--heuristics"]),
    "optuna-affine-bn-p1-top3": ("optuna-affine-bn-p1", ["--candidates", "3", "--heuristics"]),
    "dcpa-top3": ("dcpa", ["--candidates", "3"]),
    "random-bn-top3": ("random-bn", ["--candidates", "3", "--heuristics"]),
}


def shared_flags(args) -> list[str]:
    size = ["--image-size", str(args.image_size)] if args.image_size else []
    return ["--model", args.model, "--dataset", args.dataset, *size, "--data-fraction", str(args.data_fraction),
            "--pretrain-epochs", str(args.pretrain_epochs), "--finetune-epochs", str(args.finetune_epochs),
            "--concurrency", str(args.concurrency), "--scheduler", "none", "--set", f"final.epochs={args.final_epochs}",
            *(flag for item in args.set for flag in ("--set", item))]


def setting(args) -> dict:
    """What a kept search must share with this invocation to be reused: its config.yaml's values."""
    return {"model": args.model, "dataset.name": args.dataset, "dataset.image_size": args.image_size,
            "dataset.data_fraction": args.data_fraction, "pretrain.epochs": args.pretrain_epochs,
            "finetune.epochs": args.finetune_epochs}


def check_reusable(run_dir: Path, args) -> None:
    """Refuse a search in ``--storage`` made with another setting: its results would be reported as this one's."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    differ = []
    for key, wanted in setting(args).items():
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value != wanted:
            differ.append(f"{key} {value!r} (here {wanted!r})")
    if differ:
        raise SystemExit(f"quality.py: {run_dir} was searched with another setting: {', '.join(differ)}; "
                         f"give another --storage for this one")


def trials_flags(method: str, args) -> list[str]:
    if "--trials" in METHOD_FLAGS[method]:
        return []
    return ["--trials", str(args.learner_trials if method in LEARNERS else args.trials)]


def cli(arguments: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "prunetune.search.cli", *arguments], capture_output=True, text=True,
                          cwd=ROOT)
    return done, time.monotonic() - started


def run_name(method: str, target: float, seed: int) -> str:
    """The search's run directory name (a final variant's is its base method's)."""
    return f"{FINAL_VARIANTS.get(method, (method,))[0]}-t{target:g}-s{seed}"


def finished(method: str, target: float, seed: int, args) -> bool:
    """Whether that search's summary is in the storage (``--table-only`` shows only those)."""
    return (args.storage / run_name(method, target, seed) / "summary.json").exists()


def search(method: str, target: float, seed: int, args) -> dict:
    """One search (skipped when its summary.json exists); returns its summary."""
    name = run_name(method, target, seed)
    run_dir = args.storage / name
    method = FINAL_VARIANTS.get(method, (method,))[0]
    if (run_dir / "config.yaml").exists():
        check_reusable(run_dir, args)
    if not (run_dir / "summary.json").exists():
        done, wall = cli(["run", *shared_flags(args), *trials_flags(method, args), *METHOD_FLAGS[method],
                          "--macs-target", str(target), "--seed", str(seed), "--name", name,
                          "--storage", str(args.storage)])
        if search_failed(done, run_dir):
            raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        print(f"  {name}: {wall:.0f} s", file=sys.stderr, flush=True)
    return json.loads((run_dir / "summary.json").read_text())


def final_results(run_dir: Path, distill: bool, epochs: int, trial_id: str | None = None) -> list[dict]:
    """The finished final fine-tunes in ``run_dir`` with these settings (of ``trial_id`` only, if given)."""
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "final").glob("*/result.json"))]
    return [r for r in results if r["distill"] == distill and r["recipe"]["epochs"] == epochs
            and trial_id in (None, r["trial_id"])]


def variant_file(run_dir: Path, method: str, distill: bool, epochs: int) -> Path:
    """Where a final variant's outcome (summary.json's ``final`` after it ran) is kept, so that the
    run's next final does not overwrite it: ``final/quality-<variant>-<distill>-e<epochs>.json``."""
    return run_dir / "final" / f"quality-{method}-{'distill' if distill else 'plain'}-e{epochs}.json"


NONE_WITHIN = "none within target"  # a search none of whose trials met the target: no best, no final


def final(method: str, target: float, seed: int, distill: bool, args, summary: dict) -> dict | None:
    """The final fine-tune of the search's best policy: the search's own (no distillation), or
    ``prunetune finetune --distill``; a result already in the run is reused (resumable). None when the
    search has no best (no trial within the target): there is nothing to fine-tune."""
    if summary.get("best") is None:
        return None
    name = run_name(method, target, seed)
    run_dir = args.storage / name
    flags = ["--distill"] if distill else ["--no-distill"]
    if method in FINAL_VARIANTS:
        kept = variant_file(run_dir, method, distill, args.final_epochs)
        if not kept.exists():
            finetune(run_dir, [*flags, *FINAL_VARIANTS[method][1]], f"{method} of {name}", args)
            outcome = json.loads((run_dir / "summary.json").read_text())["final"]
            kept.write_text(json.dumps(outcome, indent=1) + "\n")
        outcome = json.loads(kept.read_text())
        results = {r["trial_id"]: r for r in final_results(run_dir, distill, args.final_epochs)}
        outcome["finals"] = len(outcome["candidates"])
        outcome["final_seconds"] = sum(results[c["trial_id"]]["trial_seconds"] for c in outcome["candidates"])
        return outcome
    best = summary["best"]["trial_id"]
    if not final_results(run_dir, distill, args.final_epochs, best):
        finetune(run_dir, flags, f"final of {name}", args)
    chosen = final_results(run_dir, distill, args.final_epochs, best)[-1]
    return {**chosen, "finals": 1, "final_seconds": chosen["trial_seconds"]}


def final_done(method: str, target: float, seed: int, distill: bool, args, summary: dict) -> bool:
    """Whether that final (``--table-only`` shows only those) is in the storage."""
    run_dir = args.storage / run_name(method, target, seed)
    if method in FINAL_VARIANTS:
        return variant_file(run_dir, method, distill, args.final_epochs).exists()
    return bool(final_results(run_dir, distill, args.final_epochs, summary["best"]["trial_id"]))


def finetune(run_dir: Path, flags: list[str], what: str, args) -> None:
    """``prunetune finetune RUN_DIR --epochs E FLAGS`` (it reuses what it finished before)."""
    done, wall = cli(["finetune", str(run_dir), "--epochs", str(args.final_epochs), *flags])
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    print(f"  {what}{' (distilled)' if '--distill' in flags else ''}: {wall:.0f} s", file=sys.stderr, flush=True)


def mean_sd(values: list[float], scale: float = 100, digits: int = 2) -> str:
    """Mean ± sample sd of ``values`` times ``scale`` (100: accuracies in percent or points)."""
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def tau_of(summary: dict) -> float | None:
    """The proxy's Kendall tau against the full budget over the promoted trials, where the search has one."""
    fidelity = summary.get("fidelity") or {}
    return fidelity.get("kendall_tau") if isinstance(fidelity, dict) else None


def table(rows: list[dict], methods: list[str], targets: list[float], distill: bool) -> list[str]:
    """Per target and method: final test accuracy, the paired difference to the best heuristic."""
    out = ["| target | method | seeds | final test % (mean ± sd) | minus best heuristic, points (mean ± sd) | "
           "minus the heuristic with the best final val, points | MACs ratio | trials (full + proxy) | proxy tau | "
           "search s | final fine-tunes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for target in targets:
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["target"] == target and r["distill"] == distill]
            if not mine:
                continue
            reached = [r for r in mine if r["final"] is not None]
            missed = len(mine) - len(reached)
            accuracy = mean_sd([r["final"]["test_accuracy"] for r in reached]) if reached else NONE_WITHIN
            if reached and missed:
                accuracy += f" ({missed} of {len(mine)} {NONE_WITHIN})"
            differences, by_val = [], []
            for row in reached:
                heuristics = [r["final"] for r in rows if r["method"] in HEURISTIC_METHODS
                              and r["final"] is not None and r["target"] == target and r["seed"] == row["seed"]
                              and r["distill"] == distill]
                if heuristics:  # the best by test (an oracle), and the one validation would pick
                    differences.append(row["final"]["test_accuracy"] - max(h["test_accuracy"] for h in heuristics))
                    picked = max(heuristics, key=lambda h: h["val_accuracy"])
                    by_val.append(row["final"]["test_accuracy"] - picked["test_accuracy"])
            full = statistics.mean((r["summary"].get("fidelity") or {}).get("full", 0) for r in mine)
            proxy = statistics.mean((r["summary"].get("fidelity") or {}).get("proxy", 0) for r in mine)
            taus = [t for t in (tau_of(r["summary"]) for r in mine) if t is not None]
            wall = statistics.mean(r["summary"]["wall_s"] for r in mine)
            finals = statistics.mean(r["final"]["finals"] for r in reached) if reached else None
            out.append(f"| {target:g} | {method} | {len(mine)} | {accuracy} | {mean_sd(differences)} | "
                       f"{mean_sd(by_val)} | {mean_sd([r['final']['macs_ratio'] for r in reached], 1, 3)} | "
                       f"{full:.1f} + {proxy:.1f} | {mean_sd(taus, 1) if taus else '-'} | {wall:.0f} | "
                       f"{'-' if finals is None else f'{finals:.1f}'} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(HEURISTIC_METHODS + SEARCH_METHODS),
                        help="comma-separated methods (the table's rows; default: all but the -top variants)")
    parser.add_argument("--targets", default="0.25,0.5", help="comma-separated MACs targets (default: 0.25,0.5)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one base model each (default: 0,1,2)")
    parser.add_argument("--model", default="resnet20", help="model of every search (default: resnet20)")
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset of every search (default: fashion-mnist)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize images to N x N (default: the dataset's own, 28 for Fashion-MNIST)")
    parser.add_argument("--data-fraction", type=float, default=0.02,
                        help="fraction of the training split (default: 0.02; validation and test stay whole)")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="base model's epochs (default: 15)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="each trial's fine-tuning epochs (default: 1)")
    parser.add_argument("--trials", type=int, default=10, help="trials of a searcher's search (default: 10)")
    parser.add_argument("--learner-trials", type=int, default=4,
                        help=f"trials of a learner's search, {', '.join(LEARNERS)} (default: 4)")
    parser.add_argument("--final-epochs", type=int, default=10, help="epochs of every final fine-tune (default: 10)")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once in each search (default: 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every search, e.g. resources.gpus_per_trial=0.5 (repeatable)")
    parser.add_argument("--distill", choices=("both", "on", "off"), default="both",
                        help="which final fine-tunes to run: with distillation, without, or both")
    parser.add_argument("--storage", type=Path, default=Path("/tmp/prunetune-quality"),
                        help="where the searches run; a search already there with this setting is reused")
    parser.add_argument("--keep", type=Path, default=ROOT / "benchmarks" / "results" / "quality" / date.today().isoformat(),
                        help="where the small files of every search and rows.json are kept (default: today's folder)")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: the tables from the searches and finals already in --storage")
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    distills = {"both": (False, True), "on": (True,), "off": (False,)}[args.distill]
    args.storage.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in targets:
        for seed in seeds:
            for method in methods:
                if args.table_only and not finished(method, target, seed, args):
                    continue
                summary = search(method, target, seed, args)
                for distill in distills:
                    if args.table_only and summary.get("best") and not final_done(method, target, seed, distill,
                                                                                   args, summary):
                        continue
                    rows.append({"method": method, "target": target, "seed": seed, "distill": distill,
                                 "summary": summary, "final": final(method, target, seed, distill, args, summary)})
    if not rows:
        raise SystemExit(f"quality.py: nothing to report: no finished search of those methods, targets and seeds "
                         f"in {args.storage}; run without --table-only to run them")
    run_dirs = sorted({str(args.storage / run_name(r["method"], r["target"], r["seed"])) for r in rows})
    keep(run_dirs, args.keep / "runs")
    (args.keep / "rows.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"# search quality, {date.today()}, {platform.machine()}, {platform.node()}\n")
    print(f"settings: `prunetune run {' '.join(shared_flags(args))} --trials {args.trials} (learners "
          f"{args.learner_trials}) --macs-target T --seed S` per method, then "
          f"`prunetune finetune RUN --epochs {args.final_epochs} --distill`\n")
    for distill in distills:
        print(f"\nfinal fine-tune {'with' if distill else 'without'} distillation:\n")
        print("\n".join(table(rows, methods, targets, distill)))
    print("\nthe searches through `prunetune compare` (best trial within the target, before the final fine-tune):\n")
    print(markdown(compare_json(sorted(str(p) for p in (args.keep / "runs").iterdir())), "name"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
