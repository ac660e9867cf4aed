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
    done = subprocess.run([sys.executable, "-m", "prunetune.search.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"prunetune {' '.join(args[:2])} failed: {done.stderr.strip()[-1500:]}")
    return done


def one_setting(work: Path, label: str, *, up: list[str], run: list[str], trials: int, env: dict,
                search: list[str]) -> dict:
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
        cli(["run", *search, *run, "--trials", str(trials), "--name", f"scaling-{label}",
             "--storage", str(work / "runs"), "--address", printed["address"],
             "--tracking-uri", printed["tracking_uri"]], env=driver_env)
        command_s = time.monotonic() - started
    finally:
        cli(["cluster", "down", "--dir", str(directory)], env=env)
    summary = json.loads((work / "runs" / f"scaling-{label}" / "summary.json").read_text())
    finished = summary["trials"]["finished"]
    records = [json.loads(line) for line in (work / "runs" / f"scaling-{label}" / "trials.jsonl").read_text().splitlines()]
    devices = sorted({r.get("device") or "?" for r in records})
    if finished != trials:
        raise SystemExit(f"{label}: {finished} of {trials} trials finished")
    return {"label": label, "trials": finished, "wall_s": summary["wall_s"], "command_s": command_s,
            "cluster_up_s": up_s, "trials_per_hour": finished / summary["wall_s"] * 3600,
            "load": os.getloadavg()[0], "devices": devices}


def cpu_settings(workers: list[int]) -> list[tuple[str, list[str], list[str], int]]:
    return [(f"{n} worker{'s' if n > 1 else ''}", ["--workers", str(n), "--cpus-per-worker", "1"],
             ["--concurrency", str(n), "--cpus-per-trial", "1"], n) for n in workers]


def gpu_settings() -> list[tuple[str, list[str], list[str], int]]:
    return [(f"{k} per GPU", ["--workers", "1", "--cpus-per-worker", "4", "--gpus-per-worker", "1"],
             ["--concurrency", str(k), "--cpus-per-trial", "1", "--gpus-per-trial", str(1 / k)], k)
            for k in (1, 2, 4)]


def table(runs: list[dict], labels: list[tuple[str, int]], unit: str) -> str:
    """One row per setting: the median over its repeats of trials per hour, speed-up and efficiency."""
    from statistics import median

    per_hour = {label: median(r["trials_per_hour"] for r in runs if r["label"] == label) for label, _ in labels}
    base = per_hour[labels[0][0]]
    lines = [f"| {unit} | runs | search wall s (each run) | trials / hour (median) | speed-up | "
             "parallel efficiency | load average after each run |",
             "|---|---|---|---|---|---|---|"]
    for label, parallel in labels:
        mine = [r for r in runs if r["label"] == label]
        speedup = per_hour[label] / base
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in mine)
        loads = ", ".join(f"{r['load']:.1f}" for r in mine)
        lines.append(f"| {label} | {len(mine)} | {walls} | {per_hour[label]:.0f} | {speedup:.2f} | "
                     f"{speedup / parallel:.2f} | {loads} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="worker counts to compare")
    parser.add_argument("--trials", type=int, default=12, help="trials per search")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting, interleaved (median reported)")
    parser.add_argument("--gpu", action="store_true", help="the GPU variant: 1, 2 and 4 trials per GPU")
    parser.add_argument("--search", default=" ".join(SEARCH), help="the search's settings (one string)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.md")
    args = parser.parse_args()

    env = {**os.environ, "PRUNETUNE_CACHE": os.environ.get("PRUNETUNE_CACHE", str(ROOT / ".cache"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    settings = gpu_settings() if args.gpu else cpu_settings(args.workers)
    load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="cluster-scaling-") as folder:
        for repeat in range(args.repeats):
            for label, up, run, _ in settings:
                tag = f"{label.replace(' ', '-')}-r{repeat}"
                row = {**one_setting(Path(folder), tag, up=up, run=run, trials=args.trials, env=env,
                                       search=args.search.split()), "label": label}
                print(f"{label} (run {repeat + 1}): {row['trials_per_hour']:.0f} trials/hour (search "
                      f"{row['wall_s']:.1f} s, command {row['command_s']:.1f} s, cluster up "
                      f"{row['cluster_up_s']:.1f} s, load {row['load']:.1f}, trial devices {row['devices']})", flush=True)
                runs.append(row)
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
        f"- search: {args.search}, {args.trials} trials; concurrency = "
        f"{'trials sharing the GPU' if args.gpu else 'worker nodes'}; a fresh local cluster per row "
        f"(`prunetune cluster up --local`), its start not counted; settings interleaved, {args.repeats} "
        f"run(s) each",
        "",
        table(runs, [(label, parallel) for label, _, _, parallel in settings],
              "trials per GPU" if args.gpu else "worker nodes (1 CPU each)"),
        "",
        f"trial devices recorded in trials.jsonl: {', '.join(sorted({d for r in runs for d in r['devices']}))}",
        "",
        "search wall: first trial to summary (`summary.json` wall_s), the throughput's basis; command "
        "wall: the whole `prunetune run` (Python start, base model from the cache, joining the cluster).",
        "" if args.gpu else "3 one-CPU worker nodes oversubscribe this machine's 2 cores: the third node "
        "competes with the other two (and with the driver, the head and the tracking server).",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
