"""Warm starts (methods/heuristics.py): the heuristics are evaluated first by optuna and random, and
the summary's margin over them is consistent with the trials."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch

from prunetune.methods.heuristics import HEURISTICS, heuristic_policies, heuristic_summary, optuna_points
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
