"""Helpers for the search tests: run the real CLI in a subprocess, read the run directory and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# A small, fast search: digits at 8x8, a tiny model, 1 fine-tuning epoch, no final fine-tune (the
# embedded default's 10 epochs; a test that wants one sets final.epochs after these).
QUICK = ["--model", "small_cnn", "--dataset", "digits", "--image-size", "8", "--pretrain-epochs", "2",
         "--finetune-epochs", "1", "--set", "finetune.bn_recalibration_batches=2",
         "--set", "optuna.n_startup_trials=2", "--set", "final.epochs=0"]


# A user's own modules named like prunetune's packages (DESIGN.md, Layout): in a search's working
# directory they must change nothing, in the driver or in its Ray workers (tests/test_namespace.py).
SHADOWS = ("search.py", "tracking.py", "pruning.py", "cluster.py", "methods/__init__.py")


def write_shadows(folder: Path) -> None:
    """The ``SHADOWS`` in ``folder``, each raising ImportError naming itself if it is ever imported."""
    for name in SHADOWS:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")


def cli_env(cache: Path) -> dict:
    env = {**os.environ, "PRUNETUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_cli(args: list[str], *, cache: Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``prunetune ARGS`` in a fresh process; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "prunetune.search.cli", *args], cwd=cwd, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], *, cache: Path, cwd: Path, log: Path) -> subprocess.Popen:
    """``prunetune ARGS`` in the background, output to ``log``, in its own process group."""
    handle = open(log, "w")  # noqa: SIM115 - closed with the process by the caller's cleanup
    return subprocess.Popen([sys.executable, "-m", "prunetune.search.cli", *args], cwd=cwd, env=cli_env(cache),
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_ended(records: list[dict]) -> list[dict]:
    """Trial records as their trials ended them: less ``test_accuracy``, which the search's end adds
    for the trials it reports (``search.test_eval``)."""
    return [{k: v for k, v in r.items() if k != "test_accuracy"} for r in records]


def wait_for_records(run_dir: Path, count: int, driver: subprocess.Popen, log: Path, *,
                     timeout_s: float = 240) -> list[dict]:
    """trials.jsonl once it holds ``count`` records, while the ``driver`` (logging to ``log``) runs."""
    deadline = time.monotonic() + timeout_s
    while len(records := read_jsonl(run_dir / "trials.jsonl")) < count:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"fewer than {count} trials finished in time"
        time.sleep(0.2)
    return records


def mlflow_runs(tracking_uri: str, experiment: str = "prunetune"):
    """(parent runs, child runs) of the experiment, read back through a fresh client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("prunetune.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("prunetune.role") == "trial"]
    return parents, children


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("prunetune: error:")]
    assert len(errors) == 1, lines
    assert fragment in errors[0], errors[0]
