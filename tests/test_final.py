"""`prunetune finetune`: the final fine-tune of a search's chosen policy, with distillation, logged
and exported, and resumed after SIGKILL (real Ray for the search, a real sqlite MLflow store); its
candidates (``final.candidates``, ``final.heuristics``): the top trials and the heuristics' once each,
the best by final validation accuracy chosen."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from prunetune.pruning.errors import UserError
from tests.search_helpers import QUICK, assert_user_error, mlflow_runs, read_jsonl, run_cli, start_cli

LIMIT = 0.5 + 0.02  # QUICK's MACs target and tolerance


def policy(*ratios: float) -> dict:
    return {"space_id": "toy", "keep_ratios": {f"g{i}": r for i, r in enumerate(ratios)}, "dropped_blocks": []}


def record(trial_id: str, val: float, keep: dict, *, macs_ratio: float = 0.45, status: str = "finished",
           params: dict | None = None) -> dict:
    return {"trial_id": trial_id, "trial_key": f"k-{trial_id}", "status": status, "policy": keep,
            "params": params or {}, "metrics": {"val_accuracy": val, "macs_ratio": macs_ratio, "macs": 100}}


def test_the_candidates_are_the_top_distinct_trials_plus_the_heuristics_once_each():
    from prunetune.search.final import final_candidates
    from prunetune.search.summary import best_trial

    records = [record("a", 0.90, policy(0.5)), record("b", 0.80, policy(0.6)),
               record("a2", 0.85, policy(0.5)),  # a's policy again: a lower score of the same candidate
               record("over", 0.99, policy(0.9), macs_ratio=0.7), record("failed", 0.0, policy(0.2), status="failed"),
               record("proxy", 0.98, policy(0.3), params={"finetune_epochs": 1}),
               record("u", 0.70, policy(0.4)), record("c", 0.75, policy(0.45))]
    heuristics = {"uniform": policy(0.4), "global": policy(0.5), "global-lamp": policy(0.35)}  # lamp: no trial

    def chosen(count, with_heuristics):
        found = final_candidates(records, heuristics, macs_limit=LIMIT, count=count, with_heuristics=with_heuristics)
        return [(c.record["trial_id"], c.heuristic) for c in found]

    assert chosen(1, False) == [(best_trial(records, macs_limit=LIMIT)["trial_id"], "global")] == [("a", "global")]
    assert chosen(2, False) == [("a", "global"), ("b", None)]
    assert chosen(2, True) == [("a", "global"), ("b", None), ("u", "uniform")]  # by trial val, "global" once
    assert chosen(9, True) == chosen(9, False) == [("a", "global"), ("b", None), ("c", None), ("u", "uniform")]


def test_the_chosen_candidate_has_the_best_final_validation_and_a_tie_goes_to_the_better_trial():
    from prunetune.search.config import FinalSection
    from prunetune.search.final import choose

    assert choose([{"val_accuracy": 0.8}, {"val_accuracy": 0.9}, {"val_accuracy": 0.9}]) == 1
    assert choose([{"val_accuracy": 0.7, "test_accuracy": 0.99}, {"val_accuracy": 0.71, "test_accuracy": 0.1}]) == 1
    with pytest.raises(UserError, match="final.candidates"):
        FinalSection(candidates=0)


def test_the_final_fine_tune_numbers_its_epochs_1_to_n_after_the_recalibrated_score(tmp_path):
    """As ``prunetune prune`` numbers them: the recalibrated model's score labelled as such, then every
    training epoch, the last one (which comes with the result) included."""
    from prunetune.search.final import _reporter

    lines: list[str] = []
    report = _reporter(tmp_path, 2, lines.append)
    for metrics in ({"epoch": 0, "val_accuracy": 0.6736}, {"epoch": 1, "val_accuracy": 0.5208},
                    {"epoch": 2, "val_accuracy": 0.8472, "test_accuracy": 0.9}):  # what run_trial reports
        report(metrics, None)
    assert lines == ["  final: pruned, val accuracy 0.6736 after BatchNorm recalibration",
                     "  final epoch 1/2: val accuracy 0.5208", "  final epoch 2/2: val accuracy 0.8472"]


@pytest.fixture(scope="module")
def search(tmp_path_factory, base_model_cache, tracking_store):
    """A 3-trial search (the warm start's heuristics first) whose config's ``final`` section
    fine-tunes its 2 best policies and the heuristics' at the end (the module's ``prunetune
    finetune`` commands load its base model from the same cache)."""
    work = tmp_path_factory.mktemp("final")
    result = run_cli(["run", *QUICK, "--method", "random", "--trials", "3", "--name", "s",
                      "--storage", str(tracking_store(work / "runs")), "--set", "final.epochs=2",
                      "--set", "final.candidates=2", "--set", "final.heuristics=true"],
                     cache=base_model_cache, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "runs" / "s", result


@pytest.mark.slow
def test_the_final_section_runs_the_final_fine_tune_of_every_candidate_at_the_end_of_run(search, base_model_cache):
    from prunetune.pruning.policy import Policy

    work, run_dir, result = search
    summary = json.loads((run_dir / "summary.json").read_text())
    final, rows = summary["final"], summary["final"]["candidates"]
    feasible = sorted((r for r in read_jsonl(run_dir / "trials.jsonl")
                       if r["status"] == "finished" and r["metrics"]["macs_ratio"] <= LIMIT + 1e-9),
                      key=lambda r: -r["metrics"]["val_accuracy"])
    heuristics = {Policy.from_json(p).key(): name for name, p in json.loads((run_dir / "heuristics.json").read_text()).items()}
    names = {r["trial_id"]: heuristics.get(Policy.from_json(r["policy"]).key()) for r in feasible}
    expected = {r["trial_id"] for r in feasible[:2]} | {i for i, name in names.items() if name}
    assert len(heuristics) >= 2 and sorted(row["trial_id"] for row in rows) == sorted(expected)
    assert [row["heuristic"] for row in rows] == [names[row["trial_id"]] for row in rows]
    assert rows[0]["trial_id"] == summary["best"]["trial_id"] and final["chosen_by"] == "final validation accuracy"
    (chosen,) = [row for row in rows if row["chosen"]]
    assert chosen["trial_id"] == final["trial_id"] and chosen["val_accuracy"] == max(row["val_accuracy"] for row in rows)
    assert final["val_accuracy"] == chosen["val_accuracy"] and final["test_accuracy"] == chosen["test_accuracy"]
    folders = {f"final/{path.parent.name}" for path in (run_dir / "final").glob("*/plan.json")
               if (plan := json.loads(path.read_text()))["recipe"]["epochs"] == 2 and not plan["distill"]}
    assert folders == {row["folder"] for row in rows}  # one plan folder per candidate, its result in it
    for row in rows:
        done = json.loads((run_dir / row["folder"] / "result.json").read_text())
        assert (done["trial_id"], done["val_accuracy"], done["test_accuracy"]) == (
            row["trial_id"], row["val_accuracy"], row["test_accuracy"])
        assert done["trial_val_accuracy"] == row["trial_val_accuracy"]
    assert not final["distill"] and final["recipe"]["epochs"] == 2 and "final fine-tune of trial" in result.stdout
    assert f"chosen by final validation accuracy among {len(rows)} candidates" in result.stdout
    assert result.stderr.count("final candidate ") == len(rows) and "--trial final" in result.stdout
    exported = run_cli(["export", str(run_dir), "--trial", "final", "--out", str(work / "m.pt"), "--check"],
                       cache=base_model_cache, cwd=work)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"exported trial final-{final['trial_id']} " in exported.stdout
    recorded = f"(recorded {final['test_accuracy']:.6f})"
    assert f"test accuracy of the export: {final['test_accuracy']:.6f} {recorded}" in exported.stdout


@pytest.mark.slow
def test_finetune_distils_records_logs_and_exports(search, base_model_cache):
    from prunetune.pruning.surgery import load_pruned

    work, run_dir, _ = search
    candidates = len(json.loads((run_dir / "summary.json").read_text())["final"]["candidates"])  # the run's own
    one = ["--candidates", "1", "--no-heuristics"]  # the run's config has 2 and the heuristics
    result = run_cli(["finetune", str(run_dir), "--epochs", "2", "--distill", *one, "--out", str(work / "final.pt")],
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
    hint = re.search(r"`(model, info = prunetune\.load_pruned\(.+?\))`", result.stdout).group(1)
    scope: dict = {}
    exec(f"import prunetune, torch\n{hint}\nout = model.eval()(torch.zeros(1, *info['space'].input_shape))", scope)
    assert scope["info"]["policy"].to_json() == final["policy"] and scope["out"].shape[0] == 1  # the hint runs
    epochs = [line for line in result.stderr.splitlines() if line.startswith("  final")]  # numbered as prune's
    assert [line.split(":")[0] for line in epochs] == ["  final", "  final epoch 1/2", "  final epoch 2/2"]
    assert epochs[0].endswith("after BatchNorm recalibration")

    _, trials = mlflow_runs(json.loads((run_dir / "prunetune.json").read_text())["tracking_uri"])
    finals = [r for r in mlflow_runs_all(run_dir) if r.data.tags.get("prunetune.role") == "final"]
    assert len(trials) == 3 and len(finals) == 2  # the run's own chosen final (2 epochs) and this distilled one
    others = [r for r in mlflow_runs_all(run_dir) if r.data.tags.get("prunetune.role") == "final_candidate"]
    assert len(others) == candidates - 1 and final["candidates"][0]["chosen"] and len(final["candidates"]) == 1
    assert all(r.data.tags["prunetune.fidelity"] == "final" for r in finals + others)
    distilled = [r for r in finals if r.data.params.get("distill") == "True"]
    assert len(distilled) == 1
    assert distilled[0].data.metrics["test_accuracy"] == pytest.approx(final["test_accuracy"])

    again = run_cli(["finetune", str(run_dir), "--epochs", "2", "--distill", *one], cache=base_model_cache, cwd=work)
    assert again.returncode == 0 and "is done" in again.stderr  # recorded: nothing trained twice
    assert len([r for r in mlflow_runs_all(run_dir) if r.data.tags.get("prunetune.role") == "final"]) == 2


def mlflow_runs_all(run_dir):
    from mlflow.tracking import MlflowClient

    meta = json.loads((run_dir / "prunetune.json").read_text())
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    experiment = client.get_experiment_by_name(meta["experiment"])
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.mark.slow
def test_finetune_resumes_after_sigkill_reusing_a_finished_candidate(search, tmp_path, base_model_cache):
    work, run_dir, _ = search
    epochs = 12  # enough that the second candidate cannot finish between its epoch-2 line and the kill
    args = ["finetune", str(run_dir), "--epochs", str(epochs), "--lr", "0.02", "--candidates", "2", "--no-heuristics"]
    log = tmp_path / "first.log"
    driver = start_cli(args, cache=base_model_cache, cwd=work, log=log)
    deadline = time.monotonic() + 240
    # killed in the second candidate's fine-tune, after its epoch-2 checkpoint (written before the line)
    while "final candidate 1/2" not in (text := log.read_text()) or text.count(f"final epoch 2/{epochs}") < 2:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no second candidate's checkpoint in time"
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    (finished,) = [path for path in (run_dir / "final").glob("*/result.json")
                   if json.loads(path.read_text())["recipe"]["epochs"] == epochs]
    written = finished.stat().st_mtime_ns
    resumed = run_cli(args, cache=base_model_cache, cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is done" in resumed.stderr and "continuing from its checkpoint" in resumed.stderr
    assert finished.stat().st_mtime_ns == written  # the finished candidate was read back, not trained again
    first_epochs = [line for line in log.read_text().splitlines() if "final epoch" in line]
    again_epochs = [line for line in resumed.stderr.splitlines() if "final epoch" in line]
    assert f"final epoch 1/{epochs}" not in resumed.stderr and len(first_epochs) + len(again_epochs) <= 2 * epochs + 1
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final["recipe"]["epochs"] == epochs and len(final["candidates"]) == 2
    results = [json.loads(path.read_text()) for path in (run_dir / "final").glob("*/result.json")]
    long = [r for r in results if r["recipe"]["epochs"] == epochs]  # the module's other tests made 2-epoch ones
    assert sorted(r["folder"] for r in long) == sorted(row["folder"] for row in final["candidates"])
    assert all([row["epoch"] for row in r["history"]] == list(range(epochs + 1)) for r in long)


@pytest.mark.slow
def test_finetune_refuses_bad_input_in_one_line(search, tmp_path, base_model_cache):
    work, run_dir, _ = search
    assert_user_error(run_cli(["finetune", str(tmp_path)], cache=base_model_cache, cwd=work), "")
    assert_user_error(run_cli(["finetune", str(run_dir), "--epochs", "2", "--trial", "nope"],
                              cache=base_model_cache, cwd=work), "no trial 'nope'")
    assert_user_error(run_cli(["finetune", str(run_dir), "--epochs", "2", "--distill-weight", "1.5"],
                              cache=base_model_cache, cwd=work), "distill_weight")
    assert_user_error(run_cli(["finetune", str(run_dir), "--epochs", "2", "--trial", "best", "--candidates", "3"],
                              cache=base_model_cache, cwd=work), "--trial best fine-tunes that trial only")
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 3  # nothing added to the search's trials

