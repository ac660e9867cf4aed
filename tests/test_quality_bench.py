"""benchmarks/quality.py's table: a search with no trial within its target is an empty row, not a stop."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # quality.py imports its sibling compare_table
    return importlib.import_module("quality")


def row(method, seed, accuracy, macs=0.5, val=None):
    summary = {"wall_s": 10.0, "fidelity": {"full": 4, "proxy": 0}, "best": None if accuracy is None else {}}
    final = None if accuracy is None else {"test_accuracy": accuracy, "val_accuracy": accuracy if val is None else val,
                                           "macs_ratio": macs, "finals": 1, "final_seconds": 30.0}
    return {"method": method, "target": 0.5, "seed": seed, "distill": False, "summary": summary, "final": final}


def test_a_search_without_a_best_is_none_within_target_and_runs_no_final(monkeypatch, tmp_path):
    bench = quality(monkeypatch)
    args = SimpleNamespace(storage=tmp_path, final_epochs=10)  # no run directory: a final would fail
    assert bench.final("cdp-dtc", 0.5, 0, False, args, {"best": None}) is None
    rows = [row("uniform", 0, 0.75), row("uniform", 1, 0.70), row("cdp-dtc", 0, None), row("cdp-dtc", 1, 0.72),
            row("dcm", 0, None)]
    lines = bench.table(rows, ["uniform", "cdp-dtc", "dcm"], [0.5], False)
    cells = {line.split(" | ")[1]: line.split(" | ") for line in lines[2:]}
    assert cells["uniform"][3] == "72.50 ± 3.54"
    assert cells["cdp-dtc"][3] == "72.00 ± 0.00 (1 of 2 none within target)"
    assert cells["cdp-dtc"][4] == "2.00 ± 0.00"  # against seed 1's heuristic only
    assert cells["dcm"][3] == "none within target" and cells["dcm"][4] == "-" and cells["dcm"][6] == "-"


def test_the_heuristic_validation_would_pick_and_a_final_variant_s_run_directory(monkeypatch):
    bench = quality(monkeypatch)
    # seed 0: uniform is best on test, global on validation; the search is compared with each
    rows = [row("uniform", 0, 0.75, val=0.70), row("global", 0, 0.74, val=0.72), row("optuna-affine", 0, 0.745)]
    cells = bench.table(rows, ["optuna-affine"], [0.5], False)[2].split(" | ")
    assert cells[4] == "-0.50 ± 0.00" and cells[5] == "0.50 ± 0.00" and cells[-1] == "1.0 |"
    assert bench.run_name("optuna-affine-bn-top3", 0.25, 1) == bench.run_name("optuna-affine-bn", 0.25, 1)


def test_a_search_that_met_no_target_is_finished_not_failed(monkeypatch, tmp_path):
    """`prunetune run` exits 1 when no trial met its MACs target; the benchmarks then show an empty row."""
    bench = quality(monkeypatch)
    import json
    import subprocess

    def exited(status):
        return subprocess.CompletedProcess([], status, "", "")

    assert bench.search_failed(exited(1), tmp_path) and bench.search_failed(exited(0), tmp_path)  # no summary
    (tmp_path / "summary.json").write_text(json.dumps({"best": None}))
    assert not bench.search_failed(exited(1), tmp_path) and bench.search_failed(exited(2), tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"best": {"trial_id": "a"}}))
    assert bench.search_failed(exited(1), tmp_path) and not bench.search_failed(exited(0), tmp_path)
