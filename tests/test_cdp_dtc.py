"""CDP + DTC (methods/cdp_dtc.py): skeletons, the penalty, DTC's thresholds, folding, dead filters and
empty blocks, the ``texture`` criterion, resuming mid-learning, and learning end to end on digits."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prunetune.methods.cdp_dtc import (
    AdaptiveWeights,
    CdpDtcLearner,
    angular_similarity,
    apply_dtc,
    attach_skeletons,
    dtc_thresholds,
    fold_skeletons,
    group_term,
    learned_policy,
    remove_dead,
    survival,
    threshold_units,
)
from prunetune.methods.cdp_dtc_options import CdpDtcOptions
from prunetune.methods.learner import LearnData
from prunetune.pruning.data import load_dataset
from prunetune.pruning.errors import UserError
from prunetune.pruning.models import create_model
from prunetune.pruning.train import TrainRecipe, pretrain
from prunetune.search.prepare import model_space

WIDE = {f"{name}_{end}": value for name in ("similarity", "similarity_skeleton", "group", "frobenius", "adaptive")
        for end, value in (("min", 0.0), ("max", 10.0))}
OPTIONS = CdpDtcOptions(steps=60, checkpoint_every=7, delta_max=1.0, **WIDE)  # 3 passes of 20 batches of 64
HPARAMS = {"delta": 0.3, "similarity": 0.01, "similarity_skeleton": 0.01, "group": 0.05, "frobenius": 0.05,
           "adaptive": 0.2}


def tiny(name: str = "tiny_resnet"):
    info = load_dataset("digits", image_size=8).info
    torch.manual_seed(0)
    model = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels)
    return model, model_space(name, info)


def randomise_norms(model: nn.Module) -> None:
    """BatchNorm statistics and affine parameters away from their defaults (so a test can fail)."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def kill(layer, filters) -> None:
    """Zero filters' skeletons and, as DTC does for a dead filter, their BatchNorm."""
    with torch.no_grad():
        layer.skeleton[filters] = 0
        if layer.norm is not None:
            layer.norm.weight[filters] = 0
            layer.norm.bias[filters] = 0


# --- the skeleton, the penalty and DTC --------------------------------------------------------------


def test_every_group_conv_gets_a_skeleton_of_ones_and_its_following_batchnorm():
    model, space = tiny()
    layers = attach_skeletons(model, space)
    names = {layer.name for layer in layers}
    assert {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.shortcut.0"} <= names
    by_name = {layer.name: layer for layer in layers}
    assert by_name["layer1.0.conv1"].norm is model.layer1[0].bn1
    assert by_name["layer2.0.shortcut.0"].norm is model.layer2[0].shortcut[1]
    assert by_name["layer2.0.shortcut.0"].group == by_name["layer2.0.conv2"].group  # one residual sum
    skeleton = by_name["conv1"].skeleton
    assert skeleton.shape == (8, 3, 3) and torch.equal(skeleton, torch.ones_like(skeleton))
    with torch.no_grad():
        skeleton[0, 1, 1] = 0.5
    expected = by_name["conv1"].raw_weight.clone()
    expected[0, :, 1, 1] *= 0.5
    assert torch.equal(model.conv1.weight, expected)  # the conv computes with W * FS_n


def test_the_thresholds_follow_the_formula_on_a_constructed_skeleton():
    skeleton = torch.tensor([[[1.0, 0.5], [0.2, 0.3]],  # ||FS_0||_1 = 2.0
                             [[0.1, 0.1], [0.1, 0.7]],  # 1.0
                             [[0.0, 0.0], [0.0, 0.0]]])  # dead
    tau = dtc_thresholds(skeleton, 0.4)
    mean = (2.0 + 1.0 + 0.0) / 3
    assert tau[0].item() == pytest.approx(0.4 * mean / 2.0)
    assert tau[1].item() == pytest.approx(0.4 * mean / 1.0)
    assert math.isinf(tau[2].item())
    layer = SimpleNamespace(skeleton=skeleton)
    (unit,) = threshold_units([layer], "relative")  # the layer's mean entry, 3.0 / 12
    relative = dtc_thresholds(skeleton, 0.4, unit=unit)
    torch.testing.assert_close(relative[:2], tau[:2] * 0.25)
    (scaled,) = threshold_units([SimpleNamespace(skeleton=skeleton * 8)], "relative")
    torch.testing.assert_close(dtc_thresholds(skeleton * 8, 0.4, unit=scaled)[:2] / 8, relative[:2])  # scale-free
    other = SimpleNamespace(skeleton=torch.full((1, 2, 2), 2.0))  # 8.0 over 4 entries
    assert [float(u) for u in threshold_units([layer, other], "model")] == [11.0 / 16] * 2
    assert threshold_units([layer, other], "absolute") == [1.0, 1.0]


def test_entries_below_their_threshold_stay_zero_through_an_optimiser_step():
    model, space = tiny("small_cnn")
    layers = attach_skeletons(model, space)
    layer = layers[1]
    with torch.no_grad():
        layer.skeleton[0] = 0.01  # filter 0: every entry far below its threshold: dead
        layer.skeleton[1, 0, 0] = 0.05  # one small entry of a live filter
    skeletons = [s.skeleton for s in layers]
    ids = {id(s) for s in skeletons}
    weights = torch.optim.SGD([p for p in model.parameters() if id(p) not in ids], lr=0.1, momentum=0.9)
    optimizer = torch.optim.SGD(skeletons, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, *space.input_shape), torch.randint(0, 10, (8,))
    for step in range(3):  # momentum builds up over the steps: the zeroed entries must not move
        loss = nn.functional.cross_entropy(model(x), y) + sum(s.abs().sum() for s in skeletons)
        weights.zero_grad()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert layer.skeleton.grad[0].abs().sum() > 0 and layer.skeleton.grad[1, 0, 0] != 0
        apply_dtc(layers, 0.3, [weights, optimizer])
        weights.step()
        optimizer.step()
        assert torch.all(layer.skeleton[0] == 0) and layer.skeleton[1, 0, 0] == 0
        assert layer.norm.weight[0] == 0 and layer.norm.bias[0] == 0  # the dead filter's BatchNorm
        assert layer.skeleton[1].abs().sum() > 0 and layer.norm.weight[1] != 0  # live filters stay live


def test_the_adaptive_terms_weights_change_when_the_similarity_changes():
    adaptive = AdaptiveWeights(2, spread=0.5)
    group, l1 = adaptive.update(torch.tensor([3.0, 3.0]))
    assert group.tolist() == [1.0, 1.0] and l1.tolist() == [1.0, 1.0]  # no previous step yet
    group, l1 = adaptive.update(torch.tensor([3.5, 2.0]))  # layer 0 grew alike, layer 1 apart
    assert group.tolist() == [1.5, 0.5] and l1.tolist() == [0.5, 1.5]
    group, l1 = adaptive.update(torch.tensor([3.5, 2.0]))  # unchanged: the last assignment holds
    assert group.tolist() == [1.5, 0.5]
    group, l1 = adaptive.update(torch.tensor([3.0, 2.5]))  # both turned: the weights trade places
    assert group.tolist() == [0.5, 1.5] and l1.tolist() == [1.5, 0.5]
    assert torch.all(group + l1 == 2.0)  # the public code's 2 * prop * ||FS||_1, redistributed
    restored = AdaptiveWeights(2, spread=0.5)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.update(torch.tensor([3.5, 2.5]))[0].tolist() == [1.5, 1.5]


def test_the_similarity_and_group_terms_follow_their_formulas_and_stay_finite_on_dead_filters():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    # mean (1/3, 1/3): each live row is 45 degrees from it, s = 1 - 1/4; the dead row is left out
    assert angular_similarity(x).item() == pytest.approx(2 * 0.75, abs=1e-5)
    skeleton = torch.tensor([[[1.0, -2.0]], [[0.0, 3.0]]], requires_grad=True)
    assert group_term(skeleton).item() == pytest.approx(math.sqrt(3.0 ** 2 + 3.0 ** 2))
    (angular_similarity(x) + group_term(torch.zeros(2, 1, 2, requires_grad=True))).backward()
    assert torch.isfinite(x.grad).all()


# --- folding, dead filters, empty blocks ------------------------------------------------------------


def test_folding_the_skeleton_preserves_the_outputs_exactly():
    model, space = tiny()
    randomise_norms(model)
    layers = attach_skeletons(model, space)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers:
            layer.skeleton.copy_(torch.rand(layer.skeleton.shape, generator=generator))
    model.eval()
    x = torch.randn(4, *space.input_shape, generator=generator)
    before = model(x)
    fold_skeletons(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert set(model.state_dict()) == set(create_model("tiny_resnet", 10, 1).state_dict())  # an ordinary model
    assert torch.equal(model(x), before)


def test_removing_dead_filters_preserves_the_outputs():
    model, space = tiny("small_cnn")
    randomise_norms(model)
    layers = attach_skeletons(model, space)
    kill(layers[0], [1, 4])
    kill(layers[2], [0, 3, 5, 30])
    alive = survival(space, layers)
    policy = learned_policy(space, alive)
    assert space.channels(policy)[layers[0].group] == layers[0].skeleton.shape[0] - 2
    assert space.channels(policy)[layers[2].group] == layers[2].skeleton.shape[0] - 4
    fold_skeletons(model)
    model.eval()
    x = torch.randn(4, *space.input_shape)
    pruned = remove_dead(model, space, policy)
    pruned.eval()
    assert pruned.get_submodule(layers[2].name).out_channels == 28
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_coupled_channel_dies_only_when_dead_in_every_member():
    model, space = tiny()
    layers = {layer.name: layer for layer in attach_skeletons(model, space)}
    group = layers["layer2.0.conv2"].group
    kill(layers["layer2.0.conv2"], [0, 1, 2])
    kill(layers["layer2.0.shortcut.0"], [1, 2, 3])  # channels 1 and 2 are dead in both members
    assert survival(space, list(layers.values())).live_channels[group] == 16 - 2


def test_a_block_with_an_empty_convolution_is_dropped_and_the_model_runs_and_reloads(tmp_path):
    from prunetune.pruning.surgery import load_pruned, save_pruned

    model, space = tiny()
    layers = {layer.name: layer for layer in attach_skeletons(model, space)}
    kill(layers["layer1.1.conv1"], list(range(8)))  # the block's inner convolution is empty
    kill(layers["layer2.0.conv1"], [0, 1])
    policy = learned_policy(space, survival(space, list(layers.values())))
    assert policy.dropped_blocks == ("layer1.1",)
    assert "layer1.1.conv1" not in policy.keep_ratios  # vanished with its block
    assert space.channels(policy)["layer2.0.conv1"] == 14
    fold_skeletons(model)
    pruned = remove_dead(model, space, policy)
    assert isinstance(pruned.layer1[1], nn.Identity)
    x = torch.randn(2, *space.input_shape)
    pruned.eval()
    out = pruned(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    save_pruned(tmp_path / "m.pt", pruned, arch={"name": "tiny_resnet", "num_classes": 10, "in_channels": 1},
                space=space, policy=policy)
    loaded, meta = load_pruned(tmp_path / "m.pt")
    loaded.eval()
    assert meta["policy"] == policy and torch.equal(loaded(x), out)


# --- the texture criterion ------------------------------------------------------------------------


def test_texture_scores_the_weights_kxk_pattern_norms_and_zero_for_a_dead_filter():
    from prunetune.pruning.dependency import tp_group, trace_graph, trace_groups
    from prunetune.pruning.importance import get_criterion
    from prunetune.pruning.models import classifier_layer

    model, space = tiny("small_cnn")
    graph = trace_graph(model, space.input_shape)
    traced = trace_groups(model, graph, ignored=[classifier_layer(model)])
    groups = {g.name: tp_group(graph, g.root) for g in traced}
    name = traced[1].name
    weight = model.get_submodule(name).weight.detach()
    expected = weight.pow(2).sum(1).sqrt().flatten(1).sum(1)  # sum_ij ||W[n, :, i, j]||_2
    scores = get_criterion("texture")(model, groups, None)
    torch.testing.assert_close(scores[name], expected)
    with torch.no_grad():
        model.get_submodule(name).weight[3] = 0  # a folded dead filter
    assert get_criterion("texture")(model, groups, None)[name][3] == 0


# --- the learner ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(base_model_cache):
    """small_cnn trained on digits at 8x8 (once a session: test_dcm and test_dcpa load the same one)."""
    splits = load_dataset("digits", image_size=8, seed=0)
    model, metrics = pretrain("small_cnn", splits, TrainRecipe(epochs=8), seed=0, cache_dir=base_model_cache,
                              dataset_key="d8")
    return model, splits, model_space("small_cnn", splits.info), metrics


def learn(digits, options, hparams, *, reports=None, state=None):
    model, splits, space, _ = digits
    data = LearnData(space, splits.train, splits.val, splits.info.augment,
                     TrainRecipe(epochs=1, lr=0.01, batch_size=64), seed=0)
    sink = reports if reports is not None else []

    def report(progress, learner_state):  # a copy now, as a trial writes it to disk: the live one moves on
        sink.append((progress, pickle.loads(pickle.dumps(learner_state))))

    return CdpDtcLearner(options).learn(pickle.loads(pickle.dumps(model)), data, 0.5, hparams, report, state=state)


def test_learning_on_digits_kills_filters_and_gives_a_policy_with_its_survival(digits):
    space = digits[2]
    reports = []
    learned = learn(digits, OPTIONS, HPARAMS, reports=reports)
    ratio = space.macs_ratio(learned.policy)
    assert ratio < 0.9 and learned.info["learned_macs_ratio"] == pytest.approx(ratio)
    assert 0 <= learned.info["stripe_sparsity"] < 1
    assert set(learned.info["survival"]) == {g.name for g in space.groups if g.name.startswith("features")}
    rows = learned.trajectory
    assert rows[0]["step"] == 0 and rows[0]["macs_ratio"] == 1.0
    assert [r["epoch"] for r in rows if float(r["epoch"]).is_integer()] == [0, 1, 2, 3]  # every epoch logged
    assert rows[-1]["step"] == learned.info["steps"] == 60  # counted in steps: the split passed over 3 times
    assert all(f"filters.{name}" in rows[-1] and f"stripes.{name}" in rows[-1] for name in learned.info["survival"])
    assert rows[-1]["filters.features.3"] < 1
    progress = [p for p, _ in reports]
    assert progress[-1].step == progress[-1].total_steps and "val_accuracy" in progress[-1].metrics
    assert [p.step for p in progress] == [*range(7, 60, 7), 60]  # validation scored at checkpoints, not every epoch


def test_learning_resumed_mid_way_ends_as_an_uninterrupted_one(digits):
    reports = []
    whole = learn(digits, OPTIONS, HPARAMS, reports=reports)
    progress, state = reports[1]
    assert 0 < progress.step < progress.total_steps and state["method"] == "cdp-dtc"
    resumed = learn(digits, OPTIONS, HPARAMS, state=state)
    assert resumed.policy == whole.policy

    def untimed(rows):
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]

    assert untimed(resumed.trajectory) == untimed(whole.trajectory)
    with pytest.raises(UserError, match="other hyperparameters"):
        learn(digits, OPTIONS, {**HPARAMS, "delta": 0.4}, state=state)


def test_unreachable_targets_and_bad_options_are_one_line_user_errors():
    _, space = tiny()
    dropped, kept = space.min_macs_ratio(drop_blocks=True), space.min_macs_ratio()
    with pytest.raises(UserError, match=rf"\[{kept:.3f}, 1\].*no layer empties"):  # relative, delta < 1: no drops
        CdpDtcLearner(CdpDtcOptions()).check(space, (dropped + kept) / 2)
    CdpDtcLearner(CdpDtcOptions()).check(space, 0.5)
    CdpDtcLearner(CdpDtcOptions(threshold="model")).check(space, (dropped + kept) / 2)  # layers may empty
    with pytest.raises(UserError, match=rf"\[{dropped:.3f}, 1\].*every droppable block dropped"):
        CdpDtcLearner(CdpDtcOptions(threshold="model")).check(space, dropped / 2)
    assert CdpDtcLearner(CdpDtcOptions(delta_max=1.0)).drops_blocks()
    with pytest.raises(UserError, match="cdp_dtc.delta_min"):
        CdpDtcOptions(delta_min=0.7, delta_max=0.6)
    with pytest.raises(UserError, match="every CDP penalty weight"):
        CdpDtcOptions(**{f"{n}_{end}": 0.0 for n in ("similarity", "similarity_skeleton", "group", "frobenius",
                                                     "adaptive") for end in ("min", "max")})
    with pytest.raises(UserError, match="cdp_dtc.skeleton_lr"):
        CdpDtcOptions(skeleton_lr=0)
    ranges = {r.name: r for r in CdpDtcOptions().hparam_ranges()}
    assert set(ranges) == set(HPARAMS) and ranges["delta"].log and not ranges["similarity"].log  # from 0: linear
    assert ranges["group"].low == ranges["group"].high  # a shrinking term's weight, fixed by default


def test_the_driver_refuses_only_targets_below_the_floor_with_blocks_dropped():
    """CDP+DTC drops blocks itself, so the driver's floor is the drop-aware one, as its own check's;
    a policy searcher without space.search_depth keeps the floor of every block kept."""
    from prunetune.search.driver import check_target

    _, space = tiny()
    dropped, kept = space.min_macs_ratio(drop_blocks=True), space.min_macs_ratio()
    assert dropped < kept
    between = (dropped + kept) / 2

    def cfg(method, **options):
        from prunetune.methods.registry import METHODS

        return SimpleNamespace(method=method, model="tiny_resnet", macs_target=between,
                               space=SimpleNamespace(search_depth=False),
                               method_options=METHODS[method].options(**options))

    check_target(cfg("cdp-dtc", threshold="model"), space)
    with pytest.raises(UserError, match="no layer empties"):  # its own check, as early: relative keeps blocks
        check_target(cfg("cdp-dtc"), space)
    with pytest.raises(UserError, match="below what tiny_resnet can reach"):
        check_target(cfg("optuna"), space)
    with pytest.raises(UserError, match="every droppable block dropped"):
        check_target(SimpleNamespace(**{**vars(cfg("cdp-dtc")), "macs_target": dropped / 2}), space)



def test_a_learner_trial_resumed_mid_learning_ends_as_an_uninterrupted_one(digits, tmp_path):
    """Through search.learner_trial, as a Ray trial runs it: checkpoints written at every report."""
    from prunetune.pruning.measure import measure
    from prunetune.search.learner_trial import LEARNED_FILE, LEARNER_STATE, LearnerJob, run_learner_trial
    from prunetune.search.trial import TrialSetup

    model, splits, space, metrics = digits
    measured = measure(model, space.input_shape, batch_size=64, repeats=2)
    setup = TrialSetup(arch={"name": "small_cnn", "num_classes": 10, "in_channels": 1},
                       base_state=model.state_dict(),
                       base_metrics={**metrics, "macs": measured.macs, "params": measured.params,
                                     "latency_ms": measured.latency_ms},
                       space=space, splits=splits, finetune=TrainRecipe(epochs=1, lr=0.01, batch_size=64),
                       importance="texture", bn_recalibration_batches=2, latency_repeats=2)
    job = LearnerJob("cdp-dtc", {"steps": 60, "checkpoint_every": 7, "criterion": "texture", **WIDE}, 0.5)
    config = {**HPARAMS, "learner": "cdp-dtc", "seed": 0}

    def run(folder, *, stop_after=None, checkpoint_dir=None):
        reports = []

        def report(metrics, write_checkpoint):
            reports.append(metrics)
            if write_checkpoint is not None:
                (folder / str(len(reports))).mkdir(parents=True)
                write_checkpoint(folder / str(len(reports)))
            if stop_after is not None and len(reports) == stop_after:
                raise KeyboardInterrupt

        try:
            return run_learner_trial(setup, job, config, seed=0, report=report, checkpoint_dir=checkpoint_dir), reports
        except KeyboardInterrupt:
            return None, reports

    whole, reports = run(tmp_path / "whole")
    learning = [r for r in reports if "learn_step" in r]
    assert len(learning) >= 3 and whole["learning"]["survival"]
    _, _ = run(tmp_path / "cut", stop_after=2)
    checkpoint = tmp_path / "cut" / "2"
    assert (checkpoint / LEARNER_STATE).exists() and not (checkpoint / LEARNED_FILE).exists()
    resumed, rest = run(tmp_path / "rest", checkpoint_dir=checkpoint)
    assert rest[0]["learn_step"] == learning[2]["learn_step"]  # continues, does not start over
    assert resumed["policy"] == whole["policy"]
    assert resumed["val_accuracy"] == pytest.approx(whole["val_accuracy"])


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prunetune_run_method_cdp_dtc_end_to_end(tmp_path, base_model_cache, tracking_store):
    import json

    from mlflow.tracking import MlflowClient

    from tests.search_helpers import QUICK, mlflow_runs, read_jsonl, run_cli

    result = run_cli(["run", *QUICK, "--method", "cdp-dtc", "--trials", "2", "--concurrency", "2",
                      "--objective", "pareto", "--name", "cdp2", "--storage", str(tracking_store(tmp_path / "runs")),
                      "--set", "cdp_dtc.steps=30", "--set", "cdp_dtc.checkpoint_every=10",
                      "--set", "cdp_dtc.skeleton_lr=0.03", "--set", "cdp_dtc.adaptive_min=0.2",
                      "--set", "cdp_dtc.adaptive_max=0.3"],
                     cache=base_model_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "cdp2"
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 2
    for record in records:
        assert record["status"] == "finished"
        assert record["params"]["importance"] == "texture"  # cdp-dtc's default criterion
        assert 0.05 <= record["params"]["delta"] <= 0.9 and 0.2 <= record["params"]["adaptive"] <= 0.3
        learning = record["learning"]
        assert learning["learned_macs_ratio"] == pytest.approx(record["metrics"]["macs_ratio"], abs=0.01)
        rows = learning["trajectory"]
        assert [r["epoch"] for r in rows if float(r["epoch"]).is_integer()] == [0, 1, 2, 3]  # 30 steps of 10
        assert learning["steps"] == 30
        assert set(learning["survival"]) == {k[len("filters."):] for k in rows[-1] if k.startswith("filters.")}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "cdp-dtc" and summary["trials"]["finished"] == 2

    meta = json.loads((run_dir / "prunetune.json").read_text())
    _, children = mlflow_runs(meta["tracking_uri"])
    client = MlflowClient(meta["tracking_uri"])
    assert len(children) == 2
    for child in children:
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"survival.png", "keep_ratios.png", "policy.json"} <= artifacts
        assert client.get_metric_history(child.info.run_id, "learn.filters.features.3")
