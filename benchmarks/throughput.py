"""Trials per hour of `prunetune run` against the limit of the same hardware (issue 15).

The limit is a plain PyTorch loop doing each trial's work, ``search.trial.run_trial`` (pruning,
BatchNorm recalibration, fine-tuning, validation each epoch, latency) with nothing around it: no
Ray, no MLflow, no checkpoints, no test split; one process per worker, one torch thread each, the
trials dealt out round-robin, the clock started once every process has loaded its data and base
model. prunetune runs the same policies (the ``random`` searcher's for the seed, no early stopping):
its wall time is the whole command (Ray's start, the cached base model, every trial, the test split
of the reportable trials, the summary), and its *in-search* time runs from the first trial's start
to the last one's end (trials.jsonl ``timing``), which leaves out what more trials amortise.

Two trial lengths, each at concurrency 1 and 2, ratios side by side in one run:

- ``short``: small_cnn on digits, about 3 s a trial;
- ``long``: resnet20 on a fraction of Fashion-MNIST, about 60 s a trial;

and, where a GPU is lent, ``gpu``: resnet56 at 32x32 (noise in CIFAR-10's shape,
``benchmarks/noise_data.py``) at 1, 2 and 4 trials per GPU, each trial given ``1 / concurrency``
of it, with the GPU's utilisation sampled (``nvidia-smi``, every half second) during the search and
during the limit:

    python benchmarks/throughput.py --lengths gpu   # 3 searches of 4 trials of 2 epochs on half the training split, and their limits

Sized for about 20 minutes on 2 cores once the base models are cached (``PRUNETUNE_CACHE``; a first
run pretrains them, resnet20 for a few minutes, before anything is timed). Writes
``benchmarks/results/throughput/<date>/throughput.md`` and ``summary.json``:

    python benchmarks/throughput.py                             # both lengths, concurrency 1 and 2
    python benchmarks/throughput.py --lengths short --trials 4  # a smoke run of a minute or two
    python benchmarks/throughput.py --lengths short --set checkpoint_min_s=0 --label before

``--set KEY=VALUE`` (repeatable) passes a config override to every `prunetune run` of the benchmark
(and so to the limit, which runs each search's saved config): an A/B of one option, each side under
its own ``--label``. Each row also counts the checkpoints a trial reported (Ray's ``result.json``).

Besides the means it splits each search's trials into the first trial of each worker (which waits
for its worker process to start and import torch) and the later ones (the steady state), and gives
the seconds per trial a worker slot spent outside any trial (``gap``: the hand-over from one trial
to the next).

It supersedes ``benchmarks/search_overhead.py``, which compares whole commands only, one trial at a
time against a loop of one process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LENGTHS = {
    "short": {"about": "about 3 s", "trials": 12,
              "args": ["--model", "small_cnn", "--dataset", "digits", "--pretrain-epochs", "10",
                       "--finetune-epochs", "5"]},
    "long": {"about": "about 60 s", "trials": 4,
             "args": ["--model", "resnet20", "--dataset", "fashion-mnist", "--data-fraction", "0.05",
                      "--pretrain-epochs", "10", "--finetune-epochs", "2"]},
    # where a GPU is lent: resnet56 at 32x32 on noise in CIFAR-10's shape (benchmarks/noise_data.py), a
    # fraction of the GPU per trial (1 / concurrency), the data on the device, bf16
    "gpu": {"about": "resnet56 at 32x32, not yet timed", "trials": 4, "gpu": True,
            "args": ["--model", "resnet56", "--dataset", "benchmarks/noise_data.py:noise_cifar", "--data-fraction",
                     "0.5", "--pretrain-epochs", "1", "--finetune-epochs", "2", "--cpus-per-trial", "2",
                     "--set", "resources.device=cuda", "--set", "resources.amp=bf16"]},
}
GPU_CONCURRENCY = (1, 2, 4)  # trials per GPU of the gpu length
COMMON = ["--method", "random", "--scheduler", "none", "--seed", "0", "--set", "final.epochs=0",
          "--set", "warm_start=false"]


def prunetune_run(args: list[str], *, name: str, storage: Path, cache: Path) -> float:
    """Seconds of one whole `prunetune run`; exits with its last lines if it fails."""
    command = [sys.executable, "-m", "prunetune.search.cli", "run", *args, "--name", name, "--storage", str(storage)]
    env = {**os.environ, "PRUNETUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"prunetune run {name} failed:\n" + "\n".join(done.stderr.strip().splitlines()[-8:]))
    return time.monotonic() - started


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines() if line.strip()]


def in_search_seconds(records: list[dict]) -> float:
    """From the first trial's start to the last trial's end, by the trials' own clocks."""
    starts = [r["timing"]["started_at"] for r in records]
    ends = [r["timing"]["started_at"] + r["timing"]["wall"] for r in records]
    return max(ends) - min(starts)


def _loop_worker(run_dir: str, cache: str, policies: list[dict], seed: int, ready, go, out) -> None:
    """One process of the limit: prepare, wait for the others, run its policies back to back."""
    import torch

    torch.set_num_threads(1)
    from prunetune.pruning.policy import Policy
    from prunetune.search.config import load_config
    from prunetune.search.driver import prepare
    from prunetune.search.trial import run_trial

    cfg = load_config(Path(run_dir) / "config.yaml", saved=True)
    _, setup, _ = prepare(cfg, cache_dir=Path(cache), log=lambda _message: None)
    ready.wait()
    go.wait()
    started = time.monotonic()
    seconds = []
    for policy in policies:
        result = run_trial(setup, Policy.from_json(policy), seed=seed, report=lambda *_: None, evaluate_test=False)
        seconds.append(result["trial_seconds"])
    out.put({"wall": time.monotonic() - started, "trial_seconds": seconds})


def plain_loop(run_dir: Path, *, cache: Path, processes: int) -> dict:
    """The limit: ``processes`` plain processes sharing the run's policies round-robin."""
    records = read_records(run_dir)
    policies = [r["policy"] for r in records]
    context = multiprocessing.get_context("spawn")
    ready, go, out = context.Barrier(processes + 1), context.Barrier(processes + 1), context.Queue()
    workers = [context.Process(target=_loop_worker, args=(str(run_dir), str(cache), policies[i::processes], 0,
                                                          ready, go, out)) for i in range(processes)]
    for worker in workers:
        worker.start()
    ready.wait()  # every process has its data and base model
    started = time.monotonic()
    go.wait()
    results = [out.get() for _ in workers]
    wall = time.monotonic() - started
    for worker in workers:
        worker.join()
    return {"wall": wall, "trials": len(policies),
            "trial_seconds": sorted(s for r in results for s in r["trial_seconds"])}


def per_hour(trials: int, seconds: float) -> float:
    return 3600.0 * trials / seconds if seconds > 0 else float("nan")


def checkpoints_per_trial(run_dir: Path) -> float:
    """The mean number of checkpoints a trial of the run reported: its ``result.json`` rows that name
    one (Ray's ``checkpoint_dir_name``)."""
    counts = [sum(1 for line in path.read_text().splitlines()
                  if line.strip() and json.loads(line).get("checkpoint_dir_name"))
              for path in sorted(run_dir.glob("trial_*/result.json"))]
    return sum(counts) / len(counts) if counts else float("nan")


def set_flags(overrides: Sequence[str]) -> list[str]:
    """``prunetune run``'s ``--set`` flags for the benchmark's ``--set KEY=VALUE`` overrides."""
    return [flag for override in overrides for flag in ("--set", override)]


def measure(length: str, concurrency: int, *, trials: int, storage: Path, cache: Path,
            overrides: tuple[str, ...] = ()) -> dict:
    spec = LENGTHS[length]
    name = f"{length}-c{concurrency}"
    load = [round(x, 1) for x in os.getloadavg()]  # the machine's load as the search starts
    share = ["--gpus-per-trial", f"{1 / concurrency:g}"] if spec.get("gpu") else []
    args = [*spec["args"], *share, *COMMON, *set_flags(overrides), "--trials", str(trials),
            "--concurrency", str(concurrency)]
    with GpuUtilisation() as search_gpu:
        wall = prunetune_run(args, name=name, storage=storage, cache=cache)
    records = read_records(storage / name)
    search = in_search_seconds(records)
    with GpuUtilisation() as limit_gpu:
        limit = plain_loop(storage / name, cache=cache, processes=concurrency)
    from prunetune.search.timing import PHASES, overhead_seconds

    timings = [r["timing"] for r in records]
    mean = {k: sum(float(t.get(k) or 0.0) for t in timings) / len(timings) for k in (*PHASES, "wall")
            if any(k in t for t in timings)}

    return {
        "length": length, "concurrency": concurrency, "trials": len(records), "load_average_at_start": load,
        "command": "prunetune run " + " ".join(args),
        "prunetune_wall_s": round(wall, 2), "prunetune_in_search_s": round(search, 2),
        "limit_wall_s": round(limit["wall"], 2),
        "trials_per_hour": {"prunetune": round(per_hour(len(records), wall), 1),
                            "prunetune_in_search": round(per_hour(len(records), search), 1),
                            "limit": round(per_hour(limit["trials"], limit["wall"]), 1)},
        "ratio_limit_over_prunetune": round(wall / limit["wall"], 3),  # > 1: prunetune slower
        "ratio_in_search": round(search / limit["wall"], 3),
        "mean_trial_s": {"prunetune": round(mean["wall"], 3),
                         "limit": round(sum(limit["trial_seconds"]) / len(limit["trial_seconds"]), 3)},
        "mean_phase_s": {k: round(v, 4) for k, v in mean.items()},
        "mean_overhead_s": round(sum(overhead_seconds(t) for t in timings) / len(timings), 3),
        "checkpoints_per_trial": round(checkpoints_per_trial(storage / name), 2),
        "gpu_utilisation_pct": {"prunetune": search_gpu.mean(), "limit": limit_gpu.mean()},  # None: no nvidia-smi
        **steady_state(timings, concurrency=concurrency, in_search_s=search),
    }


class GpuUtilisation:
    """The GPU's mean utilisation (%, all GPUs) while the block runs, sampled from ``nvidia-smi`` every
    half second in a thread; ``mean()`` is None where there is no nvidia-smi (a CPU machine)."""

    def __init__(self, period_s: float = 0.5):
        import shutil
        import threading

        self.period_s, self.samples = period_s, []
        self.command = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuUtilisation:
        if self.command:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.command:
            self._thread.join(timeout=10)

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            done = subprocess.run([self.command, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10)
            values = [float(v) for v in done.stdout.split() if v.replace(".", "", 1).isdigit()]
            if values:
                self.samples.append(sum(values) / len(values))

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def steady_state(timings: list[dict], *, concurrency: int, in_search_s: float) -> dict:
    """The first trial of each worker (the first ``concurrency`` to start) against the later ones:
    their mean scheduling, overhead and overhead less BatchNorm recalibration (a trial's work, which
    the limit does too); and ``gap_s``, the seconds per trial a worker slot was in no trial."""
    from prunetune.search.timing import overhead_seconds

    ordered = sorted(timings, key=lambda t: t["started_at"])

    def means(group: list[dict]) -> dict:
        if not group:
            return {}
        return {"trials": len(group),
                "scheduling_s": round(sum(float(t.get("scheduling") or 0.0) for t in group) / len(group), 3),
                "overhead_s": round(sum(overhead_seconds(t) for t in group) / len(group), 3),
                "overhead_less_bn_s": round(sum(overhead_seconds(t) - float(t.get("bn_recalibration") or 0.0)
                                                for t in group) / len(group), 3)}

    idle = in_search_s * concurrency - sum(float(t["wall"]) for t in timings)
    return {"first_per_worker": means(ordered[:concurrency]), "later": means(ordered[concurrency:]),
            "gap_s": round(max(0.0, idle) / len(timings), 3)}


def markdown(rows: list[dict], *, command: str, started: datetime, wall: float) -> str:
    load = os.getloadavg()
    lines = [f"# Throughput: trials per hour of `prunetune run` against the limit ({started:%Y-%m-%d})", "",
             f"command: `{command}`; machine: {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; started {started:%Y-%m-%d %H:%M} UTC, {wall / 60:.1f} min in all; "
             f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}", "",
             "prunetune = the whole command; in-search = first trial's start to last trial's end; limit = "
             "plain processes running `run_trial`, one per worker. Ratio = time / limit's time (1.00x = the "
             "limit; the goal is within 1.1x).", "",
             "| length | concurrency | trials | mean trial s (prunetune / limit) | trials/h prunetune | "
             "in-search | limit | ratio whole | ratio in-search | overhead s/trial | checkpoints/trial | "
             "GPU utilisation % (prunetune / limit) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tph = r["trials_per_hour"]
        gpu = r.get("gpu_utilisation_pct") or {}
        utilisation = "-" if gpu.get("prunetune") is None else f"{gpu['prunetune']:.0f} / {gpu.get('limit') or 0:.0f}"
        lines.append(f"| {r['length']} ({LENGTHS[r['length']]['about']}) | {r['concurrency']} | {r['trials']} | "
                     f"{r['mean_trial_s']['prunetune']:.2f} / {r['mean_trial_s']['limit']:.2f} | "
                     f"{tph['prunetune']:.0f} | {tph['prunetune_in_search']:.0f} | {tph['limit']:.0f} | "
                     f"**{r['ratio_limit_over_prunetune']:.2f}x** | **{r['ratio_in_search']:.2f}x** | "
                     f"{r['mean_overhead_s']:.2f} | {r.get('checkpoints_per_trial', float('nan')):.2f} | {utilisation} |")
    lines += ["", "Mean seconds per phase of prunetune's trials (`prunetune status --timing`):", "",
              "| length | concurrency | " + " | ".join(rows[0]["mean_phase_s"]) + " |",
              "|---|---|" + "---|" * len(rows[0]["mean_phase_s"])]
    for r in rows:
        lines.append(f"| {r['length']} | {r['concurrency']} | " + " | ".join(f"{r['mean_phase_s'].get(k, 0.0):.3f}" for k in rows[0]["mean_phase_s"]) + " |")
    lines += ["", "Each worker's first trial against the later ones (mean s per trial; overhead less BN = less "
              "BatchNorm recalibration); gap = s per trial a worker slot spent in no trial:", "",
              "| length | concurrency | first: scheduling | first: overhead | later: scheduling | later: overhead | "
              "later: overhead less BN | gap |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first, later = r["first_per_worker"], r["later"] or {}
        lines.append(f"| {r['length']} | {r['concurrency']} | {first['scheduling_s']:.2f} | {first['overhead_s']:.2f} | "
                     f"{later.get('scheduling_s', float('nan')):.2f} | {later.get('overhead_s', float('nan')):.2f} | "
                     f"{later.get('overhead_less_bn_s', float('nan')):.2f} | {r['gap_s']:.2f} |")
    lines += ["", "Commands of the searches:", ""] + [f"- `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", choices=sorted(LENGTHS), default=["short", "long"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=None,
                        help="trials at once (default: 1 2; for the gpu length 1 2 4 trials per GPU)")
    parser.add_argument("--trials", type=int, default=None, help="trials per search (default: 12 short, 4 long)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("PRUNETUNE_CACHE", "/work/cache")))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput")
    parser.add_argument("--label", default=None, help="the results' folder under --out (default: the date)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every prunetune run of the benchmark (repeatable), "
                             "e.g. --set checkpoint_min_s=0")
    args = parser.parse_args()
    bad = [override for override in args.overrides if "=" not in override or not override.split("=", 1)[0]]
    if bad:
        parser.error(f"--set takes KEY=VALUE, got {bad[0]!r}; e.g. --set checkpoint_min_s=0")
    started = datetime.now(UTC)
    clock = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunetune-throughput-") as tmp:
        storage = Path(tmp)
        for length in args.lengths:
            whole_gpu = ["--gpus-per-trial", "1"] if LENGTHS[length].get("gpu") else []
            prunetune_run([*LENGTHS[length]["args"], *whole_gpu, *COMMON, *set_flags(args.overrides), "--trials", "1",
                           "--concurrency", "1", "--finetune-epochs", "0"], name=f"{length}-warm", storage=storage,
                          cache=args.cache)  # the base model trained and cached before anything is timed
            default = list(GPU_CONCURRENCY) if LENGTHS[length].get("gpu") else [1, 2]
            for concurrency in args.concurrency or default:
                trials = args.trials or LENGTHS[length]["trials"]
                rows.append(measure(length, concurrency, trials=trials, storage=storage, cache=args.cache,
                                    overrides=tuple(args.overrides)))
                print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    folder = args.out / (args.label or f"{started:%Y-%m-%d}")
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, command=command.strip(), started=started, wall=time.monotonic() - clock)
    (folder / "throughput.md").write_text(text)
    (folder / "summary.json").write_text(json.dumps({
        "command": command.strip(), "started": started.isoformat(), "machine": platform.machine(),
        "cores": os.cpu_count(), "load_average": os.getloadavg(), "overrides": args.overrides, "rows": rows},
        indent=1) + "\n")
    print(text)
    print(f"written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
