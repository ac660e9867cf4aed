"""Two-stage (multi-fidelity) search, ``search.two_stage``: the wrapper's promotion and state with a
plain fake inner searcher (our logic, not Ray's), the config's refusals, the proxy's data fraction,
Kendall's tau from trials.jsonl, and one real ``prunetune run`` (Ray, Torch-Pruning, MLflow)."""

from __future__ import annotations

import json

import pytest
from ray.tune.search import Searcher as RaySearcher

from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.search.two_stage import PROMOTED_KEY, TwoStage, promotion_summary

LIMIT = 0.52


def policy(keep: float) -> dict:
    return Policy({"a": keep, "b": 1.0}).to_json()


class ListSearcher(RaySearcher):
    """Proposes ``{"policy": ...}`` for each keep ratio in turn; remembers what it was told."""

    def __init__(self, keeps):
        super().__init__(metric="val_accuracy", mode="max")
        self.keeps = list(keeps)
        self.told: dict[str, dict | None] = {}
        self.asked = 0

    def suggest(self, trial_id):
        if self.asked >= len(self.keeps):
            return RaySearcher.FINISHED
        self.asked += 1
        return {"policy": policy(self.keeps[self.asked - 1]), "seed": 0}

    def on_trial_complete(self, trial_id, result=None, error=False):
        assert trial_id not in self.told, "told twice"
        self.told[trial_id] = result

    def save(self, checkpoint_path):
        with open(checkpoint_path, "w") as handle:
            json.dump({"asked": self.asked, "told": self.told}, handle)

    def restore(self, checkpoint_path):
        with open(checkpoint_path) as handle:
            state = json.load(handle)
        self.asked, self.told = state["asked"], state["told"]


# keep ratio -> (proxy val accuracy, MACs ratio): 0.9 is the most accurate but over the limit.
SCORES = {0.3: (0.60, 0.40), 0.4: (0.80, 0.45), 0.5: (0.70, 0.50), 0.9: (0.95, 0.90), 0.45: (0.75, 0.48)}
HEURISTIC = {"uniform": policy(0.3)}


def two_stage(keeps=(0.3, 0.4, 0.5, 0.9, 0.45), promote=2, heuristics=HEURISTIC):
    return TwoStage(ListSearcher(keeps), proxies=len(keeps), promote=promote, proxy_epochs=0,
                    data_fraction=0.25, limit=LIMIT, heuristics=heuristics)


def run_stage_one(search: TwoStage, count: int) -> list[tuple[str, dict]]:
    handed = [(f"t{i}", search.suggest(f"t{i}")) for i in range(count)]
    for trial_id, config in handed:
        keep = config["policy"]["keep_ratios"]["a"]
        val, macs = SCORES[keep]
        search.on_trial_complete(trial_id, {"val_accuracy": val, "macs_ratio": macs})
    return handed


def test_stage_one_hands_out_proxies_and_waits_for_them():
    search = two_stage()
    first = search.suggest("t0")
    assert first["finetune_epochs"] == 0 and first["data_fraction"] == 0.25 and first["evaluate_test"] is False
    assert first["stage"] == 1
    others = [search.suggest(f"t{i}") for i in range(1, 5)]
    assert all(c["stage"] == 1 for c in others)
    assert search.suggest("t5") is None  # every proxy handed out, none ended: stage 2 waits
    for i in range(4):
        search.on_trial_complete(f"t{i}", {"val_accuracy": 0.5, "macs_ratio": 0.4})
    assert search.suggest("t5") is None and search.stage == 1
    assert set(search.searcher.told) == {"t0", "t1", "t2", "t3"}  # the inner searcher learns from proxies


def test_promotion_takes_the_proxy_top_k_within_the_target_and_every_heuristic():
    search = two_stage()
    handed = dict(run_stage_one(search, 5))
    assert search.total_trials == 5 + 2 + 1
    stage_two = [search.suggest(f"s{i}") for i in range(3)]
    assert search.suggest("s3") == RaySearcher.FINISHED
    # 0.9 (val 0.95) is over the MACs limit; 0.3 is the heuristic, promoted apart: the top 2 of the
    # rest by proxy score are 0.4 (0.80) and 0.45 (0.75), not 0.5 (0.70).
    keeps = [c["policy"]["keep_ratios"]["a"] for c in stage_two]
    assert keeps == [0.3, 0.4, 0.45]
    assert stage_two[0]["role"] == "heuristic:uniform"
    for config in stage_two:
        assert config["stage"] == 2 and not {"finetune_epochs", "data_fraction", "evaluate_test"} & set(config)
        proxy = handed[config[PROMOTED_KEY]]
        assert proxy["policy"] == config["policy"]
    assert search.promoted() == [config[PROMOTED_KEY] for config in stage_two[1:]]
    for i in range(len(stage_two)):  # full results are not told to the inner searcher
        search.on_trial_complete(f"s{i}", {"val_accuracy": 0.9, "macs_ratio": 0.45})
    assert set(search.searcher.told) == {f"t{i}" for i in range(5)}


def test_failed_and_over_budget_proxies_are_not_promoted():
    search = two_stage(keeps=(0.4, 0.9, 0.5), promote=3, heuristics={})
    configs = [search.suggest(f"t{i}") for i in range(3)]
    search.on_trial_complete("t0", error=True)
    search.on_trial_complete("t1", {"val_accuracy": 0.99, "macs_ratio": 0.9})
    search.on_trial_complete("t2", {"val_accuracy": 0.5, "macs_ratio": 0.5})
    promoted = search.suggest("s0")
    assert promoted["policy"] == configs[2]["policy"] and promoted[PROMOTED_KEY] == "t2"
    assert search.suggest("s1") == RaySearcher.FINISHED  # fewer feasible proxies than promote


def test_state_round_trips_and_a_resumed_search_does_not_promote_twice(tmp_path):
    search = two_stage()
    run_stage_one(search, 5)
    first = search.suggest("s0")
    search.save(str(tmp_path / "ckpt"))

    resumed = two_stage()
    resumed.restore(str(tmp_path / "ckpt"))
    assert resumed.get_state() == search.get_state()
    assert resumed.searcher.asked == 5 and set(resumed.searcher.told) == {f"t{i}" for i in range(5)}
    rest = [resumed.suggest(f"s{i}") for i in (1, 2)]
    assert resumed.suggest("s3") == RaySearcher.FINISHED
    assert [first, *rest] == search.queue  # each promoted policy once, in order


def test_ray_saves_and_restores_the_wrapper_state_with_the_experiment(tmp_path):
    """Ray's own searcher checkpoint (SearchGenerator walks the ``searcher`` chain: the wrappers'
    get_state, the innermost's save): a restored search hands out the rest of stage 2 only."""
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    search = two_stage()
    run_stage_one(search, 5)
    first = search.suggest("s0")
    SearchGenerator(ConcurrencyLimiter(search, max_concurrent=2)).save_to_dir(str(tmp_path), session_str="x")

    resumed = two_stage()
    SearchGenerator(ConcurrencyLimiter(resumed, max_concurrent=2)).restore_from_dir(str(tmp_path))
    assert resumed.stage == 2 and resumed.next == 1 and resumed.searcher.asked == 5
    assert [first, resumed.suggest("s1"), resumed.suggest("s2")] == search.queue
    assert resumed.suggest("s3") == RaySearcher.FINISHED


def test_a_resume_mid_stage_one_continues_it(tmp_path):
    search = two_stage()
    search.suggest("t0")
    search.save(str(tmp_path / "ckpt"))
    resumed = two_stage()
    resumed.restore(str(tmp_path / "ckpt"))
    assert resumed.running == ["t0"] and resumed.handed == 1 and resumed.stage == 1
    resumed.on_trial_complete("t0", {"val_accuracy": 0.6, "macs_ratio": 0.4})
    assert resumed.searcher.told == {"t0": {"val_accuracy": 0.6, "macs_ratio": 0.4}}
    assert resumed.suggest("t1")["stage"] == 1


def _record(trial_id, val, *, promoted_from=None, proxy=False, status="finished"):
    params = {"finetune_epochs": 0} if proxy else {}
    if promoted_from is not None:
        params[PROMOTED_KEY] = promoted_from
    return {"trial_id": trial_id, "status": status, "params": params, "metrics": {"val_accuracy": val}}


def test_kendall_tau_over_the_promoted_pairs():
    records = [_record("p1", 0.5, proxy=True), _record("p2", 0.6, proxy=True), _record("p3", 0.7, proxy=True),
               _record("f1", 0.8, promoted_from="p1"), _record("f2", 0.9, promoted_from="p2"),
               _record("f3", 0.85, promoted_from="p3")]
    summary = promotion_summary(records)
    assert summary["promoted"] == 3 and summary["tau_pairs"] == 3
    assert summary["kendall_tau"] == pytest.approx(1 / 3)  # 2 concordant pairs, 1 discordant
    one = promotion_summary(records[:4])
    assert one["kendall_tau"] is None and one["tau_pairs"] == 1 and "needs 2" in one["tau_note"]


@pytest.mark.parametrize("sets, fragment", [
    ({"trials": 3, "fidelity": {"promote": 4}}, "promote at most 3"),
    ({"method": "dcm", "fidelity": {"promote": 2}}, "learns its policy"),
    ({"method": "arpruning", "fidelity": {"promote": 2}}, "its own proxy"),
    ({"method": "uniform", "fidelity": {"promote": 1}}, "proposes one policy"),
    ({"fidelity": {"promote": 2, "proxy_epochs": 3}, "finetune": {"epochs": 2}}, "no cheaper"),
    ({"fidelity": {"promote": 2}, "scheduler": "asha"}, "runs its promoted trials to the end"),
])
def test_config_refusals(sets, fragment):
    from prunetune.search.config import config_from_dict

    with pytest.raises(UserError, match=fragment):
        config_from_dict(sets, names=False)


def test_a_two_stage_search_runs_no_asha():
    from prunetune.search.config import config_from_dict, resolved_scheduler

    cfg = config_from_dict({"finetune": {"epochs": 4}, "fidelity": {"promote": 2}}, names=False)
    assert resolved_scheduler(cfg) == "none"
    assert resolved_scheduler(config_from_dict({"finetune": {"epochs": 4}}, names=False)) == "asha"


def test_train_fraction_is_a_seeded_subset_of_the_training_split():
    from prunetune.pruning.data import load_dataset
    from prunetune.search.trainable import train_fraction

    splits = load_dataset("digits", seed=0, val_fraction=0.1, image_size=8)
    quarter = train_fraction(splits, 0.25, seed=0)
    again = train_fraction(splits, 0.25, seed=0)
    assert len(quarter.train) == round(len(splits.train) * 0.25)
    assert quarter.val is splits.val and quarter.test is splits.test
    assert (quarter.train.labels == again.train.labels).all()
    assert not (quarter.train.images == train_fraction(splits, 0.25, seed=1).train.images).all()


@pytest.mark.slow
def test_a_two_stage_run_end_to_end(tmp_path):
    """optuna, 5 proxies (BatchNorm recalibration only on half the data; the 3 heuristics among them),
    the best 2 searched ones promoted with the heuristics to the full fine-tune."""
    from tests.search_helpers import QUICK, mlflow_runs, read_jsonl, run_cli

    result = run_cli(["run", *QUICK, "--trials", "5", "--concurrency", "2", "--name", "two",
                      "--storage", str(tmp_path / "runs"), "--set", "fidelity.promote=2",
                      "--set", "fidelity.proxy_epochs=0", "--set", "fidelity.proxy_data_fraction=0.5"],
                     cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "two"
    records = read_jsonl(run_dir / "trials.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    heuristics = json.loads((run_dir / "heuristics.json").read_text())
    proxies = [r for r in records if r["fidelity"] == "proxy"]
    full = [r for r in records if r["fidelity"] == "full"]
    heuristic_keys = {Policy.from_json(h).key() for h in heuristics.values()}
    searched = sorted((r for r in proxies if Policy.from_json(r["policy"]).key() not in heuristic_keys
                       and r["metrics"]["macs_ratio"] <= 0.5 + 0.02 + 1e-9),
                      key=lambda r: -r["metrics"]["val_accuracy"])
    assert len(proxies) == 5 and len(searched) >= 2  # FeasibleOnly hands out policies within the target
    promoted = {r["params"][PROMOTED_KEY] for r in full if not r["params"].get("role")}
    assert promoted == {r["trial_id"] for r in searched[:2]}  # the proxy's top 2
    assert len(full) == 2 + len(heuristics)
    assert all(r["params"]["stage"] == 1 and r["test_accuracy"] is None for r in proxies)  # validation only
    assert all(r["params"]["stage"] == 2 for r in full)
    by_id = {r["trial_id"]: r for r in records}
    for record in full:
        assert by_id[record["params"][PROMOTED_KEY]]["policy"] == record["policy"]
    fidelity = summary["fidelity"]
    assert fidelity["full"] == len(full) and fidelity["proxy"] == 5 and fidelity["promoted"] == len(full)
    assert fidelity["proxy_epochs"] == 0 and fidelity["proxy_data_fraction"] == 0.5
    tau = fidelity["kendall_tau"]
    assert (tau is not None and -1 <= tau <= 1) or fidelity["tau_note"], fidelity
    assert {r["trial_id"] for r in full} >= {p["trial_id"] for p in summary["pareto"]}
    assert summary["best"]["trial_id"] in {r["trial_id"] for r in full} and summary["best"]["test_accuracy"] is not None
    assert all(row["trial_id"] in {r["trial_id"] for r in full} for row in summary["heuristics"]["policies"].values())
    assert "two-stage: 5 proxy trials" in result.stdout and "Kendall's tau" in result.stdout
    assert "two-stage search: 5 proxy trials" in result.stderr

    meta = json.loads((run_dir / "prunetune.json").read_text())
    _, children = mlflow_runs(meta["tracking_uri"])
    tags = {c.data.tags["prunetune.trial_id"]: c.data.tags["prunetune.fidelity"] for c in children}
    assert tags == {r["trial_id"]: r["fidelity"] for r in records}
