"""Warm starts (methods/heuristics.py): the heuristics are evaluated first by optuna and random, run
to their end under ASHA, and the summary's margin over them is consistent with the trials."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch

from prunetune.methods.heuristics import (
    HEURISTICS,
    heuristic_policies,
    heuristic_role,
    heuristic_summary,
    optuna_points,
)
from prunetune.methods.registry import make_searcher
from prunetune.pruning.dependency import build_space
from prunetune.pruning.models import create_model
from prunetune.pruning.policy import Policy

TARGET = 0.5


@cache
def model_and_space(name: str = "resnet20"):
    torch.manual_seed(0)
    model = create_model(name)
    return model, build_space(model, name, (3, 32, 32))


@cache
def heuristics(name: str = "resnet20"):
    model, space = model_and_space(name)
    return heuristic_policies(model, space, None, macs_target=TARGET, criterion="l1")


def test_the_heuristics_are_distinct_and_meet_the_target():
    _, space = model_and_space()
    found = heuristics()
    assert list(found) == list(HEURISTICS)  # on resnet20 at 0.5 all three differ
    assert len({p.key() for p in found.values()}) == len(found)
    assert all(TARGET - 0.1 < space.macs_ratio(p) <= TARGET for p in found.values())


def drive(searcher, count: int) -> list:
    proposals = []
    while len(proposals) < count and not searcher.finished:
        proposal = searcher.ask()
        assert proposal is not None
        proposals.append(proposal)
        searcher.tell(proposal.proposal_id, {"val_accuracy": 0.5, "macs_ratio": TARGET})
    return proposals


def test_random_evaluates_the_heuristics_first_within_its_budget():
    _, space = model_and_space()
    searcher = make_searcher("random", space, macs_target=TARGET, seed=0, budget=5, concurrency=1,
                             heuristics=heuristics())
    proposals = drive(searcher, 10)
    assert [p.policy for p in proposals[:3]] == list(heuristics().values())
    assert [p.info["role"] for p in proposals[:3]] == [f"heuristic:{name}" for name in HEURISTICS]
    assert len(proposals) == 5 and all(p.info["role"] == "random" for p in proposals[3:])


def test_a_warm_started_searcher_restores_mid_warm_start():
    _, space = model_and_space()

    def build():
        return make_searcher("random", space, macs_target=TARGET, seed=3, budget=6, concurrency=1,
                             heuristics=heuristics())

    first = build()
    drive(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    second = build()
    second.load_state_dict(state)
    assert [p.policy.key() for p in drive(first, 4)] == [p.policy.key() for p in drive(second, 4)]


def test_optuna_proposes_the_heuristics_first():
    from prunetune.search.optuna_space import make_optuna_search

    _, space = model_and_space()
    points = optuna_points(heuristics(), space)
    search = make_optuna_search(space, macs_target=TARGET, objective="constrained", sampler="tpe", seed=0,
                                n_startup_trials=2, min_keep_ratio=0.05, tolerance=0.02, points_to_evaluate=points)
    suggested = []
    for index in range(len(points)):
        config = search.suggest(f"t{index}")
        suggested.append(space.canonical(Policy.from_json(config["policy"])))
        search.on_trial_complete(f"t{index}", result={"val_accuracy": 0.5, "macs_ratio": TARGET})
    assert [p.key() for p in suggested] == [p.key() for p in heuristics().values()]


def test_optunas_heuristic_trials_carry_their_role_and_the_others_none():
    """Optuna's enqueued points cannot carry a proposal's role: the search gives their configs it."""
    from prunetune.search.config import load_config
    from prunetune.search.tuner import build_search_algorithm

    model, space = model_and_space()
    cfg = load_config(None, overrides={"model": "resnet20", "method": "optuna", "macs_target": TARGET,
                                       "optuna.n_startup_trials": 2})
    search = build_search_algorithm(cfg, space, base_model=model, calib=None, heuristics=heuristics())
    search.set_search_properties("val_accuracy", "max", {})
    roles = []
    for index in range(len(HEURISTICS) + 2):
        config = search.suggest(f"t{index}")
        roles.append(config.get("role"))
        search.on_trial_complete(f"t{index}", result={"val_accuracy": 0.5, "macs_ratio": TARGET})
    assert roles == [heuristic_role(name) for name in HEURISTICS] + [None, None]


def test_asha_never_stops_a_heuristic_and_still_ranks_its_score():
    """Under ``scheduler: auto`` with 3 epochs (ASHA): a heuristic below the rung's cutoff continues,
    a searched trial as low is stopped, and the heuristic's score is in the rung it was cut against."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from prunetune.search.config import load_config
    from prunetune.search.tuner import build_scheduler

    scheduler = build_scheduler(load_config(None, overrides={"model": "small_cnn", "dataset.name": "digits",
                                                             "finetune.epochs": 3}))
    first, heuristic, searched = (Trial("__fake", config=config, trial_id=trial_id, stub=True) for trial_id, config in (
        ("t0", {"role": heuristic_role("uniform")}), ("t1", {"role": heuristic_role("global")}),
        ("t2", {"role": "random"})))
    for trial in (first, heuristic, searched):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, first, {"epoch": 1, "val_accuracy": 0.9}) == TrialScheduler.CONTINUE
    low = {"epoch": 1, "val_accuracy": 0.3}
    assert scheduler.on_trial_result(None, heuristic, low) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, searched, low) == TrialScheduler.STOP
    rung = dict(scheduler._brackets[0]._rungs)[1]  # Ray's ASHA bracket: milestone -> recorded scores
    assert rung == {"t0": 0.9, "t1": 0.3, "t2": 0.3}
    assert scheduler.on_trial_result(None, heuristic, {"epoch": 3, "val_accuracy": 0.3}) == TrialScheduler.CONTINUE


def test_the_summary_margin_is_the_best_over_the_best_heuristic():
    found = heuristics()
    records = []
    for index, (name, policy) in enumerate(found.items()):
        records.append({"trial_id": name, "status": "finished", "policy": policy.to_json(),
                        "metrics": {"val_accuracy": 0.80 + 0.01 * index, "macs_ratio": 0.49},
                        "test_accuracy": 0.79 + 0.01 * index})
    best = {"trial_id": "x", "val_accuracy": 0.85, "test_accuracy": 0.83}
    summary = heuristic_summary(records, found, best)
    assert summary["best"] == "global-lamp"
    assert summary["best_margin"]["val_accuracy"] == pytest.approx(0.85 - 0.82)
    assert summary["best_margin"]["test_accuracy"] == pytest.approx(0.83 - 0.81)
    assert summary["policies"]["uniform"]["val_accuracy"] == pytest.approx(0.80)
    missing = heuristic_summary([], found, best)
    assert missing["best"] is None and missing["best_margin"] is None


def test_the_summary_names_a_heuristic_with_no_finished_trial_and_why():
    from prunetune.search.summary import _heuristic_lines

    found = heuristics()
    uniform, global_, _ = found.values()
    records = [{"trial_id": "a", "status": "finished", "policy": uniform.to_json(),
                "metrics": {"val_accuracy": 0.88, "macs_ratio": 0.49}, "test_accuracy": None},
               {"trial_id": "b", "status": "failed", "policy": global_.to_json(), "metrics": {}}]
    summary = {"heuristics": heuristic_summary(records, found, {"trial_id": "x", "val_accuracy": 0.9})}
    rows = summary["heuristics"]["policies"]
    assert [rows[name]["status"] for name in HEURISTICS] == ["finished", "failed", "not run"]
    assert rows["global"]["trial_id"] is None
    assert _heuristic_lines(summary) == ["heuristics (val): uniform 0.8800; the best trial is +0.0200 val against "
                                         "the best of them; no finished trial: global (failed), global-lamp (not run)"]
    nothing = {"heuristics": heuristic_summary(records[1:], found, None)}
    assert _heuristic_lines(nothing) == ["heuristics (val): none finished; no finished trial: uniform (not run), "
                                         "global (failed), global-lamp (not run)"]


@pytest.mark.slow
def test_a_search_evaluates_the_heuristics_and_reports_its_margin_over_them(optuna_search):
    """The session's 4-trial Optuna search (conftest); random's warm start: the WarmStart tests above."""
    from tests.search_helpers import read_jsonl

    _, run_dir, result = optuna_search
    assert json.loads((run_dir / "summary.json").read_text())["method"] == "optuna"
    heuristics = json.loads((run_dir / "heuristics.json").read_text())
    records = read_jsonl(run_dir / "trials.jsonl")
    keys = {Policy.from_json(r["policy"]).key() for r in records}
    assert heuristics and all(Policy.from_json(p).key() in keys for p in heuristics.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = summary["heuristics"]["policies"]
    assert set(rows) == set(heuristics) and all(row["val_accuracy"] is not None for row in rows.values())
    assert summary["heuristics"]["best_margin"]["val_accuracy"] >= 0  # the best is chosen among them too
    assert "heuristics (val):" in result.stdout and "warm start" in result.stderr


@pytest.mark.slow
def test_under_asha_every_heuristic_runs_every_epoch_and_stopped_trials_keep_their_history(
        tmp_path, base_model_cache, tracking_store):
    """A real 3-epoch Optuna search on the default model and data (``scheduler: auto`` is ASHA there):
    the heuristics are never stopped (measured here: global scored 0.306 after epoch 1 against
    uniform's 0.333 and ASHA stopped it; let finish it reached 0.903); the trials ASHA stops are
    recorded with the epochs they ran and their timing, and the progress line says so and keeps its
    best to the finished trials, as the summary does."""
    from prunetune.search.timing import timing_table
    from tests.search_helpers import read_jsonl, run_cli

    result = run_cli(["run", "--finetune-epochs", "3", "--trials", "6", "--concurrency", "1", "--set", "final.epochs=0",
                      "--name", "asha", "--storage", str(tracking_store(tmp_path / "runs"))],
                     cache=base_model_cache, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "asha"
    records = {r["trial_id"]: r for r in read_jsonl(run_dir / "trials.jsonl")}
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = summary["heuristics"]["policies"]
    assert set(rows) == set(HEURISTICS)
    for name, row in rows.items():
        record = records[row["trial_id"]]
        assert row["status"] == "finished" and record["params"]["role"] == heuristic_role(name)
        assert [h["epoch"] for h in record["history"]] == [0, 1, 2, 3]
    stopped = [r for r in records.values() if r["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial of 6: nothing below about its stopped trials was checked"
    table = timing_table(list(records.values()))
    for record in stopped:
        epoch = int(record["metrics"]["epoch"])
        assert [h["epoch"] for h in record["history"]] == list(range(epoch + 1)) and epoch < 3
        assert record["timing"]["wall"] > 0 and record["trial_id"] in table
        assert f"trial {record['trial_id']} stopped early after epoch {epoch}: " in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and progress[-1].startswith("[6/6]")
    assert f"; best {summary['best']['val_accuracy']:.4f};" in progress[-1]
    assert "no finished trial" not in result.stdout
