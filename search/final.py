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
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

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


def run_final(run_dir: Path, *, trial: str, final, cache_dir: Path | None, log: Log, setup=None) -> dict:
    """Fine-tune ``trial`` ('best' or an id) of the search in ``run_dir`` with the ``final`` settings
    (a ``search.config.FinalSection``); return the result (also written to the run directory).

    ``setup`` is the search's ``TrialSetup`` when the search itself runs this (the data and the base
    model are then at hand); without it they are prepared from the cache in ``cache_dir``."""
    from prunetune.pruning.policy import Policy
    from prunetune.search.commands.export_cmd import find_trial
    from prunetune.search.config import load_config
    from prunetune.search.driver import prepare
    from prunetune.tracking.rundir import CONFIG_FILE, write_json_atomically

    if final.epochs < 1:
        raise UserError(f"a final fine-tune needs at least 1 epoch, got {final.epochs}; pass --epochs N")
    run_dir = Path(run_dir).expanduser().resolve()
    record = find_trial(run_dir, trial)
    cfg = load_config(run_dir / CONFIG_FILE, saved=True)
    recipe = replace(cfg.finetune.recipe(), epochs=final.epochs, lr=final.lr)
    plan = final_plan(record, final, recipe)
    folder = plan_folder(run_dir, plan)
    if (folder / RESULT_FILE).exists():
        log(f"the final fine-tune of trial {record['trial_id']} with these settings is done; its result:")
        return json.loads((folder / RESULT_FILE).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomically(folder / PLAN_FILE, plan)
    if setup is None:
        _, setup, _ = prepare(cfg, run_dir=run_dir, cache_dir=cache_dir, log=log)
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


def _distillation(setup, final, recipe):
    if not final.distill:
        return None
    from prunetune.pruning.distill import Distillation
    from prunetune.search.trial import build_base_model

    return Distillation(build_base_model(setup), temperature=final.temperature, weight=final.distill_weight,
                        label_smoothing=recipe.label_smoothing)


def _reporter(folder: Path, epochs: int, log: Log):
    """The trial's ``report``: each checkpoint replaces the last one atomically; each epoch one line."""

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
        if "epoch" in metrics and "test_accuracy" not in metrics:
            log(f"  final epoch {metrics['epoch']}/{epochs}: val accuracy {metrics['val_accuracy']:.4f}")

    return report


def record_final(run_dir: Path, result: dict, log: Log) -> None:
    """``result`` into summary.json (as ``final``) and into MLflow (a child run tagged final)."""
    from prunetune.tracking.rundir import SUMMARY_FILE, read_meta, write_json_atomically

    summary_path = Path(run_dir) / SUMMARY_FILE
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary["final"] = {key: value for key, value in result.items() if key != "history"}
        write_json_atomically(summary_path, summary)
    meta = read_meta(Path(run_dir))
    try:
        from prunetune.tracking.tracker import Tracker

        Tracker(meta["tracking_uri"], meta["experiment"]).log_final(meta["parent_run_id"], result)
    except Exception as exc:  # noqa: BLE001 - the run directory holds the result; MLflow is a view of it
        log(f"prunetune: warning: could not log the final fine-tune to MLflow ({type(exc).__name__}: {exc})")


def format_final(result: dict) -> str:
    """Two lines: the trial's short fine-tune against the final one."""
    def pct(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    return (f"final fine-tune of trial {result['trial_id']} ({len(result.get('history') or []) - 1} epochs"
            f"{', distilled' if result['distill'] else ''}): val {pct(result['val_accuracy'])}, test "
            f"{pct(result.get('test_accuracy'))}, MACs ratio {result['macs_ratio']:.3f}\n"
            f"  the trial's own fine-tune: val {pct(result.get('trial_val_accuracy'))}, test "
            f"{pct(result.get('trial_test_accuracy'))}")
