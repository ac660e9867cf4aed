"""The searcher contract: one suite run over every registered searcher (after Optuna's sampler tests).

Every method of kind "searcher" in ``methods.registry.METHODS`` is picked up on tiny_resnet;
``EXTRA_MODELS`` adds larger models for some. A searcher that needs a start policy gets one from
``start_policy_for`` on the same (untrained) model. A new searcher joins by registration, plus an
entry in ``SEED_INDEPENDENT`` if its proposals do not depend on the seed, or in ``ROUND_BASED`` if it
proposes in synchronous rounds (a freed slot is refilled once the round's results are all in).
"""

from __future__ import annotations

import itertools
import json
from functools import cache

import pytest

from prunetune.methods.registry import METHODS, get_method, make_searcher, method_names, start_policy_for
from prunetune.methods.searcher import DEFAULT_TOLERANCE, Proposal, Searcher
from prunetune.pruning.dependency import build_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.models import create_model

TARGET = 0.5
BUDGET = 6
EXTRA_MODELS = {"random": ("resnet20",)}
SEED_INDEPENDENT = {"uniform", "global"}  # one deterministic policy whatever the seed
ROUND_BASED = {"arpruning"}  # the next round waits for every result of the current one
MAX_STEPS = 200

SEARCHERS = [name for name in method_names() if METHODS[name].kind == "searcher"]
CASES = [(name, "tiny_resnet") for name in SEARCHERS] + [
    (name, model) for name, models in EXTRA_MODELS.items() for model in models]


@cache
def model_and_space(model_name: str):
    model = create_model(model_name)
    return model, build_space(model, model_name, (3, 32, 32))


@cache
def start_policy(name: str, model_name: str):
    """The start policy on the untrained model, with seeded calibration batches for activation criteria."""
    import torch

    model, space = model_and_space(model_name)
    generator = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, *space.input_shape, generator=generator), torch.zeros(4, dtype=torch.long))]
    return start_policy_for(name, model, space, macs_target=TARGET, calib=calib)


def build(name: str, model_name: str, *, seed: int = 0, budget: int = BUDGET, concurrency: int = 2) -> Searcher:
    _, space = model_and_space(model_name)
    return make_searcher(name, space, macs_target=TARGET, seed=seed, budget=budget, concurrency=concurrency,
                         start_policy=start_policy(name, model_name))


def synthetic_result(proposal: Proposal, space) -> dict[str, float] | None:
    """A deterministic result: accuracy rises with the mean keep ratio; every fifth trial fails."""
    if proposal.proposal_id.endswith(("-4", "-9")):
        return None
    ratios = list(proposal.policy.keep_ratios.values())
    return {"val_accuracy": 0.5 + 0.4 * sum(ratios) / len(ratios), "macs_ratio": space.macs_ratio(proposal.policy)}


def drive(searcher: Searcher, space, *, steps: int = MAX_STEPS) -> list[Proposal]:
    """Ask greedily; when ask returns None, tell the oldest proposal in flight. Stops when finished."""
    proposals, in_flight = [], []
    for _ in range(steps):
        if searcher.finished:
            break
        proposal = searcher.ask()
        if proposal is not None:
            proposals.append(proposal)
            in_flight.append(proposal)
            continue
        assert in_flight, "ask returned None with nothing in flight and the searcher not finished"
        told = in_flight.pop(0)
        searcher.tell(told.proposal_id, synthetic_result(told, space))
    return proposals


def signature(proposals: list[Proposal]) -> list[tuple]:
    return [(p.proposal_id, p.policy.key(), json.dumps(dict(p.info), sort_keys=True)) for p in proposals]


@pytest.fixture(params=CASES, ids=[f"{n}-{m}" for n, m in CASES])
def case(request):
    return request.param


def test_every_proposal_is_valid_and_within_the_target(case):
    name, model_name = case
    _, space = model_and_space(model_name)
    proposals = drive(build(name, model_name), space)
    assert proposals
    for proposal in proposals:
        proposal.policy.validate(space)
        assert space.macs_ratio(proposal.policy) <= TARGET + DEFAULT_TOLERANCE
        json.dumps(proposal.to_json())


def test_same_seed_gives_the_same_proposals(case):
    name, model_name = case
    _, space = model_and_space(model_name)
    assert signature(drive(build(name, model_name, seed=3), space)) == \
        signature(drive(build(name, model_name, seed=3), space))


def test_seed_changes_the_proposals_unless_seed_independent(case):
    name, model_name = case
    _, space = model_and_space(model_name)
    first = [p.policy.key() for p in drive(build(name, model_name, seed=0), space)]
    second = [p.policy.key() for p in drive(build(name, model_name, seed=1), space)]
    assert (first == second) == (name in SEED_INDEPENDENT)


def test_failed_trials_are_tolerated_and_the_search_finishes(case):
    name, model_name = case
    _, space = model_and_space(model_name)
    searcher = build(name, model_name, concurrency=1)
    for proposal in iter(searcher.ask, None):
        searcher.tell(proposal.proposal_id, None)
    assert searcher.finished


def test_finishes_within_the_budget_with_unique_ids(case):
    name, model_name = case
    _, space = model_and_space(model_name)
    searcher = build(name, model_name)
    proposals = drive(searcher, space)
    assert searcher.finished
    assert searcher.ask() is None
    assert 1 <= len(proposals) <= BUDGET
    ids = [p.proposal_id for p in proposals]
    assert len(set(ids)) == len(ids)
    if name == "random":
        assert len(proposals) == BUDGET


def test_not_finished_while_results_are_in_flight(case):
    name, model_name = case
    searcher = build(name, model_name, budget=1, concurrency=1)
    proposal = searcher.ask()
    assert proposal is not None and not searcher.finished
    searcher.tell(proposal.proposal_id, None)
    assert searcher.finished


def test_ask_waits_when_concurrency_proposals_are_in_flight(case):
    name, model_name = case
    searcher = build(name, model_name, budget=BUDGET, concurrency=2)
    in_flight = [p for p in (searcher.ask(), searcher.ask()) if p is not None]
    assert searcher.ask() is None
    assert len(in_flight) <= 2
    searcher.tell(in_flight[0].proposal_id, None)
    if len(in_flight) == 2 and name in ROUND_BASED:  # refilled once the round is complete
        assert searcher.ask() is None
        searcher.tell(in_flight[1].proposal_id, None)
        assert searcher.ask() is not None
    elif len(in_flight) == 2:  # a searcher that can fill the slots refills a freed one
        assert searcher.ask() is not None


def test_telling_an_unknown_proposal_is_an_error(case):
    name, model_name = case
    searcher = build(name, model_name)
    with pytest.raises(KeyError):
        searcher.tell("no-such-proposal", None)


@pytest.mark.parametrize("told", [0, 1, 3])
def test_state_dict_round_trips_through_json_mid_search(case, told):
    name, model_name = case
    _, space = model_and_space(model_name)
    original = build(name, model_name, seed=5, concurrency=3)
    asked = [p for p in itertools.islice(iter(original.ask, None), 3)]
    for proposal in asked[:told]:
        original.tell(proposal.proposal_id, synthetic_result(proposal, space))
    state = json.loads(json.dumps(original.state_dict()))
    restored = build(name, model_name, seed=99, concurrency=3)  # the state, not the seed, decides
    restored.load_state_dict(state)
    assert restored.finished == original.finished
    for proposal in asked[told:]:  # proposals in flight at the save can be told to either
        for searcher in (original, restored):
            searcher.tell(proposal.proposal_id, synthetic_result(proposal, space))
    assert signature(drive(restored, space)) == signature(drive(original, space))


def test_state_of_another_method_is_refused(case):
    name, model_name = case
    other = "random" if name != "random" else "uniform"
    state = build(other, "tiny_resnet").state_dict()
    with pytest.raises(UserError):
        build(name, model_name).load_state_dict(state)


# make_searcher and the registry


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="uniform"):
        get_method("bogus")


def test_unknown_option_lists_the_valid_ones():
    _, space = model_and_space("tiny_resnet")
    with pytest.raises(UserError, match="floor"):
        make_searcher("random", space, macs_target=TARGET, seed=0, budget=2, concurrency=1,
                      options={"flor": 0.2})


def test_optuna_is_registered_but_not_built_here():
    assert get_method("optuna").kind == "optuna" and get_method("optuna").factory is None
    _, space = model_and_space("tiny_resnet")
    with pytest.raises(UserError, match="not a searcher"):
        make_searcher("optuna", space, macs_target=TARGET, seed=0, budget=2, concurrency=1)


def test_global_needs_its_start_policy():
    _, space = model_and_space("tiny_resnet")
    with pytest.raises(UserError, match="start policy"):
        make_searcher("global", space, macs_target=TARGET, seed=0, budget=2, concurrency=1)


def test_start_policy_over_the_target_is_refused():
    _, space = model_and_space("tiny_resnet")
    full = space.uniform_policy(1.0)
    with pytest.raises(UserError, match="over the target"):
        make_searcher("global", space, macs_target=TARGET, seed=0, budget=2, concurrency=1, start_policy=full)


@pytest.mark.parametrize("bad", [{"budget": 0}, {"concurrency": 0}, {"macs_target": 1.5}, {"seed": -1}])
def test_bad_budget_concurrency_or_target_is_a_user_error(bad):
    _, space = model_and_space("tiny_resnet")
    arguments = {"macs_target": TARGET, "seed": 0, "budget": 2, "concurrency": 1, **bad}
    with pytest.raises(UserError):
        make_searcher("random", space, **arguments)
