"""A learner's trial: learn the policy on a copy of the base model, then run it as a policy trial.

DESIGN.md, concept 6: the trial "gets a policy (given, or learned)". ``run_learner_trial`` is plain
Python (no Ray), like ``search.trial.run_trial``:

1. learn: the learner trains a copy of the trained base model with the trial's hyperparameters,
   reporting its progress (``learn_step``, ``val_accuracy`` of the masked model, ``macs_ratio``,
   ``keep.<group>``) with a checkpoint of its whole state, so a retried or resumed trial continues
   mid-learning;
2. then exactly a policy trial (``run_trial``) on the *base* model with the learned policy: prune,
   recalibrate, fine-tune, measure. Its reports carry the policy and the learning (trajectory and
   summary), and its checkpoints the learned policy, so a retry during fine-tuning does not learn
   again.

Learning reports carry no ``epoch``: ASHA's rungs count fine-tuning epochs only. One ``PhaseTimer``
times both steps (``search.timing``): the learning as ``learning`` (its reports and checkpoints as
``report`` and ``checkpoint``), then the policy trial's phases; every checkpoint carries the timing
so far (``timing.json`` beside the learner's state and the learned policy; the fine-tune's own in
its trainer state), so a retried trial sums its attempts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prunetune.search.timing import LEARNING, PhaseTimer
from prunetune.search.trial import CHECKPOINT_MODEL, Report, TrialSetup, timed_report

LEARNER_STATE = "learner.pt"
LEARNED_FILE = "learned.json"
TIMING_FILE = "timing.json"  # the trial's timing so far, in a checkpoint written before fine-tuning's own


@dataclass(frozen=True)
class LearnerJob:
    """What every trial of a learner's search shares: the method, its options, the MACs target."""

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    macs_target: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __reduce__(self):  # MappingProxyType does not pickle; Ray pickles the job once per search
        return (LearnerJob, (self.method, dict(self.options), self.macs_target))

    def learner(self):
        from prunetune.methods.registry import make_learner

        return make_learner(self.method, self.options)


def run_learner_trial(setup: TrialSetup, job: LearnerJob, config: Mapping[str, Any], *, seed: int,
                      report: Report, checkpoint_dir: Path | None = None) -> dict:
    """Learn (or continue learning from ``checkpoint_dir``), then prune, fine-tune and measure.

    ``config`` holds the hyperparameters (other keys are ignored). Returns ``run_trial``'s result
    with ``policy`` and ``learning`` added.
    """
    from prunetune.methods.learner import Learned
    from prunetune.search.trial import run_trial

    timer = PhaseTimer()  # the whole trial's: its wall time and ``trial_seconds`` include the learning
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    finetuned = checkpoint if checkpoint is not None and (checkpoint / CHECKPOINT_MODEL).exists() else None
    if checkpoint is not None and finetuned is None and (checkpoint / TIMING_FILE).exists():
        timer.resume(json.loads((checkpoint / TIMING_FILE).read_text()))  # (run_trial resumes a fine-tune's)
    if checkpoint is not None and (checkpoint / LEARNED_FILE).exists():
        learned = Learned.from_json(json.loads((checkpoint / LEARNED_FILE).read_text()))
    else:
        learned = learn(setup, job, config, seed=seed, report=report, checkpoint_dir=checkpoint, timer=timer)
    learning = {"trajectory": [dict(row) for row in learned.trajectory], **learned.info}
    extra = {"policy": learned.policy.to_json(), "learning": learning}

    def finetune_report(metrics: dict, write_checkpoint) -> None:
        report({**metrics, **extra}, _with_learned(write_checkpoint, learned, timer))

    result = run_trial(setup, learned.policy, seed=seed, report=finetune_report, checkpoint_dir=finetuned,
                       timer=timer)
    return {**result, **extra}


def learn(setup: TrialSetup, job: LearnerJob, config: Mapping[str, Any], *, seed: int, report: Report,
          checkpoint_dir: Path | None, timer: PhaseTimer | None = None):
    """Run the learner on a copy of the base model, reporting progress with its state as checkpoints.

    ``timer`` counts it as ``learning``, less its reports (``report``) and checkpoint writes (``checkpoint``).
    """
    import torch

    from prunetune.methods.learner import LearnData
    from prunetune.search.trial import build_base_model, on_device

    timer = PhaseTimer() if timer is None else timer
    since = time.perf_counter()

    def learned_so_far() -> None:  # this attempt's learning since the last report, into ``timer``
        nonlocal since
        now = time.perf_counter()
        timer.add(LEARNING, now - since)
        since = now

    setup = on_device(setup)  # the learner's batches made on the trial's device too
    learner = job.learner()
    hparams = {r.name: config[r.name] for r in learner.hparam_ranges() if r.name in config}
    state = None
    if checkpoint_dir is not None and (checkpoint_dir / LEARNER_STATE).exists():
        state = torch.load(checkpoint_dir / LEARNER_STATE, map_location=setup.device, weights_only=True)
    data = LearnData(setup.space, setup.splits.train, setup.splits.val, setup.splits.info.augment,
                     setup.finetune, seed, setup.device)

    def learn_report(progress, learner_state) -> None:
        nonlocal since
        metrics = {**progress.metrics, "learn_step": progress.step, "learn_total_steps": progress.total_steps}
        learned_so_far()
        timed_report(timer, report, metrics, None if learner_state is None else _state_writer(learner_state, timer))
        since = time.perf_counter()

    torch.manual_seed(seed)
    try:
        return learner.learn(build_base_model(setup), data, job.macs_target, hparams, learn_report, state=state)
    finally:
        learned_so_far()


def _state_writer(state: dict, timer: PhaseTimer):
    import torch

    def write(directory: Path) -> None:
        torch.save(state, Path(directory) / LEARNER_STATE)
        _write_timing(directory, timer)

    return write


def _with_learned(write_checkpoint, learned, timer: PhaseTimer):
    """A checkpoint writer that also saves the learned policy and the timing so far (and writes those
    alone without a writer)."""

    def write(directory: Path) -> None:
        if write_checkpoint is not None:
            write_checkpoint(directory)
        (Path(directory) / LEARNED_FILE).write_text(json.dumps(learned.to_json()))
        _write_timing(directory, timer)

    return write


def _write_timing(directory: Path, timer: PhaseTimer) -> None:
    (Path(directory) / TIMING_FILE).write_text(json.dumps(timer.to_json()))
