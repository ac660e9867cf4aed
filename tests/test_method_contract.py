"""The method contract: one suite over every registered method, whatever its kind (after Optuna's
sampler tests). Searchers have their own, older suite of proposal rules (test_searcher_contract.py);
this one checks what every kind promises:

- a seed makes a run deterministic;
- a saved and restored state gives the same next proposals (searchers and optuna), and resuming
  a learner from a state it reported gives the same learned policy;
- the result meets the MACs target (learners that promise it);
- states load with ``torch.load(weights_only=True)``;
- the Ray Tune adapter survives pickling, and a restored one makes the same next suggestion.

A new method joins by registration. A learner may add cheap options below so that it learns in
seconds on tiny_resnet at digits' 8x8.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from functools import cache

import pytest
import torch

from prunetune.methods.learner import LearnData
from prunetune.methods.registry import METHODS, make_learner, make_searcher, method_names, start_policy_for
from prunetune.pruning.data import load_dataset
from prunetune.pruning.dependency import build_space
from prunetune.pruning.models import create_model
from prunetune.pruning.train import TrainRecipe

TARGET = 0.5
TOLERANCE = 0.02
MODEL = "tiny_resnet"
# Options that make a learner learn in seconds here (keys of its options class).
FAST_LEARNER_OPTIONS = {
    "dcm": {"epochs": 1, "checkpoint_every": 4, "rank_every": 3},
    "dcpa": {"checkpoint_every": 4},
    "cdp-dtc": {"steps": 20, "checkpoint_every": 4},
}
KINDS = {name: METHODS[name].kind for name in method_names()}
SEARCHERS = [name for name, kind in KINDS.items() if kind == "searcher"]
LEARNERS = [name for name, kind in KINDS.items() if kind == "learner"]


def test_every_method_is_covered_by_a_kind_below():
    assert set(KINDS.values()) <= {"searcher", "optuna", "learner"} and "optuna" in KINDS


@cache
def digits():
    return load_dataset("digits", image_size=8, seed=0)


@cache
def model_and_space():
    info = digits().info
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=info.num_classes, in_channels=info.in_channels)
    return model, build_space(model, MODEL, (info.in_channels, info.image_size, info.image_size))


def weights_only_copy(state) -> object:
    """``state`` saved and loaded back the way a trial's checkpoint is: ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def synthetic_result(config: dict, space) -> dict:
    """A deterministic result for a trial config: accuracy rises with the mean keep ratio."""
    from prunetune.pruning.policy import Policy

    if "policy" not in config:  # a learner's hyperparameters
        return {"val_accuracy": 0.5 + 0.01 * len(json.dumps(config, sort_keys=True)) % 0.4, "macs_ratio": 0.5}
    policy = space.canonical(Policy.from_json(config["policy"]))
    ratios = list(policy.keep_ratios.values())
    return {"val_accuracy": 0.5 + 0.4 * sum(ratios) / len(ratios), "macs_ratio": space.macs_ratio(policy)}


# --- the Ray Tune side of every method ---------------------------------------------------------------


def ray_search(name: str, seed: int = 0):
    """The Ray Tune search algorithm ``prunetune run`` builds for method ``name`` on the tiny space."""
    from prunetune.search.adapter import PolicySearcherAdapter
    from prunetune.search.optuna_space import make_learner_search, make_optuna_search

    model, space = model_and_space()
    spec = METHODS[name]
    if spec.kind == "optuna":
        return make_optuna_search(space, macs_target=TARGET, objective="constrained", sampler="tpe", seed=seed,
                                  n_startup_trials=2, min_keep_ratio=0.1, tolerance=TOLERANCE)
    if spec.kind == "learner":
        learner = make_learner(name, FAST_LEARNER_OPTIONS.get(name, {}))
        return make_learner_search(learner.hparam_ranges(), learner=name, objective="constrained", sampler="tpe",
                                   seed=seed, n_startup_trials=2)
    generator = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, *space.input_shape, generator=generator), torch.zeros(4, dtype=torch.long))]
    start = start_policy_for(name, model, space, macs_target=TARGET, calib=calib)
    searcher = make_searcher(name, space, macs_target=TARGET, seed=seed, budget=8, concurrency=2,
                             start_policy=start)
    return PolicySearcherAdapter(searcher, seed=seed)


def suggest_and_complete(search, count: int, start: int = 0) -> list:
    """``count`` suggestions, each completed at once with its synthetic result."""
    _, space = model_and_space()
    configs = []
    for index in range(start, start + count):
        config = search.suggest(f"t{index}")
        if not isinstance(config, dict):
            break
        configs.append(config)
        search.on_trial_complete(f"t{index}", result=synthetic_result(config, space))
    return configs


def comparable(configs: list) -> str:
    return json.dumps(configs, sort_keys=True, default=str)


@pytest.mark.parametrize("name", method_names())
def test_the_same_seed_gives_the_same_suggestions(name):
    assert comparable(suggest_and_complete(ray_search(name), 3)) == comparable(suggest_and_complete(ray_search(name), 3))


@pytest.mark.parametrize("name", method_names())
def test_the_ray_adapter_survives_pickling_and_a_restore_continues_alike(name, tmp_path):
    search = ray_search(name)
    suggest_and_complete(search, 2)
    clone = pickle.loads(pickle.dumps(search))
    search.save(str(tmp_path / "searcher.pkl"))
    restored = ray_search(name)
    restored.restore(str(tmp_path / "searcher.pkl"))
    following = comparable(suggest_and_complete(search, 2, start=2))
    assert comparable(suggest_and_complete(restored, 2, start=2)) == following
    assert comparable(suggest_and_complete(clone, 2, start=2)) == following


@pytest.mark.parametrize("name", SEARCHERS)
def test_a_searchers_state_loads_with_weights_only(name):
    search = ray_search(name)
    suggest_and_complete(search, 2)
    state = search.policy_searcher.state_dict()
    assert weights_only_copy(state) == json.loads(json.dumps(state))


def test_optuna_keeps_its_rejected_count_across_a_restore(tmp_path):
    search = ray_search("optuna")
    search.rejected = 7
    search.save(str(tmp_path / "searcher.pkl"))
    restored = ray_search("optuna")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.rejected == 7


# --- learners ------------------------------------------------------------------------------------------


def learn_data() -> LearnData:
    splits = digits()
    _, space = model_and_space()
    return LearnData(space, splits.train, splits.val, splits.info.augment,
                     TrainRecipe(epochs=1, lr=0.01, batch_size=64), seed=0)


def hparams_of(learner) -> dict:
    """The middle of every declared range (ints rounded): a valid point the search could propose."""
    return {r.name: (round((r.low + r.high) / 2) if r.integer else (r.low + r.high) / 2)
            for r in learner.hparam_ranges()}


def learn(name: str, *, state=None, states: list | None = None):
    learner = make_learner(name, FAST_LEARNER_OPTIONS.get(name, {}))
    model, _ = model_and_space()
    sink = states if states is not None else []

    def report(progress, reported):
        if reported is not None:
            sink.append(copy.deepcopy(reported))

    learned = learner.learn(copy.deepcopy(model), learn_data(), TARGET, hparams_of(learner), report, state=state)
    return learner, learned


def untimed(trajectory) -> list:
    return [{k: v for k, v in row.items() if "second" not in k} for row in trajectory]


@cache
def learned_once(name: str):
    states: list = []
    learner, learned = learn(name, states=states)
    return learner, learned, states


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_a_learner_is_deterministic_given_its_seed(name):
    _, first, _ = learned_once(name)
    _, again = learn(name)
    assert again.policy == first.policy and untimed(again.trajectory) == untimed(first.trajectory)


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_a_learner_resumed_from_a_reported_state_learns_the_same_policy(name):
    learner, whole, states = learned_once(name)
    assert states, f"{name} reported no state to resume from"
    header = {"method": learner.name, "space_id": model_and_space()[1].space_id, "format": learner.state_format}
    middle = weights_only_copy(states[len(states) // 2])  # what a trial's checkpoint holds
    assert {key: middle[key] for key in header} == header and middle["hparams"] == hparams_of(learner)
    _, resumed = learn(name, state=middle)
    assert resumed.policy == whole.policy


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_a_learned_policy_is_valid_and_meets_the_target_where_promised(name):
    learner, learned, _ = learned_once(name)
    _, space = model_and_space()
    policy = space.canonical(learned.policy)
    space.channels(policy)  # valid for the space (raises otherwise)
    if learner.meets_target:
        assert space.macs_ratio(policy) <= TARGET + 1e-9


@pytest.mark.parametrize("name", LEARNERS)
def test_a_learner_refuses_another_learners_state(name):
    from prunetune.pruning.errors import UserError

    learner = make_learner(name, FAST_LEARNER_OPTIONS.get(name, {}))
    model, space = model_and_space()
    foreign = {"format": learner.state_format, "method": "someone-else", "space_id": space.space_id,
               "hparams": hparams_of(learner)}
    with pytest.raises(UserError, match="not"):
        learner.learn(copy.deepcopy(model), learn_data(), TARGET, hparams_of(learner), lambda *_: None,
                      state=foreign)
