"""How well ARPruning's cheap proxy ranks policies: Kendall's tau against the full fine-tune.

At the shared comparison setting (Fashion-MNIST at 16x16, resnet20, MACs target 0.5, 10% of the
training split, the cached 15-epoch base model, 2 fine-tuning epochs), each policy is run once as a
real trial (``search.trial.run_trial``, the function Ray runs; here in one plain process, 1 torch
thread) with the full fine-tune. Its epoch-0 report, after pruning and BatchNorm recalibration, is
exactly the ``bn`` proxy of an ARPruning neighbour (a proxy trial runs the same code with 0
epochs: checked on the first policy); ``--epochs-proxy N`` also runs each policy as an
``epochs:N`` proxy trial. Two sets of policies:

- ``neighbourhood``: what ARPruning ranks, its round 0: the global start (ranked by the criterion,
  attention by default) and its first neighbours (keep ratio moved between two groups at constant
  MACs);
- ``diverse``: the uniform policy and random policies in the MACs band (the random baseline).

Printed as Markdown: each policy's proxy and full validation accuracy (and test accuracy), then
Kendall's tau-b (scipy) and Spearman's rho per set and over all, and whether the proxy's best is
the full fine-tune's best. Results go to a JSONL file as they come, so a rerun continues.

    PRUNETUNE_CACHE=/work/cache python benchmarks/arpruning_proxy.py --out /tmp/proxy.jsonl --epochs-proxy 1
    PRUNETUNE_CACHE=/work/cache python benchmarks/arpruning_proxy.py --out /tmp/l1.jsonl --epochs-proxy 1 --importance l1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = {"model": "resnet20", "dataset.name": "fashion-mnist", "dataset.image_size": 16, "macs_target": 0.5,
          "dataset.data_fraction": 0.1, "pretrain.epochs": 15, "finetune.epochs": 2, "method": "arpruning"}


def policies(base, space, calib, *, target: float, criterion: str, neighbours: int, diverse: int,
             seed: int) -> list[tuple]:
    """``[(set, label, Policy)]``: ARPruning's round 0 (start + neighbours), then uniform and random ones."""
    from prunetune.methods.registry import make_searcher, start_policy_for
    from prunetune.methods.uniform import uniform_policy_for_target

    start = start_policy_for("arpruning", base.model, space, macs_target=target, calib=calib,
                             options={"criterion": criterion})
    search = make_searcher("arpruning", space, macs_target=target, seed=seed, budget=neighbours + 2,
                           concurrency=neighbours + 1, start_policy=start)
    chosen = [("neighbourhood", p.info["role"] + (f" {p.info['move']}" if p.info.get("move") else ""), p.policy)
              for p in iter(search.ask, None)]
    chosen.append(("diverse", "uniform", uniform_policy_for_target(space, target)))
    randoms = make_searcher("random", space, macs_target=target, seed=seed, budget=diverse - 1, concurrency=diverse)
    chosen += [("diverse", f"random {i}", p.policy) for i, p in enumerate(iter(randoms.ask, None))]
    return chosen


def run_policy(setup, policy, *, epochs: int | None, seed: int) -> dict:
    """One trial of ``policy`` (``epochs``: its own fine-tune length, as a proxy trial gets); its metrics."""
    from prunetune.search.trial import run_trial

    if epochs is not None:
        setup = replace(setup, finetune=replace(setup.finetune, epochs=epochs))
    started = time.perf_counter()
    result = run_trial(setup, policy, seed=seed, report=lambda metrics, write: None)
    return {"val": result["val_accuracy"], "test": result["test_accuracy"], "history": result["history"],
            "macs_ratio": result["macs_ratio"], "seconds": time.perf_counter() - started}


def measure(args) -> list[dict]:
    """Run every policy not yet in ``args.out``; return all records."""
    import torch

    from prunetune.search.config import load_config, resolved_importance
    from prunetune.search.driver import prepare
    from prunetune.search.prepare import default_cache_dir, log_to_stderr

    torch.set_num_threads(args.threads)
    overrides = {**SHARED, "seed": args.seed, **({"importance": args.importance} if args.importance else {})}
    cfg = load_config(overrides=overrides, names=True)
    base, setup, calib = prepare(cfg, run_dir=Path("."), cache_dir=default_cache_dir(), log=log_to_stderr)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    keys = {r["key"] for r in done}
    for index, (group, label, policy) in enumerate(policies(base, base.space, calib, target=cfg.macs_target,
                                                            criterion=resolved_importance(cfg),
                                                            neighbours=args.neighbours, diverse=args.diverse,
                                                            seed=args.seed)):
        if policy.key() in keys:
            continue
        full = run_policy(setup, policy, epochs=None, seed=cfg.seed)
        record = {"key": policy.key(), "set": group, "label": label, "macs_ratio": full["macs_ratio"],
                  "bn": full["history"][0]["val_accuracy"], "full_val": full["val"], "full_test": full["test"],
                  "full_s": full["seconds"]}
        if index == 0:  # the bn proxy is the full trial's epoch-0 report: check it once, for real
            bn = run_policy(setup, policy, epochs=0, seed=cfg.seed)
            record["bn_trial"], record["bn_s"] = bn["val"], bn["seconds"]
        if args.epochs_proxy:
            short = run_policy(setup, policy, epochs=args.epochs_proxy, seed=cfg.seed)
            record[f"epochs{args.epochs_proxy}"], record["short_s"] = short["val"], short["seconds"]
        with open(args.out, "a") as file:
            file.write(json.dumps(record) + "\n")
        done.append(record)
        print(f"  {group} {label}: bn {record['bn']:.4f}, full val {full['val']:.4f} ({full['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    return done


def correlations(records: list[dict], proxy: str) -> tuple[str, str, str]:
    """Kendall's tau-b, Spearman's rho (with p-values) and top-1 agreement of ``proxy`` against full val."""
    from scipy.stats import kendalltau, spearmanr

    xs, ys = [r[proxy] for r in records], [r["full_val"] for r in records]
    tau, tau_p = kendalltau(xs, ys)
    rho, rho_p = spearmanr(xs, ys)
    top = max(range(len(xs)), key=xs.__getitem__) == max(range(len(ys)), key=ys.__getitem__)
    return f"{tau:+.3f} (p {tau_p:.3f})", f"{rho:+.3f} (p {rho_p:.3f})", "yes" if top else "no"


def report(records: list[dict], args) -> str:
    proxies = ["bn"] + ([f"epochs{args.epochs_proxy}"] if args.epochs_proxy else [])
    lines = [f"# ARPruning proxy ranking, {date.today()}, {platform.machine()}, {args.threads} torch thread(s)", "",
             f"setting: {' '.join(f'{k}={v}' for k, v in SHARED.items())}, importance "
             f"{args.importance or 'attention (the method default)'}, seed {args.seed}; full = "
             f"{SHARED['finetune.epochs']} fine-tuning epochs", "",
             "| set | policy | MACs ratio | " + " | ".join(f"{p} val" for p in proxies) +
             " | full val | full test | full s |", "|---|---|---|" + "---|" * len(proxies) + "---|---|---|"]
    for r in records:
        lines.append(f"| {r['set']} | {r['label']} | {r['macs_ratio']:.3f} | " +
                     " | ".join(f"{r[p]:.4f}" for p in proxies) +
                     f" | {r['full_val']:.4f} | {r['full_test']:.4f} | {r['full_s']:.0f} |")
    checked = [r for r in records if "bn_trial" in r]
    for r in checked:
        lines += ["", f"bn proxy check: a 0-epoch trial of '{r['label']}' scored {r['bn_trial']:.4f}, the full "
                  f"trial's epoch-0 report {r['bn']:.4f} ({r['bn_s']:.0f} s against {r['full_s']:.0f} s)"]
    lines += ["", "| proxy | policies | Kendall tau-b | Spearman rho | proxy's best is the best |", "|---|---|---|---|---|"]
    for proxy in proxies:
        for name, subset in (("neighbourhood", [r for r in records if r["set"] == "neighbourhood"]),
                             ("diverse", [r for r in records if r["set"] == "diverse"]), ("all", records)):
            if len(subset) >= 3:
                tau, rho, top = correlations(subset, proxy)
                lines.append(f"| {proxy} ({name}) | {len(subset)} | {tau} | {rho} | {top} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL of results (appended; a rerun continues)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbours", type=int, default=11, help="neighbours of the start (+ the start)")
    parser.add_argument("--diverse", type=int, default=6, help="uniform + random policies")
    parser.add_argument("--epochs-proxy", type=int, default=0, help="also score an epochs:N proxy (0: no)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--importance", default=None, help="criterion of trials and start (default: attention)")
    args = parser.parse_args()
    os.environ.setdefault("PRUNETUNE_CACHE", "/work/cache")
    records = measure(args)
    print(report(records, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
