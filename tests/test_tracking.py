"""The tracking package against a real MLflow sqlite store: runs, idempotence, sync, URI checks, plots."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunetune.pruning.errors import UserError
from prunetune.tracking import (
    Tracker,
    check_tracking_uri,
    default_tracking_uri,
    pareto_front,
    plot_pareto,
    sync_run_dir,
)
from prunetune.tracking.names import flatten, mlflow_key
from prunetune.tracking.rundir import read_trials

GROUPS = ("layer1.0.conv1", "features[3]", "fc/out")
STATUSES = ("finished", "failed", "stopped")
RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
BASELINE = {"val_accuracy": 0.91, "test_accuracy": 0.9, "macs": 4.0e7, "params": 2.7e5}


def trial_record(index: int, status: str = "finished") -> dict:
    """A trial record as the search appends it to trials.jsonl: three epochs of history."""
    ratio = 0.3 + 0.2 * index
    return {
        "trial_id": f"trial_{index:03d}",
        "trial_key": f"key{index:03d}",
        "status": status,
        "policy": {
            "space_id": "space1",
            "keep_ratios": {group: ratio for group in GROUPS},
            "dropped_blocks": ["layer2.1"] if index % 2 else [],
        },
        "params": {"method": "random", "importance": "l1", "seed": index, "lr": 0.01},
        "metrics": {
            "val_accuracy": 0.8 + 0.02 * index,
            "macs": 4.0e7 * ratio,
            "params": 2.7e5 * ratio,
            "latency_ms": 3.0 + index,
            "macs_ratio": ratio,
            "params_ratio": ratio,
        },
        "history": [
            {"epoch": e, "val_accuracy": 0.5 + 0.1 * e, "train_loss": 1.0 / (e + 1)} for e in range(3)
        ],
        "node": f"node{index % 2}",
        "seconds": 12.5 + index,
    }


def summary_of(records: list[dict]) -> dict:
    """A summary.json for ``records``: the best is the most accurate, the front computed by pareto_front."""
    finished = [r for r in records if r["status"] == "finished"]
    best = max(finished, key=lambda r: r["metrics"]["val_accuracy"])
    points = [{"trial_id": r["trial_id"], **r["metrics"]} for r in finished]
    pareto = [
        {
            "trial_id": p["trial_id"],
            "val_accuracy": p["val_accuracy"],
            "macs": p["macs"],
            "macs_ratio": p["macs_ratio"],
            "test_accuracy": p["val_accuracy"] - 0.01,
        }
        for p in pareto_front(points)
    ]
    return {
        "name": "demo",
        "method": "random",
        "baseline": BASELINE,
        "best": {
            "trial_id": best["trial_id"],
            **best["metrics"],
            "test_accuracy": 0.85,
            "policy": best["policy"],
        },
        "pareto": pareto,
        "trials": {status: sum(r["status"] == status for r in records) for status in STATUSES},
        "wall_s": 61.0,
    }


@pytest.fixture
def tracker(tmp_path: Path, tracking_store) -> Tracker:
    """A tracker on a new sqlite store (conftest's migrated empty one: no migrations per test)."""
    return Tracker(default_tracking_uri(tracking_store(tmp_path / "store")), "prunetune-test")


def children_of(tracker: Tracker, parent_id: str) -> list:
    return tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def artifact_names(tracker: Tracker, run_id: str) -> set[str]:
    return {artifact.path for artifact in tracker.client.list_artifacts(run_id)}


def read_artifact_json(tracker: Tracker, run_id: str, name: str, folder: Path) -> dict:
    return json.loads(Path(tracker.client.download_artifacts(run_id, name, str(folder))).read_text())


def test_parent_and_three_children_carry_params_metrics_artifacts_and_tags(
    tracker: Tracker, tmp_path: Path
) -> None:
    config = {"model": {"name": "resnet20", "width": 1}, "search": {"trials": 3, "seeds": [1, 2]}}
    parent = tracker.start_parent("uid-1", "demo", config, tags={"prunetune.method": "random"})
    tracker.log_space(parent, {"groups": list(GROUPS)}, BASELINE)
    records = [trial_record(i, status) for i, status in enumerate(STATUSES)]
    child_ids = [tracker.log_trial(parent, record) for record in records]
    tracker.log_parent_step(parent, {"incumbent_val_accuracy": 0.8}, step=1)
    tracker.log_parent_step(parent, {"incumbent_val_accuracy": 0.82}, step=2)
    summary = summary_of(records)
    png = plot_pareto([r["metrics"] for r in records], tmp_path / "front.png", base=BASELINE)
    tracker.finish_parent(parent, summary, pareto_png=png)

    run = tracker.client.get_run(parent)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert run.data.params["model.name"] == "resnet20" and run.data.params["search.seeds"] == "[1,2]"
    assert run.data.tags["prunetune.run_uid"] == "uid-1" and run.data.tags["prunetune.method"] == "random"
    assert run.data.tags["prunetune.best_trial_id"] == summary["best"]["trial_id"]
    assert run.data.metrics["base_val_accuracy"] == pytest.approx(0.91)
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(summary["best"]["val_accuracy"])
    assert run.data.metrics["trials_failed"] == 1
    steps = tracker.client.get_metric_history(parent, "incumbent_val_accuracy")
    assert [(m.step, m.value) for m in steps] == [(1, 0.8), (2, 0.82)]
    assert {"config.yaml", "space.json", "summary.json", "pareto.png", "best_policy.json"} <= artifact_names(
        tracker, parent
    )
    assert read_artifact_json(tracker, parent, "best_policy.json", tmp_path) == summary["best"]["policy"]

    assert sorted(r.info.run_id for r in children_of(tracker, parent)) == sorted(child_ids)
    for record, child_id in zip(records, child_ids, strict=True):
        child = tracker.client.get_run(child_id)
        assert child.info.status == RUN_STATUS[record["status"]]
        assert child.info.end_time - child.info.start_time == round(record["seconds"] * 1000)
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent
        assert (tags["prunetune.trial_id"], tags["prunetune.trial_key"]) == (
            record["trial_id"],
            record["trial_key"],
        )
        assert tags["prunetune.node"] == record["node"] and tags["prunetune.logged"] == "1"
        params = child.data.params
        ratio_text = str(record["policy"]["keep_ratios"][GROUPS[0]])
        dropped = ", 1 block dropped" if record["policy"]["dropped_blocks"] else ""
        assert child.info.run_name == f"random: keep {float(ratio_text):.2f}{dropped} [{record['trial_id']}]"
        assert params["keep.layer1.0.conv1"] == params["keep.features_3_"] == params["keep.fc_out"] == ratio_text
        assert params["dropped_blocks"] == ",".join(record["policy"]["dropped_blocks"])
        assert (params["method"], params["importance"], params["seed"]) == (
            "random",
            "l1",
            str(record["params"]["seed"]),
        )
        assert params["trial_id"] == record["trial_id"] and params["lr"] == "0.01"
        assert child.data.metrics["macs"] == pytest.approx(record["metrics"]["macs"])
        assert child.data.metrics["val_accuracy"] == pytest.approx(record["metrics"]["val_accuracy"])
        history = tracker.client.get_metric_history(child_id, "train_loss")
        assert [m.step for m in history] == [0, 1, 2]
        assert read_artifact_json(tracker, child_id, "policy.json", tmp_path / child_id) == record["policy"]


def test_log_trial_twice_keeps_one_child(tracker: Tracker) -> None:
    parent = tracker.start_parent("uid-2", "demo", {})
    record = trial_record(0)
    first = tracker.log_trial(parent, record)
    assert tracker.log_trial(parent, record) == first
    assert [r.info.run_id for r in children_of(tracker, parent)] == [first]
    assert len(tracker.client.get_metric_history(first, "val_accuracy")) == 4  # 3 epochs + the final value


def test_half_logged_child_is_completed_not_duplicated(tracker: Tracker) -> None:
    parent = tracker.start_parent("uid-3", "demo", {})
    record = trial_record(1, "failed")
    child = tracker.log_trial(parent, record)
    tracker.client.delete_tag(child, "prunetune.logged")  # as if the driver died before the last step
    tracker.client.update_run(child, status="RUNNING")

    assert tracker.log_trial(parent, record) == child
    run = tracker.client.get_run(child)
    assert run.data.tags["prunetune.logged"] == "1" and run.info.status == "FAILED"
    assert len(children_of(tracker, parent)) == 1
    assert len(tracker.client.get_metric_history(child, "val_accuracy")) == 4  # re-logged rows de-duplicated


def test_start_parent_twice_finds_the_same_run_and_resumes_it(tracker: Tracker) -> None:
    first = tracker.start_parent("uid-4", "demo", {"model": {"name": "resnet20"}})
    tracker.finish_parent(first, {"trials": {"finished": 0}}, status="KILLED")
    assert tracker.client.get_run(first).info.status == "KILLED"

    again = tracker.start_parent("uid-4", "demo", {"model": {"name": "resnet56"}, "extra": 1})
    assert again == first
    run = tracker.client.get_run(first)
    assert run.info.status == "RUNNING"
    assert run.data.params["model.name"] == "resnet20" and run.data.params["extra"] == "1"  # immutable, added
    assert tracker.start_parent("uid-5", "other", {}) != first


def test_log_test_accuracy_reaches_the_trial_child(tracker: Tracker) -> None:
    parent = tracker.start_parent("uid-6", "demo", {})
    child = tracker.log_trial(parent, trial_record(2))
    tracker.log_test_accuracy(parent, "key002", 0.77)
    tracker.log_test_accuracy(parent, "key002", 0.77)
    history = tracker.client.get_metric_history(child, "test_accuracy")
    assert [(m.step, m.value) for m in history] == [(2, 0.77)]
    with pytest.raises(LookupError):
        tracker.log_test_accuracy(parent, "no-such-key", 0.5)


def write_run_dir(run_dir: Path, store_uri: str, records: list[dict], *, summary: dict | None = None) -> None:
    """A run directory written by hand, as a search leaves it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": 1,
        "name": "hand",
        "run_uid": "abc123",
        "method": "random",
        "tracking_uri": store_uri,
        "experiment": "prunetune-sync",
        "parent_run_id": None,
        "created": "2025-01-01T00:00:00",
    }
    (run_dir / "prunetune.json").write_text(json.dumps(meta))
    (run_dir / "config.yaml").write_text("model:\n  name: resnet20\nsearch:\n  trials: 4\n")
    (run_dir / "space.json").write_text(json.dumps({"groups": list(GROUPS)}))
    (run_dir / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))


def test_sync_run_dir_builds_the_view_once_then_only_adds_new_trials(tmp_path: Path, tracking_store) -> None:
    store = default_tracking_uri(tracking_store(tmp_path / "store"))
    run_dir = tmp_path / "run"
    records = [trial_record(i) for i in range(3)]
    write_run_dir(run_dir, store, records, summary=summary_of(records))

    report = sync_run_dir(run_dir)
    assert (report.created_parent, report.trials_logged, report.trials_already_present) == (True, 3, 0)
    assert json.loads((run_dir / "prunetune.json").read_text())["parent_run_id"] == report.parent_run_id
    tracker = Tracker(store, "prunetune-sync")
    parent = tracker.client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["model.name"] == "resnet20"
    assert {"pareto.png", "summary.json", "space.json", "config.yaml"} <= artifact_names(
        tracker, parent.info.run_id
    )
    children = tracker.trial_runs(report.parent_run_id)
    assert sorted(children) == ["key000", "key001", "key002"]
    front_key = f"key{int(summary_of(records)['pareto'][0]['trial_id'][-3:]):03d}"
    assert "test_accuracy" in tracker.client.get_run(children[front_key].info.run_id).data.metrics

    again = sync_run_dir(run_dir)
    assert (again.parent_run_id, again.created_parent, again.trials_logged, again.trials_already_present) == (
        report.parent_run_id,
        False,
        0,
        3,
    )

    with (run_dir / "trials.jsonl").open("a") as trials:
        trials.write(json.dumps(trial_record(3)) + "\n")
    third = sync_run_dir(run_dir)
    assert (third.created_parent, third.trials_logged, third.trials_already_present) == (False, 1, 3)
    assert len(children_of(tracker, report.parent_run_id)) == 4


def test_sync_logs_a_searchers_path_from_the_run_directory_once(tmp_path: Path, tracking_store) -> None:
    """ARPruning's per-round path reached MLflow only from the live driver: a sync into another store
    (or after an outage) lacked it. It is read from ``search_path.jsonl``, each round logged once."""
    from prunetune.search.search_path import SearchPathLogger

    store = default_tracking_uri(tracking_store(tmp_path / "store"))
    run_dir = tmp_path / "run"
    records = [trial_record(i) for i in range(2)]
    write_run_dir(run_dir, store, records, summary=summary_of(records))
    sink = SearchPathLogger(tracking_uri=store, experiment="prunetune-sync", parent_run_id=None, run_dir=str(run_dir))
    for round_, score in ((0, 0.61), (1, 0.64), (1, 0.65)):  # a resume hands round 1 over again
        sink({"round": round_, "incumbent_score": score, "moved": round_ > 0})

    parent = sync_run_dir(run_dir).parent_run_id
    tracker = Tracker(store, "prunetune-sync")
    history = tracker.client.get_metric_history(parent, "search.incumbent_score")
    assert [(m.step, m.value) for m in history] == [(0, 0.61), (1, 0.65)]
    sync_run_dir(run_dir)
    assert len(tracker.client.get_metric_history(parent, "search.incumbent_score")) == 2


def test_sync_refuses_a_folder_that_is_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="prunetune.json"):
        sync_run_dir(tmp_path)


def test_read_trials_skips_a_torn_last_line_and_refuses_a_bad_middle_one(tmp_path: Path) -> None:
    path = tmp_path / "trials.jsonl"
    path.write_text(json.dumps(trial_record(0)) + "\n" + '{"trial_id": "t1", "trial_k')
    assert [r["trial_key"] for r in read_trials(path)] == ["key000"]
    path.write_text('{"broken\n' + json.dumps(trial_record(0)) + "\n")
    with pytest.raises(UserError, match=":1 "):
        read_trials(path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_check_tracking_uri_refuses_a_dead_server_quickly() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(UserError, match="no MLflow tracking server answers") as error:
        check_tracking_uri(uri, timeout_s=2)
    assert time.monotonic() - start < 10
    assert uri in str(error.value) and "\n" not in str(error.value)


def test_check_tracking_uri_refuses_an_unwritable_sqlite_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder cannot be made inside a file, even by root
    start = time.monotonic()
    with pytest.raises(UserError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{blocker}/sub/mlflow.db")
    with pytest.raises(UserError, match="cannot be created"):
        check_tracking_uri(f"sqlite:///{blocker}/sub/mlflow.db", folder_may_be_missing=True)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("file:///tmp/mlruns", "plain file store"),
        ("/tmp/mlruns", "plain file store"),
        ("sqlite://", "in-memory"),
        ("ftp://example.org/x", "unsupported scheme"),
    ],
)
def test_check_tracking_uri_refuses_stores_mlflow_3_cannot_use(uri: str, problem: str) -> None:
    with pytest.raises(UserError, match=problem):
        check_tracking_uri(uri)


def test_check_tracking_uri_creates_nothing_and_refuses_a_missing_folder_unless_told(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "new" / "folder")
    assert uri == f"sqlite:///{(tmp_path / 'new' / 'folder').resolve()}/mlflow.db"
    with pytest.raises(UserError, match="does not exist"):
        check_tracking_uri(uri)
    check_tracking_uri(uri, folder_may_be_missing=True)  # the default store, which the run creates
    check_tracking_uri(default_tracking_uri(tmp_path))  # a new database in an existing folder
    assert sorted(tmp_path.iterdir()) == []


def test_pareto_front_keeps_only_non_dominated_points_sorted_by_macs() -> None:
    points = [
        {"id": "a", "macs": 10, "val_accuracy": 0.70},
        {"id": "b", "macs": 20, "val_accuracy": 0.80},
        {"id": "c", "macs": 25, "val_accuracy": 0.75},  # dominated by b
        {"id": "d", "macs": 30, "val_accuracy": 0.90},
        {"id": "e", "macs": 30, "val_accuracy": 0.85},  # same MACs as d, less accurate
        {"id": "f", "macs": 5, "val_accuracy": float("nan")},  # unusable
        {"id": "g", "macs": 40, "val_accuracy": 0.90},  # as accurate as d, dearer
        {"id": "h", "val_accuracy": 0.99},  # no MACs
    ]
    assert [p["id"] for p in pareto_front(points)] == ["a", "b", "d"]
    assert [p["id"] for p in pareto_front(points, x="val_accuracy", y="macs")] == ["a", "c", "e", "g"]
    assert pareto_front([]) == []


def test_plot_pareto_writes_a_png(tmp_path: Path) -> None:
    points = [trial_record(i)["metrics"] for i in range(3)]
    out = plot_pareto(points, tmp_path / "plots" / "pareto.png", base=BASELINE, title="demo")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000


def test_names_are_made_valid_mlflow_keys() -> None:
    assert mlflow_key("features[3]/conv:1") == "features_3__conv_1"
    assert mlflow_key("..up") == "_..up"
    assert len(mlflow_key("x" * 300)) == 250
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": {}}) == {"a.b.c": 1, "a.d": [1, 2], "e": {}}


def test_importing_tracking_imports_neither_mlflow_nor_matplotlib() -> None:
    code = "import sys, prunetune.tracking; print(sorted(m for m in ('mlflow', 'matplotlib') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "[]"
