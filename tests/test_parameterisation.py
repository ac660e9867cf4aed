"""Issue 10, item 3: the policy parameterisations (space.parameterisation = groups | stages | affine).

Every parameterisation, on a residual model (resnet20) and a plain one (small_cnn), yields valid
policies that meet the MACs target (through the Optuna constraint, the random searcher's band, or
affine's threshold by construction); affine's start is the global heuristic; the dimensions are
those README's table states; and one real optuna search runs in the stages parameterisation.
"""

from __future__ import annotations

import functools
import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from prunetune.methods.heuristics import heuristic_policies, inexpressible_heuristics, optuna_points
from prunetune.methods.parameterisation import (
    PARAMETERISATIONS,
    TABLE_END,
    TABLE_START,
    dimension_count,
    dimension_table,
    make_parameterisation,
    normalised_importance,
    sample_point,
    stage_assignment,
)
from prunetune.methods.random_search import RandomOptions
from prunetune.methods.registry import make_searcher
from prunetune.pruning.dependency import build_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.models import create_model, model_names
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import Block
from prunetune.search.config import config_from_dict
from prunetune.search.optuna_space import CONSTRAINT_KEY, define_policy_space
from tests.search_helpers import QUICK, read_jsonl, run_cli

TARGET, FLOOR, TOLERANCE = 0.5, 0.1, 0.02
README = Path(__file__).resolve().parents[1] / "README.md"


@functools.cache
def model_and_space(name: str):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1).eval()
    return model, build_space(model, name, (1, 16, 16))


def parameterisation(kind: str, name: str):
    model, space = model_and_space(name)
    scores = normalised_importance(model, space, "l1", None) if kind == "affine" else None
    return make_parameterisation(kind, space, floor=FLOOR, macs_target=TARGET, scores=scores)


def assert_valid(space, policy) -> None:
    """Policy checks pass and every group keeps channels within its bounds."""
    policy.validate(space)
    for group, kept in space.channels(policy).items():
        g = space.group(group)
        assert g.min_channels <= kept <= g.channels
        assert policy.keep_ratios[group] >= FLOOR - 1e-9


def test_dimensions_of_a_residual_and_a_plain_model():
    _, resnet = model_and_space("resnet20")
    _, plain = model_and_space("small_cnn")
    assert [dimension_count(kind, resnet) for kind in PARAMETERISATIONS] == [12, 6, 24]
    assert [dimension_count(kind, plain) for kind in PARAMETERISATIONS] == [4, 3, 8]
    stages = stage_assignment(resnet)
    assert stages["conv1"] == "keep.layer1.out"  # the stem and layer1's residual stream: one group
    assert stages["layer2.0.conv2"] == "keep.layer2.out"  # layer2's residual sum and projection shortcut
    assert stages["layer3.1.conv1"] == "keep.layer3.in"
    assert stage_assignment(plain) == {"features.0": "keep.third1", "features.3": "keep.third1",
                                       "features.6": "keep.third2", "features.9": "keep.third3"}
    unheld = replace(plain, blocks=(Block("head", "head", "identity", True, "", ()),))  # a block holding no group
    assert stage_assignment(unheld) == stage_assignment(plain)
    affine = parameterisation("affine", "resnet20").dimensions()
    assert {(d.low, d.high, d.log) for d in affine if d.name.startswith("alpha.")} == {(0.5, 2.0, True)}
    assert {(d.low, d.high, d.log) for d in affine if d.name.startswith("kappa.")} == {(-1.0, 1.0, False)}


@pytest.mark.parametrize("name", ["resnet20", "small_cnn"])
@pytest.mark.parametrize("kind", PARAMETERISATIONS)
def test_sampled_points_give_valid_policies_and_the_constraint_says_whether_they_meet_the_target(kind, name):
    """Optuna's define-by-run space: every proposal is a valid policy, its recorded constraint is its
    MACs excess, and affine's proposals meet the target by construction (with dropped blocks too)."""
    shape = parameterisation(kind, name)
    space = shape.space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    depth = bool(space.droppable_blocks)
    feasible = 0
    for _ in range(12):
        trial = study.ask()
        config = define_policy_space(trial, space=space, macs_target=TARGET, min_keep_ratio=FLOOR,
                                     search_depth=depth, parameterisation=shape)
        policy = Policy.from_json(config["policy"])
        assert_valid(space, policy)
        assert set(trial.params) >= {d.name for d in shape.dimensions()}
        assert config["estimated_macs_ratio"] == pytest.approx(space.macs_ratio(policy))
        study.tell(trial, 0.5)
        excess = study.trials[-1].constraints[CONSTRAINT_KEY]
        assert excess == pytest.approx(space.macs_ratio(policy) - TARGET)
        feasible += excess <= 0
    assert feasible >= 1
    if kind == "affine":
        assert feasible == 12


@pytest.mark.parametrize("name", ["resnet20", "small_cnn"])
@pytest.mark.parametrize("kind", PARAMETERISATIONS)
def test_the_random_searcher_proposes_distinct_valid_policies_in_the_macs_band(kind, name):
    shape = parameterisation(kind, name)
    space = shape.space
    options = RandomOptions(floor=FLOOR, tolerance=TOLERANCE, search_depth=bool(space.droppable_blocks))
    searcher = make_searcher("random", space, macs_target=TARGET, seed=0, budget=8, concurrency=8,
                             options=options.__dict__, parameterisation=shape)
    policies = [searcher.ask().policy for _ in range(6)]
    assert len({p.key() for p in policies}) == 6
    for policy in policies:
        assert_valid(space, policy)
        assert TARGET - TOLERANCE <= space.macs_ratio(policy) <= TARGET
    if kind == "stages":  # one keep ratio per stage parameter gives every group of it its channels
        for policy in policies:
            assert_one_ratio_per_parameter(space, shape.assignment, space.channels(policy))
    if kind == "affine" and space.droppable_blocks:
        assert any(p.dropped_blocks for p in policies)
    again = pickle.loads(pickle.dumps(searcher))  # Ray pickles the searcher it saves for resume
    state = searcher.state_dict()
    again.load_state_dict(state)
    assert again.ask().policy == searcher.ask().policy
    if kind != "groups":  # a state drawn in one parameterisation does not continue in another
        plain = make_searcher("random", space, macs_target=TARGET, seed=0, budget=8, concurrency=8,
                              options=options.__dict__)
        with pytest.raises(UserError, match=f"drawn in the {kind} parameterisation"):
            plain.load_state_dict(state)


def assert_one_ratio_per_parameter(space, assignment, channels) -> None:
    """Some ratio r per parameter snaps to each of its groups' kept channels: n = ceil(r C) lies in
    ((n - 1) / C, n / C] for every group (random snaps each group to whole channels)."""
    bounds: dict[str, list[float]] = {}
    for group, kept in channels.items():
        g = space.group(group)
        low = 0.0 if kept == g.min_channels else (kept - 1) / g.channels
        entry = bounds.setdefault(assignment[group], [0.0, 1.0])
        entry[0], entry[1] = max(entry[0], low), min(entry[1], kept / g.channels)
    assert all(low < high + 1e-12 for low, high in bounds.values()), bounds


@pytest.mark.parametrize("name", ["resnet20", "small_cnn"])
def test_affine_at_alpha_one_kappa_zero_is_the_global_heuristic(name):
    model, space = model_and_space(name)
    shape = parameterisation("affine", name)
    heuristics = heuristic_policies(model, space, None, macs_target=TARGET, criterion="l1", floor=FLOOR)
    assert shape.to_policy(shape.start()) == heuristics["global"]
    moved = {**shape.start(), f"kappa.{space.groups[0].name}": 1.0}  # a shift moves that group's channels up
    assert shape.to_policy(moved).keep_ratios[space.groups[0].name] >= heuristics["global"].keep_ratios[
        space.groups[0].name]
    assert shape.to_policy(moved) != heuristics["global"]


@pytest.mark.parametrize("kind", PARAMETERISATIONS)
def test_heuristics_become_optuna_points_where_the_parameterisation_expresses_them(kind):
    model, space = model_and_space("resnet20")
    shape = parameterisation(kind, "resnet20")
    heuristics = heuristic_policies(model, space, None, macs_target=TARGET, criterion="l1", floor=FLOOR)
    points = optuna_points(heuristics, space, search_depth=True, parameterisation=shape)
    left_out = inexpressible_heuristics(heuristics, shape)
    assert len(points) == len(heuristics) - len(left_out)
    expected_left_out = {"groups": set(), "stages": {"global"}, "affine": {"uniform", "global-lamp"}}[kind]
    assert expected_left_out <= set(left_out)
    assert "uniform" not in left_out or kind == "affine"
    for point in points:  # each point gives back one heuristic's policy exactly
        drops = [k for k in point if k.startswith("drop.")]
        assert len(drops) == len(space.droppable_blocks) and not any(point[k] for k in drops)
        policy = shape.to_policy({k: v for k, v in point.items() if not k.startswith("drop.")})
        assert any(space.channels(policy) == space.channels(h) for h in heuristics.values())


def test_parameterisations_pickle_and_keep_their_mapping():
    for kind in PARAMETERISATIONS:
        shape = parameterisation(kind, "resnet20")
        again = pickle.loads(pickle.dumps(shape))
        point = sample_point(shape, np.random.default_rng(1))
        assert again.to_policy(point) == shape.to_policy(point)


def test_the_config_refuses_a_parameterisation_where_the_method_samples_no_space():
    assert config_from_dict({"method": "random", "space": {"parameterisation": "affine"}},
                            names=False).space.parameterisation == "affine"
    for method in ("global", "uniform", "arpruning", "dcm"):
        with pytest.raises(UserError, match="space.parameterisation' is stages, but method"):
            config_from_dict({"method": method, "space": {"parameterisation": "stages"}}, names=False)
    with pytest.raises(UserError, match="parameterisation"):
        config_from_dict({"space": {"parameterisation": "layers"}}, names=False)
    _, space = model_and_space("small_cnn")
    with pytest.raises(UserError, match="takes no stages parameterisation"):
        make_searcher("uniform", space, macs_target=TARGET, seed=0, budget=1, concurrency=1,
                      parameterisation=make_parameterisation("stages", space, floor=FLOOR))


def readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(re.escape(TABLE_START) + r"\n(.*?)\n" + re.escape(TABLE_END), text, re.S)
    assert found, f"README lacks the dimensions table between {TABLE_START} and {TABLE_END}"
    return found.group(1)


@pytest.mark.slow
def test_readme_states_the_dimensions_of_every_shipped_model():
    """README's table is what the code computes (python -m prunetune.methods.parameterisation README.md)."""
    from prunetune.methods.parameterisation import shipped_spaces

    spaces = shipped_spaces()
    assert [s.model_name for s in spaces] == model_names()
    assert readme_table() == dimension_table(spaces)


@pytest.mark.slow
def test_an_optuna_search_in_the_stages_parameterisation(tmp_path, base_model_cache, tracking_store):
    """A real 2-trial search: the uniform heuristic is its first trial (expressed as equal stage
    ratios), the global ones are said not to be evaluated, and every policy shares a ratio per third."""
    result = run_cli(["run", *QUICK, "--method", "optuna", "--set", "space.parameterisation=stages",
                      "--trials", "2", "--concurrency", "2", "--name", "stages",
                      "--storage", str(tracking_store(tmp_path / "runs"))], cache=base_model_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optuna enqueues only the heuristics the stages parameterisation expresses; global" in (
        result.stderr + result.stdout)
    records = [r for r in read_jsonl(tmp_path / "runs" / "stages" / "trials.jsonl") if r.get("status") == "finished"]
    assert len(records) == 2
    _, space = model_and_space("small_cnn")
    assignment = stage_assignment(space)
    for record in records:
        ratios = record["policy"]["keep_ratios"]
        for param in set(assignment.values()):
            assert len({round(ratios[g], 9) for g, p in assignment.items() if p == param}) == 1
    uniform = [r for r in records if len(set(r["policy"]["keep_ratios"].values())) == 1]
    assert uniform, "the uniform heuristic was not evaluated"
