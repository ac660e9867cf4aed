"""What Ray Tune, MLflow and the run directory cost: `prunetune run` against a plain Python loop.

The same N trials (the `random` searcher's policies for one seed, the same fine-tuning, no early
stopping) run three ways, side by side in one invocation:

1. `prunetune run --concurrency 1` (a subprocess: local Ray, sqlite MLflow, checkpoints);
2. a plain loop in this process calling ``search.trial.run_trial`` on the policies that run
   recorded in trials.jsonl, with one torch thread like a 1-CPU trial;
3. `prunetune run --concurrency 2`.

It prints the wall-time ratio of (1) to (2), the overhead per trial, and the speed-up of (3) over
(2) and over (1). Wall time of a search is the whole command (Ray start, base model from the cache,
every trial, summary), so fixed costs count; ``--trials`` sets how far they are amortised.

    python benchmarks/search_overhead.py                     # resnet20 on 5% of Fashion-MNIST
    python benchmarks/search_overhead.py --preset tiny       # small_cnn on digits (seconds per trial)

Superseded by ``benchmarks/throughput.py`` (trials per hour against a loop of one process per
worker, at concurrency 1 and 2, with the in-search time and the per-phase timing); kept for the
figures in BENCHMARKS.md that it produced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "resnet20": ["--model", "resnet20", "--dataset", "fashion-mnist", "--data-fraction", "0.05",
                 "--pretrain-epochs", "10", "--finetune-epochs", "2"],
    "tiny": ["--model", "small_cnn", "--dataset", "digits", "--pretrain-epochs", "10", "--finetune-epochs", "3"],
}


def prunetune_run(args: list[str], *, name: str, storage: Path, cache: Path) -> tuple[float, Path]:
    command = [sys.executable, "-m", "prunetune.search.cli", "run", *args, "--name", name, "--storage", str(storage)]
    env = {**os.environ, "PRUNETUNE_CACHE": str(cache)}
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"prunetune run {name} failed: {done.stderr.strip().splitlines()[-3:]}")
    return wall, storage / name


def plain_loop(run_dir: Path, *, cache: Path) -> tuple[float, float, int]:
    """Prepare once (cached base model), then run the recorded policies one after another.

    Returns (seconds of the loop, seconds of preparation, trials).
    """
    import torch

    from prunetune.pruning.policy import Policy
    from prunetune.search.config import load_config
    from prunetune.search.driver import prepare
    from prunetune.search.trial import run_trial

    torch.set_num_threads(1)
    cfg = load_config(run_dir / "config.yaml", saved=True)
    records = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines() if line.strip()]
    started = time.monotonic()
    _, setup, _ = prepare(cfg, run_dir=run_dir, cache_dir=cache, log=lambda _message: None)
    prepared = time.monotonic()
    for record in records:
        run_trial(setup, Policy.from_json(record["policy"]), seed=cfg.seed, report=lambda *_: None)
    return time.monotonic() - prepared, prepared - started, len(records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="resnet20")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("PRUNETUNE_CACHE", "/work/cache")))
    args = parser.parse_args()
    common = [*PRESETS[args.preset], "--method", "random", "--trials", str(args.trials), "--scheduler", "none",
              "--seed", "0"]
    with tempfile.TemporaryDirectory(prefix="prunetune-overhead-") as tmp:
        storage = Path(tmp)
        prunetune_run([*common, "--trials", "1"], name="warm-cache", storage=storage, cache=args.cache)
        one_wall, run_dir = prunetune_run([*common, "--concurrency", "1"], name="c1", storage=storage,
                                          cache=args.cache)
        loop_wall, prep_wall, n = plain_loop(run_dir, cache=args.cache)
        two_wall, run_dir2 = prunetune_run([*common, "--concurrency", "2"], name="c2", storage=storage,
                                           cache=args.cache)
        same = [json.loads(x)["policy"] for x in (run_dir / "trials.jsonl").read_text().splitlines()]
        same2 = [json.loads(x)["policy"] for x in (run_dir2 / "trials.jsonl").read_text().splitlines()]
        policies_match = sorted(map(json.dumps, same)) == sorted(map(json.dumps, same2))
    print(f"# search overhead, {date.today()}, {platform.machine()} ({os.cpu_count()} cores), preset {args.preset}\n")
    print(f"command: `python benchmarks/search_overhead.py --preset {args.preset} --trials {args.trials}`; "
          f"trials: `prunetune run {' '.join(common)}`\n")
    print("| way | trials | wall s | per trial s |")
    print("|---|---|---|---|")
    print(f"| plain loop over run_trial (1 thread; + {prep_wall:.1f} s to load data and the cached base model) | "
          f"{n} | {loop_wall:.1f} | {loop_wall / n:.2f} |")
    print(f"| prunetune run, concurrency 1 (whole command) | {n} | {one_wall:.1f} | {one_wall / n:.2f} |")
    print(f"| prunetune run, concurrency 2 (whole command) | {n} | {two_wall:.1f} | {two_wall / n:.2f} |")
    print(f"\n- concurrency 1 / plain loop (incl. its preparation): **{one_wall / (loop_wall + prep_wall):.2f}x** wall time; "
          f"overhead {(one_wall - loop_wall - prep_wall) / n:.2f} s per trial")
    print(f"- speed-up of concurrency 2 over the plain loop: **{(loop_wall + prep_wall) / two_wall:.2f}x**, over concurrency 1: "
          f"**{one_wall / two_wall:.2f}x**")
    print(f"- both searches ran the same policies: {policies_match}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
