"""summary.json from trial records: the latency warning beside the best trial (issue 17, item 11)."""

from __future__ import annotations

from prunetune.search.summary import build_summary, format_summary


def record(trial_id: str, **latency) -> dict:
    metrics = {"val_accuracy": 0.9, "macs": 500, "params": 50, "macs_ratio": 0.5, "params_ratio": 0.5,
               "latency_ms": 1.0, **latency}
    return {"trial_id": trial_id, "trial_key": f"u:{trial_id}", "status": "finished", "metrics": metrics,
            "test_accuracy": 0.9, "policy": None}


BASE = {"val_accuracy": 0.95, "test_accuracy": 0.95, "macs": 1000, "params": 100, "latency_ms": 2.0,
        "latency_median_ms": 2.0, "latency_iqr_ms": 0.1, "latency_repeats": 10, "latency_load_avg": 0.5,
        "latency_cpus": 2}


def summary_of(records) -> dict:
    return build_summary(name="s", method="random", baseline=BASE, records=records, macs_target=0.5,
                         macs_tolerance=0.02, wall_s=10.0)


def test_a_steady_measurement_gives_no_warning():
    quiet = record("a", latency_median_ms=1.0, latency_iqr_ms=0.05, latency_repeats=10, latency_load_avg=0.4,
                   latency_cpus=2)
    summary = summary_of([quiet])
    assert summary["latency_warning"] is None and "warning" not in format_summary(summary)
    assert summary["baseline"]["latency_iqr_ms"] == 0.1 and summary["baseline"]["latency_load_avg"] == 0.5


def test_a_loaded_measurement_of_the_best_trial_is_flagged_in_the_summary_and_its_table():
    loaded = record("b", latency_median_ms=1.0, latency_iqr_ms=0.6, latency_repeats=10, latency_load_avg=9.0,
                    latency_cpus=2)
    summary = summary_of([loaded])
    assert "IQR 60% of the median" in summary["latency_warning"]
    assert "load average 9.0 on 2 CPUs" in summary["latency_warning"]
    assert f"warning: {summary['latency_warning']}" in format_summary(summary)


def test_records_of_older_versions_without_a_spread_give_no_warning():
    assert summary_of([record("c")])["latency_warning"] is None


def test_proxy_trials_are_counted_apart_and_never_on_the_front():
    """A BatchNorm-only proxy scoring higher at fewer MACs must not hide the fully fine-tuned trials."""
    full = record("full")
    proxy = {**record("proxy"), "params": {"finetune_epochs": 0}, "test_accuracy": None}
    proxy["metrics"] = {**proxy["metrics"], "val_accuracy": 0.99, "macs": 400}
    summary = summary_of([full, proxy])
    assert [p["trial_id"] for p in summary["pareto"]] == ["full"]
    assert summary["fidelity"] == {"full": 1, "proxy": 1} and summary["best"]["trial_id"] == "full"


def test_trials_that_repeat_an_earlier_policy_are_named():
    """Two learners' trials (their own hyperparameters) converged to one policy and both were fine-tuned:
    the summary says so instead of showing them as two results."""
    policy = {"keep_ratios": {"conv1": 0.5, "conv2": 0.75}, "dropped_blocks": []}
    trials = [{**record(t), "policy": p} for t, p in (("a", policy), ("b", {**policy, "keep_ratios": {"conv1": 0.5,
              "conv2": 0.5}}), ("c", dict(policy)))]
    summary = summary_of(trials)
    assert summary["repeated_policies"] == [{"trial_id": "c", "same_as": "a"}]
    assert "note: 1 trial repeated an earlier trial's policy (c = a)" in format_summary(summary)
    assert summary_of(trials[:2])["repeated_policies"] == [] and "repeated" not in format_summary(summary_of(trials[:2]))


def test_a_proxy_policy_trained_again_at_full_fidelity_is_no_repeat():
    """A two-stage search promotes its best proxies: the full trial of a proxy's policy is by design."""
    policy = {"keep_ratios": {"conv1": 0.5}, "dropped_blocks": []}
    proxy = {**record("p"), "policy": policy, "params": {"finetune_epochs": 0}}
    full = {**record("f"), "policy": dict(policy)}
    assert summary_of([proxy, full])["repeated_policies"] == []
