"""The run directory's one module (tracking/rundir.py): paths that survive a move, appends, identity."""

from __future__ import annotations

import json

import pytest

from prunetune.pruning.errors import UserError
from prunetune.tracking import rundir


def test_checkpoints_are_recorded_relative_to_the_experiment():
    assert rundir.relative_checkpoint("/old/place/runs/r/trial_a1/checkpoint_000002") == "trial_a1/checkpoint_000002"
    assert rundir.relative_checkpoint("trial_a1/checkpoint_000002/") == "trial_a1/checkpoint_000002"
    assert rundir.relative_checkpoint("bucket/prefix/r/trial_a1/checkpoint_000002") == "trial_a1/checkpoint_000002"
    assert rundir.relative_checkpoint(None) is None


def test_an_old_absolute_record_resolves_inside_the_moved_run(tmp_path):
    moved = tmp_path / "elsewhere" / "r"
    old = "/gone/runs/r/trial_a1/checkpoint_000002"
    assert rundir.local_checkpoint(moved, old) == moved / "trial_a1" / "checkpoint_000002"
    assert rundir.local_checkpoint(moved, "trial_a1/checkpoint_000002") == moved / "trial_a1" / "checkpoint_000002"


def test_a_trial_is_appended_once(tmp_path):
    record = {"trial_id": "a1", "trial_key": "u:a1", "status": "finished"}
    assert rundir.append_trial(tmp_path, record) is True
    assert rundir.append_trial(tmp_path, {**record, "status": "failed"}) is False
    assert rundir.read_trials(tmp_path / rundir.TRIALS_FILE) == [record]


def test_a_missing_folder_a_file_and_a_plain_folder_are_not_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "plain").mkdir()
    for path, says in ((tmp_path / "nosuch", "does not exist"), (tmp_path / "file", "not a folder"),
                       (tmp_path / "plain", "no prunetune.json")):
        with pytest.raises(UserError, match=says):
            rundir.read_meta(path)


def test_a_run_is_created_config_first_identity_last_and_a_failed_start_leaves_nothing(tmp_path):
    run_dir = tmp_path / "r"
    rundir.create_run_dir(run_dir, write_config=lambda path: path.write_text("model: x\n"), space={"s": 1})
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "space.json"]
    rundir.remove_unstarted_run_dir(run_dir)
    assert not run_dir.exists()

    rundir.create_run_dir(run_dir, write_config=lambda path: path.write_text("model: x\n"), space={})
    meta = rundir.new_meta(name="r", method="random", tracking_uri="sqlite:///x.db", experiment="e")
    rundir.write_meta(run_dir, meta)
    rundir.write_parent_run_id(run_dir, "p1")
    assert rundir.read_meta(run_dir)["parent_run_id"] == "p1"
    rundir.remove_unstarted_run_dir(run_dir)  # a run now: kept
    assert json.loads((run_dir / rundir.META_FILE).read_text())["run_uid"] == meta["run_uid"]
    with pytest.raises(UserError, match="resume it"):
        rundir.check_new_run_dir(run_dir)
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file"):
        rundir.check_new_run_dir(tmp_path / "f")


def test_the_run_directory_module_imports_neither_ray_nor_mlflow():
    import subprocess
    import sys

    code = ("import sys, prunetune.tracking.rundir; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
