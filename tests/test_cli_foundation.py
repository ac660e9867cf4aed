"""The CLI's dispatcher and its `space` and `prune` commands, end to end on real code.

Commands run in-process through ``main([...])`` (fast); the start-up checks run ``prunetune`` in a
subprocess. The pruning runs train tiny models on scikit-learn's digits at 8x8 pixels for a few
epochs, once per module, with the base-model cache in a temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunetune.pruning.dependency import build_space
from prunetune.pruning.models import create_model
from prunetune.pruning.surgery import load_pruned
from prunetune.search.cli import COMMANDS, build_parser, main

MODEL = "tiny_resnet"
DATA = ["--dataset", "digits", "--image-size", "8"]
PRETRAIN = ["--pretrain-epochs", "2", "--calibration-batches", "4"]


def run_cli(argv: list[str]) -> tuple[int, str, str, float]:
    """``main(argv)`` with stdout and stderr captured: (exit status, stdout, stderr, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue(), time.perf_counter() - started


def prune_argv(cache: Path, *extra: str, model: str = MODEL) -> list[str]:
    return ["prune", "--model", model, *DATA, *PRETRAIN, "--cache-dir", str(cache), *extra]


def digits_space(model: str = MODEL):
    """The space `prunetune space` should report for ``model`` on 8x8 digits."""
    return build_space(create_model(model, num_classes=10, in_channels=1), model, (1, 8, 8))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The first `prune --uniform 0.5 --finetune-epochs 1 --json`: trains and caches the base model."""
    cache = tmp_path_factory.mktemp("cache")
    status, out, err, seconds = run_cli(prune_argv(cache, "--uniform", "0.5", "--finetune-epochs", "1", "--json"))
    assert status == 0, err
    return {"cache": cache, "result": json.loads(out), "stderr": err, "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# Start-up
# ----------------------------------------------------------------------------------------------


def prunetune_executable() -> str:
    beside_python = Path(sys.executable).parent / "prunetune"
    return str(beside_python) if beside_python.exists() else shutil.which("prunetune")


def test_help_answers_fast_and_lists_the_commands():
    started = time.perf_counter()
    done = subprocess.run([prunetune_executable(), "--help"], capture_output=True, text=True, timeout=30)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "space" in done.stdout and "prune" in done.stdout
    assert seconds < 1.5, f"prunetune --help took {seconds:.2f} s"


def test_importing_the_cli_imports_no_heavy_package():
    code = ("import sys, prunetune.search.cli; "
            "print(sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_command_module_is_registered_under_its_name():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(subparsers.choices) == [command.NAME for command in COMMANDS]
    for command in COMMANDS:
        assert subparsers.choices[command.NAME].get_default("handler") is command.run


def test_ctrl_c_exits_130_with_one_line_and_caches_nothing(tmp_path):
    cache = tmp_path / "cache"
    argv = [prunetune_executable(), *prune_argv(cache, "--uniform", "0.5")]
    argv[argv.index("--pretrain-epochs") + 1] = "500"
    # SIGINT's default disposition, as a terminal gives it: a suite started in the background
    # (`nohup ... &` from a script) ignores SIGINT, and a child would inherit that
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stderr:  # wait until training has started
            if line.startswith("pretrain epoch 1/"):
                break
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "prunetune: interrupted" and "Traceback" not in err
    assert out == ""
    assert not cache.exists() or list(cache.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# space
# ----------------------------------------------------------------------------------------------


def test_space_table_lists_groups_blocks_and_base_cost():
    status, out, err, _ = run_cli(["space", "--model", MODEL, *DATA])
    assert status == 0, err
    expected = digits_space()
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for group in expected.groups:
        assert rows[group.name][1:3] == [str(group.channels), str(group.min_channels)]
    assert "droppable blocks: layer1.0, layer1.1" in out
    assert f"({expected.base_macs:,})" in out and f"({expected.base_params:,})" in out
    assert "209.57K" in out  # human units for the base MACs


def test_space_json_is_the_space_and_nothing_else():
    status, out, err, _ = run_cli(["space", "--model", MODEL, *DATA, "--json"])
    assert status == 0, err
    data = json.loads(out)
    expected = digits_space()
    assert data["space_id"] == expected.space_id
    assert {g["name"]: g["channels"] for g in data["groups"]} == {g.name: g.channels for g in expected.groups}
    assert data["base_macs"] == expected.base_macs


# ----------------------------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------------------------


def test_prune_uniform_halves_the_model_and_reports_json(first_run):
    result = first_run["result"]
    assert set(result) == {"base", "pruned", "macs_ratio", "params_ratio", "policy", "importance",
                           "finetune_epochs", "latency"}
    for side in ("base", "pruned"):
        assert set(result[side]) == {"val_accuracy", "test_accuracy", "macs", "params", "latency_ms"}
        assert 0.0 <= result[side]["val_accuracy"] <= 1.0 and 0.0 <= result[side]["test_accuracy"] <= 1.0
        assert result[side]["latency_ms"] > 0
        timing = result["latency"][side]  # the spread behind the figure (issue 17, item 11)
        assert timing["latency_ms"] == result[side]["latency_ms"] and timing["latency_repeats"] == 20
        assert timing["latency_iqr_ms"] >= 0 and timing["latency_threads"] == 1
    assert "warning" in result["latency"]
    assert result["pruned"]["macs"] < result["base"]["macs"]
    assert result["macs_ratio"] < 0.7
    assert result["macs_ratio"] == pytest.approx(result["pruned"]["macs"] / result["base"]["macs"])
    assert set(result["policy"]["keep_ratios"].values()) == {0.5}
    assert (result["importance"], result["finetune_epochs"]) == ("l1", 1)
    assert "pretrain epoch 2/2" in first_run["stderr"] and "fine-tune epoch 1/1" in first_run["stderr"]


def test_second_prune_reuses_the_cached_base_model(first_run):
    cached = list(first_run["cache"].glob("*.pt"))
    assert len(cached) == 1
    written = cached[0].stat().st_mtime_ns
    status, out, err, seconds = run_cli(prune_argv(first_run["cache"], "--uniform", "0.5",
                                                   "--finetune-epochs", "1", "--json"))
    assert status == 0, err
    assert "pretrain epoch" not in err and f"loaded from {cached[0]}" in err
    assert cached[0].stat().st_mtime_ns == written
    assert json.loads(out)["base"]["val_accuracy"] == first_run["result"]["base"]["val_accuracy"]
    assert json.loads(out)["base"]["test_accuracy"] == first_run["result"]["base"]["test_accuracy"]
    assert seconds < first_run["seconds"]


def test_prune_with_a_policy_file_made_from_space_json(first_run, tmp_path):
    _, space_json, _, _ = run_cli(["space", "--model", MODEL, *DATA, "--json"])
    space = json.loads(space_json)
    ratios = {g["name"]: (1.0 if i == 0 else 0.5) for i, g in enumerate(space["groups"])}
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"space_id": space["space_id"], "keep_ratios": ratios,
                                       "dropped_blocks": ["layer1.1"]}))
    status, out, err, _ = run_cli(prune_argv(first_run["cache"], "--policy", str(policy_file), "--json"))
    assert status == 0, err
    result = json.loads(out)
    assert result["policy"] == {"space_id": space["space_id"], "keep_ratios": ratios, "dropped_blocks": ["layer1.1"]}
    assert result["finetune_epochs"] == 0
    assert result["pruned"]["macs"] < result["base"]["macs"]


def test_prune_out_saves_a_model_that_load_pruned_rebuilds(first_run, tmp_path):
    out_file = tmp_path / "pruned.pt"
    status, out, err, _ = run_cli(prune_argv(first_run["cache"], "--uniform", "0.5", "--importance", "taylor",
                                             "--out", str(out_file)))
    assert status == 0, err
    assert "MACs" in out and "pruned/base" in out and "val accuracy" in out  # the text table
    model, meta = load_pruned(out_file)
    space = digits_space()
    assert meta["policy"].space_id == space.space_id
    assert meta["arch"] == {"name": MODEL, "num_classes": 10, "in_channels": 1}
    assert model.get_submodule("layer2.0.conv1").out_channels == space.channels(meta["policy"])["layer2.0.conv1"]
    assert meta["extra"]["importance"] == "taylor"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.pt"]  # no temporary file left


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------


def _policy_file(folder: Path, policy: dict) -> str:
    path = folder / "policy.json"
    path.write_text(json.dumps(policy))
    return str(path)


def _uniform_ratios(space, ratio: float = 0.5) -> dict:
    return {name: ratio for name in space.group_names()}


def bad_input_cases():
    """(id, argv builder (work folder, cache, out) -> argv, expected text in the message)."""
    space = digits_space()
    other = digits_space("small_cnn")
    return [
        ("unknown-model", lambda w, c, o: prune_argv(c, "--uniform", "0.5", "--out", o, model="nope"),
         "unknown model 'nope'; choose one of:"),
        ("unknown-model-space", lambda w, c, o: ["space", "--model", "nope", *DATA], "tiny_resnet"),
        ("unknown-dataset", lambda w, c, o: ["space", "--model", MODEL, "--dataset", "mnist"],
         "unknown dataset 'mnist'; choose one of:"),
        ("unknown-criterion", lambda w, c, o: prune_argv(c, "--uniform", "0.5", "--importance", "magic", "--out", o),
         "unknown importance criterion 'magic'; choose one of:"),
        ("uniform-zero", lambda w, c, o: prune_argv(c, "--uniform", "0", "--out", o), "--uniform 0 is outside (0, 1]"),
        ("uniform-above-one", lambda w, c, o: prune_argv(c, "--uniform", "1.5", "--out", o), "outside (0, 1]"),
        ("uniform-not-a-number", lambda w, c, o: prune_argv(c, "--uniform", "half", "--out", o), "invalid float"),
        ("no-policy-source", lambda w, c, o: prune_argv(c, "--out", o), "--policy --uniform"),
        ("policy-unknown-groups", lambda w, c, o: prune_argv(c, "--out", o, "--policy", _policy_file(
            w, {"keep_ratios": {**_uniform_ratios(space), "bogus": 0.5}, "space_id": space.space_id})),
         "unknown groups ['bogus']"),
        ("policy-missing-groups", lambda w, c, o: prune_argv(c, "--out", o, "--policy", _policy_file(
            w, {"keep_ratios": {"conv1": 0.5}})), "misses groups"),
        ("policy-other-model", lambda w, c, o: prune_argv(c, "--out", o, "--policy", _policy_file(
            w, {"keep_ratios": _uniform_ratios(other), "space_id": other.space_id})), "was made for space 'small_cnn:"),
        ("policy-not-json", lambda w, c, o: prune_argv(c, "--out", o, "--policy", _text_file(w, "keep: all")),
         "is not valid JSON"),
        ("policy-missing-file", lambda w, c, o: prune_argv(c, "--out", o, "--policy", str(w / "none.json")),
         "cannot read policy file"),
        ("dataset-files-missing", lambda w, c, o: prune_argv(c, "--uniform", "0.5", "--out", o) + [
            "--dataset", "fashion-mnist", "--data-root", _empty_folder(w)], "not found in"),
        ("out-folder-missing", lambda w, c, o: prune_argv(c, "--uniform", "0.5", "--out", str(w / "no" / "m.pt")),
         "does not exist"),
        ("cache-dir-is-a-file", lambda w, c, o: prune_argv(c, "--uniform", "0.5", "--out", o)
         + ["--cache-dir", _text_file(w, "")], "is not a folder"),
        ("bad-device", lambda w, c, o: prune_argv(c, "--uniform", "0.5", "--device", "tpu"), "invalid choice: 'tpu'"),
    ]


def _text_file(folder: Path, text: str) -> str:
    path = folder / "file.txt"
    path.write_text(text)
    return str(path)


def _empty_folder(folder: Path) -> str:
    path = folder / "empty"
    path.mkdir()
    return str(path)


def assert_one_line_error(status: int, out: str, err: str, expected: str) -> None:
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunetune: error: "), err
    assert "Traceback" not in err
    assert expected in lines[0]


@pytest.mark.parametrize(("argv_for", "expected"), [case[1:] for case in bad_input_cases()],
                         ids=[case[0] for case in bad_input_cases()])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, argv_for, expected):
    work, cache, out_dir = tmp_path / "work", tmp_path / "cache", tmp_path / "out"
    work.mkdir()
    out_dir.mkdir()
    status, out, err, _ = run_cli(argv_for(work, cache, str(out_dir / "pruned.pt")))
    assert_one_line_error(status, out, err, expected)
    assert not cache.exists()
    assert list(out_dir.iterdir()) == []


def test_corrupt_cached_base_model_is_named_with_the_fix(first_run, tmp_path):
    cache, out_dir = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    out_dir.mkdir()
    corrupt = cache / next(first_run["cache"].glob("*.pt")).name
    corrupt.write_bytes(b"not a checkpoint")
    status, out, err, _ = run_cli(prune_argv(cache, "--uniform", "0.5", "--out", str(out_dir / "pruned.pt")))
    assert_one_line_error(status, out, err, str(corrupt))
    assert "delete it" in err
    assert [p.name for p in cache.iterdir()] == [corrupt.name] and corrupt.read_bytes() == b"not a checkpoint"
    assert list(out_dir.iterdir()) == []
