"""Training learns, is reproducible and resumable; evaluation, BN recalibration and the pretrain cache."""

import math
import time
from dataclasses import FrozenInstanceError

import pytest
import torch
from torch import nn

from prunetune.pruning.data import load_dataset
from prunetune.pruning.errors import UserError
from prunetune.pruning.train import (
    EpochReport,
    Trainer,
    TrainRecipe,
    evaluate,
    pretrain,
    pretrain_path,
    recalibrate_bn,
    seed_everything,
    train,
)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits at 8x8: real, small, and not learned in one epoch."""
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="module")
def splits():
    """The synthetic task at 8x8, with a validation split big enough to compare accuracies."""
    return load_dataset("synthetic", val_fraction=0.25, image_size=8)


def tiny_net(seed: int = 0, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Two conv+BN layers, dropout and a linear head; seeded initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, num_classes),
    )


RECIPE = TrainRecipe(epochs=3, lr=0.05, batch_size=32)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def digits_net(seed: int = 0) -> nn.Module:
    return tiny_net(seed, in_channels=1, num_classes=10)


def test_training_learns_well_above_chance(digits):
    model = digits_net()
    before, _ = evaluate(model, digits.val)
    reports = train(model, digits, TrainRecipe(epochs=5, batch_size=64), seed=0)
    assert [r.epoch for r in reports] == [0, 1, 2, 3, 4]
    assert all(isinstance(r, EpochReport) and r.seconds > 0 for r in reports)
    assert before < 0.2  # chance is 0.1
    assert reports[-1].val_accuracy > 0.6
    assert reports[-1].train_loss < 0.75 * reports[0].train_loss


def test_same_seed_same_weights_other_seed_other_weights(splits):
    recipe = TrainRecipe(epochs=1, batch_size=32)
    a, b, c = tiny_net(), tiny_net(), tiny_net()
    train(a, splits, recipe, seed=5)
    train(b, splits, recipe, seed=5)
    train(c, splits, recipe, seed=6)
    assert same_weights(a, b)
    assert not same_weights(a, c)


def test_resumed_run_matches_an_uninterrupted_one(splits, tmp_path):
    straight = tiny_net()
    straight_reports = train(straight, splits, RECIPE, seed=3)

    first = Trainer(tiny_net(), splits, RECIPE, seed=3)
    for report in first.remaining_epochs():
        if report.epoch == 1:
            break
    torch.save(first.state_dict(), tmp_path / "checkpoint.pt")
    torch.manual_seed(12345)  # whatever the crashed process left in the global RNG must not matter

    resumed = Trainer(tiny_net(seed=99), splits, RECIPE, seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    last = list(resumed.remaining_epochs())
    assert [r.epoch for r in last] == [2]
    assert same_weights(straight, resumed.model)
    assert last[0].val_accuracy == straight_reports[-1].val_accuracy


def test_train_resumes_from_start_epoch_and_optimizer_state(splits):
    straight = tiny_net()
    train(straight, splits, RECIPE, seed=3)
    first = Trainer(tiny_net(), splits, RECIPE, seed=3)
    first.run_epoch(0)
    first.run_epoch(1)
    reports = train(
        first.model, splits, RECIPE, seed=3, start_epoch=2, optimizer_state=first.optimizer.state_dict()
    )
    assert [r.epoch for r in reports] == [2]
    assert same_weights(straight, first.model)


def test_checkpoint_of_another_recipe_is_refused(splits):
    state = Trainer(tiny_net(), splits, RECIPE, seed=0).state_dict()
    with pytest.raises(UserError, match="another recipe or seed"):
        Trainer(tiny_net(), splits, TrainRecipe(epochs=4, batch_size=32), seed=0).load_state_dict(state)


def test_schedules_follow_the_recipe():
    cosine = TrainRecipe(epochs=4, lr=0.1)
    assert cosine.learning_rate(0, 0.0) == pytest.approx(0.1)
    assert cosine.learning_rate(2, 0.0) == pytest.approx(0.05)
    assert cosine.learning_rate(3, 0.999) < 0.001
    step = TrainRecipe(epochs=8, lr=0.1, schedule="step")
    assert [step.learning_rate(e, 0.5) for e in (0, 3, 4, 5, 6, 7)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_evaluate_gives_accuracy_in_unit_interval_and_keeps_mode(splits):
    model = tiny_net().train()
    accuracy, loss = evaluate(model, splits.val, batch_size=50)
    assert 0.0 <= accuracy <= 1.0
    assert math.isfinite(loss) and loss > 0
    assert model.training
    assert model[1].num_batches_tracked.item() == 0


def test_recalibrate_bn_repairs_corrupted_statistics_and_restores_state(digits):
    model = digits_net()
    train(model, digits, TrainRecipe(epochs=5, batch_size=64), seed=0)
    good, _ = evaluate(model, digits.val)
    with torch.no_grad():
        model[1].running_mean.add_(2.0)
        model[4].running_var.mul_(20.0)
    broken, _ = evaluate(model, digits.val)
    corrupted_mean = model[1].running_mean.clone()
    model.eval()
    model[6].train()  # a mixed state, to be given back as it was
    recalibrate_bn(model, digits.train, batches=8, batch_size=64)
    repaired, _ = evaluate(model, digits.val)
    assert not torch.equal(model[1].running_mean, corrupted_mean)
    assert broken < good - 0.3
    assert repaired >= good - 0.06
    assert [m.training for m in model] == [i == 6 for i in range(len(model))]
    assert model[1].momentum == model[4].momentum == 0.1
    assert model[1].num_batches_tracked.item() == 8


def test_recalibrate_bn_needs_a_batch(digits):
    with pytest.raises(UserError, match="batches >= 1"):
        recalibrate_bn(digits_net(), digits.train, batches=0)


def test_recipe_is_frozen_and_its_key_stable():
    recipe = TrainRecipe()
    assert recipe.key() == TrainRecipe().key() == TrainRecipe(lr=0.05, epochs=10).key()
    assert TrainRecipe(lr=1).key() == TrainRecipe(lr=1.0).key()
    assert recipe.key() != TrainRecipe(lr=0.1).key()
    with pytest.raises(FrozenInstanceError):
        recipe.lr = 0.1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"epochs": -1}, "epochs"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.5}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"batch_size": 0}, "batch_size"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"schedule": "linear"}, "'schedule' must be one of: cosine, step; got 'linear'"),
        ({"momentum": 0.0}, "nesterov needs momentum"),
        ({"epochs": 2.5}, "'epochs' must be an integer"),
        ({"lr": "0.1"}, "'lr' must be a number"),
    ],
)
def test_bad_recipes_are_user_errors(fields, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as caught:
        TrainRecipe(**fields)
    assert "\n" not in str(caught.value)


def test_start_epoch_outside_the_run_is_a_user_error(splits):
    with pytest.raises(UserError, match="start_epoch"):
        train(tiny_net(), splits, RECIPE, seed=0, start_epoch=4)


def test_pretrain_caches_and_second_call_does_not_train(splits, tmp_path):
    recipe = TrainRecipe(epochs=2, batch_size=32)
    epochs_seen = []
    model, metrics = pretrain(
        "tiny_resnet",
        splits,
        recipe,
        seed=0,
        cache_dir=tmp_path / "cache",
        dataset_key="synthetic8",
        on_epoch=epochs_seen.append,
    )
    path = pretrain_path("tiny_resnet", "synthetic8", recipe, 0, tmp_path / "cache")
    assert path.name == f"tiny_resnet-synthetic8-{recipe.key()}-s0.pt"
    assert [r.epoch for r in epochs_seen] == [0, 1]
    assert (metrics["val_accuracy"], metrics["val_loss"]) == evaluate(model, splits.val)
    assert metrics["test_accuracy"] == evaluate(model, splits.test)[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    modified = path.stat().st_mtime_ns

    again_epochs = []
    started = time.perf_counter()
    cached, cached_metrics = pretrain(
        "tiny_resnet",
        splits,
        recipe,
        seed=0,
        cache_dir=tmp_path / "cache",
        dataset_key="synthetic8",
        on_epoch=again_epochs.append,
    )
    assert time.perf_counter() - started < 1.0
    assert again_epochs == []
    assert cached_metrics == metrics
    assert path.stat().st_mtime_ns == modified
    assert same_weights(model, cached)
    assert not cached.training
    assert evaluate(cached, splits.val)[0] == metrics["val_accuracy"]


def test_pretrain_corrupt_cache_is_a_user_error(splits, tmp_path):
    recipe = TrainRecipe(epochs=1, batch_size=32)
    path = pretrain_path("tiny_resnet", "synthetic8", recipe, 0, tmp_path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="delete it") as caught:
        pretrain("tiny_resnet", splits, recipe, seed=0, cache_dir=tmp_path, dataset_key="synthetic8")
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_seed_everything_makes_initialisation_repeatable():
    seed_everything(7)
    a = nn.Linear(4, 4).weight.detach().clone()
    seed_everything(7)
    assert torch.equal(a, nn.Linear(4, 4).weight)


def test_prune_and_run_name_the_same_base_model_alike(tmp_path):
    """`prunetune prune` and `prunetune run` on the same model, data and recipe share one cache file."""
    import argparse

    from prunetune.pruning.data import DatasetInfo
    from prunetune.pruning.train import dataset_cache_key
    from prunetune.search.commands import common, prune_cmd
    from prunetune.search.config import load_config

    parser = argparse.ArgumentParser()
    prune_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["prune", "--model", "small_cnn", "--dataset", "digits", "--image-size", "8",
                              "--uniform", "0.5", "--pretrain-epochs", "2", "--data-root", str(tmp_path)])
    info = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.5,), "none")
    prune_path = pretrain_path(args.model, common.dataset_key(args, info), common.pretrain_recipe(args),
                               args.seed, tmp_path)

    cfg = load_config(None, overrides={"model": "small_cnn", "dataset.name": "digits", "dataset.image_size": 8,
                                       "pretrain.epochs": 2, "dataset.root": str(tmp_path)})
    d = cfg.dataset
    run_key = dataset_cache_key(d.name, 8, d.data_fraction, d.val_fraction, d.root)
    run_path = pretrain_path(cfg.model, run_key, cfg.pretrain.recipe(), cfg.seed, tmp_path)
    assert prune_path == run_path
    assert "-v0.1-" in run_path.name  # the validation fraction is part of the key for both
