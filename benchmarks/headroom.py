"""Headroom at a MACs target: does any policy of the space beat the one-shot heuristics, whatever the searcher?

The search-quality goal (issue 10; ``benchmarks/quality.py``) asks the best search to be at least 1 point above the
best heuristic at MACs target 0.25. This measures whether policies that good exist in the setting at all,
independently of how a searcher ranks them. Per seed it draws random policies within the target (``--method
random``: one uniform draw per group, and a second search with one draw per stage, ``space.parameterisation=stages``),
the first search warm-started with the heuristics (uniform, global and global LAMP, in ``--importance`` order), and
gives every policy the same final fine-tune as quality.py's searches (``prunetune finetune RUN --candidates K
--heuristics``: all of them). It reports per seed the best heuristic's final test accuracy, the random policies'
best, median and worst, how many beat the best heuristic and how many by a point, the policy that the best final
*validation* accuracy picks, and Kendall's tau between the trials' short fine-tune and the final's validation;
then each random search read as a search: the policy it would choose with one final (its best trial by the
trials' validation), with the final of its 3 best trials and the heuristics, and with the final of all of them.

If no random policy reaches +1, a searcher can reach it only by finding a policy rarer than 1 in the draws; if some
do, it is the searchers' ranking that is missing. Same setting and cache as quality.py (Fashion-MNIST at 28x28,
resnet20, ``--data-fraction`` of the training split), resumable the same way (a finished search or final is reused):

    PRUNETUNE_CACHE=/work/cache python benchmarks/headroom.py --storage /work/headroom --data-fraction 0.05
    python benchmarks/headroom.py --storage /work/headroom --data-fraction 0.05 --seeds 0   # one seed

``--heuristics-from QUALITY_STORAGE`` adds quality.py's uniform and global l1 finals of the same seeds (same
setting, same base models) to the heuristics measured against, as the search-quality goal takes the best of them
all. Each search's small files and every final's ``result.json`` are kept under ``--keep`` with ``rows.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
from datetime import date
from pathlib import Path

from compare_table import keep
from quality import ROOT, cli, final_results, finetune, shared_flags

# the random searches of a seed: parameterisation -> whether the heuristics are evaluated first (once is enough)
SEARCHES = {"groups": True, "stages": False}
HEURISTIC_COUNT = 3  # uniform, global, global-lamp (methods.heuristics.HEURISTICS)


def run_dir_of(args, parameterisation: str, seed: int) -> Path:
    return args.storage / f"random-{parameterisation}-t{args.target:g}-s{seed}"


def search(args, parameterisation: str, seed: int) -> Path:
    """One random search (skipped when its summary exists), then the final of every one of its policies."""
    run_dir = run_dir_of(args, parameterisation, seed)
    warm = SEARCHES[parameterisation]
    trials = args.draws + (HEURISTIC_COUNT if warm else 0)
    if not (run_dir / "summary.json").exists():
        done, wall = cli(["run", *shared_flags(args), "--method", "random", "--importance", args.importance,
                          "--trials", str(trials), "--set", f"space.parameterisation={parameterisation}",
                          "--set", f"warm_start={str(warm).lower()}", "--macs-target", str(args.target),
                          "--seed", str(seed), "--name", run_dir.name, "--storage", str(args.storage)])
        if done.returncode != 0 or not (run_dir / "summary.json").exists():
            raise SystemExit(f"{run_dir.name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        print(f"  {run_dir.name}: {wall:.0f} s", file=sys.stderr, flush=True)
    finetune(run_dir, ["--no-distill", "--candidates", str(trials), *(["--heuristics"] if warm else [])],
             f"finals of {run_dir.name}", args)
    return run_dir


def finals_of(run_dir: Path, parameterisation: str, args) -> list[dict]:
    """Every final of the run (no distillation, the final's epochs), with the heuristic it is, if any."""
    from prunetune.pruning.policy import Policy
    from prunetune.tracking.rundir import read_heuristics

    names = {Policy.from_json(p).key(): f"{n} ({args.importance})" for n, p in reversed(read_heuristics(run_dir).items())}
    return [{"search": run_dir.name, "parameterisation": parameterisation, "trial_id": r["trial_id"], "heuristic": names.get(Policy.from_json(r["policy"]).key()),
             "trial_val": r["trial_val_accuracy"], "val": r["val_accuracy"], "test": r["test_accuracy"],
             "macs_ratio": r["macs_ratio"], "policy": r["policy"]} for r in final_results(run_dir, False, args.final_epochs)]


def reference_heuristics(args, seed: int) -> list[dict]:
    """The finals of quality.py's heuristics in l1 order (``uniform``, ``global``) for this seed and target, from
    its storage (``--heuristics-from``): the search-quality goal is measured against the best of every heuristic."""
    if args.heuristics_from is None:
        return []
    found = []
    for method in ("uniform", "global"):
        run_dir = args.heuristics_from / f"{method}-t{args.target:g}-s{seed}"
        results = final_results(run_dir, False, args.final_epochs) if run_dir.is_dir() else []
        if not results:
            raise SystemExit(f"headroom.py: no {args.final_epochs}-epoch final of {run_dir}; run quality.py with "
                             f"--methods {method} --targets {args.target:g} --seeds {seed} there first")
        r = results[-1]
        found.append({"search": run_dir.name, "parameterisation": None, "trial_id": r["trial_id"],
                      "heuristic": f"{method} (l1)", "trial_val": r["trial_val_accuracy"], "val": r["val_accuracy"],
                      "test": r["test_accuracy"], "macs_ratio": r["macs_ratio"], "policy": r["policy"]})
    return found


def seed_row(seed: int, finals: list[dict]) -> dict:
    """The figures of one seed: the best heuristic against the random policies' finals."""
    from scipy.stats import kendalltau

    heuristics = [f for f in finals if f["heuristic"]]
    drawn = [f for f in finals if not f["heuristic"]]
    best_h = max(heuristics, key=lambda f: f["test"])
    gains = sorted(f["test"] - best_h["test"] for f in drawn)
    picked = max(finals, key=lambda f: f["val"])  # what a user with every final in hand would keep
    searched = {kind: _as_search([f for f in finals if f["parameterisation"] == kind]) for kind in SEARCHES}
    return {"searches": {name: {rule: r["test"] - best_h["test"] for rule, r in rows.items()}
                         for name, rows in searched.items()},
            "seed": seed, "best_heuristic": best_h["heuristic"], "best_heuristic_test": best_h["test"],
            "heuristics": {f["heuristic"]: f["test"] for f in heuristics}, "policies": len(drawn),
            "best_gain": gains[-1], "median_gain": statistics.median(gains), "worst_gain": gains[0],
            "above": sum(g > 0 for g in gains), "above_by_1": sum(g >= 0.01 for g in gains),
            "picked_by_val": picked["heuristic"] or picked["search"], "picked_gain": picked["test"] - best_h["test"],
            "tau_trial_vs_final_val": kendalltau([f["trial_val"] for f in finals], [f["val"] for f in finals]).statistic,
            "tau_final_val_vs_test": kendalltau([f["val"] for f in finals], [f["test"] for f in finals]).statistic}


def _as_search(finals: list[dict]) -> dict[str, dict]:
    """What the search of these finals (its trials, the warm start's heuristics among them) would have
    chosen: its best trial by the trials' own validation (the usual one final), the best final validation
    of its 3 best trials and its heuristics (``final.candidates=3``, ``final.heuristics``), and of all."""
    ranked = sorted(finals, key=lambda f: -f["trial_val"])
    top3 = ranked[:3] + [f for f in ranked[3:] if f["heuristic"]]
    return {"one final": ranked[0], "top 3": max(top3, key=lambda f: f["val"]),
            "all": max(finals, key=lambda f: f["val"])}


def search_table(rows: list[dict]) -> list[str]:
    """Each random search as a search: its chosen policy's final test minus the seed's best heuristic."""
    names = list(rows[0]["searches"])
    rules = list(rows[0]["searches"][names[0]])
    out = ["| random search | chosen by | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean ± sd | finals |",
           "|---|---|" + "---|" * (len(rows) + 2)]
    for name in names:
        for rule in rules:
            gains = [100 * r["searches"][name][rule] for r in rows]
            spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
            finals = {"one final": "1", "top 3": "3 (+ its heuristics)", "all": "all"}[rule]
            out.append(f"| {name} | {rule} | " + " | ".join(f"{g:+.2f}" for g in gains)
                       + f" | {statistics.mean(gains):+.2f} ± {spread:.2f} | {finals} |")
    return out


def table(rows: list[dict]) -> list[str]:
    out = ["| seed | best heuristic: final test % | random policies | best, median, worst of them minus it, points | "
           "above it | above by 1 point | final val picks (minus it) | tau: trial val vs final val | "
           "tau: final val vs test |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['seed']} | {r['best_heuristic']} {100 * r['best_heuristic_test']:.2f} | {r['policies']} | "
                   f"{100 * r['best_gain']:+.2f}, {100 * r['median_gain']:+.2f}, {100 * r['worst_gain']:+.2f} | "
                   f"{r['above']} | {r['above_by_1']} | {r['picked_by_val']} ({100 * r['picked_gain']:+.2f}) | "
                   f"{r['tau_trial_vs_final_val']:.2f} | {r['tau_final_val_vs_test']:.2f} |")
    return out


def keep_finals(run_dirs: list[Path], out: Path) -> None:
    """The searches' small files, and each final's plan and result (no checkpoints)."""
    keep([str(d) for d in run_dirs], out)
    for run_dir in run_dirs:
        for result in (run_dir / "final").glob("*/result.json"):
            target = out / run_dir.name / "final" / result.parent.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(result, target / result.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.25, help="the MACs target (a ratio of the base model's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--importance", default="bn_scale", help="the criterion of the heuristics and of the pruning")
    parser.add_argument("--draws", type=int, default=8, help="random policies per parameterisation and seed")
    parser.add_argument("--data-fraction", type=float, default=0.05)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--final-epochs", type=int, default=10)
    parser.add_argument("--storage", type=Path, default=Path("/tmp/prunetune-headroom"))
    parser.add_argument("--heuristics-from", type=Path, default=None,
                        help="quality.py's --storage for the same setting: its uniform and global l1 finals join the "
                             "heuristics measured against")
    parser.add_argument("--keep", type=Path, default=ROOT / "benchmarks" / "results" / "headroom" / date.today().isoformat())
    args = parser.parse_args()
    args.storage.mkdir(parents=True, exist_ok=True)
    rows, run_dirs = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        finals = [f for kind in SEARCHES for f in finals_of(search(args, kind, seed), kind, args)]
        finals += reference_heuristics(args, seed)
        rows.append({**seed_row(seed, finals), "finals": finals})
        run_dirs += [run_dir_of(args, kind, seed) for kind in SEARCHES]
    keep_finals(run_dirs, args.keep / "runs")
    (args.keep / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"# headroom at MACs target {args.target:g}, {date.today()}, {platform.machine()}, {platform.node()}\n")
    print(f"settings: `prunetune run {' '.join(shared_flags(args))} --method random --importance {args.importance} "
          f"--macs-target {args.target:g}` per parameterisation ({args.draws} random policies each of "
          f"{', '.join(SEARCHES)}; the heuristics first in the groups search), then `prunetune finetune RUN --epochs {args.final_epochs} "
          f"--candidates K --heuristics` of every policy\n")
    print("\n".join(table(rows)))
    print("\neach random search as a search would choose (its final test minus the best heuristic's, points):\n")
    print("\n".join(search_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
