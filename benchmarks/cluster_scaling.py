"""Trials per hour against the number of worker nodes of a local multi-node Ray cluster.

For each worker count (default 1, 2, 3; one CPU each) it starts a real local cluster with
`prunetune cluster up --local`, runs the same search on it with `prunetune run --address ...`
(the `random` searcher's policies for one seed, the same fine-tuning, no early stopping,
`--concurrency` = the worker count), reads the search's `wall_s` (first trial to summary) and the
whole command's wall time, and stops the cluster. Throughput is trials per hour of `wall_s`; the
speed-up is against one worker, the parallel efficiency the speed-up divided by the worker count.

With `--gpu` it runs the GPU variant instead: one worker node with one GPU and four CPUs, and the
same search with 1, 2 and 4 trials sharing the GPU (`--gpus-per-trial` 1, 0.5, 0.25).

    python benchmarks/cluster_scaling.py                       # small_cnn on digits, 12 trials
    python benchmarks/cluster_scaling.py --workers 1 2 --trials 6
    python benchmarks/cluster_scaling.py --gpu                 # needs a CUDA machine
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SEARCH = ["--model", "small_cnn", "--dataset", "digits", "--method", "random", "--seed", "0",
          "--pretrain-epochs", "10", "--finetune-epochs", "3", "--scheduler", "none"]


def cli(args: list[str], *, env: dict, timeout: float = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"prunetune {' '.join(args[:2])} failed: {done.stderr.strip()[-1500:]}")
    return done


def one_setting(work: Path, label: str, *, up: list[str], run: list[str], trials: int, env: dict) -> dict:
    """Start a cluster, run the search on it, stop it; return the timings."""
    directory = work / f"cluster-{label}"
    token = {"RAY_AUTH_TOKEN_PATH": str(work / "token")}
    started = time.monotonic()
    printed = json.loads(cli(["cluster", "up", "--local", "--dir", str(directory), "--json", *up],
                             env={**env, **token}).stdout)
    up_s = time.monotonic() - started
    try:
        driver_env = {**env, **token, "RAY_AUTH_MODE": "token"}
        started = time.monotonic()
        cli(["run", *SEARCH, *run, "--trials", str(trials), "--name", f"scaling-{label}",
             "--storage", str(work / "runs"), "--address", printed["address"],
             "--tracking-uri", printed["tracking_uri"]], env=driver_env)
        command_s = time.monotonic() - started
    finally:
        cli(["cluster", "down", "--dir", str(directory)], env=env)
    summary = json.loads((work / "runs" / f"scaling-{label}" / "summary.json").read_text())
    finished = summary["trials"]["finished"]
    if finished != trials:
        raise SystemExit(f"{label}: {finished} of {trials} trials finished")
    return {"label": label, "trials": finished, "wall_s": summary["wall_s"], "command_s": command_s,
            "cluster_up_s": up_s, "trials_per_hour": finished / summary["wall_s"] * 3600}


def cpu_settings(workers: list[int]) -> list[tuple[str, list[str], list[str], int]]:
    return [(f"{n} worker{'s' if n > 1 else ''}", ["--workers", str(n), "--cpus-per-worker", "1"],
             ["--concurrency", str(n), "--cpus-per-trial", "1"], n) for n in workers]


def gpu_settings() -> list[tuple[str, list[str], list[str], int]]:
    return [(f"{k} per GPU", ["--workers", "1", "--cpus-per-worker", "4", "--gpus-per-worker", "1"],
             ["--concurrency", str(k), "--cpus-per-trial", "1", "--gpus-per-trial", str(1 / k)], k)
            for k in (1, 2, 4)]


def table(rows: list[dict], unit: str) -> str:
    base = rows[0]["trials_per_hour"]
    lines = [f"| {unit} | trials | search wall s | command wall s | trials / hour | speed-up | parallel efficiency |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = row["trials_per_hour"] / base
        lines.append(f"| {row['label']} | {row['trials']} | {row['wall_s']:.1f} | {row['command_s']:.1f} | "
                     f"{row['trials_per_hour']:.0f} | {speedup:.2f} | {speedup / row['parallel']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="worker counts to compare")
    parser.add_argument("--trials", type=int, default=12, help="trials per search")
    parser.add_argument("--gpu", action="store_true", help="the GPU variant: 1, 2 and 4 trials per GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.md")
    args = parser.parse_args()

    env = {**os.environ, "PRUNETUNE_CACHE": os.environ.get("PRUNETUNE_CACHE", str(ROOT / ".cache"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    settings = gpu_settings() if args.gpu else cpu_settings(args.workers)
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cluster-scaling-") as folder:
        for label, up, run, parallel in settings:
            row = {**one_setting(Path(folder), label.replace(" ", "-"), up=up, run=run, trials=args.trials,
                                 env=env), "label": label, "parallel": parallel}
            print(f"{label}: {row['trials_per_hour']:.0f} trials/hour (search {row['wall_s']:.1f} s, "
                  f"command {row['command_s']:.1f} s, cluster up {row['cluster_up_s']:.1f} s)", flush=True)
            rows.append(row)
    command = "python benchmarks/cluster_scaling.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"## Cluster scaling{' (GPU)' if args.gpu else ''}: trials per hour against "
        f"{'trials per GPU' if args.gpu else 'worker nodes'}",
        "",
        f"- command: `{command.strip()}` (PRUNETUNE_CACHE={env['PRUNETUNE_CACHE']})",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}; 1-minute load average {load:.1f} at the start (a machine shared with "
        f"other work)",
        f"- date: {datetime.now().isoformat(timespec='minutes')}",
        f"- search: {' '.join(SEARCH)}, {args.trials} trials; concurrency = "
        f"{'trials sharing the GPU' if args.gpu else 'worker nodes'}; a fresh local cluster per row "
        f"(`prunetune cluster up --local`), its start not counted",
        "",
        table(rows, "trials per GPU" if args.gpu else "worker nodes (1 CPU each)"),
        "",
        "search wall: first trial to summary (`summary.json` wall_s), the throughput's basis; command "
        "wall: the whole `prunetune run` (Python start, base model from the cache, joining the cluster).",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
