"""One trial: prune the trained base model with a policy, fine-tune it, measure it.

``run_trial`` is plain Python (no Ray): Ray Tune calls it through ``search.trainable``, tests and
the benchmarks call it directly. It reports after BatchNorm recalibration (epoch 0) and after every
fine-tuning epoch, each report with the history and timing so far (a trial stopped early is
recorded with them). The last report always carries a checkpoint (the trial's model); an earlier
one carries one only where a retry would otherwise lose real work (``CheckpointSchedule``: at least
``checkpoint_min_s`` seconds since the last checkpoint, epoch 0 only for fine-tunes of 3 epochs or
more). It continues from such a checkpoint when one is given, so a retried trial does not start
over. It times its phases (``search.timing``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from prunetune.pruning.data import Splits
from prunetune.pruning.loader import make_loader
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace
from prunetune.pruning.train import TrainRecipe
from prunetune.search.timing import PhaseTimer

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
    # Set by a search (a fresh id each): the base model and calibration batches are built once per
    # worker process for it (``BASES``); None builds them for every trial.
    cache_key: str | None = None
    val_subset: float = 1.0  # the fraction of the validation split the intermediate reports score on
    evaluate_test: bool = True  # whether a trial scores itself on the test split (``search.test_eval``)
    finetune_splits: Splits | None = None  # the fine-tune's training data where not ``splits`` (a proxy's fraction)
    amp: str = "none"  # resources.amp: bf16 autocasts the forward passes (pruning.train.autocast)
    channels_last: bool = False  # resources.channels_last: the model and its inputs in NHWC memory order
    # The search's checkpoint_min_s, which its policy trials pass to ``run_trial`` (``search.trainable``);
    # a learner's fine-tune and the final fine-tune checkpoint every epoch (run_trial's default, 0).
    checkpoint_min_s: float = 0.0


# report(metrics, checkpoint_dir_writer or None); the writer saves a checkpoint into a directory.
Report = Callable[[dict, Callable[[Path], None] | None], None]


def build_base_model(setup: TrialSetup) -> nn.Module:
    from prunetune.pruning.models import create_from_arch

    model = create_from_arch(setup.arch)
    model.load_state_dict(setup.base_state)
    return model.to(setup.device)


def on_device(setup: TrialSetup) -> TrialSetup:
    """``setup`` with its in-memory splits on its device where they fit (``Splits.on_device``), so
    the batches of every epoch are made on the device.

    Each dataset keeps its copy; and since Ray hands every trial its setup (and so its splits)
    anew, a search's moved splits are also kept per worker process (``RESIDENT``, by ``cache_key``
    as the base model is): a worker's later trials move nothing. A proxy's ``finetune_splits``
    shares the moved validation and test splits; only its training fraction moves per trial.
    """
    if setup.cache_key is None or torch.device(setup.device).type == "cpu":
        splits = setup.splits.on_device(setup.device)
    else:
        splits = RESIDENT.get((setup.cache_key, str(setup.device)), lambda: setup.splits.on_device(setup.device))
    finetune = setup.finetune_splits
    if finetune is not None:
        shared = {part: getattr(splits, part) for part in ("train", "val", "test")
                  if getattr(finetune, part) is getattr(setup.splits, part)}
        finetune = replace(finetune, **shared).on_device(setup.device)
    return replace(setup, splits=splits, finetune_splits=finetune)


def calibration_batches(setup: TrialSetup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``calibration_batches`` batches of the training split, shuffled by the search seed."""
    loader = make_loader(setup.splits.train, 64, shuffle=True, seed=setup.seed)
    batches = []
    for x, y in loader:
        batches.append((x.to(setup.device), y.to(setup.device)))
        if len(batches) == setup.calibration_batches:
            break
    return batches


def prune_for_trial(setup: TrialSetup, policy: Policy, timer: PhaseTimer | None = None) -> nn.Module:
    """The base model pruned to ``policy`` with the search's criterion, BatchNorm recalibrated.

    ``timer`` counts the three steps as ``load``, ``prune`` (calibration batches, tracing, cutting)
    and ``bn_recalibration``.
    """
    from prunetune.pruning.surgery import prune
    from prunetune.pruning.train import recalibrate_bn

    timer = timer or PhaseTimer()
    with timer.phase("load"):
        if setup.cache_key is None:
            base, calib = build_base_model(setup), None
        else:  # built once per worker process and search (``BASES``)
            base, calib = BASES.get((setup.cache_key, str(setup.device)),
                                    lambda: (build_base_model(setup), calibration_batches(setup)))
    with timer.phase("prune"):
        pruned = prune(base, setup.space, policy, setup.importance, calib or calibration_batches(setup))
    if setup.bn_recalibration_batches:
        with timer.phase("bn_recalibration"):
            recalibrate_bn(pruned, setup.splits.train, batches=setup.bn_recalibration_batches,
                           seed=setup.seed, device=setup.device, amp=setup.amp,
                           channels_last=setup.channels_last)
    return pruned


def run_trial(setup: TrialSetup, policy: Policy, *, seed: int, report: Report,
              checkpoint_dir: Path | None = None, evaluate_test: bool | None = None,
              timer: PhaseTimer | None = None, checkpoint_min_s: float = 0.0) -> dict:
    """Prune, recalibrate, fine-tune (reporting each epoch), evaluate and measure; return the result.

    ``checkpoint_dir`` is a checkpoint this trial wrote earlier: training continues after its epoch.
    The result holds ``val_accuracy`` (what searchers see: on the full validation split; the
    intermediate reports on ``setup.val_subset`` of it), ``test_accuracy`` (None unless
    ``evaluate_test``, default ``setup.evaluate_test``: a search evaluates the test split for its
    reportable trials only, at its end, ``search.test_eval``), ``macs``, ``params``, ``latency_ms``
    and their ratios to the base model, and ``timing``: seconds per phase (``search.timing``), from
    ``timer`` where given (a learner's trial: its learning timed already), else from now.
    ``checkpoint_min_s``: an intermediate report carries a checkpoint only when this attempt has run
    at least that many seconds since its start or its last checkpoint (``CheckpointSchedule``); 0 =
    after every epoch (epoch 0 as ``_worth_resuming`` says). The last report always carries one.
    """
    from prunetune.pruning.surgery import load_pruned
    from prunetune.pruning.train import Trainer, evaluate

    timer = PhaseTimer() if timer is None else timer
    schedule = CheckpointSchedule(setup.finetune.epochs, checkpoint_min_s, saved_at=time.perf_counter())
    evaluate_test = setup.evaluate_test if evaluate_test is None else evaluate_test
    setup = on_device(setup)
    torch.manual_seed(seed)
    if checkpoint_dir is not None:
        with timer.phase("load"):
            model, _ = load_pruned(Path(checkpoint_dir) / CHECKPOINT_MODEL, map_location=setup.device)
            model = model.to(setup.device)
            state = torch.load(Path(checkpoint_dir) / CHECKPOINT_STATE, map_location=setup.device,
                               weights_only=True)
        timer.resume(state.get("timing"))
    else:
        model, state = prune_for_trial(setup, policy, timer), None
    size = _size_metrics(setup, policy)
    val = _validation(setup)
    splits = replace(setup.finetune_splits or setup.splits, val=val.intermediate)
    trainer = Trainer(model, splits, setup.finetune, seed=seed, device=setup.device,
                      distillation=setup.distillation, amp=setup.amp, channels_last=setup.channels_last)
    fast = {"amp": setup.amp, "channels_last": setup.channels_last}  # evaluate's forward passes
    epochs = setup.finetune.epochs
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        history = list(state["history"])
    else:
        with timer.phase("evaluate"):
            val_accuracy, val_loss = evaluate(model, val.at_epoch(0, epochs), device=setup.device, **fast)
        history = [{"epoch": 0, "val_accuracy": val_accuracy, "val_loss": val_loss,
                    "val_images": len(val.at_epoch(0, epochs))}]
        due = schedule.due(0, time.perf_counter())
        timed_report(timer, report, {**size, **history[-1], **_so_far(history, timer)},
                     _checkpoint_writer(setup, policy, trainer, history, timer) if due else None)
    for epoch_report in trainer.remaining_epochs():
        timer.add("train", epoch_report.seconds - epoch_report.val_seconds)
        timer.add("evaluate", epoch_report.val_seconds)
        history.append({"epoch": epoch_report.epoch + 1, "val_accuracy": epoch_report.val_accuracy,
                        "val_loss": epoch_report.val_loss, "train_loss": epoch_report.train_loss,
                        "val_images": len(val.intermediate)})
        if trainer.epochs_done < epochs:
            due = schedule.due(trainer.epochs_done, time.perf_counter())
            timed_report(timer, report, {**size, **history[-1], **_so_far(history, timer)},
                         _checkpoint_writer(setup, policy, trainer, history, timer) if due else None)
    if epochs and val.subset_used:  # the last report's score is on the full validation split
        with timer.phase("evaluate"):
            val_accuracy, val_loss = evaluate(model, setup.splits.val, device=setup.device, **fast)
        history[-1] = {**history[-1], "val_accuracy": val_accuracy, "val_loss": val_loss,
                       "val_images": len(setup.splits.val)}
    with timer.phase("latency"):
        measured = _measure(setup, policy, model)
    with timer.phase("evaluate"):
        test_accuracy = evaluate(model, setup.splits.test, device=setup.device, **fast)[0] if evaluate_test else None
    base = setup.base_metrics
    timing = timer.to_json()
    result = {
        **history[-1], "test_accuracy": test_accuracy,
        "macs": measured.macs, "params": measured.params, **measured.latency.to_json(),
        "macs_ratio": measured.macs / base["macs"], "params_ratio": measured.params / base["params"],
        "latency_ratio": measured.latency_ms / base["latency_ms"] if base.get("latency_ms") else None,
        "trial_seconds": timing["wall"], "timing": timing, "history": history, COMPLETE_KEY: True,
    }
    # The last checkpoint: the model a search's end evaluates on the test split, and exports. Its
    # write is added to ``timing`` (the same dict) as it runs, before the report is sent.
    report(result, _timed_into(timing, _checkpoint_writer(setup, policy, trainer, history, timer)))
    return result


def _so_far(history: list[dict], timer: PhaseTimer) -> dict:
    """What an intermediate report carries of the trial so far: its ``history`` (every epoch
    reported) and ``timing``, so a trial that ASHA stops after this report is recorded with both."""
    return {"history": [dict(row) for row in history], "timing": timer.to_json()}


def _size_metrics(setup: TrialSetup, policy: Policy) -> dict:
    """MACs and their ratio from the space's estimate (exact for conv and linear layers)."""
    macs = setup.space.estimate_macs(policy)
    return {"macs": macs, "macs_ratio": macs / setup.space.base_macs}


@dataclass(frozen=True)
class Validation:
    """The validation images a trial's reports score on: ``intermediate`` (a fixed ``val_subset``
    of the split, drawn with the search seed, or all of it) before the last report, all of it then."""

    full: object  # torch Dataset
    intermediate: object

    @property
    def subset_used(self) -> bool:
        return self.intermediate is not self.full

    def at_epoch(self, epoch: int, epochs: int):
        return self.full if epoch >= epochs else self.intermediate


def _validation(setup: TrialSetup) -> Validation:
    full = setup.splits.val
    count = max(1, round(setup.val_subset * len(full)))
    if count >= len(full):
        return Validation(full, full)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(setup.seed))
    return Validation(full, full.subset(order[:count].sort().values))


def _worth_resuming(epoch: int, epochs: int) -> bool:
    """Whether the report after ``epoch`` (0: after BatchNorm recalibration) of ``epochs`` may carry
    a checkpoint at all.

    Every epoch before the last may (the last report carries the final checkpoint). Epoch 0 only
    for fine-tunes of 3 epochs or more: before that, a retried trial redoes the pruning and
    recalibration from the base model in about the time a checkpoint costs to write and read back.
    """
    return 0 < epoch < epochs or (epoch == 0 and epochs >= 3)


@dataclass
class CheckpointSchedule:
    """Which of a trial's intermediate reports carry a checkpoint: those after which a retry would
    otherwise lose real work (issue 15).

    A report of ``epoch`` carries one when ``_worth_resuming`` allows it and the trial has run at
    least ``min_seconds`` (by its own clock, ``time.perf_counter`` as its ``PhaseTimer``) since
    ``saved_at``: its start, its resume from a checkpoint, or its last checkpoint. Under Ray Tune
    an intermediate checkpoint is not free: the trial writes it, the report becomes two round
    trips to the driver (the result, then Tune's save), and the driver forces an experiment-state
    snapshot (``CheckpointConfig(num_to_keep=1)``, ``search.tuner``). That is paid at every epoch,
    a retry is rare: below ``min_seconds`` of work, redoing it on a retry costs less than saving
    it every time (BENCHMARKS.md, "Throughput"). No scheduler of prunetune's pauses trials (ASHA
    stops them, FIFO runs them to the end), so none needs a checkpoint at an epoch the rule skips;
    one that pauses and resumes trials (PBT) would need ``min_seconds`` 0. ``min_seconds`` 0
    checkpoints every epoch ``_worth_resuming`` allows. One per trial attempt; ``due`` moves
    ``saved_at``.
    """

    epochs: int
    min_seconds: float
    saved_at: float  # time.perf_counter() at the trial's start, its resume or its last checkpoint

    def due(self, epoch: int, now: float) -> bool:
        """Whether the report after ``epoch`` carries a checkpoint (``now``: the trial's clock); if
        it does, the trial's work is saved as of ``now``."""
        if not _worth_resuming(epoch, self.epochs) or now - self.saved_at < self.min_seconds:
            return False
        self.saved_at = now
        return True


@dataclass(frozen=True)
class Measured:
    """What a trial records of its model's cost: MACs, parameters (counts) and single-sample latency."""

    macs: int
    params: int
    latency: object  # pruning.measure.Latency

    @property
    def latency_ms(self) -> float:
        return self.latency.ms


class ProcessCache:
    """What a worker process computes once and its trials reuse, bounded, oldest entries dropped first.

    Ray runs a worker's trials one after another in one process (``reuse_actors``) and hands each
    its setup anew, so nothing the trainable holds outlives a trial; these per-process caches do
    (one instance each below, like ``functools.lru_cache``). ``BASES``: the base model and the
    calibration batches of the search now running, by ``TrialSetup.cache_key`` (trials copy the
    model, never change it); ``MEASURED``: MACs, parameters and latency by architecture (kept
    channels per group and dropped blocks), which do not depend on the weights, so each
    architecture is timed once: a later trial of it reports the first one's latency.
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, compute: Callable):
        if key not in self._entries:
            self._entries[key] = compute()
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return self._entries[key]


BASES = ProcessCache(size=1)
RESIDENT = ProcessCache(size=1)  # by cache_key and device: the search's splits moved to the GPU (``on_device``)
MEASURED = ProcessCache(size=256)


def _measure(setup: TrialSetup, policy: Policy, model: nn.Module) -> Measured:
    """The trial model's MACs, parameters and latency (as ``pruning.measure.measure`` times a single
    sample), once per architecture in this process."""
    import json

    from prunetune.pruning.measure import count_macs, count_params, time_latency

    def compute() -> Measured:
        shape = setup.space.input_shape
        return Measured(count_macs(model, shape), count_params(model),
                        time_latency(model, shape, batch_size=1, repeats=setup.latency_repeats,
                                     device=setup.device, threads=setup.threads))

    key = (json.dumps(setup.arch, sort_keys=True, default=str), tuple(setup.space.input_shape),
           json.dumps(setup.space.channels(policy), sort_keys=True), tuple(policy.dropped_blocks),
           str(setup.device), setup.threads, setup.latency_repeats)
    return MEASURED.get(key, compute)


def timed_report(timer: PhaseTimer, report: Report, metrics: dict, writer) -> None:
    """``report`` the metrics, its checkpoint write counted as ``checkpoint``, the rest as ``report``
    (Ray's report waits for the driver to take the result)."""
    started, written = time.perf_counter(), timer.seconds.get("checkpoint", 0.0)
    report(metrics, timer.timed("checkpoint", writer))
    timer.add("report", time.perf_counter() - started - (timer.seconds.get("checkpoint", 0.0) - written))


def _timed_into(timing: dict, write: Callable[[Path], None]) -> Callable[[Path], None]:
    """``write`` adding its seconds to ``timing["checkpoint"]`` (and ``wall``) as it runs."""

    def timed_write(directory: Path) -> None:
        started = time.perf_counter()
        write(directory)
        seconds = time.perf_counter() - started
        timing["checkpoint"] = round(timing.get("checkpoint", 0.0) + seconds, 4)
        timing["wall"] = round(timing["wall"] + seconds, 4)

    return timed_write


def _checkpoint_writer(setup: TrialSetup, policy: Policy, trainer, history: list[dict], timer: PhaseTimer):
    """A function that writes the pruned model and the trainer state into a checkpoint directory
    (with the trial's timing so far, which a retried trial continues)."""
    from prunetune.pruning.surgery import save_pruned

    def write(directory: Path) -> None:
        save_pruned(Path(directory) / CHECKPOINT_MODEL, trainer.model, arch=setup.arch,
                    space=setup.space, policy=policy, extra={"history": history})
        torch.save({"trainer": trainer.state_dict(), "history": history, "timing": timer.to_json()},
                   Path(directory) / CHECKPOINT_STATE)

    return write
