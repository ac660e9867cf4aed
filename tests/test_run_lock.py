"""One writer per run directory (``tracking/run_lock.py``), and a final fine-tune interrupted after its search.

Two resumes of one killed search at once both ran its remaining trials, and two ``run --name X`` at once
wrote one folder: the second writer is now refused in one line, at once, and a lock never outlives its
process. A ``run`` stopped during its final fine-tune says how to continue, and ``resume`` continues it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunetune.pruning.errors import UserError
from prunetune.tracking.run_lock import lock_path, run_lock
from tests.search_helpers import QUICK, assert_user_error, run_cli, start_cli

HOLD = "import sys, time\nfrom prunetune.tracking.run_lock import run_lock\n" \
       "with run_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(120)\n"


def hold(run_dir: Path, command: str = "run") -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock as ``prunetune COMMAND``, once it says so."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), command], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def stop(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(timeout=10)


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holder_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    holder = hold(run_dir, "resume")
    try:
        refused = rf"{run_dir} is in use by `prunetune resume` \(PID {holder.pid}\)"
        with pytest.raises(UserError, match=refused), run_lock(run_dir, "run"):
            pass
    finally:
        stop(holder)  # SIGKILL: the kernel drops the lock with the process
    with run_lock(run_dir, "run"):
        assert json.loads(lock_path(run_dir).read_text()) == {"pid": os.getpid(), "command": "run"}
    assert not lock_path(run_dir).exists()


def test_the_lock_leaves_no_folder_it_made_and_keeps_what_was_there(tmp_path):
    with run_lock(tmp_path / "new" / "runs" / "x", "run"):
        assert (tmp_path / "new" / "runs").is_dir()
    assert not (tmp_path / "new").exists()
    (tmp_path / "runs").mkdir()
    with run_lock(tmp_path / "runs" / "x", "run"):
        pass
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.fixture(scope="module")
def stopped_in_final(tmp_path_factory, base_model_cache, tracking_store):
    """A 2-trial search whose final fine-tune (many epochs) got SIGTERM once it started:
    (work folder, run directory, the stderr of the interrupted run, its exit status)."""
    work = tmp_path_factory.mktemp("lock")
    log = work / "run.log"
    driver = start_cli(["run", *QUICK, "--method", "random", "--trials", "2", "--name", "s",
                        "--storage", str(tracking_store(work / "runs")), "--set", "final.epochs=8"],
                       cache=base_model_cache, cwd=work, log=log)
    deadline = time.monotonic() + 240
    while "final fine-tune of" not in log.read_text():
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the final fine-tune did not start in time"
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    status = driver.wait(timeout=60)
    return work, work / "runs" / "s", log.read_text(), status


@pytest.mark.slow
def test_a_run_stopped_in_its_final_says_to_resume_and_resume_finishes_the_final(stopped_in_final, base_model_cache):
    work, run_dir, stderr, status = stopped_in_final
    assert status == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"interrupted (SIGTERM) during the final fine-tune: the search's results are in {run_dir}; " \
           f"continue the final with `prunetune resume {run_dir}`" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"] is not None and "final" not in summary
    resumed = run_cli(["resume", str(run_dir)], cache=base_model_cache, cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has finished, but not its final fine-tune: continuing it" in resumed.stderr
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final["recipe"]["epochs"] == 8 and final["trial_id"] == summary["best"]["trial_id"]
    again = run_cli(["resume", str(run_dir)], cache=base_model_cache, cwd=work)
    assert again.returncode == 0 and "has already finished" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["resume", "finetune", "run", "sync", "sync-own-store-spelled-relative"])
def test_every_writer_of_a_run_in_use_is_refused_at_once_in_one_line(stopped_in_final, base_model_cache, command):
    work, run_dir, _, _ = stopped_in_final
    arguments = {"resume": ["resume", str(run_dir)], "finetune": ["finetune", str(run_dir), "--epochs", "1"],
                 "run": ["run", *QUICK, "--name", "s", "--storage", str(run_dir.parent)],
                 "sync": ["sync", str(run_dir)],
                 "sync-own-store-spelled-relative": ["sync", str(run_dir), "--tracking-uri", "sqlite:///runs/mlflow.db"],
                 }[command]
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    holder = hold(run_dir, "resume")
    try:
        started = time.monotonic()
        refused = run_cli(arguments, cache=base_model_cache, cwd=work, timeout=60)
        assert time.monotonic() - started < 30
    finally:
        stop(holder)
    assert_user_error(refused, f"{run_dir} is in use by `prunetune resume` (PID {holder.pid})")
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


def test_a_sync_into_another_store_is_not_held_up_by_the_runs_writer(stopped_in_final, base_model_cache, tmp_path):
    work, run_dir, _, _ = stopped_in_final
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    holder = hold(run_dir, "resume")
    try:
        synced = run_cli(["sync", str(run_dir), "--tracking-uri", other], cache=base_model_cache, cwd=work, timeout=120)
    finally:
        stop(holder)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert f"synced {run_dir}: parent run " in synced.stdout and "(created), 2 trials logged" in synced.stdout


def test_a_run_in_a_folder_that_cannot_be_written_is_refused_in_one_line():
    refused = r"cannot write the lock file /proc/prunetune-runs/\.x\.lock beside the run"
    with pytest.raises(UserError, match=refused), run_lock(Path("/proc/prunetune-runs/x"), "resume"):
        pass
