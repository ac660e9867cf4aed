"""The driver's callbacks without a search: the trial log's records and the progress line on resume."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

from prunetune.search.callbacks import (
    ProgressLine,
    TrialRecorder,
    resume_progress,
    reusable_results,
)
from prunetune.search.trainable import config_key
from prunetune.search.trial import COMPLETE_KEY, REUSED_KEY
from prunetune.tracking.rundir import TRIALS_FILE, file_sha256, read_trials


@dataclass
class FakeTrial:
    trial_id: str
    last_result: dict
    config: dict = field(default_factory=lambda: {"policy": {"keep": {}}, "proposal_id": "p", "seed": 0})
    checkpoint: object = None
    status: str = "TERMINATED"


def recorded(trial_id: str, value: float, status: str = "finished") -> dict:
    return {"trial_id": trial_id, "trial_key": f"u:{trial_id}", "status": status,
            "metrics": {"val_accuracy": value, "macs_ratio": 0.5, "epoch": 1.0}, "test_accuracy": value,
            "history": [], "policy": None, "seconds": 3.0, "config_key": f"k{trial_id}"}


def test_resume_starts_the_count_and_the_best_from_the_recorded_trials():
    records = [recorded(f"t{i}", v) for i, v in enumerate((0.41, 0.8681, 0.62, 0.55, 0.70, 0.4931))]
    stream = io.StringIO()
    progress = ProgressLine(10, stream=stream)
    progress.started -= 600  # the first process ran for ten minutes: none of it counts after a resume
    progress.resume(records)
    assert (progress.finished, progress.best) == (6, 0.8681)
    progress.on_trial_complete(0, [], FakeTrial("t5", {"val_accuracy": 0.4931}))  # Ray hands back a recorded one
    assert progress.finished == 6 and stream.getvalue() == ""
    progress.on_trial_complete(0, [], FakeTrial("t6", {"val_accuracy": 0.5, "macs_ratio": 0.5, COMPLETE_KEY: True}))
    line = stream.getvalue()
    assert line.startswith("[7/10] trial t6 done") and "best 0.8681" in line
    assert "~0.0 min left" in line  # three trials left at the pace of this process, not of the first


def test_the_progress_lines_best_is_the_summarys_and_each_ending_says_how_it_ended():
    """A stopped trial's partial score, a proxy's and one over the MACs limit never count as the best;
    a stopped trial names its last epoch, a failed one the first line of its cause."""
    stream = io.StringIO()
    progress = ProgressLine(5, macs_limit=0.55, stream=stream)
    full = {"policy": {"keep": {}}, "seed": 0}
    ends = [FakeTrial("s", {"val_accuracy": 0.95, "macs_ratio": 0.5, "macs": 9.0, "epoch": 1}, full),
            FakeTrial("p", {"val_accuracy": 0.9, "macs_ratio": 0.5, "macs": 9.0, COMPLETE_KEY: True},
                      {**full, "finetune_epochs": 0}),
            FakeTrial("o", {"val_accuracy": 0.85, "macs_ratio": 0.7, "macs": 14.0, COMPLETE_KEY: True}, full),
            FakeTrial("f", {"val_accuracy": 0.6, "macs_ratio": 0.5, "macs": 9.0, COMPLETE_KEY: True}, full)]
    for trial in ends:
        progress.on_trial_complete(0, [], trial)
    failed = SimpleNamespace(trial_id="x", last_result={}, config=full, checkpoint=None, get_error=lambda: None,
                             get_pickled_error=lambda: ValueError("the policy is wrong\nsecond line"))
    progress.on_trial_error(0, [], failed)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/5] trial s stopped early after epoch 1: val_accuracy 0.9500, MACs ratio 0.500; "
                               "best -;")
    assert [line.split("; best ")[1].split(";")[0] for line in lines] == ["-", "-", "-", "0.6000", "0.6000"]
    assert lines[3].startswith("[4/5] trial f done: val_accuracy 0.6000")
    assert lines[4].startswith("[5/5] trial x failed: ValueError: the policy is wrong; best 0.6000")
    assert progress.best_record["trial_id"] == "f"


def test_a_stopped_trial_is_recorded_with_the_epochs_it_reported_and_its_timing(tmp_path):
    recorder = TrialRecorder(tmp_path, "u", tracking_uri="sqlite:///x.db", experiment="e", parent_run_id=None,
                             params={})
    history = [{"epoch": 0, "val_accuracy": 0.2}, {"epoch": 1, "val_accuracy": 0.3}]
    result = {"val_accuracy": 0.3, "macs_ratio": 0.5, "epoch": 1, "history": history,
              "timing": {"train": 1.0, "wall": 2.0, "started_at": 100.0}}
    recorder.on_trial_complete(0, [], FakeTrial("t3", result))
    [record] = read_trials(tmp_path / TRIALS_FILE)
    assert record["status"] == "stopped" and record["history"] == history
    assert record["timing"]["wall"] == 2.0 and "logging" in record["timing"]


def test_resume_progress_reaches_the_progress_line_ray_restored(tmp_path):
    (tmp_path / TRIALS_FILE).write_text("".join(json.dumps(recorded(f"t{i}", 0.5 + i / 10)) + "\n" for i in range(3)))
    restored = ProgressLine(5)
    tuner = SimpleNamespace(_local_tuner=SimpleNamespace(
        get_run_config=lambda: SimpleNamespace(callbacks=[object(), restored])))
    resume_progress(tuner, tmp_path)
    assert (restored.finished, round(restored.best, 4)) == (3, 0.7)


def test_a_progress_line_pickled_by_an_older_version_resumes():
    old = ProgressLine(4)
    state = {k: v for k, v in old.__getstate__().items() if k not in ("session_finished", "counted")}
    revived = ProgressLine.__new__(ProgressLine)
    revived.__setstate__(state)
    revived.resume([recorded("t0", 0.3)])
    assert revived.finished == 1


def test_a_record_names_its_checkpoint_relative_to_the_run_with_its_digest(tmp_path):
    checkpoint = tmp_path / "trial_t1" / "checkpoint_000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"weights")
    recorder = TrialRecorder(tmp_path, "u", tracking_uri="sqlite:///x.db", experiment="e", parent_run_id=None,
                             params={})
    result = {"val_accuracy": 0.5, "macs_ratio": 0.4, COMPLETE_KEY: True, "latency_ms": 1.0,
              "latency_iqr_ms": 0.1, "latency_repeats": 20, "latency_load_avg": 0.5}
    recorder.on_trial_complete(0, [], FakeTrial("t1", result, checkpoint=SimpleNamespace(path=str(checkpoint))))
    [record] = read_trials(tmp_path / TRIALS_FILE)
    assert record["checkpoint"] == "trial_t1/checkpoint_000003"
    assert record["checkpoint_sha256"] == file_sha256(checkpoint / "model.pt")
    assert record["metrics"]["latency_iqr_ms"] == 0.1 and record["metrics"]["latency_repeats"] == 20
    assert record["config_key"] == config_key({"policy": {"keep": {}}, "seed": 0})


def test_a_trial_that_hands_back_its_recorded_result_is_not_recorded_again(tmp_path):
    recorder = TrialRecorder(tmp_path, "u", tracking_uri="sqlite:///x.db", experiment="e", parent_run_id=None,
                             params={})
    recorder.on_trial_complete(0, [], FakeTrial("t9", {"val_accuracy": 0.5, REUSED_KEY: "t1"}))
    assert read_trials(tmp_path / TRIALS_FILE) == []


def test_reusable_results_by_id_and_by_config_leave_failed_trials_to_run_again():
    records = [recorded("t1", 0.8), recorded("t2", 0.6, "stopped"), recorded("t3", 0.0, "failed")]
    reusable = reusable_results(records)
    assert sorted(reusable["by_id"]) == ["t1", "t2"] and sorted(reusable["by_config"]) == ["kt1", "kt2"]
    assert reusable["by_id"]["t1"][COMPLETE_KEY] is True and reusable["by_id"]["t2"][COMPLETE_KEY] is False
    assert reusable["by_id"]["t1"]["val_accuracy"] == 0.8 and reusable["by_id"]["t1"][REUSED_KEY] == "t1"


def test_the_config_key_ignores_the_searchers_bookkeeping():
    config = {"policy": {"keep": {"a": 0.5}}, "seed": 0, "role": "random"}
    assert config_key({**config, "proposal_id": "p7", "estimated_macs_ratio": 0.5}) == config_key(config)
    assert config_key({**config, "seed": 1}) != config_key(config)


def test_a_method_of_one_policy_plans_one_trial_and_says_so_once():
    from prunetune.methods.registry import make_searcher
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.models import create_model
    from prunetune.search.tuner import planned_trials

    space = build_space(create_model("small_cnn", num_classes=10, in_channels=1), "small_cnn", (1, 8, 8))
    messages: list[str] = []
    for method, trials in (("uniform", 3), ("random", 3)):
        searcher = make_searcher(method, space, macs_target=0.5, seed=0, budget=trials, concurrency=1,
                                 options={"tolerance": 0.05})
        cfg = SimpleNamespace(trials=trials, method=method)
        planned = planned_trials(cfg, SimpleNamespace(policy_searcher=searcher), messages.append)
        assert planned == (1 if method == "uniform" else 3)
    assert messages == ["note: uniform proposes 1 policy, so 1 trial will run, not the 3 of --trials"]


def test_a_failed_trials_cause_is_read_from_the_next_source_when_one_is_unreadable(tmp_path):
    """A staged error.pkl that does not unpickle still leaves the staged error.txt to name the cause."""
    from prunetune.search.failures import trial_cause

    (tmp_path / "error.pkl").write_bytes(b"not a pickle")
    (tmp_path / "error.txt").write_text("Failure # 1\nValueError: the staged text\n")
    trial = SimpleNamespace(pickled_error_file=str(tmp_path / "error.pkl"), error_file=str(tmp_path / "error.txt"),
                            get_pickled_error=lambda: None, get_error=lambda: None)
    assert trial_cause(trial) == "ValueError: the staged text"
