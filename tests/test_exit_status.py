"""A run that did not do its job does not exit 0: a search (objective constrained) none of whose
trials met the MACs target keeps everything it ran and exits 1 with one line naming the closest
trial and the fix; with objective pareto the front is the result, so it warns and exits 0. And
``prunetune status`` reads JSON only: it imports neither torch nor ray nor mlflow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_driver import _finish


def test_a_constrained_search_with_no_trial_within_the_target_exits_1_with_one_line(tmp_path, capsys,
                                                                                     tracking_store):
    status, lines, summary, parent_status, out = _finish(tmp_path, ["finished", "failed"], capsys, tracking_store,
                                                         macs_target=0.3)
    assert status == 1 and parent_status == "FAILED" and summary["best"] is None
    assert lines == ["prunetune: error: no finished trial met the MACs target 0.3 (a MACs ratio of at most 0.32 "
                     "with macs_tolerance 0.02; the closest: trial t0 at MACs ratio 0.500); raise --macs-target, "
                     "or let optuna cut deeper (lower --set optuna.min_keep_ratio, now 0.1)"]
    assert "no finished trial met the MACs target 0.3" in out  # the summary table is printed first
    assert summary["pareto"][0]["trial_id"] == "t0"  # what it ran is kept


def test_a_pareto_search_with_no_trial_within_the_target_warns_and_exits_0(tmp_path, capsys, tracking_store):
    status, lines, summary, parent_status, out = _finish(tmp_path, ["finished"], capsys, tracking_store,
                                                         macs_target=0.3, objective="pareto")
    assert status == 0 and parent_status == "FINISHED" and summary["best"] is None
    assert len(lines) == 1 and lines[0].startswith("prunetune: warning: no finished trial met the MACs target 0.3")
    closing = out.strip().splitlines()[-1]  # suggests what works: --trial best would be refused
    assert closing.startswith("next: ") and "--trial best" not in closing
    assert f"prunetune status {tmp_path / 'r'}" in closing
    assert f"prunetune export {tmp_path / 'r'} --trial t0 --out pruned.pt" in closing


def test_the_closing_line_suggests_an_export_that_works():
    from pathlib import Path

    from prunetune.search.failures import next_steps

    run = Path("/runs/r")
    front = [{"trial_id": "a", "macs": 90.0, "macs_ratio": 0.9}, {"trial_id": "b", "macs": 60.0, "macs_ratio": 0.6}]
    assert next_steps({"best": {"trial_id": "a"}, "pareto": front}, run, "sqlite:///x.db", final=False) == (
        "next: mlflow ui --backend-store-uri sqlite:///x.db   |   prunetune status /runs/r   |   "
        "prunetune export /runs/r --trial best --out pruned.pt")
    assert next_steps({"best": {"trial_id": "a"}, "pareto": front}, run, "http://h:5000", final=True).endswith(
        "--trial final --out pruned.pt") and "open http://h:5000" in next_steps({}, run, "http://h:5000", final=False)
    assert ("open http://h:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=trials   |"
            in next_steps({}, run, "http://h:5000", final=False, experiment_id="7"))
    postgres = next_steps({}, run, "postgresql://me:secret@db:5432/mlflow", final=False, experiment_id="7")
    assert postgres.startswith("next: mlflow ui --backend-store-uri postgresql://me:***@db:5432/mlflow   |")
    unmet = next_steps({"best": None, "pareto": front}, run, "sqlite:///x.db", final=False)
    assert "--trial b --out pruned.pt (the front's fewest MACs, ratio 0.600; none met the target)" in unmet
    assert next_steps({"best": None, "pareto": []}, run, "sqlite:///x.db", final=False).endswith(
        "prunetune status /runs/r")  # nothing to export: status lists the trials


def test_the_closest_trial_prefers_finished_full_fidelity_ones_and_the_hint_follows_the_method():
    from prunetune.search.config import load_config
    from prunetune.search.failures import closest_trial, cut_deeper_hint, no_best_message

    def record(trial_id, status, ratio, **params):
        return {"trial_id": trial_id, "status": status, "params": params,
                "metrics": {} if ratio is None else {"macs_ratio": ratio}}

    records = [record("proxy", "finished", 0.4, finetune_epochs=0), record("stopped", "stopped", 0.45),
               record("full", "finished", 0.7), record("failed", "failed", None)]
    assert closest_trial(records)["trial_id"] == "full"
    assert closest_trial(records[:2])["trial_id"] == "proxy"  # no finished full trial: any that measured
    assert closest_trial(records[3:]) is None

    def cfg(method, *sets):
        return load_config(sets=[f"method={method}", *sets], names=False)

    assert cut_deeper_hint(cfg("random", "random.floor=0.3")) == \
        "let random cut deeper (lower --set random.floor, now 0.3)"
    assert "cdp_dtc.* hyperparameters" in cut_deeper_hint(cfg("cdp-dtc"))
    assert "space.min_channels" in cut_deeper_hint(cfg("uniform"))
    assert "no trial measured its MACs" in no_best_message(records[3:], cfg("optuna"))


# --- end to end: one real search (Ray, MLflow), then `status` in a fresh process -----------------------


@pytest.fixture(scope="module")
def unmet_search(tmp_path_factory, base_model_cache, tracking_store):
    """One CDP+DTC trial that learns too briefly to empty any filter (MACs ratio 1) under a 0.5 target:
    (its folder, run directory, the completed ``prunetune run``)."""
    from tests.search_helpers import QUICK, run_cli

    work = tmp_path_factory.mktemp("unmet")
    result = run_cli(["run", *QUICK, "--method", "cdp-dtc", "--trials", "1", "--concurrency", "1",
                      "--macs-target", "0.5", "--name", "unmet", "--storage", str(tracking_store(work / "runs")),
                      "--set", "cdp_dtc.steps=5", "--set", "cdp_dtc.checkpoint_every=5",
                      "--set", "cdp_dtc.delta_max=0.1"], cache=base_model_cache, cwd=work)
    return work, work / "runs" / "unmet", result


@pytest.mark.slow
def test_a_run_none_of_whose_trials_met_the_target_exits_1_and_keeps_everything(unmet_search):
    """``prunetune resume`` ends in the same ``finish_search`` (tested above without Ray)."""
    from tests.search_helpers import mlflow_runs, read_jsonl

    work, run_dir, result = unmet_search
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("prunetune: error: no finished trial met the MACs target 0.5 ") and \
        "the closest: trial " in last and "raise --macs-target, or let cdp-dtc cut deeper" in last, last
    assert "Traceback" not in result.stderr
    records = read_jsonl(run_dir / "trials.jsonl")
    assert [r["status"] for r in records] == ["finished"] and records[0]["metrics"]["macs_ratio"] > 0.52
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"] is None and summary["trials"]["finished"] == 1
    parents, children = mlflow_runs(f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    assert [p.info.status for p in parents] == ["FAILED"] and len(children) == 1
    assert children[0].data.tags["prunetune.trial_id"] == records[0]["trial_id"]


@pytest.mark.slow
def test_status_imports_neither_torch_nor_ray_nor_mlflow(unmet_search):
    _, run_dir, _ = unmet_search
    code = ("import sys; from prunetune.search.cli import main; "
            f"assert main(['status', {str(run_dir)!r}, '--timing']) == 0; "
            "heavy = sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules); "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cdp-dtc): finished; 1 finished" in done.stdout and "none within the MACs target" in done.stdout
