"""Depth as part of the space: stages and blocks, dropping identity and projection blocks, exact MACs
with dropped blocks (space estimate, MacsTerm's gates, the pruned model's measured count), policies
that leave out the groups of dropped blocks, and a random search over depth end to end."""

import json
import random

import pytest
import torch

from prunetune.methods.macs_term import MacsTerm
from prunetune.pruning.dependency import build_space
from prunetune.pruning.errors import UserError
from prunetune.pruning.measure import count_macs
from prunetune.pruning.models import create_model
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace, policy_from_channels
from prunetune.pruning.surgery import load_pruned, prune, save_pruned

SIDES = {"resnet20": 16, "resnet56": 16, "mobilenetv2": 16, "resnet18": 32}


def make_space(name, side=None):
    side = side or SIDES.get(name, 16)
    torch.manual_seed(0)
    model = create_model(name, 10, 3).eval()
    return model, build_space(model, name, (3, side, side))


def random_policy(space, rng, drop=0.4):
    dropped = tuple(b for b in space.droppable_blocks if rng.random() < drop)
    policy = Policy({g.name: rng.uniform(0.1, 1.0) for g in space.groups}, dropped, space.space_id)
    return space.canonical(policy)


def test_resnet20_lists_its_stages_and_blocks_in_order():
    _, space = make_space("resnet20")
    assert [(s.name, s.blocks) for s in space.stages] == [
        (f"layer{i}", (f"layer{i}.0", f"layer{i}.1", f"layer{i}.2")) for i in (1, 2, 3)]
    assert [b.shortcut for b in space.blocks] == ["identity"] * 3 + ["projection", "identity", "identity"] * 2
    assert space.droppable_blocks == tuple(b.name for b in space.blocks)
    assert space.block("layer2.0").groups == ("layer2.0.conv1",)  # the stream group stays with the shortcut
    stream = next(g for g in space.groups if "layer2.0.shortcut.0" in g.members)
    assert stream.name not in space.omittable_groups(["layer2.0", "layer2.1", "layer2.2"])


def test_a_block_without_shortcut_says_why_it_cannot_be_dropped():
    _, space = make_space("mobilenetv2")
    fixed = [b for b in space.blocks if not b.droppable]
    assert len(fixed) == 7 and all("no shortcut" in b.why_not for b in fixed)
    assert [s.blocks[0] for s in space.stages] == [b.name for b in fixed]  # each stage starts with one
    assert all(b.why_not == "" for b in space.blocks if b.droppable)
    with pytest.raises(UserError, match="no shortcut"):
        Policy.uniform(space, 0.5, (fixed[1].name,)).validate(space)


@pytest.mark.parametrize("name", list(SIDES))
def test_macs_estimate_equals_the_measured_pruned_model_with_dropped_blocks(name):
    model, space = make_space(name)
    rng = random.Random(11)
    term = MacsTerm(space)
    for _ in range(2):
        policy = random_policy(space, rng)
        pruned = prune(model, space, policy, "l1")
        measured = count_macs(pruned, space.input_shape)
        assert space.estimate_macs(policy) == measured
        snapped = policy_from_channels(space, space.channels(policy), policy.dropped_blocks)
        assert round(term.of(snapped.keep_ratios, snapped.dropped_blocks)) == measured
    every = Policy.uniform(space, 1.0, space.droppable_blocks)
    assert space.estimate_macs(every) == count_macs(prune(model, space, every), space.input_shape)
    assert space.min_macs_ratio(drop_blocks=True) < space.min_macs_ratio()


def test_macs_term_prices_depth_through_block_gates():
    _, space = make_space("resnet20")
    term = MacsTerm(space)
    ratios = torch.full((len(space.groups),), 0.5, dtype=torch.float64, requires_grad=True)
    gates = torch.full((len(space.droppable_blocks),), 0.5, dtype=torch.float64, requires_grad=True)
    term(ratios, gates).backward()
    assert (gates.grad > 0).all() and (ratios.grad > 0).all()
    ones = torch.ones(len(space.droppable_blocks), dtype=torch.float64)
    assert term(ratios.detach(), ones) == term(ratios.detach())
    projection = space.droppable_blocks.index("layer2.0")
    closed = ones.clone()
    closed[projection] = 0.0
    policy = Policy.uniform(space, 0.5, ("layer2.0",))
    assert round(float(term(ratios.detach(), closed))) == space.estimate_macs(policy)
    with pytest.raises(ValueError, match="one gate per droppable block"):
        term(ratios.detach(), ones[:3])


def test_surgery_prunes_a_policy_that_leaves_out_dropped_groups_and_reloads(tmp_path):
    model, space = make_space("resnet20", 8)
    policy = space.canonical(Policy.uniform(space, 0.5, ("layer2.0", "layer3.2")))
    assert len(policy.keep_ratios) == len(space.groups) - 2
    pruned = prune(model, space, policy, "l2").eval()
    path = tmp_path / "pruned.pt"
    save_pruned(path, pruned, arch={"name": "resnet20", "num_classes": 10, "in_channels": 3},
                space=space, policy=policy)
    loaded, meta = load_pruned(path)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), pruned(x)) and loaded(x).shape == (3, 10)
    assert meta["policy"] == policy and meta["space"] == space
    assert count_macs(loaded, (3, 8, 8)) == space.estimate_macs(policy)


def test_format_1_space_files_are_still_read():
    _, space = make_space("tiny_resnet", 8)
    old = space.to_json()
    old.update(format=1, droppable_blocks=["layer1.0", "layer1.1"])
    del old["blocks"]
    read = SearchSpace.from_json(json.loads(json.dumps(old)))
    assert read.space_id == space.space_id and read.droppable_blocks == ("layer1.0", "layer1.1")
    assert read.block("layer1.1").groups == space.block("layer1.1").groups
    policy = Policy.uniform(read, 0.5, ("layer1.1",))
    assert read.estimate_macs(policy) == space.estimate_macs(policy)


def test_optuna_samples_a_drop_flag_per_droppable_block_and_prices_it():
    import optuna

    from prunetune.search.optuna_space import define_policy_space

    _, space = make_space("tiny_resnet", 8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    dropped = set()
    for _ in range(6):
        trial = study.ask()
        config = define_policy_space(trial, space=space, macs_target=0.5, min_keep_ratio=0.1, search_depth=True)
        policy = Policy.from_json(config["policy"])
        policy.validate(space)
        assert set(trial.params) == {f"keep.{g}" for g in space.group_names()} | {
            f"drop.{b}" for b in space.droppable_blocks}
        assert policy.dropped_blocks == tuple(b for b in space.droppable_blocks if trial.params[f"drop.{b}"])
        assert policy == space.canonical(policy)
        assert config["estimated_macs_ratio"] == space.macs_ratio(policy)
        dropped |= set(policy.dropped_blocks)
        study.tell(trial, 0.5)
    assert dropped  # six draws of three fair coins
    trial = study.ask()
    config = define_policy_space(trial, space=space, macs_target=0.5, min_keep_ratio=0.1)
    assert not any(name.startswith("drop.") for name in trial.params) and not config["policy"]["dropped_blocks"]


@pytest.mark.parametrize("method", ["random", "optuna"])
def test_space_search_depth_reaches_the_searchers_options(method):
    from prunetune.search.config import config_from_dict

    assert config_from_dict({"method": method}, names=False).method_options.search_depth is False
    cfg = config_from_dict({"method": method, "space": {"search_depth": True}}, names=False)
    assert cfg.method_options.search_depth is True
    with pytest.raises(UserError, match="set space.search_depth instead"):
        config_from_dict({"method": method, method: {"search_depth": True}}, names=False)


@pytest.mark.slow
def test_a_random_search_over_depth_drops_blocks_and_exports_them(tmp_path, base_model_cache, tracking_store):
    from tests.search_helpers import read_jsonl, run_cli

    quick = ["--model", "resnet20", "--dataset", "digits", "--image-size", "8", "--pretrain-epochs", "1",
             "--finetune-epochs", "1", "--set", "finetune.bn_recalibration_batches=2",
             "--set", "final.epochs=0"]  # no final fine-tune (the embedded default's 10 epochs of resnet20)
    tracking_store(tmp_path / "runs")
    result = run_cli(["run", *quick, "--method", "random", "--set", "space.search_depth=true", "--trials", "4",
                      "--concurrency", "2", "--name", "depth", "--storage", str(tmp_path / "runs")],
                     cache=base_model_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "depth"
    records = [r for r in read_jsonl(run_dir / "trials.jsonl") if r["status"] == "finished"]
    space = SearchSpace.from_json(json.loads((run_dir / "space.json").read_text()))
    dropping = [r for r in records if r["policy"]["dropped_blocks"]]
    assert len(records) == 4 and dropping, [r["policy"]["dropped_blocks"] for r in records]
    record = dropping[0]
    policy = Policy.from_json(record["policy"])
    assert space.estimate_macs(policy) == record["metrics"]["macs"]
    out = tmp_path / "dropped.pt"
    exported = run_cli(["export", str(run_dir), "--trial", record["trial_id"], "--out", str(out)],
                       cache=tmp_path / "cache", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    model, meta = load_pruned(out)
    assert meta["policy"] == policy
    assert model.eval()(torch.zeros(2, *space.input_shape)).shape == (2, 10)
    assert count_macs(model, space.input_shape) == record["metrics"]["macs"]
