"""DCM (methods/dcm.py) and the learner trial path: the MACs term, the masks, the ratios it learns,
resuming mid-learning, and `prunetune run --method dcm` end to end on real Ray and MLflow."""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import replace

import pytest
import torch

from prunetune.methods.channel_mask import ChannelMasks, ranks_from_scores, soft_mask
from prunetune.methods.dcm import DcmLearner, policy_meeting_target, rounded_policy
from prunetune.methods.dcm_options import DcmOptions
from prunetune.methods.learner import HParamRange, LearnData
from prunetune.methods.macs_term import MacsTerm
from prunetune.methods.registry import make_learner
from prunetune.pruning.data import load_dataset
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.train import TrainRecipe, pretrain
from prunetune.search.prepare import model_space
from tests.learner_helpers import run_and_keep_checkpoints

TARGET = 0.5
HPARAMS = {"lambda": 200.0, "k": 1, "temperature_start": 1.0, "temperature_end": 0.02, "target_margin": 0.0}


@pytest.fixture(scope="module")
def digits(base_model_cache):
    """small_cnn trained on digits at 8x8 (a few seconds, once a session: test_dcpa and test_cdp_dtc
    load the same one from the cache), its splits and space."""
    splits = load_dataset("digits", image_size=8, seed=0)
    model, metrics = pretrain("small_cnn", splits, TrainRecipe(epochs=8), seed=0, cache_dir=base_model_cache,
                              dataset_key="d8")
    return model, splits, model_space("small_cnn", splits.info), metrics


def learn_data(splits, space, **recipe) -> LearnData:
    return LearnData(space, splits.train, splits.val, splits.info.augment,
                     TrainRecipe(**{"epochs": 1, "lr": 0.01, "batch_size": 64, **recipe}), seed=0)


def learn(digits, options: DcmOptions, hparams: dict, reports: list | None = None):
    model, splits, space, _ = digits
    copy = pickle.loads(pickle.dumps(model))
    sink = reports if reports is not None else []
    return DcmLearner(options).learn(copy, learn_data(splits, space), TARGET, hparams,
                                     lambda progress, state: sink.append(progress))


# --- the differentiable MACs term --------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["small_cnn", "tiny_resnet", "tiny_mobilenet", "tiny_concat"])
def test_macs_term_is_the_space_estimate_and_the_measured_macs(model_name):
    from prunetune.pruning.measure import count_macs
    from prunetune.pruning.models import create_model
    from prunetune.pruning.surgery import prune

    info = load_dataset("digits", image_size=8).info
    model = create_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels)
    space = model_space(model_name, info)
    term = MacsTerm(space)
    rng = random.Random(0)
    for _ in range(3):
        ratios = torch.tensor([rng.uniform(0.15, 1.0) for _ in space.groups])
        policy = rounded_policy(space, ratios)
        at_rounded = term.of(policy.keep_ratios)
        assert at_rounded == pytest.approx(space.estimate_macs(policy), abs=1.0)
        measured = count_macs(prune(model, space, policy, "l1"), space.input_shape)
        assert at_rounded == pytest.approx(measured, rel=0.02)


def test_macs_term_is_differentiable_in_the_ratios():
    space = model_space("tiny_resnet", load_dataset("digits", image_size=8).info)
    term = MacsTerm(space)
    ratios = torch.linspace(0.3, 0.9, len(space.groups), dtype=torch.float64).requires_grad_()
    (gradient,) = torch.autograd.grad(term.ratio(ratios), [ratios])
    assert (gradient > 0).all()  # every group costs MACs
    for index in range(len(space.groups)):  # agrees with central finite differences
        step = torch.zeros_like(ratios)
        step[index] = 1e-5
        numeric = (term.ratio(ratios + step) - term.ratio(ratios - step)) / 2e-5
        assert float(gradient[index]) == pytest.approx(numeric.item(), rel=1e-5)
    assert float(term.ratio(torch.ones(len(space.groups)))) == pytest.approx(1.0)


# --- the dynamic mask ----------------------------------------------------------------------------


def test_the_mask_becomes_hard_as_the_temperature_falls():
    ranks = ranks_from_scores(torch.tensor([0.3, 2.0, 0.1, 1.0, 0.7, 0.2, 0.9, 0.5]))
    ratio = torch.tensor(0.45)  # 0.45 * 8 = 3.6: the best 4 channels
    softness = []
    for temperature in (2.0, 0.5, 0.1, 0.01, 1e-3):
        mask = soft_mask(ratio, ranks, temperature)
        softness.append(float(torch.minimum(mask, 1 - mask).max()))
    assert softness == sorted(softness, reverse=True) and softness[0] > 0.3
    hard = soft_mask(ratio, ranks, 1e-3)
    assert torch.equal(hard.round(), (ranks <= 4).float()) and softness[-1] < 1e-6
    assert hard[1] == pytest.approx(1.0) and hard[2] == pytest.approx(0.0)  # the best kept, the worst cut


def test_ranks_follow_a_weight_change(digits):
    model, _, space, _ = digits
    copy = pickle.loads(pickle.dumps(model))
    masks = ChannelMasks(copy, space, "bn_scale")
    try:
        masks.rerank([])
        first = space.groups[0]
        worst = int(torch.argmax(masks.ranks[0]))
        assert masks.ranks[0][worst] == first.channels
        norm = copy.get_submodule(first.members[1])
        with torch.no_grad():
            norm.weight[worst] = 10 * norm.weight.abs().max()
        masks.rerank([])
        assert masks.ranks[0][worst] == 1  # the weight changed; the rank followed
    finally:
        masks.remove()


def test_masks_cut_channels_as_pruning_would(digits):
    """A hard mask on every group gives the pruned model's outputs (before any retraining)."""
    from prunetune.pruning.surgery import prune

    model, splits, space, _ = digits
    copy = pickle.loads(pickle.dumps(model)).eval()
    masks = ChannelMasks(copy, space, "bn_scale")
    ratios = torch.tensor([0.5, 0.75, 0.5, 0.25])
    try:
        masks.rerank([])
        masks.set(ratios, 1e-4)
        x = torch.stack([splits.val[i][0] for i in range(16)])
        masked = copy(x)
    finally:
        masks.remove()
    pruned = prune(model, space, rounded_policy(space, ratios), "bn_scale").eval()
    assert torch.allclose(masked, pruned(x), atol=1e-4)


# --- learning the ratios -------------------------------------------------------------------------


def test_with_lambda_large_the_learned_ratios_meet_the_target(digits):
    reports = []
    learned = learn(digits, DcmOptions(epochs=3, start_keep_ratio=0.9, ratio_lr=0.2, lambda_max=1e4,
                                       checkpoint_every=10), {**HPARAMS, "lambda": 2000.0}, reports)
    space = digits[2]
    first, last = learned.trajectory[0], learned.trajectory[-1]
    assert first["macs_ratio"] > 0.75  # from 0.9 per group
    assert last["macs_ratio"] == pytest.approx(TARGET, abs=0.03)
    assert learned.info["learned_macs_ratio"] == pytest.approx(TARGET, abs=0.03)
    assert space.macs_ratio(learned.policy) <= TARGET + 1e-9  # the rounded policy meets the target
    assert [p.step for p in reports] == sorted(p.step for p in reports) and reports[-1].step == learned.info["steps"]
    assert all(0 <= p.metrics["val_accuracy"] <= 1 and "macs_ratio" in p.metrics for p in reports)


def test_with_lambda_zero_the_ratios_stay_near_their_start(digits):
    learned = learn(digits, DcmOptions(epochs=3, start_keep_ratio=0.9, ratio_lr=0.2, lambda_min=0.0),
                    {**HPARAMS, "lambda": 0.0})
    space = digits[2]
    ends = [learned.trajectory[-1][f"keep.{g.name}"] for g in space.groups]
    assert all(abs(end - 0.9) < 0.08 for end in ends), ends
    assert learned.trajectory[-1]["macs_ratio"] > 0.7  # nothing pulled it towards 0.5
    assert space.macs_ratio(learned.policy) <= TARGET + 1e-9  # the projection still meets the target


def test_the_mask_hardens_and_ranks_refresh_during_learning(digits):
    learned = learn(digits, DcmOptions(epochs=1, rank_every=3), {**HPARAMS, "temperature_end": 0.02})
    softness = [row["mask_softness"] for row in learned.trajectory]
    assert softness[0] > 0.02 and softness[-1] < 0.01 and softness[-1] < softness[0]
    temperatures = [row["temperature"] for row in learned.trajectory]
    assert temperatures == sorted(temperatures, reverse=True)
    steps = learned.info["steps"]
    assert learned.info["reranks"] == -(-steps // 3)  # at steps 0, 3, 6, ...


def test_policy_meeting_target_moves_ratios_towards_their_floors():
    space = model_space("tiny_resnet", load_dataset("digits", image_size=8).info)
    floor = torch.full((len(space.groups),), 0.1)
    full = torch.ones(len(space.groups))
    policy = policy_meeting_target(space, full, floor, 0.4)
    assert 0.35 < space.macs_ratio(policy) <= 0.4
    fits = rounded_policy(space, torch.full((len(space.groups),), 0.5))
    assert policy_meeting_target(space, torch.full((len(space.groups),), 0.5), floor, 0.9) == fits


# --- options, hyperparameters, registry ------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"lambda_min": 10.0, "lambda_max": 1.0}, {"penalty": "cubic"},
                                 {"temperature_end_max": 1.0, "temperature_start_min": 0.5},
                                 {"floor": 0.5, "start_keep_ratio": 0.4}, {"k_min": 0}])
def test_bad_options_are_one_line_user_errors(bad):
    with pytest.raises(UserError) as error:
        DcmOptions(**bad)
    assert "dcm." in str(error.value) and "\n" not in str(error.value)


def test_config_section_checks_the_ranges_before_anything_starts():
    from prunetune.search.config import load_config

    cfg = load_config(sets=["method=dcm", "dcm.k_max=2", "dcm.lambda_min=5"], names=False)
    assert cfg.method_options.k_max == 2 and cfg.method_options.lambda_min == 5.0
    with pytest.raises(UserError, match="dcm.k_min"):
        load_config(sets=["method=dcm", "dcm.k_min=3", "dcm.k_max=2"], names=False)


def test_hparams_outside_their_ranges_and_unreachable_targets_are_refused(digits):
    _, splits, space, _ = digits
    learner = make_learner("dcm", {"floor": 0.6})
    with pytest.raises(UserError, match="dcm.floor"):
        learner.check(space, 0.2)
    with pytest.raises(UserError, match="outside its range"):
        learn(digits, DcmOptions(), {**HPARAMS, "lambda": 1e6})
    with pytest.raises(UserError, match="not a learner"):
        make_learner("uniform")


def test_optuna_samples_the_declared_ranges():
    import optuna

    from prunetune.search.optuna_space import define_learner_space, make_learner_search

    ranges = DcmOptions(k_min=2, k_max=2).hparam_ranges()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    for _ in range(5):
        trial = study.ask()
        config = define_learner_space(trial, ranges=ranges, learner="dcm")
        assert config == {"learner": "dcm"}
        for r in ranges:
            assert r.contains(trial.params[r.name])
        assert trial.params["k"] == 2 and isinstance(trial.params["k"], int)  # equal bounds fix it
        study.tell(trial, 0.5)
    search = make_learner_search(ranges, learner="dcm", objective="constrained", sampler="tpe", seed=0,
                                 n_startup_trials=2)
    pickle.dumps(search)  # OptunaSearch pickles itself to save the search state
    assert HParamRange("k", 1, 4, integer=True).contains(3)


def test_asha_counts_fine_tuning_epochs_not_learning_reports():
    """The search's ASHA rungs are fine-tuning epochs: a learner's many learning reports move nothing."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from prunetune.search.config import load_config
    from prunetune.search.tuner import build_scheduler

    scheduler = build_scheduler(load_config(sets=["method=dcm", "finetune.epochs=4", "scheduler=asha"],
                                            names=False))
    strong = [SimpleNamespace(trial_id=f"s{i}", config={}) for i in range(3)]
    weak = SimpleNamespace(trial_id="w", config={})
    for trial in (*strong, weak):
        scheduler.on_trial_add(None, trial)
    for trial in strong:
        assert scheduler.on_trial_result(None, trial, {"epoch": 1, "val_accuracy": 0.9}) == TrialScheduler.CONTINUE
    for step in range(1, 30):  # learning reports: a poor masked model, no epoch
        learning = {"learn_step": step, "training_iteration": step, "val_accuracy": 0.05}
        assert scheduler.on_trial_result(None, weak, learning) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, {"epoch": 0, "val_accuracy": 0.1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, {"epoch": 1, "val_accuracy": 0.1}) == TrialScheduler.STOP


def test_the_learner_path_imports_neither_ray_nor_mlflow():
    """DESIGN.md's boundaries: methods/ and a trial's plain-Python path run without Ray and MLflow."""
    import subprocess
    import sys

    code = ("import sys, prunetune.methods.registry, prunetune.methods.dcm, prunetune.search.learner_trial, "
            "prunetune.tracking.learning; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- the learner trial: resumable mid-learning -------------------------------------------------------


@pytest.fixture(scope="module")
def trial_setup(digits):
    from prunetune.pruning.measure import measure
    from prunetune.search.trial import TrialSetup

    model, splits, space, metrics = digits
    measured = measure(model, space.input_shape, batch_size=64, repeats=2)
    base = {**metrics, "macs": measured.macs, "params": measured.params, "latency_ms": measured.latency_ms}
    return TrialSetup(arch={"name": "small_cnn", "num_classes": 10, "in_channels": 1},
                      base_state=model.state_dict(), base_metrics=base, space=space, splits=splits,
                      finetune=TrainRecipe(epochs=1, lr=0.01, batch_size=64), importance="bn_scale",
                      bn_recalibration_batches=2, latency_repeats=2)


def test_a_learner_trial_resumed_mid_learning_ends_as_an_uninterrupted_one(trial_setup, tmp_path):
    from prunetune.search.learner_trial import LEARNED_FILE, LEARNER_STATE, LearnerJob

    job = LearnerJob("dcm", {"checkpoint_every": 4, "rank_every": 3, "criterion": "bn_scale"}, TARGET)
    config = {**HPARAMS, "k": 2, "learner": "dcm", "seed": 0}
    whole, reports = run_and_keep_checkpoints(trial_setup, job, config, tmp_path / "whole")
    learning = [r for r in reports if "learn_step" in r]
    assert len(learning) >= 3 and "epoch" not in learning[0]  # ASHA counts fine-tuning epochs only
    assert [r["epoch"] for r in reports if "epoch" in r] == [0, 1]  # recalibrated, then the result
    assert whole["policy"] == reports[-1]["policy"] and whole["learning"]["trajectory"]
    assert trial_setup.space.macs_ratio(Policy.from_json(whole["policy"])) <= TARGET + 1e-9

    _, first = run_and_keep_checkpoints(trial_setup, job, config, tmp_path / "cut", stop_after=2)
    untimed = [{k: v for k, v in r.items() if k != "learn_seconds"} for r in first + learning[:2]]
    assert untimed[:2] == untimed[2:]  # the same learning, reported the same way
    checkpoint = tmp_path / "cut" / "2"
    assert (checkpoint / LEARNER_STATE).exists() and not (checkpoint / LEARNED_FILE).exists()
    resumed, rest = run_and_keep_checkpoints(trial_setup, job, config, tmp_path / "rest", checkpoint_dir=checkpoint)
    assert rest[0]["learn_step"] == learning[2]["learn_step"]  # continues, does not start over
    assert resumed["policy"] == whole["policy"]
    assert resumed["learning"]["trajectory"] == whole["learning"]["trajectory"]
    assert resumed["val_accuracy"] == pytest.approx(whole["val_accuracy"])

    after_learning = tmp_path / "whole" / str(len(learning) + 1)  # the recalibrated model's checkpoint
    assert (after_learning / LEARNED_FILE).exists()
    again, more = run_and_keep_checkpoints(trial_setup, job, config, tmp_path / "again", checkpoint_dir=after_learning)
    assert not any("learn_step" in r for r in more)  # a retry while fine-tuning does not learn again
    assert again["policy"] == whole["policy"] and again["val_accuracy"] == pytest.approx(whole["val_accuracy"])

    # issue 15: the learning is a phase of the trial's timing, within its wall time, summed over attempts
    from prunetune.search.learner_trial import TIMING_FILE
    from prunetune.search.timing import WORKER_PHASES

    timing = whole["timing"]
    assert "resumed" not in timing  # the wall time: the trial's seconds and the last checkpoint's write
    assert whole["trial_seconds"] <= timing["wall"] <= whole["trial_seconds"] + timing["checkpoint"] + 1e-3
    assert timing["learning"] >= whole["learning"]["seconds"] - 1e-3  # the learner's own count, within ours
    assert sum(timing.get(p, 0.0) for p in WORKER_PHASES) <= timing["wall"] + 1e-3
    assert timing["report"] > 0 and timing["checkpoint"] > 0  # the learning's reports and checkpoints too
    cut = json.loads((checkpoint / TIMING_FILE).read_text())
    assert cut["learning"] > 0 and resumed["timing"]["resumed"] is True
    assert resumed["timing"]["learning"] > cut["learning"] and resumed["timing"]["wall"] > cut["wall"]
    saved = json.loads((after_learning / TIMING_FILE).read_text())
    assert again["timing"]["learning"] == pytest.approx(saved["learning"])  # learned in the first attempt only
    assert again["timing"]["started_at"] == pytest.approx(timing["started_at"]) and again["timing"]["resumed"]


def test_a_learner_trial_refuses_another_learners_checkpoint(trial_setup, tmp_path):
    from prunetune.search.learner_trial import LEARNER_STATE, LearnerJob

    job = LearnerJob("dcm", {"checkpoint_every": 4}, TARGET)
    run_and_keep_checkpoints(trial_setup, job, {**HPARAMS}, tmp_path / "a", stop_after=1)
    other = replace(job, options={"checkpoint_every": 4, "epochs": 2})
    state = torch.load(tmp_path / "a" / "1" / LEARNER_STATE, weights_only=True)
    assert state["method"] == "dcm"
    with pytest.raises(UserError, match="other hyperparameters"):
        run_and_keep_checkpoints(trial_setup, other, {**HPARAMS, "lambda": 300.0}, tmp_path / "b",
                                 checkpoint_dir=tmp_path / "a" / "1")


# --- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prunetune_run_method_dcm_end_to_end(tmp_path, base_model_cache, tracking_store):
    from tests.search_helpers import QUICK, mlflow_runs, read_jsonl, run_cli

    result = run_cli(["run", *QUICK, "--method", "dcm", "--trials", "2",
                      "--concurrency", "2", "--name", "dcm2", "--storage", str(tracking_store(tmp_path / "runs")),
                      "--set", "dcm.checkpoint_every=3", "--set", "dcm.k_max=2"],
                     cache=base_model_cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "dcm2"
    records = read_jsonl(run_dir / "trials.jsonl")
    space = json.loads((run_dir / "space.json").read_text())
    groups = {g["name"] for g in space["groups"]}
    assert len(records) == 2
    for record in records:
        assert record["status"] == "finished"
        assert set(record["policy"]["keep_ratios"]) == groups
        assert record["metrics"]["macs_ratio"] <= 0.5 + 1e-9  # measured on the pruned model
        assert 1 <= record["params"]["k"] <= 2 and 10 <= record["params"]["lambda"] <= 1000
        assert record["params"]["importance"] == "bn_scale"  # dcm's default criterion
        trajectory = record["learning"]["trajectory"]
        assert len(trajectory) >= 3 and all(f"keep.{g}" in trajectory[-1] for g in groups)
        assert [h["epoch"] for h in record["history"]] == [0, 1]
        assert record["timing"]["learning"] > 0 and record["seconds"] <= record["timing"]["wall"]  # issue 15
    shown = run_cli(["status", str(run_dir), "--timing"], cache=base_model_cache, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if line.split()}
    assert rows["trial"][1] == "learn" and all(float(rows[r["trial_id"]][1]) > 0 for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "dcm" and summary["trials"]["finished"] == 2 and summary["best"] is not None

    from mlflow.tracking import MlflowClient

    meta = json.loads((run_dir / "prunetune.json").read_text())
    _, children = mlflow_runs(meta["tracking_uri"])
    client = MlflowClient(meta["tracking_uri"])
    assert len(children) == 2
    by_id = {r["trial_id"]: r for r in records}
    for child in children:
        record = by_id[child.data.tags["prunetune.trial_id"]]
        group = sorted(groups)[0]
        history = client.get_metric_history(child.info.run_id, f"learn.keep.{group}")
        assert [m.step for m in history] == [row["step"] for row in record["learning"]["trajectory"]]
        assert child.data.params["lambda"] == str(record["params"]["lambda"])
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"keep_ratios.png", "policy.json"} <= artifacts
        assert child.data.metrics["timing.learning_s"] == pytest.approx(record["timing"]["learning"])
