"""`prunetune compare` on two small real searches (a sqlite MLflow store), the Pareto front on
constructed points, the figures and compare.html in headless Chromium, MLflow's conventions, bad input."""

from __future__ import annotations

import json
import random
import shutil
import socket

import pytest

from prunetune.pruning.errors import UserError
from prunetune.search.cli import main
from prunetune.tracking.compare import (
    Search,
    TrialPoint,
    compare_rows,
    front_of,
    parse_budgets,
    search_from_run_dir,
)
from prunetune.tracking.names import policy_summary, trial_run_name
from prunetune.tracking.pareto import pareto_front
from prunetune.tracking.plots import plot_pareto
from prunetune.tracking.report_html import png_size
from tests.browser_helpers import NO_CHROMIUM, chromium, render
from tests.search_helpers import QUICK, read_jsonl, run_cli

BUDGETS = (0.3, 0.5, 0.75)


@pytest.fixture(scope="module")
def searches(tmp_path_factory, base_model_cache, tracking_store):
    """A 3-trial random search and a 4-trial ARPruning search (3 proxy neighbours, a final), one store."""
    work = tmp_path_factory.mktemp("compare")
    runs = tracking_store(work / "runs")
    for name, method, trials in (("rnd", "random", "3"), ("arp", "arpruning", "4")):
        result = run_cli(["run", *QUICK, "--method", method, "--trials", trials, "--concurrency", "2",
                          "--name", name, "--storage", str(runs)], cache=base_model_cache, cwd=work)
        assert result.returncode == 0, result.stderr[-3000:]
    return work, runs


def compare_json(args: list[str], capsys) -> dict:
    assert main(["compare", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_table_matches_each_search_s_summary_json(searches, capsys):
    work, runs = searches
    budgets = ",".join(map(str, BUDGETS))
    table = compare_json([str(runs / "rnd"), str(runs / "arp"), "--macs-budgets", budgets], capsys)
    assert table["budgets"] == list(BUDGETS) and [r["name"] for r in table["searches"]] == ["rnd", "arp"]
    for row in table["searches"]:
        run_dir = runs / row["name"]
        summary = json.loads((run_dir / "summary.json").read_text())
        records = read_jsonl(run_dir / "trials.jsonl")
        assert (row["method"], row["model"], row["dataset"]) == (summary["method"], "small_cnn", "digits")
        counts = row["trials"]
        assert counts["full"] + counts["proxy"] == summary["trials"]["finished"]
        assert (counts["stopped"], counts["failed"]) == (summary["trials"]["stopped"], summary["trials"]["failed"])
        assert row["wall_s"] == summary["wall_s"]
        best = summary["best"]
        assert (row["best"] or {}).get("trial_id") == (best or {}).get("trial_id")
        if best is not None:
            assert row["best"]["val_accuracy"] == best["val_accuracy"]
            assert row["best"]["test_accuracy"] == best["test_accuracy"]
        full = [r for r in records if r["status"] == "finished" and "finetune_epochs" not in r["params"]]
        for budget in BUDGETS:  # brute force: the most accurate full trial within the budget
            within = [r for r in full if r["metrics"]["macs_ratio"] <= budget and r["test_accuracy"] is not None]
            expected = max(within, key=lambda r: r["metrics"]["val_accuracy"], default=None)
            cell = row["best_within"][f"{budget:g}"]
            assert (cell or {}).get("val_accuracy") == (expected or {}).get("metrics", {}).get("val_accuracy")
    rnd, arp = table["searches"]
    assert rnd["trials"]["proxy"] == 0 and rnd["pareto_size"] == len(
        json.loads((runs / "rnd" / "summary.json").read_text())["pareto"])  # no proxies: the same front
    assert arp["trials"]["proxy"] >= 1 and arp["final"] is not None
    final = [r for r in read_jsonl(runs / "arp" / "trials.jsonl") if r["params"].get("role") == "final"][-1]
    assert arp["final"]["test_accuracy"] == final["test_accuracy"]

    from_mlflow = compare_json(["--experiment", "prunetune", "--tracking-uri", f"sqlite:///{runs}/mlflow.db",
                                "--macs-budgets", budgets], capsys)
    for mine, theirs in zip(table["searches"], from_mlflow["searches"], strict=True):
        mine.pop("source"), theirs.pop("source")
        mine.pop("baseline"), theirs.pop("baseline")
        mine["best"].pop("keep_ratios"), theirs["best"].pop("keep_ratios")  # MLflow keys are sanitised
        assert theirs == mine  # MLflow stores the same doubles


def test_the_printed_table_names_the_searches_and_says_what_its_cells_are(searches, capsys):
    _, runs = searches
    assert main(["compare", str(runs / "rnd"), str(runs / "arp")]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for column in ("search", "method", "trials", "wall", "MACs <= 0.25", "MACs <= 0.5", "own target", "front"):
        assert column in header
    assert "proxy" in out and "arpruning" in out and "MACs ratio (of the base model)" in out


def test_a_search_given_twice_is_one_row_and_searches_of_two_settings_are_told_apart(searches, capsys, tmp_path):
    _, runs = searches
    table = compare_json([str(runs / "rnd"), str(runs / "rnd") + "/", str(runs / "arp")], capsys)
    assert [row["name"] for row in table["searches"]] == ["rnd", "arp"]
    assert main(["compare", str(runs / "rnd"), str(runs / "arp")]) == 0
    assert "different models or data" not in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(runs / "rnd", other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("model: small_cnn", "model: tiny_resnet", 1))
    assert main(["compare", str(runs / "rnd"), str(other)]) == 0
    assert ("prunetune: warning: these searches prune different models or data (small_cnn on digits; tiny_resnet "
            "on digits)") in capsys.readouterr().err


def test_out_writes_valid_pngs_and_an_html_page_logged_to_the_parent_runs(searches, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    _, runs = searches
    table = compare_json([str(runs / "rnd"), str(runs / "arp"), "--out", str(tmp_path / "report")], capsys)
    names = sorted(p.rsplit("/", 1)[-1] for p in table["report"])
    assert names == ["best_policies.png", "best_so_far.png", "compare.html", "fronts.png"]
    for png in (tmp_path / "report").glob("*.png"):
        width, height = png_size(png)
        assert width >= 400 and height >= 300
    html = (tmp_path / "report" / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html and "http" not in html
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    for name in ("rnd", "arp"):
        parent = json.loads((runs / name / "prunetune.json").read_text())["parent_run_id"]
        logged = {a.path for a in client.list_artifacts(parent, "compare")}
        assert {"compare/compare.html", "compare/fronts.png"} <= logged


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_compare_html_loads_in_headless_chromium_with_images_at_natural_size(searches, capsys, tmp_path):
    _, runs = searches
    compare_json([str(runs / "rnd"), str(runs / "arp"), "--out", str(tmp_path)], capsys)
    rendered, console = render(tmp_path / "compare.html")
    assert [line for line in console if "compare.html" in line] == []
    assert rendered.get("rows") == 2 and rendered["title"].startswith("prunetune compare"), rendered
    assert len(rendered["images"]) == 3
    for image in rendered["images"]:
        assert image["complete"] and image["naturalWidth"] > 0, image
        assert (image["width"], image["height"]) == (image["naturalWidth"], image["naturalHeight"]), image


def test_mlflow_sees_a_training_experiment_and_runs_named_and_tagged_by_what_they_are(searches):
    from mlflow.tracking import MlflowClient

    from prunetune.pruning.policy import Policy
    from prunetune.pruning.space import SearchSpace

    _, runs = searches
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    experiment = client.get_experiment_by_name("prunetune")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.trials"])
    assert "prunetune.role" in view["searchFilter"] and "metrics.`val_accuracy`" in view["selectedColumns"]
    for name in ("rnd", "arp"):
        space = SearchSpace.from_json(json.loads((runs / name / "space.json").read_text()))
        parent_id = json.loads((runs / name / "prunetune.json").read_text())["parent_run_id"]
        parent = client.get_run(parent_id)
        method = parent.data.tags["prunetune.method"]
        for key, value in {"prunetune.model": "small_cnn", "prunetune.dataset": "digits",
                           "prunetune.macs_target": "0.5"}.items():
            assert parent.data.tags[key] == value
        records = {r["trial_id"]: r for r in read_jsonl(runs / name / "trials.jsonl")}
        children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
        assert len(children) == len(records)
        for child in children:
            record = records[child.data.tags["prunetune.trial_id"]]
            fidelity = "proxy" if "finetune_epochs" in record["params"] else "full"
            assert child.data.tags["prunetune.fidelity"] == fidelity
            assert child.data.tags["prunetune.method"] == method and child.data.tags["prunetune.model"] == "small_cnn"
            assert child.info.run_name == trial_run_name(record, method, fidelity)
            assert policy_summary(record["policy"]) in child.info.run_name and "keep 0." in child.info.run_name
            channels = space.channels(Policy.from_json(record["policy"]))
            assert {g: int(child.data.params[f"channels.{g}"]) for g in channels} == channels
            assert ("test_accuracy" in child.data.metrics) == (record["test_accuracy"] is not None)
    assert any(c.data.tags["prunetune.fidelity"] == "proxy" for c in client.search_runs(
        [experiment.experiment_id], "tags.`prunetune.method` = 'arpruning'"))


def test_the_pareto_front_holds_exactly_the_non_dominated_points():
    rng = random.Random(3)
    points = [{"x": rng.choice([0.2, 0.4, 0.5, 0.7]) + rng.random() / 10, "y": rng.random()} for _ in range(60)]
    points += [dict(points[5]), {"x": 0.9, "y": None}]  # an exact duplicate; a point without accuracy
    front = pareto_front(points, x="x", y="y")
    usable = [p for p in points if p["y"] is not None]

    def dominated(p):
        return any(q["x"] <= p["x"] and q["y"] >= p["y"] and (q["x"], q["y"]) != (p["x"], p["y"]) for q in usable)

    assert all(not dominated(p) for p in front)
    assert {id(p) for p in usable if not dominated(p)} == {id(p) for p in front}
    assert [p["x"] for p in front] == sorted(p["x"] for p in front)


def test_front_and_best_leave_out_proxy_trials():
    trials = (TrialPoint("full-a", 0, "finished", val_accuracy=0.8, test_accuracy=0.79, macs_ratio=0.5),
              TrialPoint("proxy", 1, "finished", "proxy", val_accuracy=0.95, macs_ratio=0.3),
              TrialPoint("full-b", 2, "finished", val_accuracy=0.6, test_accuracy=0.61, macs_ratio=0.3),
              TrialPoint("stopped", 3, "stopped", val_accuracy=0.99, macs_ratio=0.1))
    search = Search("s", "arpruning", "m", "d", 0.5, 0.0, 1.0, trials, source="here")
    assert [t.trial_id for t in front_of(search)] == ["full-b", "full-a"]
    row = compare_rows([search], (0.3, 0.5))["searches"][0]
    assert row["best_within"]["0.3"]["trial_id"] == "full-b" and row["best"]["trial_id"] == "full-a"
    assert row["trials"] == {"full": 2, "proxy": 1, "stopped": 1, "failed": 0}


def test_pareto_png_marks_the_target_the_best_and_proxies(tmp_path):
    points = [{"trial_id": f"t{i}", "macs_ratio": 0.3 + i / 20, "val_accuracy": 0.5 + i / 30,
               "fidelity": "proxy" if i % 2 else "full"} for i in range(8)]
    title = "a search name long enough to be clipped on both sides before: validation accuracy against MACs"
    png = plot_pareto(points, tmp_path / "p.png", base={"val_accuracy": 0.9}, title=title, target=0.5,
                      best_trial_id="t4")
    assert png_size(png) == (640, 480)


@pytest.fixture
def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_line_error(capsys, args: list[str], fragment: str) -> None:
    assert main(["compare", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunetune: error:") and fragment in lines[0], lines


def test_bad_input_is_one_line_and_exit_2(searches, capsys, tmp_path, dead_port):
    from mlflow.tracking import MlflowClient

    _, runs = searches
    uri = f"sqlite:///{runs}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("empty")
    one_line_error(capsys, ["--experiment", "nope", "--tracking-uri", uri], "no MLflow experiment 'nope'")
    one_line_error(capsys, ["--experiment", "empty", "--tracking-uri", uri], "holds no prunetune search")
    one_line_error(capsys, ["--experiment", "x", "--tracking-uri", f"http://127.0.0.1:{dead_port}"],
                   "no MLflow tracking server answers")
    one_line_error(capsys, ["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"],
                   "no MLflow database")
    (tmp_path / "not_a_run").mkdir()
    one_line_error(capsys, [str(tmp_path / "not_a_run")], "is not a prunetune run directory")
    one_line_error(capsys, [str(tmp_path / "absent")], "is not a folder")
    one_line_error(capsys, [str(runs / "rnd"), "--macs-budgets", "0.5,2"], "(0, 1]")
    assert not (tmp_path / "none.db").exists()


def test_budgets_parse_sorted_and_refuse_nonsense():
    assert parse_budgets("0.75, 0.25,0.5") == (0.25, 0.5, 0.75)
    for text in ("", "a,b", "0", "1.5"):
        with pytest.raises(UserError):
            parse_budgets(text)


def test_a_run_directory_reads_back_as_a_search(searches):
    _, runs = searches
    search = search_from_run_dir(runs / "arp")
    assert search.method == "arpruning" and search.macs_target == 0.5 and search.parent_run_id
    assert {t.fidelity for t in search.trials} == {"full", "proxy"}


def test_experiment_tags_keep_a_user_s_own_kind_and_description():
    from prunetune.tracking.experiment_view import experiment_tags, trials_url

    fresh = experiment_tags("7", {})
    assert fresh["mlflow.experimentKind"] == "custom_model_development"
    assert "#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=trials" in fresh[
        "mlflow.note.content"]
    assert experiment_tags("7", fresh) == {}  # idempotent
    theirs = experiment_tags("7", {"mlflow.experimentKind": "finetuning", "mlflow.note.content": "mine"})
    assert "mlflow.experimentKind" not in theirs and "mlflow.note.content" not in theirs
    assert experiment_tags("7", {"mlflow.experimentKind": "genai_development"})["mlflow.experimentKind"] == \
        "custom_model_development"
    assert trials_url("http://h:5000/", "7") == \
        "http://h:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=trials"


def test_benchmark_tables_regenerate_from_the_kept_small_files(searches, capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "compare_table.py"
    spec = importlib.util.spec_from_file_location("compare_table", path)
    compare_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_table)
    _, runs = searches
    compare_table.keep([str(runs / "rnd"), str(runs / "arp")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "arp").iterdir()) == sorted(compare_table.KEPT_FILES)
    kept = compare_json([str(tmp_path / "rnd"), str(tmp_path / "arp")], capsys)
    original = compare_json([str(runs / "rnd"), str(runs / "arp")], capsys)
    for row in (*kept["searches"], *original["searches"]):
        row.pop("source")
    assert kept == original
    table = compare_table.markdown(kept, "method")
    assert table.splitlines()[2].startswith("| random | 1 | 3 + 0 |") and "| arpruning | 1 |" in table


def test_a_final_fine_tune_is_the_final_column_from_the_run_directory_and_from_mlflow(searches, capsys,
                                                                                     base_model_cache):
    """Last in this file: it adds a final fine-tune to the random search."""
    work, runs = searches
    result = run_cli(["finetune", str(runs / "rnd"), "--epochs", "1"], cache=base_model_cache, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((runs / "rnd" / "summary.json").read_text())["final"]
    from_dir = compare_json([str(runs / "rnd")], capsys)["searches"][0]["final"]
    from_mlflow = [row for row in compare_json(["--experiment", "prunetune", "--tracking-uri",
                                                f"sqlite:///{runs}/mlflow.db"], capsys)["searches"]
                   if row["name"] == "rnd"][0]["final"]
    for cell in (from_dir, from_mlflow):
        assert (cell["val_accuracy"], cell["test_accuracy"]) == (final["val_accuracy"], final["test_accuracy"])
        assert cell["trial_id"] == f"final-{final['trial_id']}"
