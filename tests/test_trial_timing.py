"""A trial's time by phase, the validation subset of its intermediate epochs, and the test split
scored at a search's end for its reportable trials only (issue 15).

Plain Python trials on an untrained small_cnn (the figures, not the accuracy, are under test); the
end-to-end checks of a real search ride on the session's ``optuna_search`` (tests/test_search_e2e.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from prunetune.pruning.recipe import TrainRecipe
from prunetune.search.timing import PHASES, TRIAL_PHASES, driver_timing, overhead_seconds, timing_table


@pytest.fixture(scope="module")
def setup():
    from prunetune.pruning.data import load_dataset
    from prunetune.pruning.measure import measure
    from prunetune.pruning.models import create_model
    from prunetune.search.prepare import model_space
    from prunetune.search.trial import TrialSetup

    splits = load_dataset("digits", seed=0, image_size=8)
    space = model_space("small_cnn", splits.info)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    measured = measure(model, space.input_shape, batch_size=8, repeats=2)
    return TrialSetup(arch={"name": "small_cnn", "num_classes": 10, "in_channels": 1},
                      base_state=model.state_dict(),
                      base_metrics={"val_accuracy": 0.1, "test_accuracy": 0.1, "macs": measured.macs,
                                    "params": measured.params, "latency_ms": measured.latency_ms},
                      space=space, splits=splits, finetune=TrainRecipe(epochs=2, lr=0.01, batch_size=64),
                      bn_recalibration_batches=2, latency_repeats=2, val_subset=0.25, evaluate_test=False,
                      cache_key="test-trial-timing")


def half(space):
    from prunetune.pruning.policy import Policy

    return Policy({g.name: 0.5 for g in space.groups})


def keep_reports(folder: Path):
    """A ``report`` that keeps every report's metrics and writes its checkpoints under ``folder``."""
    reports = []

    def report(metrics, write):
        reports.append(json.loads(json.dumps(metrics)))
        if write is not None:
            (folder / str(len(reports))).mkdir(parents=True)
            write(folder / str(len(reports)))

    return reports, report


def test_the_phases_are_timed_and_sum_to_no_more_than_the_trial(setup, tmp_path):
    from prunetune.search.trial import run_trial

    reports, report = keep_reports(tmp_path)
    started = time.perf_counter()
    result = run_trial(setup, half(setup.space), seed=0, report=report)
    wall = time.perf_counter() - started
    timing = reports[-1]["timing"]
    assert set(TRIAL_PHASES) <= set(timing) and "resumed" not in timing
    assert all(timing[p] > 0 for p in TRIAL_PHASES), timing
    assert sum(timing[p] for p in TRIAL_PHASES) <= timing["wall"] <= wall + 1e-3
    assert result["trial_seconds"] == pytest.approx(timing["wall"])
    assert timing["started_at"] == pytest.approx(time.time() - wall, abs=1.0)
    # 2 epochs, checkpoint_min_s 0 (run_trial's default): the epoch-0 report carries no checkpoint (a
    # retry redoes the pruning), epoch 1's and the last do
    assert [r["epoch"] for r in reports] == [0, 1, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]


def test_every_report_carries_the_history_and_timing_so_far(setup, tmp_path):
    """So a trial ASHA stops after any report is recorded with the epochs it ran and its time."""
    from prunetune.search.trial import run_trial

    reports, report = keep_reports(tmp_path)
    run_trial(setup, half(setup.space), seed=0, report=report)
    assert [[row["epoch"] for row in r["history"]] for r in reports] == [[0], [0, 1], [0, 1, 2]]
    assert all(r["history"][-1]["val_accuracy"] == r["val_accuracy"] for r in reports)
    walls = [r["timing"]["wall"] for r in reports]
    assert walls == sorted(walls) and walls[0] > 0 and "train" in reports[1]["timing"]


def test_intermediate_epochs_score_the_val_subset_and_the_last_the_whole_split(setup, tmp_path):
    from prunetune.pruning.train import evaluate
    from prunetune.search.trial import CHECKPOINT_MODEL, run_trial

    reports, report = keep_reports(tmp_path)
    result = run_trial(setup, half(setup.space), seed=0, report=report)
    full, subset = len(setup.splits.val), round(0.25 * len(setup.splits.val))
    assert [h["val_images"] for h in result["history"]] == [subset, subset, full]
    assert result["test_accuracy"] is None  # the search scores the test split of its reportable trials
    from prunetune.pruning.surgery import load_pruned

    model, _ = load_pruned(tmp_path / "3" / CHECKPOINT_MODEL)  # the last checkpoint is the final model
    assert result["val_accuracy"] == pytest.approx(evaluate(model, setup.splits.val)[0])
    assert reports[-1]["val_accuracy"] == result["val_accuracy"]


def test_a_resumed_trial_sums_its_attempts_and_says_so(setup, tmp_path):
    import torch

    from prunetune.search.trial import CHECKPOINT_STATE, run_trial

    reports, report = keep_reports(tmp_path / "first")
    run_trial(setup, half(setup.space), seed=0, report=report)
    saved = torch.load(tmp_path / "first" / "2" / CHECKPOINT_STATE, weights_only=True)["timing"]  # after epoch 1
    again, report = keep_reports(tmp_path / "again")
    result = run_trial(setup, half(setup.space), seed=0, report=report, checkpoint_dir=tmp_path / "first" / "2")
    timing = result["timing"]
    assert timing["resumed"] is True and [r["epoch"] for r in again] == [2]
    assert timing["started_at"] == pytest.approx(reports[-1]["timing"]["started_at"])  # the first attempt's
    assert timing["train"] > saved["train"] and timing["wall"] > saved["wall"]  # epoch 1 earlier, epoch 2 now
    assert timing["prune"] == pytest.approx(saved["prune"])  # pruned once, in the first attempt


def checkpointed_epochs(epochs: int, min_s: float, seconds: list[float]) -> list[int]:
    """The intermediate reports (epochs 0 .. epochs-1) that ``CheckpointSchedule`` gives a checkpoint,
    when reaching report ``e`` takes ``seconds[e]`` (recalibration's, then each epoch's)."""
    from prunetune.search.trial import CheckpointSchedule

    schedule, now = CheckpointSchedule(epochs, min_s, saved_at=100.0), 100.0
    due = []
    for epoch in range(epochs):
        now += seconds[epoch]
        if schedule.due(epoch, now):
            due.append(epoch)
    return due


@pytest.mark.parametrize("epochs, min_s, seconds, expected", [
    (5, 0.0, [1, 1, 1, 1, 1], [0, 1, 2, 3, 4]),  # 0: every epoch, as before
    (2, 0.0, [1, 1], [1]),  # epoch 0 only for fine-tunes of 3 epochs or more
    (1, 0.0, [1], []),  # one epoch: the last report's checkpoint only
    (5, 30.0, [0.1, 1, 1, 1, 1], []),  # 1-s epochs (the benchmark's short trials): none
    (5, 30.0, [2, 20, 20, 20, 20], [2, 4]),  # 30 s of work since the start, then since that checkpoint
    (5, 30.0, [40, 10, 10, 10, 10], [0, 3]),  # a long recalibration is worth keeping
    (2, 30.0, [40, 40], [1]),  # but not before a 2-epoch fine-tune: epoch 0's rule still holds
    (4, 30.0, [0, 30, 29.9, 0.2], [1, 3]),  # at least min_s, measured from the last checkpoint
])
def test_an_intermediate_epoch_is_checkpointed_only_after_min_s_of_work(epochs, min_s, seconds, expected):
    assert checkpointed_epochs(epochs, min_s, seconds) == expected


def test_a_short_trial_reports_its_last_checkpoint_only_and_a_retry_starts_over(setup, tmp_path):
    from prunetune.search.trial import run_trial

    reports, report = keep_reports(tmp_path / "first")
    result = run_trial(setup, half(setup.space), seed=0, report=report, checkpoint_min_s=3600.0)
    assert [r["epoch"] for r in reports] == [0, 1, 2]
    assert [p.name for p in (tmp_path / "first").iterdir()] == ["3"]  # the final report's, with the result
    assert reports[-1]["val_accuracy"] == result["val_accuracy"] and result["timing"]["checkpoint"] > 0
    again, report = keep_reports(tmp_path / "again")  # a retry has no checkpoint: the same trial from its start
    retried = run_trial(setup, half(setup.space), seed=0, report=report, checkpoint_min_s=3600.0)
    assert [r["epoch"] for r in again] == [0, 1, 2] and "resumed" not in retried["timing"]
    assert [h["val_accuracy"] for h in retried["history"]] == pytest.approx([h["val_accuracy"] for h in result["history"]])


def test_latency_is_measured_once_per_architecture(setup, tmp_path):
    from prunetune.pruning.policy import Policy
    from prunetune.search.trial import _measure

    policy = half(setup.space)
    almost = Policy({k: v - 1e-3 for k, v in policy.keep_ratios.items()})  # the same channel counts
    assert setup.space.channels(almost) == setup.space.channels(policy)
    from prunetune.search.trial import prune_for_trial

    model = prune_for_trial(setup, policy)
    first = _measure(setup, policy, model)
    assert _measure(setup, almost, model) is first
    other = Policy({k: 0.75 for k in policy.keep_ratios})
    assert _measure(setup, other, prune_for_trial(setup, other)) is not first


def test_driver_timing_adds_scheduling_and_logging_and_the_table_shows_them():
    trial = {"load": 0.01, "prune": 0.1, "bn_recalibration": 0.05, "train": 2.0, "evaluate": 0.2,
             "latency": 0.05, "checkpoint": 0.04, "report": 0.02, "wall": 2.6, "started_at": 1000.5}
    timing = driver_timing(trial, created=1000.0, logging_s=0.003)
    assert timing["scheduling"] == pytest.approx(0.5) and timing["logging"] == pytest.approx(0.003)
    assert list(timing)[0] == "scheduling" and driver_timing(None, created=1.0, logging_s=0.0) is None
    assert overhead_seconds(timing) == pytest.approx(0.5 + 0.003 + 2.6 - 2.0 - 0.2)
    learner = {**timing, "learning": 3.0, "wall": 5.6}  # a learner's learning is its work, not overhead
    assert overhead_seconds(learner) == pytest.approx(overhead_seconds(timing))
    table = timing_table([{"trial_id": "t1", "timing": timing}, {"trial_id": "t2", "timing": {**timing, "resumed": True}},
                          {"trial_id": "old"}])
    lines = table.splitlines()
    assert lines[1].split()[1:] == ["sched", "learn", "load", "prune", "bn_recal", "train", "eval", "latency",
                                    "ckpt", "report", "logging", "other", "wall", "overhead"]
    assert lines[2].split()[2] == "-"  # a policy trial learned nothing
    assert lines[2].split()[0] == "t1" and lines[3].split()[:2] == ["t2", "R"] and lines[-1].startswith("mean")
    assert float(lines[2].split()[-1]) == pytest.approx(overhead_seconds(timing), abs=1e-3)
    assert float(lines[2].split()[-3]) == pytest.approx(0.13, abs=1e-3)  # other: wall less the phases
    assert len(PHASES) + 4 == len(lines[1].split())
    assert "no ended trial recorded a timing" in timing_table([{"trial_id": "old"}])


def test_reportable_trials_are_the_front_and_the_best():
    from prunetune.search.test_eval import reportable_trials

    def record(trial_id, val, macs_ratio, **extra):
        return {"trial_id": trial_id, "trial_key": f"k:{trial_id}", "status": "finished", "params": {},
                "metrics": {"val_accuracy": val, "macs": macs_ratio * 100, "macs_ratio": macs_ratio},
                "test_accuracy": None, **extra}

    records = [record("a", 0.8, 0.5), record("b", 0.7, 0.4), record("dominated", 0.6, 0.45),
               record("over", 0.9, 0.9), record("proxy", 0.95, 0.3, params={"finetune_epochs": 0}),
               {**record("stopped", 0.99, 0.2), "status": "stopped"}]
    assert reportable_trials(records, macs_limit=0.52) == ["a", "b", "over"]  # the best, a, is on the front


def test_the_recorder_logs_mlflow_off_the_driver_loop_and_flushes_before_the_summary(tmp_path):
    import pickle

    from prunetune.search.callbacks import TrialRecorder
    from prunetune.tracking.rundir import TRIALS_FILE, read_trials
    from prunetune.tracking.tracker import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e")
    parent = tracker.start_parent("uid", "r", {})
    recorder = TrialRecorder(tmp_path, "uid", tracking_uri=tracker.tracking_uri, experiment="e",
                             parent_run_id=parent, params={"method": "random"})
    for index in range(3):
        recorder.record({"trial_id": f"t{index}", "trial_key": f"uid:t{index}", "status": "finished", "policy": None,
                         "params": {}, "metrics": {"val_accuracy": 0.5, "macs_ratio": 0.5, "macs": 1.0, "params": 1.0},
                         "test_accuracy": None, "history": [],
                         "timing": {"learning": 0.25 * index, "train": 1.0, "wall": 1.5, "started_at": 1000.0,
                                    **({"resumed": True} if index else {})}})
    assert recorder._worker is not None and recorder._worker.name == "prunetune-mlflow"
    assert pickle.loads(pickle.dumps(recorder))._worker is None  # Ray pickles it with the tuner, thread left out
    assert [r["timing"]["logging"] >= 0 for r in read_trials(tmp_path / TRIALS_FILE)] == [True] * 3
    recorder.on_experiment_end([])
    children = tracker.client.search_runs([tracker.client.get_experiment_by_name("e").experiment_id],
                                          f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.data.tags["prunetune.trial_id"] for c in children) == ["t0", "t1", "t2"]
    assert recorder._worker is None
    recorded = {r["trial_id"]: r["timing"] for r in read_trials(tmp_path / TRIALS_FILE)}
    for child in children:  # the phases as timing.<phase>_s in one batch with the rest; no Unix time, no flag
        timing = recorded[child.data.tags["prunetune.trial_id"]]
        logged = {k: v for k, v in child.data.metrics.items() if k.startswith("timing.")}
        assert logged == pytest.approx({"timing.learning_s": timing["learning"], "timing.train_s": 1.0,
                                        "timing.wall_s": 1.5, "timing.logging_s": timing["logging"]})
