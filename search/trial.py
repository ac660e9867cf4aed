"""One trial: prune the trained base model with a policy, fine-tune it, measure it.

``run_trial`` is plain Python (no Ray): Ray Tune calls it through ``search.trainable``, tests and
the overhead benchmark call it directly. It reports after BatchNorm recalibration (epoch 0) and
after every fine-tuning epoch, handing the caller a checkpoint each time, and continues from such
a checkpoint when one is given, so a retried trial does not start over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from prunetune.pruning.data import Splits, make_loader
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace
from prunetune.pruning.train import TrainRecipe

CHECKPOINT_MODEL = "model.pt"
CHECKPOINT_STATE = "trainer.pt"
COMPLETE_KEY = "trial_complete"  # set in the last report only: the trial ran to the end (not stopped early)
REUSED_KEY = "reused_result"  # a resumed trial reported its result recorded before the interruption


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one search shares: the base model, the data, the space, the recipe."""

    arch: dict  # create_model's arguments: {"name", "num_classes", "in_channels", "model_args"}
    base_state: dict  # the trained base model's state_dict
    base_metrics: dict  # {"val_accuracy", "test_accuracy", "macs", "params", "latency_ms"}
    space: SearchSpace
    splits: Splits
    finetune: TrainRecipe
    importance: str = "l1"
    calibration_batches: int = 4
    bn_recalibration_batches: int = 20
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch threads per trial: never more than the trial's CPUs
    latency_repeats: int = 10
    # On resume: the results trials.jsonl holds, by trial id and by config key
    # (``search.callbacks.reusable_results``); such a trial reports its result again and computes nothing.
    recorded: dict = field(default_factory=dict)
    distillation: object = None  # pruning.distill.Distillation: train against the base model's logits (final)
    amp: str = "none"  # resources.amp: bf16 autocasts the forward passes (pruning.train.autocast)
    channels_last: bool = False  # resources.channels_last: the model and its inputs in NHWC memory order


# report(metrics, checkpoint_dir_writer or None); the writer saves a checkpoint into a directory.
Report = Callable[[dict, Callable[[Path], None] | None], None]


def build_base_model(setup: TrialSetup) -> nn.Module:
    from prunetune.pruning.models import create_from_arch

    model = create_from_arch(setup.arch)
    model.load_state_dict(setup.base_state)
    return model.to(setup.device)


def on_device(setup: TrialSetup) -> TrialSetup:
    """``setup`` with its in-memory splits on its device where they fit (``Splits.on_device``): each
    dataset moves once and keeps its copy, so the batches of every epoch are made on the device."""
    return replace(setup, splits=setup.splits.on_device(setup.device))


def calibration_batches(setup: TrialSetup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``calibration_batches`` batches of the training split, shuffled by the search seed."""
    loader = make_loader(setup.splits.train, 64, shuffle=True, seed=setup.seed)
    batches = []
    for x, y in loader:
        batches.append((x.to(setup.device), y.to(setup.device)))
        if len(batches) == setup.calibration_batches:
            break
    return batches


def prune_for_trial(setup: TrialSetup, policy: Policy) -> nn.Module:
    """The base model pruned to ``policy`` with the search's criterion, BatchNorm recalibrated."""
    from prunetune.pruning.surgery import prune
    from prunetune.pruning.train import recalibrate_bn

    base = build_base_model(setup)
    pruned = prune(base, setup.space, policy, setup.importance, calibration_batches(setup))
    if setup.bn_recalibration_batches:
        recalibrate_bn(pruned, setup.splits.train, batches=setup.bn_recalibration_batches,
                       seed=setup.seed, device=setup.device, amp=setup.amp,
                       channels_last=setup.channels_last)
    return pruned


def run_trial(setup: TrialSetup, policy: Policy, *, seed: int, report: Report,
              checkpoint_dir: Path | None = None, evaluate_test: bool = True) -> dict:
    """Prune, recalibrate, fine-tune (reporting each epoch), evaluate and measure; return the result.

    ``checkpoint_dir`` is a checkpoint this trial wrote earlier: training continues after its epoch.
    The result holds ``val_accuracy`` (what searchers see), ``test_accuracy`` (for final reports
    only; None with ``evaluate_test=False``, a searcher's proxy trial), ``macs``, ``params``,
    ``latency_ms`` and their ratios to the base model.
    """
    from prunetune.pruning.measure import measure
    from prunetune.pruning.surgery import load_pruned
    from prunetune.pruning.train import Trainer, evaluate

    started = time.perf_counter()
    setup = on_device(setup)
    torch.manual_seed(seed)
    if checkpoint_dir is not None:
        model, _ = load_pruned(Path(checkpoint_dir) / CHECKPOINT_MODEL, map_location=setup.device)
        model = model.to(setup.device)
        state = torch.load(Path(checkpoint_dir) / CHECKPOINT_STATE, map_location=setup.device,
                           weights_only=True)
    else:
        model, state = prune_for_trial(setup, policy), None
    size = _size_metrics(setup, policy)
    trainer = Trainer(model, setup.splits, setup.finetune, seed=seed, device=setup.device,
                      distillation=setup.distillation, amp=setup.amp, channels_last=setup.channels_last)
    fast = {"amp": setup.amp, "channels_last": setup.channels_last}  # evaluate's forward passes
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        history = list(state["history"])
    else:
        val_accuracy, val_loss = evaluate(model, setup.splits.val, device=setup.device, **fast)
        history = [{"epoch": 0, "val_accuracy": val_accuracy, "val_loss": val_loss}]
        report({**size, **history[-1], "epoch": 0},
               _checkpoint_writer(setup, policy, trainer, history) if setup.finetune.epochs else None)
    for epoch_report in trainer.remaining_epochs():
        history.append({"epoch": epoch_report.epoch + 1, "val_accuracy": epoch_report.val_accuracy,
                        "val_loss": epoch_report.val_loss, "train_loss": epoch_report.train_loss})
        if trainer.epochs_done < setup.finetune.epochs:
            report({**size, **history[-1]}, _checkpoint_writer(setup, policy, trainer, history))
    measured = measure(model, setup.space.input_shape, batch_size=64, device=setup.device,
                       repeats=setup.latency_repeats, threads=setup.threads)  # the base's thread count too
    test_accuracy = evaluate(model, setup.splits.test, device=setup.device, **fast)[0] if evaluate_test else None
    base = setup.base_metrics
    result = {
        **history[-1], "test_accuracy": test_accuracy,
        "macs": measured.macs, "params": measured.params, **measured.latency.to_json(),
        "macs_ratio": measured.macs / base["macs"], "params_ratio": measured.params / base["params"],
        "latency_ratio": measured.latency_ms / base["latency_ms"] if base.get("latency_ms") else None,
        "trial_seconds": time.perf_counter() - started, "history": history, COMPLETE_KEY: True,
    }
    report(result, _checkpoint_writer(setup, policy, trainer, history))
    return result


def _size_metrics(setup: TrialSetup, policy: Policy) -> dict:
    """MACs and their ratio from the space's estimate (exact for conv and linear layers)."""
    macs = setup.space.estimate_macs(policy)
    return {"macs": macs, "macs_ratio": macs / setup.space.base_macs}


def _checkpoint_writer(setup: TrialSetup, policy: Policy, trainer, history: list[dict]):
    """A function that writes the pruned model and the trainer state into a checkpoint directory."""
    from prunetune.pruning.surgery import save_pruned

    def write(directory: Path) -> None:
        save_pruned(Path(directory) / CHECKPOINT_MODEL, trainer.model, arch=setup.arch,
                    space=setup.space, policy=policy, extra={"history": history})
        torch.save({"trainer": trainer.state_dict(), "history": history},
                   Path(directory) / CHECKPOINT_STATE)

    return write
