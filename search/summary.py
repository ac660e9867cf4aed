"""The end of a search: the best trial, the Pareto front, counts, and a readable table.

The best trial is the most accurate on *validation* among finished full-fidelity trials within the
MACs budget (``macs_ratio <= macs_target + tolerance``; a searcher's proxy trials are not among
them); test accuracy is reported beside it, never used to choose. The Pareto front
is validation accuracy against MACs over the finished full-fidelity trials: a searcher's proxy
trials (scored after BatchNorm recalibration or a shorter fine-tune) are counted apart
(``fidelity``), never set against fully fine-tuned ones. A two-stage search's ``fidelity`` also
says how many trials it promoted and how well the proxy ranked them (``search.two_stage``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prunetune.tracking.names import fidelity_of
from prunetune.tracking.pareto import pareto_front
from prunetune.tracking.rundir import STATUS_FAILED, STATUS_FINISHED, STATUS_STOPPED


def _point(record: Mapping) -> dict:
    m = record.get("metrics") or {}
    return {"trial_id": record["trial_id"], "trial_key": record["trial_key"],
            "val_accuracy": m.get("val_accuracy"), "test_accuracy": record.get("test_accuracy"),
            "macs": m.get("macs"), "params": m.get("params"), "macs_ratio": m.get("macs_ratio"),
            "params_ratio": m.get("params_ratio"), "latency_ms": m.get("latency_ms"),
            "policy": record.get("policy")}


def front_points(records: Sequence[Mapping]) -> list[dict]:
    """The Pareto front (validation accuracy against MACs) of the finished full-fidelity trials."""
    full = [r for r in records if r["status"] == STATUS_FINISHED and fidelity_of(r.get("params") or {}) == "full"]
    return pareto_front([_point(r) for r in full], x="macs", y="val_accuracy")


def best_trial(records: Sequence[Mapping], *, macs_limit: float) -> dict | None:
    """The finished full-fidelity trial (not a searcher's proxy) with the highest validation accuracy
    within ``macs_limit``, or None. Its test accuracy is scored at the search's end (``search.test_eval``)."""
    feasible = [_point(r) for r in records if r["status"] == STATUS_FINISHED
                and (r.get("metrics") or {}).get("macs_ratio", 1e9) <= macs_limit + 1e-9
                and (r.get("metrics") or {}).get("val_accuracy") is not None
                and fidelity_of(r.get("params") or {}) == "full"]
    return max(feasible, key=lambda p: (p["val_accuracy"], -(p["macs"] or 0)), default=None)


def build_summary(*, name: str, method: str, baseline: Mapping, records: Sequence[Mapping],
                  macs_target: float, macs_tolerance: float, wall_s: float,
                  first_failure: Mapping | None = None, two_stage: Mapping | None = None) -> dict:
    """``summary.json``: see README ("The run directory"). ``first_failure``: the first failed
    trial's id, cause and traceback file (``search.failures``), when a trial failed; ``two_stage``:
    the config's ``fidelity`` section of a two-stage search (promote > 0), else None."""
    finished = [r for r in records if r["status"] == STATUS_FINISHED]
    full = [r for r in finished if fidelity_of(r.get("params") or {}) == "full"]
    front = front_points(records)
    best = best_trial(records, macs_limit=macs_target + macs_tolerance)
    counts = {status: sum(1 for r in records if r["status"] == status)
              for status in (STATUS_FINISHED, STATUS_FAILED, STATUS_STOPPED)}
    fidelity = {"full": len(full), "proxy": len(finished) - len(full)}  # finished trials by fidelity
    if two_stage:
        from prunetune.search.two_stage import promotion_summary

        fidelity.update(promotion_summary(records), promote=two_stage["promote"],
                        proxy_epochs=two_stage["proxy_epochs"], proxy_data_fraction=two_stage["proxy_data_fraction"])
    return {
        "name": name, "method": method, "macs_target": macs_target,
        "baseline": {k: baseline.get(k) for k in ("val_accuracy", "test_accuracy", "macs", "params",
                                                   "latency_ms", "latency_median_ms", "latency_iqr_ms",
                                                   "latency_repeats", "latency_load_avg", "latency_threads",
                                                   "latency_cpus")},  # all of the base model's metrics: sync logs them
        "best": None if best is None else {k: best[k] for k in (
            "trial_id", "val_accuracy", "test_accuracy", "macs", "params", "macs_ratio", "params_ratio",
            "latency_ms", "policy")},
        "pareto": [{k: p[k] for k in ("trial_id", "trial_key", "val_accuracy", "test_accuracy", "macs",
                                      "macs_ratio", "params")} for p in front],
        "trials": counts,
        "fidelity": fidelity,
        "first_failure": dict(first_failure) if first_failure else None,
        "latency_warning": _latency_warning(baseline, records, best),
        "repeated_policies": repeated_policies(records),
        "wall_s": round(wall_s, 1),
    }


def repeated_policies(records: Sequence[Mapping]) -> list[dict]:
    """``{trial_id, same_as}`` of each finished full trial whose policy (``Policy.key``: every keep ratio
    to 1e-6, the dropped blocks) an earlier finished full trial already had (a proxy's policy trained
    again at full fidelity, a two-stage search's promotion, is no repeat): learners' trials, each with its
    own hyperparameters, may converge to one policy, and each is fine-tuned all the same."""
    from prunetune.pruning.policy import Policy

    first: dict[str, str] = {}
    repeated = []
    for record in records:
        if record["status"] != STATUS_FINISHED or not record.get("policy") \
                or fidelity_of(record.get("params") or {}) != "full":  # a proxy promoted to full is by design
            continue
        key = Policy.from_json(record["policy"]).key()
        if key in first:
            repeated.append({"trial_id": record["trial_id"], "same_as": first[key]})
        else:
            first[key] = record["trial_id"]
    return repeated


def _latency_warning(baseline: Mapping, records: Sequence[Mapping], best: Mapping | None) -> str | None:
    """Why the best trial's latency ratio to the base cannot be trusted (their spread or load), or None."""
    if best is None:
        return None
    from prunetune.pruning.measure import Latency, latency_warning  # torch: only where a search ends

    metrics = next((r.get("metrics") or {} for r in records if r["trial_id"] == best["trial_id"]), {})
    timings = [t for t in (Latency.from_json(baseline), Latency.from_json(metrics)) if t is not None]
    return latency_warning(*timings) if timings else None


def format_summary(summary: Mapping) -> str:
    """A short human table: the baseline, the Pareto front, the best trial."""
    base = summary["baseline"]
    lines = [f"search '{summary['name']}' ({summary['method']}): "
             f"{summary['trials']['finished']} finished, {summary['trials']['stopped']} stopped early, "
             f"{summary['trials']['failed']} failed in {summary['wall_s'] / 60:.1f} min",
             *_failure_lines(summary),
             *([f"warning: {summary['latency_warning']}"] if summary.get("latency_warning") else []),
             *_repeat_lines(summary),
             f"base model: val {base['val_accuracy']:.4f}, test {base['test_accuracy']:.4f}, "
             f"{human_count(base['macs'])} MACs, {human_count(base['params'])} params", "",
             "Pareto front (validation accuracy against MACs)" + _proxies_apart(summary) + ":",
             f"  {'trial':<14}{'val acc':>9}{'test acc':>10}{'MACs':>10}{'MACs ratio':>12}{'params':>10}"]
    for p in summary["pareto"]:
        test = "-" if p.get("test_accuracy") is None else f"{p['test_accuracy']:.4f}"
        lines.append(f"  {p['trial_id']:<14}{p['val_accuracy']:>9.4f}{test:>10}{human_count(p['macs']):>10}"
                     f"{p['macs_ratio']:>12.3f}{human_count(p['params']):>10}")
    best = summary.get("best")
    lines.append("")
    if best is None:
        lines.append(f"no finished trial met the MACs target {summary.get('macs_target')}")
    else:
        lines.append(f"best within the MACs target: trial {best['trial_id']}, val {best['val_accuracy']:.4f}, "
                     f"test {_accuracy(best['test_accuracy'])}, MACs ratio {best['macs_ratio']:.3f}")
    lines.extend(_heuristic_lines(summary))
    lines.extend(_two_stage_lines(summary))
    return "\n".join(lines)


def _repeat_lines(summary: Mapping) -> list[str]:
    """One line naming the trials that repeated an earlier trial's policy, if any did."""
    repeats = summary.get("repeated_policies") or []
    if not repeats:
        return []
    pairs = ", ".join(f"{r['trial_id']} = {r['same_as']}" for r in repeats[:6]) + (", ..." if len(repeats) > 6 else "")
    return [f"note: {len(repeats)} trial{'s' * (len(repeats) != 1)} repeated an earlier trial's policy ({pairs}): "
            f"their fine-tunes measured one policy again"]


def _proxies_apart(summary: Mapping) -> str:
    """The front's title note when proxy trials are left off it (their scores are not the full trials')."""
    proxies = (summary.get("fidelity") or {}).get("proxy") or 0
    return f", full-fidelity trials only ({proxies} proxy trial{'s' * (proxies != 1)} apart)" if proxies else ""


def _two_stage_lines(summary: Mapping) -> list[str]:
    """A two-stage search's one line: proxies, promoted, and the proxy's Kendall's tau against the full score."""
    fidelity = summary.get("fidelity") or {}
    if "kendall_tau" not in fidelity:
        return []
    tau = fidelity["kendall_tau"]
    rank = (f"Kendall's tau {tau:+.3f} over {fidelity['tau_pairs']} pairs" if tau is not None
            else f"Kendall's tau n/a ({fidelity.get('tau_note')})")
    epochs = fidelity["proxy_epochs"]
    proxy = "BatchNorm recalibration only" if epochs == 0 else f"{epochs} epoch{'s' * (epochs != 1)}"
    return [f"two-stage: {fidelity['proxy']} proxy trials ({proxy} on {fidelity['proxy_data_fraction']:g} of the "
            f"training split), {fidelity['promoted']} promoted to the full fine-tune; proxy against full "
            f"validation accuracy: {rank}"]


def _heuristic_lines(summary: Mapping) -> list[str]:
    """The warm start's heuristics and the best trial's margin over the best of them (val and test);
    a heuristic with no finished trial is named with why (its trial ``failed``, ``stopped``, ``not run``)."""
    heuristics = summary.get("heuristics")
    if not heuristics or not heuristics.get("policies"):
        return []
    rows = heuristics["policies"]
    scored = [f"{name} {row['val_accuracy']:.4f}" for name, row in rows.items() if row.get("val_accuracy") is not None]
    missing = [f"{name} ({row.get('status') or 'not run'})" for name, row in rows.items()
               if row.get("val_accuracy") is None]
    margin = heuristics.get("best_margin") or {}
    line = "heuristics (val): " + ", ".join(scored or ["none finished"])
    if margin:
        test = f", test {margin['test_accuracy']:+.4f}" if margin.get("test_accuracy") is not None else ""
        line += f"; the best trial is {margin['val_accuracy']:+.4f} val{test} against the best of them"
    if missing:
        line += f"; no finished trial: {', '.join(missing)}"
    return [line]


def _failure_lines(summary: Mapping) -> list[str]:
    failure = summary.get("first_failure")
    if not failure:
        return []
    return [f"first failure: trial {failure['trial_id']} with {failure['cause']}; traceback in {failure['log']}"]


def human_count(count: float | None) -> str:
    """A count (MACs, parameters) in short units, the same in every output: 40812544 -> '40.81M',
    1234 -> '1.23K', 999 -> '999', None -> '-'."""
    if count is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:g}"


def _accuracy(value) -> str:
    return "-" if value is None else f"{value:.4f}"


