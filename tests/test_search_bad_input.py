"""Bad input to `prunetune run`, `resume`, `status` and `export`: one line, exit 2, nothing created.

Each case runs the real CLI in a subprocess. "Nothing created": no run directory under the storage
folder and no base model in the cache; the checks all come before any training or Ray start.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.search_helpers import assert_user_error, run_cli

QUICK = ["--model", "small_cnn", "--dataset", "digits", "--image-size", "8", "--pretrain-epochs", "1"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


RUN_CASES = [
    ("unknown-method", ["--method", "anneal"], "unknown method 'anneal'"),
    ("unknown-model", ["--model", "resnet21"], "resnet21"),
    ("unknown-dataset", ["--dataset", "mnist"], "unknown dataset 'mnist'"),
    ("unknown-config-key", ["--set", "finetune.epoch=2"], "did you mean 'finetune.epochs'"),
    ("target-above-one", ["--macs-target", "1.5"], "macs_target"),
    ("target-zero", ["--macs-target", "0"], "--macs-target"),
    ("target-below-reach", ["--macs-target", "0.0001"], "MACs ratios from"),
    ("no-trials", ["--trials", "0"], "--trials"),
    ("bad-sampler-pair", ["--set", "optuna.sampler=nsga2"], "nsga2"),
]


@pytest.mark.parametrize(("extra", "fragment"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_bad_run_input_is_one_line_and_creates_nothing(tmp_path, extra, fragment):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    result = run_cli(["run", *QUICK, "--storage", str(storage), "--name", "r", *extra], cache=cache, cwd=tmp_path)
    assert_user_error(result, fragment)
    assert not (storage / "r").exists()
    assert not cache.exists()


def test_unreachable_tracking_server_is_refused_before_anything_runs(tmp_path):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    uri = f"http://127.0.0.1:{closed_port()}"
    result = run_cli(["run", *QUICK, "--storage", str(storage), "--name", "r", "--tracking-uri", uri],
                     cache=cache, cwd=tmp_path)
    assert_user_error(result, uri)
    assert not (storage / "r").exists() and not cache.exists()


def test_unreachable_ray_address_is_refused_before_anything_runs(tmp_path):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    address = f"127.0.0.1:{closed_port()}"
    result = run_cli(["run", *QUICK, "--storage", str(storage), "--name", "r", "--address", address],
                     cache=cache, cwd=tmp_path, timeout=180)
    assert_user_error(result, address)
    assert not (storage / "r").exists() and not cache.exists()


def test_a_used_run_name_says_how_to_resume_it(tmp_path):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    used = storage / "r"
    used.mkdir(parents=True)
    meta = {"format": 1, "name": "r", "run_uid": "u", "tracking_uri": "sqlite:///x.db", "experiment": "e"}
    (used / "prunetune.json").write_text(json.dumps(meta))
    before = sorted(p.name for p in used.iterdir())
    result = run_cli(["run", *QUICK, "--storage", str(storage), "--name", "r"], cache=cache, cwd=tmp_path)
    assert_user_error(result, f"prunetune resume {used}")
    assert sorted(p.name for p in used.iterdir()) == before and not cache.exists()


@pytest.mark.parametrize("command", [["resume"], ["status"], ["export", "--out", "model.pt"], ["sync"]])
def test_commands_on_a_folder_that_is_not_a_run_are_refused(tmp_path, command):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    result = run_cli([command[0], str(folder), *command[1:]], cache=tmp_path / "cache", cwd=tmp_path)
    assert_user_error(result, "prunetune.json")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "model.pt").exists()
