"""ARPruning (methods/arpruning.py): the attention criterion on constructed activations, the
neighbourhood, the search on a synthetic objective with a known best policy, resume mid-round, the
config and the Ray-side pieces (adapter, ASHA), and `prunetune run --method arpruning` end to end.

The searcher contract (valid, seeded, failure-tolerant, state round trips) is in
test_searcher_contract.py, which picks arpruning up from the registry.
"""

from __future__ import annotations

import json

import pytest
import torch

from prunetune.methods.arpruning import ArpruningOptions, ArpruningSearcher
from prunetune.methods.neighbourhood import is_finest_step, macs_ratio_of, move_channels, neighbour
from prunetune.methods.proxy import proxy_epochs
from prunetune.methods.registry import make_searcher, start_policy_for
from prunetune.pruning.errors import UserError
from prunetune.pruning.importance import attention_scores, get_criterion
from prunetune.pruning.space import Group, LayerCost, SearchSpace, policy_from_channels
from tests.search_helpers import QUICK, mlflow_runs, read_jsonl, run_cli

# -- a hand-built space: one linear layer per group, so MACs are a weighted count of channels ----


def linear_space(widths: dict[str, int], macs_per_channel: dict[str, int] | None = None,
                 round_to: int = 1) -> SearchSpace:
    """Groups whose layer costs ``macs_per_channel[g]`` MACs per kept channel (10 by default)."""
    cost = macs_per_channel or dict.fromkeys(widths, 10)
    total = sum(cost[g] * c for g, c in widths.items())
    groups = tuple(Group(g, c, 1, round_to, cost[g] * c / total, (g,)) for g, c in widths.items())
    layers = tuple(LayerCost(g, cost[g] * c, g, c, ((None, 1),), False, None) for g, c in widths.items())
    return SearchSpace("synthetic", (1, 8, 8), groups, layers, (), total, 0)


def drive_to_end(searcher, objective) -> list:
    """Run a searcher to its end, telling each round's proposals in reverse order of asking."""
    asked, pending = [], []
    while not searcher.finished:
        proposal = searcher.ask()
        if proposal is not None:
            asked.append(proposal)
            pending.append(proposal)
            continue
        assert pending, "ask returned None with nothing in flight"
        told = pending.pop()
        searcher.tell(told.proposal_id, objective(told))
    return asked


# -- the criterion ----------------------------------------------------------------------------


def test_attention_p1_matches_the_definition_with_absolute_values():
    torch.manual_seed(2)
    f = torch.randn(2, 6, 5, 5)
    j = 4

    def q(x):
        v = x.abs().mean(dim=1).flatten(1)
        return v / v.norm(dim=1, keepdim=True)

    expected = (q(f) - q(torch.cat([f[:, :j], f[:, j + 1:]], dim=1))).pow(2).mean()
    assert attention_scores(f, p=1)[j].item() == pytest.approx(expected.item(), rel=1e-5)
    assert get_criterion("attention_p1").p == 1


def test_attention_p_must_be_one_or_two():
    with pytest.raises(UserError, match="p=3"):
        get_criterion("attention", p=3)


def test_attention_criterion_ranks_the_channels_of_a_model_by_their_batchnorm_outputs():
    """In a conv-BN net, a channel whose BN output is zero scores 0; one that alone lights a spot ranks first."""
    from prunetune.pruning.dependency import tp_group, trace_graph, trace_groups
    from prunetune.pruning.models import classifier_layer

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    conv, bn = model[0], model[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[2, 0, 1, 1] = 1.0  # channel 2 copies the input: the one hot pixel
        bn.weight.fill_(1.0)
        bn.bias.fill_(0.5)  # a flat map everywhere...
        bn.weight[0], bn.bias[0] = 0.0, 0.0  # ...but channel 0, silenced
    model.eval()
    x = torch.zeros(2, 1, 6, 6)
    x[:, 0, 2, 3] = 8.0
    graph = trace_graph(model, (1, 6, 6))
    traced = trace_groups(model, graph, ignored=[classifier_layer(model)])
    groups = {g.name: tp_group(graph, g.root) for g in traced}
    scores = get_criterion("attention")(model, groups, [(x, torch.zeros(2, dtype=torch.long))])
    (only,) = scores.values()
    assert only.argmax().item() == 2
    assert only[0].item() == pytest.approx(0.0, abs=1e-12)


# -- the neighbourhood ------------------------------------------------------------------------


def test_a_move_shifts_keep_ratio_between_two_groups_at_constant_macs():
    space = linear_space({"a": 20, "b": 20, "c": 40})
    start = {"a": 10, "b": 10, "c": 20}
    moved = neighbour(space, start, "a", "c", 0.1, macs_target=0.5, tolerance=0.02, floor=0.1)
    assert moved == {"a": 8, "b": 10, "c": 22}  # 0.1 of a's 20 channels go; the freed MACs buy c two
    assert macs_ratio_of(space, moved) == pytest.approx(0.5)


def test_the_takers_gain_is_rescaled_to_the_macs_the_giver_freed():
    space = linear_space({"a": 20, "b": 20}, {"a": 10, "b": 40})  # a channel of b costs four of a
    start = {"a": 16, "b": 6}  # (160 + 240) / 1000 = 0.4
    cheap_to_dear = neighbour(space, start, "a", "b", 0.2, macs_target=0.4, tolerance=0.05, floor=0.1)
    assert cheap_to_dear == {"a": 12, "b": 7}  # 4 channels of a buy one of b: 0.4 exactly
    dear_to_cheap = neighbour(space, start, "b", "a", 0.05, macs_target=0.4, tolerance=0.05, floor=0.1)
    assert dear_to_cheap == {"a": 20, "b": 5}  # the 40 MACs one channel of b frees buy a four
    for moved in (cheap_to_dear, dear_to_cheap):
        assert 0.35 - 1e-9 <= macs_ratio_of(space, moved) <= 0.4 + 1e-9


@pytest.mark.parametrize(("channels", "giver", "taker", "why"), [
    ({"a": 2, "b": 10}, "a", "b", "the giver would fall below its floor"),
    ({"a": 10, "b": 20}, "a", "b", "the taker is full"),
])
def test_impossible_moves_have_no_neighbour(channels, giver, taker, why):
    space = linear_space({"a": 20, "b": 20})
    assert neighbour(space, channels, giver, taker, 0.1, macs_target=1.0, tolerance=0.5, floor=0.1) is None, why


def test_a_move_that_cannot_stay_in_the_macs_band_has_no_neighbour():
    space = linear_space({"a": 20, "b": 20}, {"a": 10, "b": 100})
    start = {"a": 10, "b": 10}  # (100 + 1000) / 2200 = 0.5
    # a frees 20 MACs but one channel of b costs 100: b cannot gain a channel without passing 0.5
    assert neighbour(space, start, "a", "b", 0.1, macs_target=0.5, tolerance=0.005, floor=0.1) is None


def test_steps_are_whole_rounding_units_and_the_finest_step_moves_one():
    space = linear_space({"a": 16, "b": 64}, round_to=4)
    assert [move_channels(space.group("b"), d) for d in (0.25, 0.05, 0.01)] == [16, 4, 4]
    assert not is_finest_step(space, 0.25) and is_finest_step(space, 0.05)


# -- the search -------------------------------------------------------------------------------


def synthetic_searcher(budget: int, *, seed: int = 0, concurrency: int = 3, step: float = 0.25):
    space = linear_space({"a": 20, "b": 20, "c": 20, "d": 20})
    start = policy_from_channels(space, {"a": 10, "b": 10, "c": 10, "d": 10})
    options = ArpruningOptions(step=step, criterion="l1")
    searcher = ArpruningSearcher(space, macs_target=0.5, seed=seed, options=options, start_policy=start,
                                 budget=budget, concurrency=concurrency)
    return space, searcher


BEST = {"a": 4, "b": 8, "c": 12, "d": 16}  # 40 of 80 channels: MACs ratio 0.5, inside the band


def known_best_objective(space):
    """A separable concave score with its unique maximum at BEST: pair moves can climb to it."""
    def objective(proposal):
        channels = space.channels(proposal.policy)
        return {"val_accuracy": 1.0 - sum((channels[g] - BEST[g]) ** 2 for g in BEST) / 1000}
    return objective


def test_the_search_reaches_the_known_best_policy_of_a_synthetic_objective():
    space, searcher = synthetic_searcher(budget=200)
    asked = drive_to_end(searcher, known_best_objective(space))
    final = asked[-1]
    assert final.info["role"] == "final" and "finetune_epochs" not in final.info
    assert space.channels(final.policy) == BEST
    assert final.info["proxy_score"] == pytest.approx(1.0)
    assert len(asked) < 200  # it stopped by itself: the finest neighbourhood of BEST holds nothing better
    path = searcher.search_path()
    scores = [row["incumbent_score"] for row in path]
    assert scores == sorted(scores) and scores[-1] == pytest.approx(1.0)  # the incumbent never gets worse
    steps = [row["step"] for row in path]
    assert steps[0] == 0.25 and steps == sorted(steps, reverse=True) and min(steps) < 0.25  # d halved
    for proposal in asked:
        assert 0.48 - 1e-9 <= space.macs_ratio(proposal.policy) <= 0.5 + 1e-9


def test_every_trial_counts_against_the_budget_and_the_last_one_is_the_full_fine_tune():
    space, searcher = synthetic_searcher(budget=7)
    asked = drive_to_end(searcher, known_best_objective(space))
    assert len(asked) == 7
    assert [p.info["role"] for p in asked[:3]] == ["start", "neighbour", "neighbour"]
    assert all(p.info["finetune_epochs"] == 0 for p in asked[:-1])  # proxy bn: 0 epochs
    assert all(p.info["evaluate_test"] is False for p in asked[:-1])  # scored on validation only
    assert asked[-1].info["role"] == "final"
    assert [row["round"] for row in searcher.search_path()] == [0, 1]  # 3 + 3 proxies, then the final


def test_the_proxy_sets_the_fine_tune_length_of_neighbours():
    assert (proxy_epochs("bn"), proxy_epochs("epochs:3")) == (0, 3)
    for bad in ("epochs:0", "ep:2", "bn2"):
        with pytest.raises(UserError, match="epochs:N"):
            proxy_epochs(bad)
    space = linear_space({"a": 20, "b": 20})
    start = policy_from_channels(space, {"a": 10, "b": 10})
    searcher = ArpruningSearcher(space, macs_target=0.5, seed=0, start_policy=start, budget=4, concurrency=2,
                                 options=ArpruningOptions(proxy="epochs:2", criterion="l1"))
    assert searcher.ask().info["finetune_epochs"] == 2


def test_a_failed_start_is_beaten_by_any_scored_neighbour():
    space, searcher = synthetic_searcher(budget=5, concurrency=2)
    start, first = searcher.ask(), searcher.ask()
    searcher.tell(start.proposal_id, None)
    searcher.tell(first.proposal_id, {"val_accuracy": 0.1})
    assert searcher.search_path()[0]["moved"] == 1
    assert searcher.search_path()[0]["incumbent_score"] == pytest.approx(0.1)


@pytest.mark.parametrize("cut", [1, 4, 5, 9, 16])
def test_a_search_killed_mid_round_and_resumed_makes_the_same_moves(cut):
    """Save the state after ``cut`` events (asks and tells, in flight mid-round), load it into a
    searcher built with another seed, and drive both on: the same proposals, the same path."""
    space, original = synthetic_searcher(budget=24, seed=7)
    objective = known_best_objective(space)
    pending, events = [], 0
    while events < cut:
        proposal = original.ask()
        if proposal is not None:
            pending.append(proposal)
        else:
            told = pending.pop(0)
            original.tell(told.proposal_id, objective(told))
        events += 1
    state = json.loads(json.dumps(original.state_dict()))
    _, resumed = synthetic_searcher(budget=24, seed=99)
    resumed.load_state_dict(state)
    for proposal in pending:  # the trials in flight at the kill end after the resume, on both
        for searcher in (original, resumed):
            searcher.tell(proposal.proposal_id, objective(proposal))

    def rest(searcher):
        return [(p.proposal_id, p.policy.key(), dict(p.info)) for p in drive_to_end(searcher, objective)]

    assert rest(resumed) == rest(original)
    assert resumed.search_path() == original.search_path()


def test_start_policies_global_with_attention_and_uniform():
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.models import create_model

    model = create_model("tiny_resnet")
    space = build_space(model, "tiny_resnet", (3, 16, 16))
    calib = [(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
              torch.zeros(4, dtype=torch.long))]
    start = start_policy_for("arpruning", model, space, macs_target=0.5, calib=calib)
    assert space.macs_ratio(start) <= 0.5
    with pytest.raises(UserError, match="calibration"):  # attention is the default: it needs batches
        start_policy_for("arpruning", model, space, macs_target=0.5)
    uniform = start_policy_for("arpruning", model, space, macs_target=0.5, options={"start": "uniform"})
    assert len(set(uniform.keep_ratios.values())) == 1
    searcher = make_searcher("arpruning", space, macs_target=0.5, seed=0, budget=6, concurrency=3,
                             start_policy=start)
    assert [searcher.ask() is not None for _ in range(4)] == [True, True, True, False]  # K = concurrency


# -- config -----------------------------------------------------------------------------------


def test_config_section_importance_default_and_bad_values():
    from prunetune.search.config import load_config, resolved_importance

    cfg = load_config(sets=["method=arpruning", "arpruning.proxy=epochs:2", "arpruning.neighbours=4"])
    assert resolved_importance(cfg) == "attention"
    assert (cfg.method_options.proxy, cfg.method_options.neighbours) == ("epochs:2", 4)
    assert resolved_importance(load_config()) == "l1"  # the other methods keep l1
    assert resolved_importance(load_config(sets=["method=arpruning", "importance=taylor"])) == "taylor"
    with pytest.raises(UserError, match="arpruning.proxy"):
        load_config(sets=["arpruning.proxy=epochs:0"])
    with pytest.raises(UserError, match="bn_recalibration_batches"):
        load_config(sets=["method=arpruning", "finetune.bn_recalibration_batches=0"])
    with pytest.raises(UserError, match="arpruning.start"):
        load_config(sets=["arpruning.start=random"])


# -- the Ray side: adapter and scheduler ------------------------------------------------------


def test_adapter_passes_the_proxy_length_and_hands_each_path_row_on_once(tmp_path):
    from prunetune.search.adapter import PolicySearcherAdapter
    from prunetune.search.search_path import path_metrics

    space, searcher = synthetic_searcher(budget=8, concurrency=2)
    rows = []
    adapter = PolicySearcherAdapter(searcher, path_sink=rows.append)
    configs = {trial: adapter.suggest(trial) for trial in ("t0", "t1")}
    assert configs["t0"]["finetune_epochs"] == 0 and configs["t0"]["role"] == "start"
    assert configs["t0"]["evaluate_test"] is False
    adapter.on_trial_complete("t0", {"val_accuracy": 0.5})
    assert rows == []  # the round is not complete yet
    adapter.on_trial_complete("t1", {"val_accuracy": 0.6})
    assert [row["round"] for row in rows] == [0]
    assert path_metrics(rows[0])["search.incumbent_score"] == pytest.approx(0.6)
    adapter.save(str(tmp_path / "state.json"))

    _, fresh = synthetic_searcher(budget=8, concurrency=2)
    restored_rows = []
    restored = PolicySearcherAdapter(fresh, path_sink=restored_rows.append)
    restored.restore(str(tmp_path / "state.json"))
    suggested = []
    for adapted, sink in ((adapter, rows), (restored, restored_rows)):
        suggested.append([adapted.suggest(trial) for trial in ("t2", "t3")])
        for trial in ("t2", "t3"):
            adapted.on_trial_complete(trial, {"val_accuracy": 0.4})
        assert [row["round"] for row in sink][-1] == 1
    assert suggested[0] == suggested[1]  # the restored searcher proposes the same round
    assert restored_rows == rows[1:]  # row 0 was handed on before the save, and not again
    for index in range(8):  # the rest of the budget: one proxy trial (7 in all), then the final
        config = adapter.suggest(f"x{index}")
        if config["role"] == "final":
            break
        adapter.on_trial_complete(f"x{index}", {"val_accuracy": 0.3})
    assert index == 3 and config["role"] == "final"
    assert "finetune_epochs" not in config and "evaluate_test" not in config  # the full trial


def test_asha_leaves_proxy_trials_alone():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from prunetune.search.schedulers import FullLengthASHA

    scheduler = FullLengthASHA(time_attr="training_iteration", metric="val_accuracy", mode="max", max_t=4,
                               grace_period=1, reduction_factor=2)
    full = [SimpleNamespace(trial_id=f"f{i}", config={}) for i in range(4)]
    proxy = SimpleNamespace(trial_id="p", config={"finetune_epochs": 0})
    weak = SimpleNamespace(trial_id="w", config={})
    for trial in (*full, proxy, weak):
        scheduler.on_trial_add(None, trial)
    for trial in full:
        scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_accuracy": 0.9})
    result = {"training_iteration": 1, "val_accuracy": 0.1}
    assert scheduler.on_trial_result(None, proxy, result) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, result) == TrialScheduler.STOP  # ASHA itself still cuts
    scheduler.on_trial_complete(None, proxy, result)
    assert "p" not in scheduler._trial_info


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_prunetune_run_arpruning_on_digits(tmp_path, base_model_cache, tracking_store):
    """5 trials, 2 at a time, ASHA on: start + neighbours scored after BN recalibration, one full fine-tune."""
    storage = tracking_store(tmp_path / "runs")
    result = run_cli(["run", *QUICK, "--method", "arpruning", "--trials", "5", "--concurrency", "2",
                      "--finetune-epochs", "2", "--scheduler", "asha", "--name", "ar", "--storage", str(storage)],
                     cache=base_model_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = storage / "ar"
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 5 and all(r["status"] == "finished" for r in records)  # ASHA stopped none
    by_role = {}
    for r in records:
        by_role.setdefault(r["params"]["role"], []).append(r)
        assert r["params"]["importance"] == "attention"  # importance null: the method's own
        assert r["metrics"]["macs_ratio"] <= 0.5 + 1e-9
    assert len(by_role["start"]) == 1 and len(by_role["neighbour"]) == 3 and len(by_role["final"]) == 1
    for r in by_role["start"] + by_role["neighbour"]:
        assert r["params"]["finetune_epochs"] == 0 and [h["epoch"] for h in r["history"]] == [0]
        assert r["params"]["evaluate_test"] is False and r["test_accuracy"] is None
    final = by_role["final"][0]
    assert "finetune_epochs" not in final["params"] and [h["epoch"] for h in final["history"]] == [0, 1, 2]
    assert final["test_accuracy"] is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["trial_id"] == final["trial_id"]  # the only trial evaluated on the test split

    meta = json.loads((run_dir / "prunetune.json").read_text())
    parents, children = mlflow_runs(meta["tracking_uri"])
    assert len(parents) == 1 and len(children) == 5
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    history = client.get_metric_history(meta["parent_run_id"], "search.incumbent_score")
    assert [m.step for m in history] == [0, 1]  # round 0 (start + 1 neighbour), round 1 (2 neighbours)
    proxy_scores = [r["metrics"]["val_accuracy"] for r in by_role["start"] + by_role["neighbour"]]
    assert history[-1].value == pytest.approx(max(proxy_scores))  # the incumbent: the best scored so far
    assert client.get_metric_history(meta["parent_run_id"], "search.step")[0].value == pytest.approx(0.05)
