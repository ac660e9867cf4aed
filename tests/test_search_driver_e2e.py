"""The driver end to end on a local Ray: an image folder in Ray's workers, and SIGTERM as Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from prunetune.search.ray_session import kill_leftover_ray
from tests.search_helpers import QUICK, mlflow_runs, read_jsonl, run_cli, start_cli, wait_for_records

pytestmark = pytest.mark.slow


def write_image_folder(root: Path) -> None:
    """train/ and val/ with 3 classes of small PNGs (a colour each, so the classes can be learned)."""
    from PIL import Image

    for part, count in (("train", 6), ("val", 3)):
        for label, colour in enumerate(((200, 20, 20), (20, 200, 20), (20, 20, 200))):
            folder = root / part / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 12), tuple(min(255, c + 9 * i) for c in colour)).save(folder / f"{i}.png")


def test_an_image_folder_search_runs_its_trials_in_ray_workers(tmp_path, tracking_store):
    write_image_folder(tmp_path / "images")
    tracking_store(tmp_path / "runs")
    args = ["run", *[a for a in QUICK if a not in ("--dataset", "digits")], "--dataset", "imagefolder",
            "--data-root", "images", "--trials", "2", "--storage", "runs", "--name", "folder"]  # relative paths
    result = run_cli(args, cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "folder" / "summary.json").read_text())
    assert summary["trials"] == {"finished": 2, "failed": 0, "stopped": 0}
    assert summary["first_failure"] is None


def test_sigterm_stops_the_search_as_ctrl_c_does(tmp_path, base_model_cache, tracking_store, monkeypatch):
    storage, cache, log = tracking_store(tmp_path / "runs"), base_model_cache, tmp_path / "driver.log"
    run_dir = storage / "termed"
    args = ["run", *QUICK, "--finetune-epochs", "2", "--trials", "4", "--concurrency", "1", "--name", "termed",
            "--storage", str(storage)]
    driver = start_cli(args, cache=cache, cwd=tmp_path, log=log)
    temp_dirs: list[str] = []
    try:
        wait_for_records(run_dir, 1, driver, log)
        temp_dirs = json.loads((run_dir / "prunetune.json").read_text())["ray_temp_dirs"]
        os.kill(driver.pid, signal.SIGTERM)  # a scheduler's `kill PID`: the driver alone
        assert driver.wait(timeout=120) == 143, log.read_text()[-3000:]
        text = log.read_text()
        assert f"interrupted (SIGTERM): finished trials are kept in {run_dir}; continue with " \
               f"`prunetune resume {run_dir}`" in text
        assert "Traceback" not in text and "StackTrace" not in text
        assert not (run_dir / "summary.json").exists() and (run_dir / "trials.jsonl").read_text().strip()
        meta = json.loads((run_dir / "prunetune.json").read_text())
        parents, _ = mlflow_runs(meta["tracking_uri"])
        assert [p.info.status for p in parents] == ["KILLED"]
        assert temp_dirs and not any(Path(d).exists() for d in temp_dirs)  # Ray's temp dir is removed
        status = run_cli(["status", str(run_dir), "--json"], cache=cache, cwd=tmp_path)
        assert json.loads(status.stdout)["state"] == "interrupted"

        # a signal after Ray's start but before the resumed trials (here: while MLflow is brought up to
        # date) ends the resume with the same line, and changes nothing recorded. This process keeps
        # the log files of that in-process Ray open: the resume below must not take it for Ray's
        # leftover and kill it (as it once did: the notebook user's case)
        kept = read_jsonl(run_dir / "trials.jsonl")
        _signal_before_the_resumed_trials(run_dir, cache, monkeypatch)
        assert read_jsonl(run_dir / "trials.jsonl") == kept and not (run_dir / "summary.json").exists()
        parents, _ = mlflow_runs(meta["tracking_uri"])
        assert [p.info.status for p in parents] == ["KILLED"]

        # resume takes the same path (StopSignals, a graceful tuner.fit): SIGTERM keeps it resumable
        driver = start_cli(["resume", str(run_dir)], cache=cache, cwd=tmp_path, log=log)
        wait_for_records(run_dir, len(kept) + 1, driver, log)  # the resumed tuner.fit() is running
        temp_dirs = json.loads((run_dir / "prunetune.json").read_text())["ray_temp_dirs"]
        os.kill(driver.pid, signal.SIGTERM)
        assert driver.wait(timeout=120) == 143, log.read_text()[-3000:]
        text = log.read_text()
        assert f"interrupted (SIGTERM): finished trials are kept in {run_dir}; continue with " \
               f"`prunetune resume {run_dir}`" in text and "Traceback" not in text and "StackTrace" not in text
        assert not (run_dir / "summary.json").exists()
        assert read_jsonl(run_dir / "trials.jsonl")[: len(kept)] == kept  # kept as they were
        parents, _ = mlflow_runs(meta["tracking_uri"])
        assert [p.info.status for p in parents] == ["KILLED"]
        assert temp_dirs and not any(Path(d).exists() for d in temp_dirs)
        status = run_cli(["status", str(run_dir), "--json"], cache=cache, cwd=tmp_path)
        assert json.loads(status.stdout)["state"] == "interrupted"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        kill_leftover_ray(temp_dirs)


def _signal_before_the_resumed_trials(run_dir: Path, cache: Path, monkeypatch) -> None:
    """``resume_search`` in this process, SIGTERM raised where the driver syncs MLflow (as the signal
    handler does): exit 143, the usual one line, Ray stopped and its temp dir removed."""
    from prunetune.search import driver
    from prunetune.search.interrupt import Interrupted

    def signalled(*_args) -> None:
        raise Interrupted(signal.SIGTERM)

    lines: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(driver, "_log_recorded_trials", signalled)
        assert driver.resume_search(run_dir, cache_dir=cache, log=lines.append) == 143
    assert lines[-1] == (f"interrupted (SIGTERM): finished trials are kept in {run_dir}; continue with "
                         f"`prunetune resume {run_dir}`")
    temp_dirs = json.loads((run_dir / "prunetune.json").read_text())["ray_temp_dirs"]
    assert temp_dirs and not any(Path(d).exists() for d in temp_dirs)


def _ray_temp_dirs_of_children(pid: int) -> set[Path]:
    """The prunetune-ray-* folders named on the command lines of ``pid``'s child processes."""
    import re

    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found |= {Path(m) for m in re.findall(r"/tmp/prunetune-ray-[0-9a-f]{8}", command)}
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_a_signal_before_the_trials_leaves_nothing_behind(tmp_path):
    """SIGTERM while the base model trains: exit 143, one line, and no run folder, store, cached
    model, Ray process or Ray temp dir left."""
    import time

    storage, cache, log = tmp_path / "runs", tmp_path / "cache", tmp_path / "driver.log"
    quick = list(QUICK)
    quick[quick.index("--pretrain-epochs") + 1] = "200"
    args = ["run", *quick, "--storage", str(storage), "--name", "early"]
    driver = start_cli(args, cache=cache, cwd=tmp_path, log=log)
    try:
        deadline = time.monotonic() + 180
        while "pretrain epoch 1/" not in log.read_text():
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert not _ray_temp_dirs_of_children(driver.pid)  # a local Ray starts after the base model
        os.kill(driver.pid, signal.SIGTERM)
        assert driver.wait(timeout=60) == 143, log.read_text()[-3000:]
        text = log.read_text()
        assert "interrupted (SIGTERM) before the search started; nothing was created" in text
        assert "Traceback" not in text and "StackTrace" not in text
        assert not storage.exists() and not list(cache.glob("*.pt"))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
