"""`prunetune run` end to end: real Ray, real Torch-Pruning, a real sqlite MLflow store; and resume
after the driver is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal

import pytest

from prunetune.search.ray_session import kill_leftover_ray, processes_using
from tests.search_helpers import (
    QUICK,
    as_ended,
    mlflow_runs,
    read_jsonl,
    run_cli,
    start_cli,
    wait_for_records,
)

pytestmark = pytest.mark.slow


def test_every_trial_is_in_the_run_directory_once(optuna_search):
    _, run_dir, _ = optuna_search
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 4
    assert len({r["trial_key"] for r in records}) == 4
    space = json.loads((run_dir / "space.json").read_text())
    groups = {g["name"] for g in space["groups"]}
    for r in records:
        assert r["status"] == "finished"
        assert set(r["policy"]["keep_ratios"]) == groups
        assert 0.0 <= r["metrics"]["val_accuracy"] <= 1.0
        assert r["metrics"]["macs_ratio"] <= 0.5 + 0.02 + 1e-9  # the constraint, not clipping
        assert r["metrics"]["macs"] < space["base_macs"]
        assert r["node"] and r["device"] == "cpu" and r["seconds"] > 0
        assert [h["epoch"] for h in r["history"]] == [0, 1]


def test_summary_agrees_with_trials_and_mlflow(optuna_search):
    _, run_dir, result = optuna_search
    summary = json.loads((run_dir / "summary.json").read_text())
    records = {r["trial_id"]: r for r in read_jsonl(run_dir / "trials.jsonl")}
    assert summary["trials"] == {"finished": 4, "failed": 0, "stopped": 0}
    best = summary["best"]
    assert best["val_accuracy"] == max(r["metrics"]["val_accuracy"] for r in records.values())
    assert best["test_accuracy"] == records[best["trial_id"]]["test_accuracy"]
    assert summary["pareto"] and all(p["trial_id"] in records for p in summary["pareto"])
    assert "Pareto front" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout

    meta = json.loads((run_dir / "prunetune.json").read_text())
    parents, children = mlflow_runs(meta["tracking_uri"])
    assert len(parents) == 1 and parents[0].info.run_id == meta["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {meta["parent_run_id"]}
    by_trial = {c.data.tags["prunetune.trial_id"]: c for c in children}
    assert set(by_trial) == set(records)
    for trial_id, child in by_trial.items():
        record = records[trial_id]
        assert child.info.status == "FINISHED"
        assert child.data.params["method"] == "optuna" and child.data.params["importance"] == "l1"
        assert child.data.params["seed"] == "0" and child.data.params["trial_id"] == trial_id
        assert len([k for k in child.data.params if k.startswith("keep.")]) == len(record["policy"]["keep_ratios"])
        for key in ("val_accuracy", "macs", "params", "latency_ms", "macs_ratio", "params_ratio"):
            assert child.data.metrics[key] == pytest.approx(record["metrics"][key])
        timing = {f"timing.{k}_s": v for k, v in record["timing"].items() if k not in ("started_at", "resumed")}
        assert {k: v for k, v in child.data.metrics.items() if k.startswith("timing.")} == pytest.approx(timing)
        assert {"timing.scheduling_s", "timing.train_s", "timing.logging_s"} <= set(timing)  # issue 15
    with_test = {t: c.data.metrics["test_accuracy"] for t, c in by_trial.items() if "test_accuracy" in c.data.metrics}
    assert with_test == {t: r["test_accuracy"] for t, r in records.items() if r["test_accuracy"] is not None}
    assert {p["trial_id"] for p in summary["pareto"]} <= set(with_test)  # every trial evaluated on test has it
    assert parents[0].data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])


def test_status_and_export_reproduce_the_test_accuracy(optuna_search):
    work, run_dir, _ = optuna_search
    status = run_cli(["status", str(run_dir), "--json"], cache=work / "cache", cwd=work)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["state"] == "finished" and state["trials"]["finished"] == 4

    summary = json.loads((run_dir / "summary.json").read_text())
    for fmt in ("state", "torchscript"):
        out = work / f"best.{fmt}.pt"
        exported = run_cli(["export", str(run_dir), "--trial", "best", "--out", str(out), "--format", fmt,
                            "--check"], cache=work / "cache", cwd=work)
        assert exported.returncode == 0, exported.stderr[-2000:]
        line = [x for x in exported.stdout.splitlines() if x.startswith("test accuracy of the export")][0]
        assert float(line.split()[5]) == pytest.approx(summary["best"]["test_accuracy"], abs=1e-6)


def test_trials_record_their_timing_and_only_reportable_trials_the_test_split(optuna_search):
    """Issue 15: each trial's phases (within its wall time) in trials.jsonl and `status --timing`;
    the test split scored at the end for the Pareto front and the best only, and said so."""
    from prunetune.search.timing import TRIAL_PHASES

    work, run_dir, result = optuna_search
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_jsonl(run_dir / "trials.jsonl")
    reportable = {p["trial_id"] for p in summary["pareto"]} | {summary["best"]["trial_id"]}
    assert {r["trial_id"] for r in records if r["test_accuracy"] is not None} == reportable
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in records if r["trial_id"] in reportable)
    assert "the Pareto front and the best trial only" in summary["evaluated_on"]["test_accuracy"]
    assert "the full validation split" in summary["evaluated_on"]["val_accuracy"]
    assert f"scored {len(reportable)} reportable trials" in result.stderr
    for r in records:
        timing = r["timing"]
        assert set(TRIAL_PHASES) <= set(timing) and timing["scheduling"] >= 0 and timing["logging"] >= 0
        assert sum(timing[p] for p in TRIAL_PHASES) <= timing["wall"]
        assert r["seconds"] <= timing["wall"] <= r["seconds"] + timing["checkpoint"] + 1e-3  # + the last checkpoint's write
    shown = run_cli(["status", str(run_dir), "--timing"], cache=work / "cache", cwd=work)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if line.split()}
    assert {r["trial_id"] for r in records} | {"mean", "trial"} <= set(rows)
    assert float(rows[records[0]["trial_id"]][-2]) == pytest.approx(records[0]["timing"]["wall"], abs=1e-3)


def test_sync_rebuilds_mlflow_from_the_run_directory(optuna_search):
    work, run_dir, _ = optuna_search
    other = f"sqlite:///{work / 'elsewhere.db'}"
    first = run_cli(["sync", str(run_dir), "--tracking-uri", other], cache=work / "cache", cwd=work)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "4 trials logged" in first.stdout
    again = run_cli(["sync", str(run_dir), "--tracking-uri", other], cache=work / "cache", cwd=work)
    assert "0 trials logged, 4 already present" in again.stdout
    parents, children = mlflow_runs(other)
    assert len(parents) == 1 and len(children) == 4


def test_resume_after_ctrl_c_and_after_the_driver_is_killed(tmp_path, base_model_cache, tracking_store):
    """Ctrl-C after the first finished trial, resume; SIGKILL that driver after its first trial, resume
    again: the budget completes with every finished trial run once and one MLflow run per trial."""
    storage = tracking_store(tmp_path / "runs")
    run_dir = storage / "killed"
    cache = base_model_cache
    args = ["run", *QUICK, "--finetune-epochs", "2", "--trials", "4", "--concurrency", "1", "--name", "killed",
            "--storage", str(storage)]
    first = start_cli(args, cache=cache, cwd=tmp_path, log=tmp_path / "first.log")
    second = None
    temp_dirs: list[str] = []
    try:
        wait_for_records(run_dir, 1, first, tmp_path / "first.log")
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
        assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
        assert f"prunetune resume {run_dir}" in (tmp_path / "first.log").read_text()
        assert not (run_dir / "summary.json").exists()
        status = run_cli(["status", str(run_dir), "--json"], cache=cache, cwd=tmp_path)
        assert json.loads(status.stdout)["state"] == "interrupted"
        after_ctrl_c = read_jsonl(run_dir / "trials.jsonl")

        second = start_cli(["resume", str(run_dir)], cache=cache, cwd=tmp_path, log=tmp_path / "second.log")
        wait_for_records(run_dir, len(after_ctrl_c) + 1, second, tmp_path / "second.log")
        os.kill(second.pid, signal.SIGKILL)
        second.wait(timeout=30)
        before_kill = read_jsonl(run_dir / "trials.jsonl")
        assert before_kill[: len(after_ctrl_c)] == after_ctrl_c
        meta = json.loads((run_dir / "prunetune.json").read_text())
        temp_dirs = list(meta["ray_temp_dirs"])
        assert any(processes_using(d) for d in temp_dirs), "the killed driver's Ray should still be running"
        status = run_cli(["status", str(run_dir), "--json"], cache=cache, cwd=tmp_path)
        assert json.loads(status.stdout)["state"] == "interrupted"

        resumed = run_cli(["resume", str(run_dir)], cache=cache, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        counters = [line for line in resumed.stderr.splitlines() if line.startswith("[")]
        assert counters and counters[0].startswith(f"[{len(before_kill) + 1}/4]"), resumed.stderr[-3000:]
        best = max(r["metrics"]["val_accuracy"] for r in before_kill)
        assert f"best {best:.4f}" in counters[0] or float(counters[0].split("best ")[1][:6]) > best
        assert "Tuner.restore" not in resumed.stderr and "Failed to fetch metrics" not in resumed.stderr
        assert not any(processes_using(d) for d in temp_dirs), "leftover Ray processes of the killed run"

        records = read_jsonl(run_dir / "trials.jsonl")
        keys = [r["trial_key"] for r in records]
        assert len(keys) == len(set(keys)) == 4
        assert as_ended(records[: len(before_kill)]) == as_ended(before_kill)  # kept as they ended, not rerun
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["trials"]["finished"] == 4
        # Issue 15: these epochs take a second, under checkpoint_min_s (30 s), so a trial's one checkpoint
        # is its last report's (its model, for export); a trial interrupted above started over
        results = {path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                   for path in run_dir.glob("trial_*/result.json")}
        assert sorted(results) == sorted(f"trial_{r['trial_id']}" for r in records)
        for rows in results.values():
            saved = [row for row in rows if row.get("checkpoint_dir_name")]
            assert saved and all(row.get("trial_complete") for row in saved), [
                (row.get("epoch"), row.get("checkpoint_dir_name")) for row in rows]
        assert all(r["checkpoint"] for r in records)
        parents, children = mlflow_runs(meta["tracking_uri"])
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(c.data.tags["prunetune.trial_key"] for c in children) == sorted(keys)
        assert all(c.info.status == "FINISHED" for c in children)
    finally:
        for driver in (first, second):
            if driver is not None and driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        meta_path = run_dir / "prunetune.json"
        if meta_path.exists():
            temp_dirs = json.loads(meta_path.read_text()).get("ray_temp_dirs", temp_dirs)
        kill_leftover_ray(temp_dirs)
