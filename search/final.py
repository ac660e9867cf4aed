"""The final fine-tune of a chosen policy: ``prunetune finetune RUN_DIR`` (and ``final`` at the end of run).

A search scores policies with short fine-tunes; the one it chooses deserves a long one. This
prunes the trained base model to the chosen trial's policy again (the same criterion and
recalibration as the trial), fine-tunes it for ``final.epochs`` with the search's recipe at
``final.lr``, optionally distilling from the unpruned base model (``pruning/distill.py``), and
evaluates and measures it like a trial. It runs in this process, not on Ray: it is one job.

Everything lives in ``RUN_DIR/final/<trial>-<plan>/``: the plan (what is being trained), the last
epoch's checkpoint (written atomically), and ``result.json`` when done. Run the same command again
after a kill and it continues from the checkpoint; once done it prints the recorded result. The
result goes into ``summary.json`` as ``final`` and into MLflow as a child run tagged final.

Several candidates (``final.candidates`` > 1, ``final.heuristics``; ``run_finals``): a trial's short
fine-tune ranks policies poorly at the final's budget (BENCHMARKS.md, "Search quality": Kendall's tau
about 0), so the top few trials by validation accuracy, and the warm start's heuristics, each get the
final in their own plan folder, and the one with the best final *validation* accuracy is chosen
(multi-fidelity's last rung, as successive halving keeps the best at each budget: Jamieson and
Talwalkar, AISTATS 2016). The cost is one final fine-tune per candidate.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prunetune.pruning.errors import UserError

FINAL_DIR = "final"
PLAN_FILE = "plan.json"
RESULT_FILE = "result.json"
CHECKPOINT = "checkpoint"

Log = Callable[[str], None]


def final_plan(record: dict, final, recipe) -> dict:
    """What a final fine-tune trains: the trial's policy, the recipe and the distillation settings."""
    return {"trial_id": record["trial_id"], "policy": record["policy"], "recipe": asdict(recipe),
            "distill": bool(final.distill),
            "distill_weight": final.distill_weight if final.distill else None,
            "temperature": final.temperature if final.distill else None}


def plan_folder(run_dir: Path, plan: dict) -> Path:
    """``RUN_DIR/final/<trial>-<hash of the plan>``: another plan never resumes this one's checkpoint."""
    digest = hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:8]
    return Path(run_dir) / FINAL_DIR / f"{plan['trial_id']}-{digest}"


def _check_epochs(final) -> None:
    if final.epochs < 1:
        raise UserError(f"a final fine-tune needs at least 1 epoch, got {final.epochs}; pass --epochs N")


class _Setup:
    """The ``TrialSetup`` of the finals, prepared (the base model loaded, the data split) at most once,
    and only when a final has training to do: finished ones are read back."""

    def __init__(self, cfg, run_dir: Path, cache_dir: Path | None, log: Log, setup=None) -> None:
        self._args = (cfg, run_dir, cache_dir, log)
        self._setup = setup

    def get(self):
        if self._setup is None:
            from prunetune.search.driver import prepare

            cfg, run_dir, cache_dir, log = self._args
            _, self._setup, _ = prepare(cfg, run_dir=run_dir, cache_dir=cache_dir, log=log)
        return self._setup


def _final_of(run_dir: Path, record: dict, final, cfg, setups: _Setup, log: Log) -> dict:
    """The final fine-tune of the trial ``record`` with the ``final`` settings (a
    ``search.config.FinalSection``): read back when done, else trained (continuing from its
    checkpoint after a kill); the result is written to its plan folder and returned."""
    from prunetune.pruning.policy import Policy
    from prunetune.tracking.rundir import write_json_atomically

    recipe = replace(cfg.finetune.recipe(), epochs=final.epochs, lr=final.lr)
    plan = final_plan(record, final, recipe)
    folder = plan_folder(run_dir, plan)
    if (folder / RESULT_FILE).exists():
        log(f"the final fine-tune of trial {record['trial_id']} with these settings is done; its result:")
        return json.loads((folder / RESULT_FILE).read_text())
    setup = setups.get()  # before the plan folder: a refused preparation leaves nothing behind
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomically(folder / PLAN_FILE, plan)
    setup = replace(setup, finetune=recipe, distillation=_distillation(setup, final, recipe))
    resume_from = folder / CHECKPOINT if (folder / CHECKPOINT).is_dir() else None
    log(f"final fine-tune of trial {record['trial_id']}: {final.epochs} epochs at lr {final.lr:g}"
        f"{f', distilled from the base model (T {final.temperature:g}, w {final.distill_weight:g})' if final.distill else ''}"
        f"{' (continuing from its checkpoint)' if resume_from else ''}; in {folder}")

    from prunetune.search.trial import run_trial

    result = run_trial(setup, Policy.from_json(record["policy"]), seed=cfg.seed,  # the final is reported:
                       report=_reporter(folder, final.epochs, log), checkpoint_dir=resume_from,
                       evaluate_test=True)  # it scores the test split whatever search.test_eval says
    out = {**plan, "fidelity": "final", "folder": str(folder.relative_to(run_dir)),
           "checkpoint": str((folder / CHECKPOINT).relative_to(run_dir)),
           "trial_val_accuracy": (record.get("metrics") or {}).get("val_accuracy"),
           "trial_test_accuracy": record.get("test_accuracy"),
           **{key: result[key] for key in ("val_accuracy", "test_accuracy", "macs", "params", "macs_ratio",
                                           "params_ratio", "latency_ms", "trial_seconds", "history")
              if key in result}}
    write_json_atomically(folder / RESULT_FILE, out)
    return out


@dataclass(frozen=True)
class Candidate:
    """A trial that gets the final fine-tune: its trials.jsonl record and, when its policy is a warm
    start's heuristic (``methods.heuristics``), that heuristic's name."""

    record: Mapping[str, Any]
    heuristic: str | None = None


def final_candidates(records: Sequence[Mapping], heuristics: Mapping[str, Mapping], *, macs_limit: float,
                     count: int, with_heuristics: bool) -> list[Candidate]:
    """The trials a multi-candidate final fine-tunes, best trial validation accuracy first (ties: fewer
    MACs, then the earlier trial, as ``search.summary.best_trial`` breaks them): the ``count`` best
    distinct policies among the finished full-fidelity trials within ``macs_limit``, and with
    ``with_heuristics`` every heuristic (name -> policy JSON, ``tracking.rundir.read_heuristics``)
    that has such a trial. A trial is a heuristic's when its policy is the heuristic's (as
    ``methods.heuristics.heuristic_summary`` finds them); one policy is one candidate, its best trial."""
    from prunetune.pruning.policy import Policy
    from prunetune.search.summary import best_trial

    # best_trial of one record: whether it is finished, full fidelity, scored and within the limit
    feasible = [r for r in records if r.get("policy") and best_trial([r], macs_limit=macs_limit) is not None]
    ranked = sorted(feasible, key=lambda r: (-r["metrics"]["val_accuracy"], r["metrics"].get("macs") or 0))
    by_policy: dict[str, Mapping] = {}
    for record in ranked:
        by_policy.setdefault(Policy.from_json(record["policy"]).key(), record)  # the best trial of each policy
    names = _heuristic_names(heuristics)
    chosen = list(by_policy)[:count]
    if with_heuristics:
        chosen += [key for key in names if key in by_policy and key not in chosen]
    order = list(by_policy)  # the ranking, best first
    return [Candidate(by_policy[key], names.get(key)) for key in sorted(chosen, key=order.index)]


def choose(results: Sequence[Mapping]) -> int:
    """The index of the best final validation accuracy among ``results`` (ordered as the candidates,
    best trial validation first, so a tie goes to the better trial). Never the test split."""
    return max(range(len(results)), key=lambda i: (results[i]["val_accuracy"], -i))


CHOSEN_BY = "final validation accuracy"


def run_finals(run_dir: Path, *, final, cache_dir: Path | None, log: Log, setup=None,
               trial: str | None = None) -> dict:
    """The final fine-tune (each in its own plan folder, each resumable) of every candidate
    (``final_candidates`` with ``final.candidates`` and ``final.heuristics``), or of ``trial``
    ('best' or an id) alone when given; returns the chosen one's result (best final validation
    accuracy, ``choose``) with ``candidates`` (one row each, in candidate order) and ``chosen_by``.

    ``setup`` is the search's ``TrialSetup`` when the search itself runs this (the data and the base
    model are then at hand); without it they are prepared from the cache in ``cache_dir``, once, and
    only if some candidate has training left.

    This is the last rung of multi-fidelity: the short fine-tunes of the trials rank policies poorly
    at the final's budget, so the top few are compared at that budget, on validation."""
    from prunetune.pruning.policy import Policy
    from prunetune.search.commands.export_cmd import find_trial
    from prunetune.search.config import load_config
    from prunetune.tracking.rundir import CONFIG_FILE, TRIALS_FILE, read_heuristics, read_trials

    _check_epochs(final)
    run_dir = Path(run_dir).expanduser().resolve()
    cfg = load_config(run_dir / CONFIG_FILE, saved=True)
    heuristics = read_heuristics(run_dir)
    if trial is not None:
        record = find_trial(run_dir, trial)
        candidates = [Candidate(record, _heuristic_names(heuristics).get(Policy.from_json(record["policy"]).key()))]
    else:
        find_trial(run_dir, "best")  # a one-line error when no trial meets the target
        candidates = final_candidates(read_trials(run_dir / TRIALS_FILE), heuristics,
                                      macs_limit=cfg.macs_target + cfg.macs_tolerance,
                                      count=final.candidates, with_heuristics=final.heuristics)
        if final.heuristics and not heuristics:
            log("final: this search had no warm-start heuristics, so only its best trials are candidates")
    if len(candidates) > 1:
        log(f"final fine-tune of {len(candidates)} candidates ({final.epochs} epochs each), the best by final "
            f"validation accuracy is kept: {', '.join(_label(c) for c in candidates)}")
    setups = _Setup(cfg, run_dir, cache_dir, log, setup)
    results = []
    for number, candidate in enumerate(candidates, start=1):
        result = _final_of(run_dir, dict(candidate.record), final, cfg, setups, log)
        results.append(result)
        log(f"final candidate {number}/{len(candidates)}: {_label(candidate)}, trial val "
            f"{_pct(result.get('trial_val_accuracy'))}, final val {_pct(result['val_accuracy'])}")
    best = choose(results)
    rows = [{"trial_id": c.record["trial_id"], "heuristic": c.heuristic,
             "trial_val_accuracy": r.get("trial_val_accuracy"), "val_accuracy": r["val_accuracy"],
             "test_accuracy": r.get("test_accuracy"), "macs_ratio": r["macs_ratio"], "folder": r["folder"],
             "chosen": i == best} for i, (c, r) in enumerate(zip(candidates, results, strict=True))]
    return {**results[best], "heuristic": candidates[best].heuristic, "candidates": rows, "chosen_by": CHOSEN_BY}


def _heuristic_names(heuristics: Mapping[str, Mapping]) -> dict[str, str]:
    """Policy key -> the name of the (first) heuristic with that policy."""
    from prunetune.pruning.policy import Policy

    names: dict[str, str] = {}
    for name, policy in heuristics.items():
        names.setdefault(Policy.from_json(policy).key(), name)
    return names


def _label(candidate: Candidate) -> str:
    trial_id = candidate.record["trial_id"]
    return f"trial {trial_id} ({candidate.heuristic})" if candidate.heuristic else f"trial {trial_id}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _distillation(setup, final, recipe):
    if not final.distill:
        return None
    from prunetune.pruning.distill import Distillation
    from prunetune.search.trial import build_base_model

    return Distillation(build_base_model(setup), temperature=final.temperature, weight=final.distill_weight,
                        label_smoothing=recipe.label_smoothing)


def _reporter(folder: Path, epochs: int, log: Log):
    """The trial's ``report``: each checkpoint replaces the last one atomically; each report one line,
    numbered as ``prunetune prune`` numbers its epochs: ``run_trial`` reports epoch 0 (the pruned
    model after BatchNorm recalibration, before any training), then epochs 1 to N (the last with
    the result, on the whole validation split)."""

    def report(metrics: dict, write_checkpoint) -> None:
        if write_checkpoint is not None:
            staging = folder / f".{CHECKPOINT}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            write_checkpoint(staging)
            old = folder / f".{CHECKPOINT}.old"
            if (folder / CHECKPOINT).exists():
                shutil.rmtree(old, ignore_errors=True)
                (folder / CHECKPOINT).rename(old)
            staging.rename(folder / CHECKPOINT)
            shutil.rmtree(old, ignore_errors=True)
        if metrics.get("epoch") == 0:
            log(f"  final: pruned, val accuracy {metrics['val_accuracy']:.4f} after BatchNorm recalibration")
        elif "epoch" in metrics:
            log(f"  final epoch {metrics['epoch']}/{epochs}: val accuracy {metrics['val_accuracy']:.4f}")

    return report


def record_final(run_dir: Path, result: dict, log: Log) -> None:
    """``result`` (``run_finals``') into summary.json (as ``final``) and into MLflow: the chosen one a
    child run tagged final, every other candidate a child run tagged final_candidate."""
    from prunetune.tracking.rundir import SUMMARY_FILE, read_meta, write_json_atomically

    summary_path = Path(run_dir) / SUMMARY_FILE
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary["final"] = {key: value for key, value in result.items() if key != "history"}
        write_json_atomically(summary_path, summary)
    others = [{**json.loads((Path(run_dir) / row["folder"] / RESULT_FILE).read_text()), "heuristic": row["heuristic"]}
              for row in result.get("candidates") or [] if not row["chosen"]]
    meta = read_meta(Path(run_dir))
    try:
        from prunetune.tracking.tracker import Tracker

        tracker = Tracker(meta["tracking_uri"], meta["experiment"])
        for other in others:
            tracker.log_final(meta["parent_run_id"], other, chosen=False)
        tracker.log_final(meta["parent_run_id"], result)
    except Exception as exc:  # noqa: BLE001 - the run directory holds the result; MLflow is a view of it
        log(f"prunetune: warning: could not log the final fine-tune to MLflow ({type(exc).__name__}: {exc})")


def format_final(result: dict) -> str:
    """Two lines: the chosen trial's short fine-tune against the final one; with several candidates,
    a small table of them (the chosen one starred) and what chose it."""
    lines = [f"final fine-tune of trial {result['trial_id']} ({len(result.get('history') or []) - 1} epochs"
             f"{', distilled' if result['distill'] else ''}): val {_pct(result['val_accuracy'])}, test "
             f"{_pct(result.get('test_accuracy'))}, MACs ratio {result['macs_ratio']:.3f}",
             f"  the trial's own fine-tune: val {_pct(result.get('trial_val_accuracy'))}, test "
             f"{_pct(result.get('trial_test_accuracy'))}"]
    rows = result.get("candidates") or []
    if len(rows) > 1:
        lines += [f"  chosen by {result['chosen_by']} among {len(rows)} candidates (*):",
                  f"    {'trial':<12}{'heuristic':<13}{'trial val':>10}{'final val':>11}{'final test':>12}"
                  f"{'MACs ratio':>12}"]
        lines += [f"  {'*' if row['chosen'] else ' '} {row['trial_id']:<12}{row['heuristic'] or '-':<13}"
                  f"{_pct(row['trial_val_accuracy']):>10}{_pct(row['val_accuracy']):>11}"
                  f"{_pct(row['test_accuracy']):>12}{row['macs_ratio']:>12.3f}" for row in rows]
    return "\n".join(lines)
