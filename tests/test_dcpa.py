"""DCP-A (methods/dcpa.py): gradients to the attention and logits, the expected MACs at one-hot
choices against the measured pruned model (depth included), the temperature schedule, the learned
policy against the target, a depth-pruned result through prune / fine-tune / export / reload, and
a trial killed in stage 2 resuming. The contract suite (tests/test_method_contract.py) covers the rest."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from prunetune.methods.dcpa import DcpaLearner, DcpaRun, fit_to_target
from prunetune.methods.dcpa_options import DcpaOptions
from prunetune.methods.dcpa_relaxation import (
    block_gates,
    cosine_temperature,
    depth_stages,
    gumbel_softmax,
    width_choices,
)
from prunetune.methods.learner import LearnData
from prunetune.methods.macs_term import MacsTerm
from prunetune.methods.registry import make_learner
from prunetune.pruning.data import load_dataset
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.train import TrainRecipe, pretrain
from prunetune.search.prepare import model_space
from tests.learner_helpers import run_and_keep_checkpoints

TARGET = 0.5
HPARAMS = {"lambda": 3.0, "target_margin": 0.0, "tau_max": 5.0, "warmup_epochs": 1, "search_epochs": 3}


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", image_size=8, seed=0)


def trained(name, splits, cache):
    model, metrics = pretrain(name, splits, TrainRecipe(epochs=8), seed=0, cache_dir=cache, dataset_key="d8")
    return model, model_space(name, splits.info), metrics


@pytest.fixture(scope="module")
def resnet(splits, base_model_cache):
    """tiny_resnet on digits at 8x8: its stage layer1 has depth choices 1 and 2."""
    return trained("tiny_resnet", splits, base_model_cache)


def learn_data(splits, space) -> LearnData:
    return LearnData(space, splits.train, splits.val, splits.info.augment,
                     TrainRecipe(epochs=1, lr=0.01, batch_size=64), seed=0)


def a_run(trained_model, splits, options: DcpaOptions | None = None, hparams=HPARAMS) -> DcpaRun:
    model, space, _ = trained_model
    return DcpaRun(options or DcpaOptions(), pickle.loads(pickle.dumps(model)), learn_data(splits, space), dict(hparams), TARGET)


# --- the pieces ------------------------------------------------------------------------------------------


def test_the_temperature_schedule_hits_its_end_points():
    assert cosine_temperature(0, 50, 5.0, 0.1) == pytest.approx(5.0)
    assert cosine_temperature(49, 50, 5.0, 0.1) == pytest.approx(0.1)
    assert cosine_temperature(24.5, 50, 5.0, 0.1) == pytest.approx(2.55)  # halfway: the mean
    values = [cosine_temperature(s, 50, 5.0, 0.1) for s in range(50)]
    assert values == sorted(values, reverse=True)


def test_gumbel_softmax_samples_follow_the_logits_and_hard_samples_are_one_hot():
    alpha = torch.tensor([[2.0, 0.0, -1.0]]).repeat(4000, 1)
    soft = gumbel_softmax(alpha, 1.0, torch.Generator().manual_seed(0), hard=False)
    assert torch.allclose(soft.sum(-1), torch.ones(4000))
    frequency = torch.bincount(soft.argmax(-1), minlength=3).float() / 4000
    assert torch.allclose(frequency, torch.softmax(alpha[0], -1), atol=0.03)  # Gumbel-max draws softmax(alpha)
    hard = gumbel_softmax(alpha.requires_grad_(), 0.5, torch.Generator().manual_seed(0), hard=True)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    hard[:, 0].sum().backward()
    assert alpha.grad.abs().sum() > 0  # straight-through: the soft sample's gradient


def test_gradients_reach_the_attention_module_and_the_logits(resnet, splits):
    run = a_run(resnet, splits)
    try:
        x, y = run.weights.next()
        run.rerank(x, y)
        run.step = run.warmup_steps  # stage 2
        loss, row = run.arch_loss(*run.arch.next())
        loss.backward()
        attention = run.attention
        for name, parameter in [("embed", attention.embed.weight),
                                ("self-attention", attention.attention.in_proj_weight),
                                ("width head", attention.width_head.weight), ("depth head", attention.depth_head.weight),
                                ("width logits", attention.width_logits), ("depth logits", attention.depth_logits)]:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert row["cross_entropy"] > 0 and 0 < row["macs_ratio"] < 1
    finally:
        run.remove_hooks()


def test_an_architecture_step_moves_only_the_attention_and_logits(resnet, splits):
    run = a_run(resnet, splits)
    try:
        x, y = run.weights.next()
        run.rerank(x, y)
        run.step = run.warmup_steps
        weights = {k: v.clone() for k, v in run.model.state_dict().items() if "running" not in k and "num_batches" not in k}
        logits = run.attention.width_logits.detach().clone()
        run.arch_step()
        assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in weights.items())
        assert not torch.equal(logits, run.attention.width_logits)
    finally:
        run.remove_hooks()


@pytest.mark.parametrize("model_name", ["tiny_resnet", "resnet20", "tiny_mobilenet"])
def test_at_one_hot_choices_the_expected_macs_are_the_measured_macs(model_name, splits):
    """E[MACs] of a one-hot distribution (widths and depths) = MACs counted on the pruned model."""
    from prunetune.pruning.measure import count_macs
    from prunetune.pruning.models import create_model
    from prunetune.pruning.surgery import prune

    info = splits.info
    model = create_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels)
    space = model_space(model_name, info)
    rhos = DcpaOptions().width_ratios()
    widths = width_choices(space, rhos)
    stages = depth_stages(space)
    if model_name == "resnet20":
        assert [(s.name, s.depths()) for s in stages] == [(f"layer{i}", [1, 2, 3]) for i in (1, 2, 3)]
    term = MacsTerm(space)
    channels = torch.tensor([g.channels for g in space.groups], dtype=torch.float64)
    rng = random.Random(0)
    dropped_any = False
    for _ in range(4):
        width_g = torch.zeros(len(space.groups), len(rhos), dtype=torch.float64)
        for i in range(len(space.groups)):
            width_g[i, rng.randrange(len(rhos))] = 1.0
        depth_g = torch.zeros(len(stages), max([s.choices for s in stages], default=1), dtype=torch.float64)
        dropped = []
        for s, stage in enumerate(stages):
            choice = rng.randrange(stage.choices)
            depth_g[s, choice] = 1.0
            dropped += stage.dropped(choice)
        dropped_any |= bool(dropped)
        ratios = (width_g * widths / channels.unsqueeze(1)).sum(1)
        gates = block_gates(depth_g, stages, space.droppable_blocks)
        expected = float(term(ratios, gates if stages else None))
        kept = {g.name: float(r) for g, r in zip(space.groups, ratios, strict=True)}
        policy = space.canonical(Policy(kept, tuple(dropped), space.space_id))
        measured = count_macs(prune(model, space, policy, "l1"), space.input_shape)
        assert expected == pytest.approx(space.estimate_macs(policy), abs=1.0)
        assert expected == pytest.approx(measured, rel=1e-3)
    assert dropped_any or not stages


def test_the_runs_expected_macs_at_peaked_logits_are_the_argmax_policys(resnet, splits):
    """DcpaRun.expected_macs_ratio (softmax of the logits, expected widths and gates) at logits that
    put all mass on one choice = the space's MACs of the argmax policy, which drops a block."""
    run = a_run(resnet, splits)
    try:
        space = resnet[1]
        width_alpha = torch.full((len(space.groups), len(run.rhos)), -60.0)
        for i in range(len(space.groups)):
            width_alpha[i, (3 * i + 2) % len(run.rhos)] = 60.0
        depth_alpha = torch.tensor([[60.0, -60.0]])  # layer1 at depth 1: layer1.1 dropped
        run.descriptors = torch.zeros(len(space.groups) + len(run.stages), 10)
        with torch.no_grad():
            run.attention.width_logits.copy_(width_alpha)
            run.attention.depth_logits.copy_(depth_alpha)
            for head in (run.attention.width_head, run.attention.depth_head):
                head.weight.zero_()
        ratios, dropped = run.argmax_architecture()
        assert dropped == ("layer1.1",)
        policy = Policy({g.name: float(r) for g, r in zip(space.groups, ratios, strict=True)}, dropped,
                        space.space_id)
        expected = float(run.expected_macs_ratio(width_alpha, depth_alpha))
        assert expected == pytest.approx(space.macs_ratio(policy), abs=1e-6)
    finally:
        run.remove_hooks()


def test_fit_to_target_shrinks_over_the_target_and_fills_under_it_only_when_asked(resnet):
    space = resnet[1]
    floor = torch.full((len(space.groups),), 0.25)
    narrow = torch.linspace(0.3, 0.6, len(space.groups))  # under the target, unequal widths
    kept = fit_to_target(space, narrow, floor, ("layer1.1",), TARGET)
    filled = fit_to_target(space, narrow, floor, ("layer1.1",), TARGET, fill=True)
    assert space.macs_ratio(kept) < space.macs_ratio(filled) <= TARGET
    assert filled.dropped_blocks == kept.dropped_blocks == ("layer1.1",)
    assert all(filled.keep_ratios[g] >= r for g, r in kept.keep_ratios.items())
    assert filled.keep_ratios != kept.keep_ratios
    wide = torch.ones(len(space.groups))
    for fill in (False, True):  # over the target: shrunk towards the floor either way
        shrunk = fit_to_target(space, wide, floor, (), TARGET, fill=fill)
        assert TARGET - 0.1 < space.macs_ratio(shrunk) <= TARGET


def test_the_depth_logits_start_at_full_depth_and_the_widths_at_the_loss_target(resnet, splits):
    run = a_run(resnet, splits, DcpaOptions(full_depth_logit=2.0, min_epoch_steps=40))
    try:
        assert run.attention.depth_logits[0, :2].tolist() == [-2.0, 0.0]  # layer1: depth 1 drops one block
        x, _ = run.weights.next()
        run.descriptors = run.layer_descriptors(x)
        ratios, dropped = run.argmax_architecture()
        assert dropped == ()
        with torch.no_grad():
            expected = float(run.expected_macs_ratio(*run.attention(run.descriptors)))
        assert expected == pytest.approx(run.loss_target, abs=0.05)
        assert run.per_epoch == 40 > run.weights.per_epoch  # digits' half has fewer batches
        assert run.total_steps == 40 * (HPARAMS["warmup_epochs"] + HPARAMS["search_epochs"])
    finally:
        run.remove_hooks()


# --- learning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start_at_target", [True, False])
def test_on_digits_the_learned_policy_meets_the_target_within_the_tolerance(start_at_target, splits, base_model_cache):
    cnn = trained("small_cnn", splits, base_model_cache)  # trained once a session (test_dcm, test_cdp_dtc)
    options = DcpaOptions(checkpoint_every=10, start_at_target=start_at_target)
    reports = []
    model, space, _ = cnn
    learned = DcpaLearner(options).learn(pickle.loads(pickle.dumps(model)), learn_data(splits, space), TARGET,
                                         HPARAMS, lambda progress, state: reports.append(progress))
    reached = space.macs_ratio(learned.policy)
    assert TARGET - options.tolerance <= reached <= TARGET, reached
    first, last = learned.trajectory[0], learned.trajectory[-1]
    if not start_at_target:  # from every choice equally likely (E[MACs] near 0.33), pulled to the target
        assert first["macs_ratio"] < TARGET - 0.1 and abs(last["macs_ratio"] - TARGET) < abs(first["macs_ratio"] - TARGET)
    assert TARGET - options.tolerance - 0.02 <= last["macs_ratio"] <= TARGET + 0.02
    assert [p.step for p in reports] == sorted(p.step for p in reports) and reports[-1].step == learned.info["steps"]
    assert {p.metrics["learn_stage"] for p in reports} == {1, 2}
    assert all(0 <= p.metrics["val_accuracy"] <= 1 for p in reports)
    assert last["temperature"] == pytest.approx(options.tau_min)
    probabilities = [v for k, v in last.items() if k.startswith(f"prob.{space.groups[0].name}.w")]
    assert len(probabilities) == len(options.width_ratios()) and sum(probabilities) == pytest.approx(1.0)
    distribution = learned.info["distribution"]
    assert set(distribution["widths"]) == set(space.group_names()) and distribution["depths"] == {}


def test_a_depth_pruned_result_prunes_finetunes_exports_and_reloads(resnet, splits, tmp_path):
    """Logits set to the shallowest depth: the argmax policy drops the block, and a trial runs it."""
    from prunetune.pruning.surgery import load_pruned, save_pruned
    from prunetune.search.trial import run_trial

    run = a_run(resnet, splits)
    try:
        x, y = run.weights.next()
        run.rerank(x, y)
        run.descriptors = run.layer_descriptors(x)
        with torch.no_grad():
            run.attention.depth_logits[:, 0] = 20.0  # depth 1 in layer1
            run.attention.width_logits[:, -2] = 20.0  # 7/8 of every group
        learned = run.result()
    finally:
        run.remove_hooks()
    space = resnet[1]
    assert learned.policy.dropped_blocks == ("layer1.1",)
    assert "layer1.1.conv1" not in learned.policy.keep_ratios  # the dropped block's group is left out
    assert space.macs_ratio(learned.policy) <= TARGET
    assert learned.info["distribution"]["depths"]["layer1"][0] > 0.99
    setup = trial_setup(resnet, splits)
    result = run_trial(setup, learned.policy, seed=0, report=lambda metrics, write: None)
    assert result["macs_ratio"] <= TARGET + 1e-9 and 0 <= result["val_accuracy"] <= 1

    from prunetune.pruning.surgery import prune

    pruned = prune(resnet[0], space, learned.policy, "bn_scale")
    path = tmp_path / "pruned.pt"
    save_pruned(path, pruned, arch=setup.arch, space=space, policy=learned.policy)
    reloaded, meta = load_pruned(path)
    sample = torch.stack([splits.val[i][0] for i in range(8)])
    assert torch.allclose(reloaded.eval()(sample), pruned.eval()(sample), atol=1e-5)
    assert meta["policy"] == learned.policy


# --- the learner trial: killed in stage 2, resumed -------------------------------------------------------------


def trial_setup(trained_model, splits):
    from prunetune.pruning.measure import measure
    from prunetune.search.trial import TrialSetup

    model, space, metrics = trained_model
    measured = measure(model, space.input_shape, batch_size=64, repeats=2)
    base = {**metrics, "macs": measured.macs, "params": measured.params, "latency_ms": measured.latency_ms}
    return TrialSetup(arch={"name": space.model_name, "num_classes": 10, "in_channels": 1},
                      base_state=model.state_dict(), base_metrics=base, space=space, splits=splits,
                      finetune=TrainRecipe(epochs=1, lr=0.01, batch_size=64), importance="bn_scale",
                      bn_recalibration_batches=2, latency_repeats=2)


def test_a_trial_killed_in_stage_2_resumes_rather_than_restarting(resnet, splits, tmp_path):
    from prunetune.search.learner_trial import LEARNER_STATE, LearnerJob

    setup = trial_setup(resnet, splits)
    job = LearnerJob("dcpa", {"checkpoint_every": 4, "criterion": "bn_scale"}, TARGET)
    config = {**HPARAMS, "learner": "dcpa", "seed": 0}
    whole, reports = run_and_keep_checkpoints(setup, job, config, tmp_path / "whole")
    learning = [r for r in reports if "learn_step" in r]
    assert [r["epoch"] for r in reports if "epoch" in r] == [0, 1]
    assert setup.space.macs_ratio(Policy.from_json(whole["policy"])) <= TARGET + 1e-9

    in_stage_2 = next(i for i, r in enumerate(learning) if r["learn_stage"] == 2 and i + 1 < len(learning))
    cut, first = run_and_keep_checkpoints(setup, job, config, tmp_path / "cut",
                                          stop_when=lambda r: r.get("learn_step") == learning[in_stage_2]["learn_step"])
    checkpoint = tmp_path / "cut" / str(len(first))
    assert cut is None and (checkpoint / LEARNER_STATE).exists()
    state = torch.load(checkpoint / LEARNER_STATE, weights_only=True)
    assert state["method"] == "dcpa" and state["step"] > 0 and state["descriptors"] is not None
    resumed, rest = run_and_keep_checkpoints(setup, job, config, tmp_path / "rest", checkpoint_dir=checkpoint)
    assert rest[0]["learn_step"] == learning[in_stage_2 + 1]["learn_step"]  # continues, does not start over
    assert resumed["policy"] == whole["policy"]
    assert resumed["learning"]["trajectory"] == whole["learning"]["trajectory"]
    assert resumed["val_accuracy"] == pytest.approx(whole["val_accuracy"])


# --- options, registry, config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"lambda_min": 10.0, "lambda_max": 1.0}, {"width_min": 0.0},
                                 {"attention_dim": 10, "attention_heads": 3}, {"tau_max_min": 0.05},
                                 {"search_epochs_min": 0}])
def test_bad_options_are_one_line_user_errors(bad):
    with pytest.raises(UserError) as error:
        DcpaOptions(**bad)
    assert "dcpa." in str(error.value) and "\n" not in str(error.value)


def test_the_width_choices_and_the_registry(resnet):
    assert DcpaOptions(width_step=0.125).width_ratios() == (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert len(DcpaOptions().width_ratios()) == 13  # 0.25 by 0.0625
    assert DcpaOptions(width_min=0.3, width_step=0.3).width_ratios() == (0.3, 0.6, 0.9, 1.0)
    learner = make_learner("dcpa", {"width_min": 0.9})
    with pytest.raises(UserError, match="dcpa.width_min"):
        learner.check(resnet[1], 0.5)
    names = [r.name for r in make_learner("dcpa").hparam_ranges()]
    assert names == ["lambda", "target_margin", "tau_max", "warmup_epochs", "search_epochs"]


def test_the_config_section_takes_set_dcpa_keys():
    from prunetune.search.config import load_config

    cfg = load_config(sets=["method=dcpa", "dcpa.lambda_min=2", "dcpa.search_epochs_max=6"], names=False)
    assert cfg.method_options.lambda_min == 2.0 and cfg.method_options.search_epochs_max == 6
    with pytest.raises(UserError, match="dcpa.tau_max_min"):
        load_config(sets=["method=dcpa", "dcpa.tau_max_min=9"], names=False)


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prunetune_run_method_dcpa_end_to_end(tmp_path, base_model_cache, tracking_store):
    import json

    from mlflow.tracking import MlflowClient

    from tests.search_helpers import QUICK, mlflow_runs, read_jsonl, run_cli

    result = run_cli(["run", *QUICK, "--model", "tiny_resnet", "--method", "dcpa", "--trials", "2",
                      "--concurrency", "2", "--name", "dcpa2", "--storage", str(tracking_store(tmp_path / "runs")),
                      "--set", "dcpa.checkpoint_every=5", "--set", "dcpa.search_epochs_max=2"],
                     cache=base_model_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "dcpa2"
    records = read_jsonl(run_dir / "trials.jsonl")
    assert len(records) == 2
    for record in records:
        assert record["status"] == "finished"
        assert record["metrics"]["macs_ratio"] <= 0.5 + 1e-9  # measured on the pruned model
        params = record["params"]
        defaults = DcpaOptions()
        assert defaults.lambda_min <= params["lambda"] <= defaults.lambda_max and params["search_epochs"] <= 2
        assert defaults.tau_max_min <= params["tau_max"] <= defaults.tau_max_max
        assert params["importance"] == "bn_scale"
        learning = record["learning"]
        assert any(key.startswith("prob.layer1.d") for key in learning["trajectory"][-1])  # depth choices
        assert set(learning["distribution"]["depths"]) == {"layer1"}
        assert [h["epoch"] for h in record["history"]] == [0, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "dcpa" and summary["trials"]["finished"] == 2

    meta = json.loads((run_dir / "prunetune.json").read_text())
    _, children = mlflow_runs(meta["tracking_uri"])
    client = MlflowClient(meta["tracking_uri"])
    assert len(children) == 2
    by_id = {r["trial_id"]: r for r in records}
    for child in children:
        record = by_id[child.data.tags["prunetune.trial_id"]]
        history = client.get_metric_history(child.info.run_id, "learn.prob.conv1.w0")
        assert [m.step for m in history] == [row["step"] for row in record["learning"]["trajectory"]]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"choices.png", "keep_ratios.png", "policy.json"} <= artifacts
