"""`prunetune finetune`: the final fine-tune of a search's chosen policy, with distillation, logged
and exported, and resumed after SIGKILL (real Ray for the search, a real sqlite MLflow store)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.search_helpers import QUICK, assert_user_error, mlflow_runs, read_jsonl, run_cli, start_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def search(tmp_path_factory, base_model_cache, tracking_store):
    """A 2-trial search whose config's ``final`` section fine-tunes its best policy at the end (the
    module's ``prunetune finetune`` commands load its base model from the same cache)."""
    work = tmp_path_factory.mktemp("final")
    result = run_cli(["run", *QUICK, "--method", "random", "--trials", "2", "--name", "s",
                      "--storage", str(tracking_store(work / "runs")), "--set", "final.epochs=2"],
                     cache=base_model_cache, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "runs" / "s", result


def test_the_final_section_runs_the_final_fine_tune_at_the_end_of_run(search, base_model_cache):
    work, run_dir, result = search
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["trial_id"] == summary["best"]["trial_id"] and not summary["final"]["distill"]
    assert summary["final"]["recipe"]["epochs"] == 2 and "final fine-tune of trial" in result.stdout
    assert "--trial final" in result.stdout
    exported = run_cli(["export", str(run_dir), "--trial", "final", "--out", str(work / "m.pt"), "--check"],
                       cache=base_model_cache, cwd=work)
    assert exported.returncode == 0, exported.stderr[-2000:]
    recorded = f"(recorded {summary['final']['test_accuracy']:.6f})"
    assert f"test accuracy of the export: {summary['final']['test_accuracy']:.6f} {recorded}" in exported.stdout


def test_finetune_distils_records_logs_and_exports(search, base_model_cache):
    from prunetune.pruning.surgery import load_pruned

    work, run_dir, _ = search
    result = run_cli(["finetune", str(run_dir), "--epochs", "2", "--distill", "--out", str(work / "final.pt")],
                     cache=base_model_cache, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    assert final["trial_id"] == summary["best"]["trial_id"] and final["distill"] and final["fidelity"] == "final"
    assert final["recipe"]["epochs"] == 2 and 0 <= final["test_accuracy"] <= 1
    assert final["macs_ratio"] <= 0.5 + 0.02 + 1e-9
    assert "final fine-tune of trial" in result.stdout and "distilled" in result.stdout
    model, meta = load_pruned(work / "final.pt")
    assert meta["policy"].to_json() == final["policy"]

    _, trials = mlflow_runs(json.loads((run_dir / "prunetune.json").read_text())["tracking_uri"])
    finals = [r for r in mlflow_runs_all(run_dir) if r.data.tags.get("prunetune.role") == "final"]
    assert len(trials) == 2 and len(finals) == 2  # the run's own final (2 epochs) and this distilled one
    assert all(r.data.tags["prunetune.fidelity"] == "final" for r in finals)
    distilled = [r for r in finals if r.data.params.get("distill") == "True"]
    assert len(distilled) == 1
    assert distilled[0].data.metrics["test_accuracy"] == pytest.approx(final["test_accuracy"])

    again = run_cli(["finetune", str(run_dir), "--epochs", "2", "--distill"], cache=base_model_cache, cwd=work)
    assert again.returncode == 0 and "is done" in again.stderr  # recorded: nothing trained twice
    assert len([r for r in mlflow_runs_all(run_dir) if r.data.tags.get("prunetune.role") == "final"]) == 2


def mlflow_runs_all(run_dir):
    from mlflow.tracking import MlflowClient

    meta = json.loads((run_dir / "prunetune.json").read_text())
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    experiment = client.get_experiment_by_name(meta["experiment"])
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_finetune_resumes_after_sigkill(search, tmp_path, base_model_cache):
    work, run_dir, _ = search
    args = ["finetune", str(run_dir), "--epochs", "8", "--lr", "0.02"]
    log = tmp_path / "first.log"
    driver = start_cli(args, cache=base_model_cache, cwd=work, log=log)
    deadline = time.monotonic() + 240
    while not list((run_dir / "final").glob("*/checkpoint/trainer.pt")) or "final epoch 2/" not in log.read_text():
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    resumed = run_cli(args, cache=base_model_cache, cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from its checkpoint" in resumed.stderr
    first_epochs = [line for line in log.read_text().splitlines() if "final epoch" in line]
    again_epochs = [line for line in resumed.stderr.splitlines() if "final epoch" in line]
    assert "final epoch 1/8" not in resumed.stderr and len(first_epochs) + len(again_epochs) <= 9
    assert json.loads((run_dir / "summary.json").read_text())["final"]["recipe"]["epochs"] == 8
    results = [json.loads(path.read_text()) for path in (run_dir / "final").glob("*/result.json")]
    (result,) = [r for r in results if r["recipe"]["epochs"] == 8]  # the module's other test made a 2-epoch one
    assert [row["epoch"] for row in result["history"]] == list(range(9))


def test_finetune_refuses_bad_input_in_one_line(search, tmp_path, base_model_cache):
    work, run_dir, _ = search
    assert_user_error(run_cli(["finetune", str(tmp_path)], cache=base_model_cache, cwd=work), "")
    assert_user_error(run_cli(["finetune", str(run_dir), "--epochs", "2", "--trial", "nope"],
                              cache=base_model_cache, cwd=work), "no trial 'nope'")
    assert_user_error(run_cli(["finetune", str(run_dir), "--epochs", "2", "--distill-weight", "1.5"],
                              cache=base_model_cache, cwd=work), "distill_weight")
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 2  # nothing added to the search's trials

