"""CDP+DTC's accuracy/MACs front from a sweep of delta, against uniform, global and optuna at the same MACs.

CDP+DTC reaches the MACs its delta (DTC's threshold factor) lets die, not a target (METHODS.md). So
for each model and each delta of ``--deltas`` it runs a ``cdp-dtc`` search with delta fixed
(``cdp_dtc.delta_min = delta_max``; the similarity weights still searched, ``--trials`` trials,
objective pareto, no target in the way); the MACs ratio its best trial reaches is then the target of
a ``uniform`` and a ``global`` (l1) search, and with ``--baselines uniform,global,optuna`` of an optuna
search too, on the same base model. Every search's best policy gets the same final fine-tune (the search's own,
``final.epochs``). It prints one Markdown table per model (delta, MACs ratio reached, final test
accuracy of each method at that MACs) and draws ``front-<model>.png`` into ``--keep``, with every
search's small files.

Setting: Fashion-MNIST at 28x28 with ``--data-fraction`` of the training split, seed 0. Resumable
like ``benchmarks/quality.py`` (a search whose summary.json exists is not run again):

    PRUNETUNE_CACHE=/work/cache python benchmarks/delta_front.py --storage /work/delta-front
    python benchmarks/delta_front.py --models vgg11 --deltas 0.2,0.6      # a slice
    python benchmarks/delta_front.py --storage /work/delta-front --table-only   # what is there, running nothing
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path

from compare_table import keep, search_failed
from quality import ROOT, cli, final_results

BASELINES = {"uniform": ["--method", "uniform"], "global": ["--method", "global", "--importance", "l1"],
             "optuna": ["--method", "optuna"]}


def flags(model: str, args) -> list[str]:
    return ["--model", model, "--dataset", "fashion-mnist", "--data-fraction", str(args.data_fraction),
            "--pretrain-epochs", str(args.pretrain_epochs), "--finetune-epochs", str(args.finetune_epochs),
            "--concurrency", "2", "--scheduler", "none", "--seed", "0", "--storage", str(args.storage),
            "--set", f"final.epochs={args.final_epochs}",
            # the per-epoch reports (trials' and the final's) on a quarter of the validation split; the
            # last report is on the whole of it, and the test accuracy compared is the whole test split's
            "--set", f"val_subset={args.val_subset}"]


def run(name: str, arguments: list[str], args) -> dict:
    """One search (skipped when its summary.json exists): its summary with its final fine-tune's result."""
    run_dir = args.storage / name
    if not (run_dir / "summary.json").exists() and args.table_only:
        return {"name": name, "summary": None, "final": None}  # not run: shown as "-"
    if not (run_dir / "summary.json").exists():
        done, wall = cli(["run", *arguments, "--name", name])
        if search_failed(done, run_dir):
            raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        print(f"  {name}: {wall:.0f} s", file=sys.stderr, flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    finals = final_results(run_dir, False, args.final_epochs)
    return {"name": name, "summary": summary, "final": finals[-1] if finals else None}


def sweep(model: str, args) -> list[dict]:
    """Per delta: the cdp-dtc point and the baselines' at the MACs ratio it reached."""
    rows = []
    for delta in args.deltas:
        cdp = run(f"cdp-dtc-{model}-d{delta:g}", [*flags(model, args), "--method", "cdp-dtc", "--objective", "pareto",
                                                 "--macs-target", "1", "--trials", str(args.trials),
                                                 "--set", f"cdp_dtc.delta_min={delta}",
                                                 "--set", f"cdp_dtc.delta_max={delta}"], args)
        row = {"delta": delta, "cdp-dtc": cdp}
        best = (cdp["summary"] or {}).get("best")
        if best is None:
            rows.append(row)
            continue
        target = math.ceil(best["macs_ratio"] * 1000) / 1000  # the baselines may spend what cdp-dtc spent
        row["macs_target"] = target
        for method in args.baselines:
            trials = ["--trials", str(args.optuna_trials)] if method == "optuna" else []
            row[method] = run(f"{method}-{model}-t{target:g}", [*flags(model, args), *BASELINES[method],
                                                                 "--macs-target", str(target), *trials], args)
        rows.append(row)
    return rows


def point(entry: dict | None) -> tuple[float, float] | None:
    final = (entry or {}).get("final")
    return (final["macs_ratio"], final["test_accuracy"]) if final else None


def markdown(model: str, rows: list[dict], methods: list[str]) -> str:
    head = "| delta | cdp-dtc MACs ratio | " + " | ".join(f"{m} final test" for m in ["cdp-dtc", *methods]) + " |"
    lines = [f"{model}:", "", head, "|" + "---|" * (2 + 1 + len(methods))]
    for row in rows:
        cdp = point(row["cdp-dtc"])
        cells = [f"{p[1]:.4f} (MACs {p[0]:.3f})" if p else "-" for p in
                 (point(row.get(m)) for m in ["cdp-dtc", *methods])]
        lines.append(f"| {row['delta']:g} | {cdp[0]:.3f} |" if cdp else f"| {row['delta']:g} | - |")
        lines[-1] += " " + " | ".join(cells) + " |"
    return "\n".join(lines)


def plot(model: str, rows: list[dict], methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for method, marker in zip(["cdp-dtc", *methods], "osD^", strict=False):
        points = sorted(p for p in (point(r.get(method)) for r in rows) if p)
        if points:
            axes.plot(*zip(*points, strict=True), marker=marker, label=method)
    axes.set_xlabel("MACs ratio (of base)")
    axes.set_ylabel("test accuracy after the final fine-tune")
    axes.set_title(f"{model} on Fashion-MNIST: cdp-dtc's delta sweep against baselines", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(out / f"front-{model}.png", dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vgg11")
    parser.add_argument("--deltas", default="0.1,0.25,0.6")
    parser.add_argument("--baselines", default="uniform,global", help="add optuna for its front too (costly)")
    parser.add_argument("--data-fraction", type=float, default=0.02)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=1,
                        help="cdp-dtc trials per delta (the similarity weights searched; the shrinking terms' "
                             "weights are fixed by default, methods/cdp_dtc_options.py)")
    parser.add_argument("--val-subset", type=float, default=0.25)
    parser.add_argument("--optuna-trials", type=int, default=10)
    parser.add_argument("--final-epochs", type=int, default=10)
    parser.add_argument("--storage", type=Path, default=Path("/tmp/prunetune-delta-front"))
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: the table, plot and kept files of the searches already in --storage")
    parser.add_argument("--keep", type=Path,
                        default=ROOT / "benchmarks" / "results" / "delta-front" / date.today().isoformat())
    args = parser.parse_args()
    args.deltas = [float(d) for d in args.deltas.split(",")]
    args.baselines = args.baselines.split(",")
    args.storage.mkdir(parents=True, exist_ok=True)
    args.keep.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in args.models.split(","):
        rows = sweep(model, args)
        results[model] = rows
        keep([str(args.storage / e["name"]) for r in rows for e in r.values()
              if isinstance(e, dict) and e["summary"] is not None], args.keep / "runs")
        plot(model, rows, args.baselines, args.keep)
        print(markdown(model, rows, args.baselines) + "\n", flush=True)
    (args.keep / "rows.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
